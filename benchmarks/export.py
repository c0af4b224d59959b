"""What each GGUF type of `distill export` costs: size, llama.cpp speed and memory, fidelity.

For each type (f16, q8_0, q4_0) the student is exported and run by llama.cpp (llama-cpp-python,
the `edge` extra): file size; prompt and generation tokens/s at `--threads` threads and the
process's peak RSS (each type in a fresh process, so the peak is its own); on `--n` held-out
prompts, the mean per-token KL(float student || file) and, with `--teacher`, KL(teacher || file),
both along the float student's greedy answers (teacher-forced, every answer position), top-1
agreement with the float student there, and how many of the file's own greedy answers are
identical to the float student's. The float student runs in transformers (float32).

    python benchmarks/export.py [--student DIR] [--teacher DIR] [--prompts FILE] [--n 100]
                                [--max-tokens 32] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, Headline, emit, parse_args

TYPES = ("f16", "q8_0", "q4_0")
DEMO = ROOT / "distill" / "demo"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's ru_maxrss, it starts afresh at
    exec, so it is not the forking parent's)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def speed(path: Path, threads: int, prompt_tokens: int, gen_tokens: int) -> dict:
    """Run in its own process: llama.cpp's prompt and generation speed, and the peak RSS."""
    import llama_cpp

    before = peak_rss_mib()
    llm = llama_cpp.Llama(str(path), n_ctx=prompt_tokens + gen_tokens + 8, n_threads=threads, n_batch=prompt_tokens,
                          verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # without logits_all, llama-cpp-python keeps no scores: llama.cpp's own
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    prompt = [int(i) for i in np.random.default_rng(0).integers(10, n_vocab, size=prompt_tokens)]
    pp, tg = [], []
    for _ in range(5):  # best of 5: the machine is shared
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        pp.append(prompt_tokens / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([int(np.argmax(last_logits()))])
        tg.append(gen_tokens / (time.perf_counter() - start))
    llm.close()
    return {"prompt_tps": max(pp), "gen_tps": max(tg), "peak_rss_mib": peak_rss_mib(), "base_rss_mib": before}


def float_reference(student: Path, teacher: Path | None, prompts: list[list[dict]], max_tokens: int) -> list[dict]:
    """Per prompt: the prompt's ids, the float student's greedy answer, the float student's and the
    teacher's log-probs at each answer position (transformers, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    other = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval() if teacher else None
    refs = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            answer = out[0, len(ids):].tolist()
            whole = torch.tensor([ids + answer])
            span = slice(len(ids) - 1, len(ids) + len(answer) - 1)  # position t predicts token t + 1
            ref = {"prompt": ids, "answer": answer, "eos": tokenizer.eos_token_id,
                   "student": torch.log_softmax(model(whole).logits[0, span].double(), -1).numpy()}
            if other is not None:
                ref["teacher"] = torch.log_softmax(other(whole).logits[0, span].double(), -1).numpy()
        refs.append(ref)
    return refs


def kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """KL(p || q) per position."""
    return (np.exp(p_log) * (p_log - q_log)).sum(-1)


def fidelity(path: Path, refs: list[dict]) -> dict:
    from llama_cpp import Llama

    longest = max(len(r["prompt"]) + len(r["answer"]) for r in refs)
    # One thread: the results do not depend on it, and on a busy machine llama.cpp's threads
    # wait for each other at every operation (measured: many times slower with 2 under load).
    llm = Llama(str(path), n_ctx=longest + 8, n_threads=1, logits_all=True, verbose=False)
    kl_student, kl_teacher, agree, identical = [], [], [], 0
    try:
        for ref in refs:
            llm.reset()
            llm.eval(ref["prompt"] + ref["answer"])
            n = len(ref["prompt"])
            got = log_softmax(np.array(llm.scores[n - 1:n - 1 + len(ref["answer"])]))
            kl_student.extend(kl(ref["student"], got))
            if "teacher" in ref:
                kl_teacher.extend(kl(ref["teacher"], got))
            agree.extend(ref["student"].argmax(-1) == got.argmax(-1))
            llm.reset()  # the file's own greedy answer, as far as the float student's went
            llm.eval(ref["prompt"])
            answer = []
            while len(answer) < len(ref["answer"]):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                answer.append(token)
                if token == ref["eos"]:
                    break
                llm.eval([token])
            identical += answer == ref["answer"]
    finally:
        llm.close()
    return {"kl_student": float(np.mean(kl_student)), "kl_teacher": float(np.mean(kl_teacher)) if kl_teacher else None,
            "top1": float(np.mean(agree)), "identical": identical, "prompts": len(refs)}


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", type=Path, default=DEMO / "teacher",
                    help="The model to export (default: the demo's shipped teacher, a trained 1.85M Llama).")
    ap.add_argument("--teacher", type=Path, help="Its teacher, for KL(teacher || file) (same tokenizer).")
    ap.add_argument("--prompts", type=Path, default=DEMO / "prompts" / "eval.jsonl", help="Held-out prompts (messages JSONL).")
    ap.add_argument("--n", type=int, default=100, help="Prompts to measure on.")
    ap.add_argument("--max-tokens", type=int, default=32, help="Greedy answer tokens.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="Prompt length of the speed run.")
    ap.add_argument("--gen-tokens", type=int, default=64, help="Generated tokens of the speed run.")
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    ap.add_argument("--also", type=Path, help="An existing GGUF of the same model (e.g. the one the student was "
                    "converted from) measured the same way, as one more row.")
    ap.add_argument("--speed", type=Path, help=argparse.SUPPRESS)  # internal: one file's speed run
    args = parse_args(ap, argv, quick={"n": 20, "max_tokens": 16, "prompt_tokens": 64, "gen_tokens": 32})
    if args.speed:
        print(json.dumps(speed(args.speed, args.threads, args.prompt_tokens, args.gen_tokens)))
        return []
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:  # `make bench` without the extra: a row that says so
        print("skipped: llama.cpp is not installed (pip install '.[edge]': llama-cpp-python, built from source)")
        return [Headline("GGUF export in llama.cpp", "skipped", "needs the `edge` extra")]
    from distill.config import ExportConfig
    from distill.export.job import export

    prompts = [json.loads(line)["messages"] for line in args.prompts.read_text().splitlines()[:args.n]]
    refs = float_reference(args.student, args.teacher, prompts, args.max_tokens)
    results = {}

    def measure(path: Path) -> dict:
        run = subprocess.run([sys.executable, __file__, "--speed", str(path), "--threads", str(args.threads),
                              "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)],
                             capture_output=True, text=True, check=True)
        return {"mib": path.stat().st_size / 2**20, **json.loads(run.stdout.strip().splitlines()[-1]),
                **fidelity(path, refs)}

    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.types:
            done = export(ExportConfig(student=str(args.student), outtype=outtype, out=Path(tmp) / f"student-{outtype}.gguf"))
            results[outtype] = measure(done.gguf)
    if args.also:
        results[args.also.name] = measure(args.also)
    base = min(r["base_rss_mib"] for r in results.values())
    print(f"{args.student}: llama.cpp (llama-cpp-python), {args.threads} threads; speed: {args.prompt_tokens}-token "
          f"prompt, {args.gen_tokens} generated tokens, best of 5; peak RSS: the whole process (Python + llama.cpp, {base:.0f} MiB before loading); fidelity: {len(refs)} held-out prompts of "
          f"{args.prompts.name}, the float32 student's greedy answers (<= {args.max_tokens} tokens)")
    width = max(6, *(len(name) + 1 for name in results))
    header = (f"{'type':<{width}}{'MiB':>9}{'prompt tok/s':>14}{'gen tok/s':>11}{'peak RSS MiB':>14}{'KL to float':>13}"
              f"{'KL to teacher':>15}{'top-1':>8}{'greedy identical':>18}")
    print(header)
    for outtype, r in results.items():
        teacher = f"{r['kl_teacher']:.5f}" if r["kl_teacher"] is not None else "-"
        print(f"{outtype:<{width}}{r['mib']:>9.2f}{r['prompt_tps']:>14,.0f}{r['gen_tps']:>11,.0f}{r['peak_rss_mib']:>14,.0f}"
              f"{r['kl_student']:>13.2e}{teacher:>15}{r['top1']:>8.3f}{r['identical']:>12}/{r['prompts']}")
    if refs and "teacher" in refs[0]:
        float_kl = np.mean(np.concatenate([kl(r["teacher"], r["student"]) for r in refs]))
        print(f"float32 student (transformers): KL to teacher {float_kl:.5f}")
    return [Headline(f"GGUF {t}: size, gen tok/s, KL to float", f"{r['mib']:.1f} MiB, {r['gen_tps']:,.0f} tok/s",
                     f"KL {r['kl_student']:.4f}, greedy identical {r['identical']}/{r['prompts']}")
            for t, r in results.items()]


if __name__ == "__main__":
    emit(main())
