"""What does distilling a context save when serving? The teacher is a base model with a long
prompt on every request; the student is the same base with a LoRA adapter and the short prompt.

One run, the same requests (`distill.evaluation.load.measure`: streaming chat requests, every
reply exactly `--max-tokens` long via `ignore_eos`) at each concurrency level, against:

  1. one `distill serve` of the base with the adapter (many students on one base): the
     teacher's requests (the whole conversation) to the base, the student's (its own view) to
     the adapter; once with vLLM's prefix caching on (its default: the prompt shared by every
     request is computed once and reused) and once off (every request pays its whole prompt);
  2. the adapter merged into the base, served alone (one student, no LoRA kernels), with the
     student's requests.

Prints output tokens/s, TTFT p50/p95 and TPOT p50 per row, and the student/teacher TTFT ratios.

    python benchmarks/context_serving.py --base DIR --adapter DIR --corpus DIR
        [--requests N] [--max-tokens N] [--concurrency 1 8] [--quick]

`--corpus`: a corpus made with `distill generate --student-view` (its records' `messages` are the
teacher's requests, `student_messages` the student's), e.g. the held-out corpus of
`experiments/context_distillation.py`. Without it (and with `--quick`): the tiny test Llama as the
base, a random LoRA adapter and a synthetic 60-word system prompt, which compare the serving
paths, not real models.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import Headline, emit, parse_args, tiny_models

METRICS = (("tokens_per_s", "tok/s"), ("ttft_ms_p50", "TTFT p50 ms"), ("ttft_ms_p95", "TTFT p95 ms"),
           ("tpot_ms_p50", "TPOT p50 ms"))


def synthetic_requests(n: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """A long system prompt + question (the teacher's request) and the question alone (the student's)."""
    system = "You are the assistant of a store. Be polite, short and exact. " * 5
    questions = [f"What does item {i} cost, and when can it arrive?" for i in range(n)]
    return ([[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions],
            [[{"role": "user", "content": q}] for q in questions])


def corpus_requests(root: Path) -> tuple[list[list[dict]], list[list[dict]]]:
    from distill import corpus

    records = list(corpus.iter_records(root))
    if not records or corpus.STUDENT_MESSAGES not in records[0]:
        raise SystemExit(f"`{root}`: no `{corpus.STUDENT_MESSAGES}` column: make it with `distill generate --student-view`")
    return [r["messages"] for r in records], [r[corpus.STUDENT_MESSAGES] for r in records]


def random_adapter(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=8, target_modules="all-linear", init_lora_weights=False)).save_pretrained(out)
    return out


def merged(base: Path, adapter: Path, out: Path) -> Path:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    AutoPeftModelForCausalLM.from_pretrained(adapter).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)  # a bare adapter directory may hold no tokenizer
    return out


def served(cfg, requests: dict[str, list[list[dict]]], args) -> dict[str, list[dict]]:
    """Start one server with `cfg`, measure each model name's requests, stop it."""
    from distill.evaluation.load import measure
    from distill.launcher import start_server

    server = start_server(cfg)
    try:
        return {name: measure(server.url, name, conversations, args.concurrency, args.requests, args.max_tokens)
                for name, conversations in requests.items()}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, help="base model directory (default: the tiny test Llama)")
    ap.add_argument("--adapter", type=Path, help="the student's LoRA adapter (default: a random one on the tiny base)")
    ap.add_argument("--corpus", type=Path, help="student-view corpus whose records give both requests")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    args = parse_args(ap, argv, quick={"requests": 8, "max_tokens": 8, "concurrency": [1, 4]})

    from distill.config import ServeConfig

    scratch = Path(tempfile.mkdtemp(prefix="context-serving-"))
    base = args.base or tiny_models()["llama-teacher"]
    adapter = args.adapter or random_adapter(base, scratch / "adapter")
    teacher_requests, student_requests = corpus_requests(args.corpus) if args.corpus else synthetic_requests(32)
    requests = {"teacher": teacher_requests, "student": student_requests}
    common = dict(port=0, max_model_len=args.max_model_len)
    rows = {}
    for caching, extra in (("on", []), ("off", ["--no-enable-prefix-caching"])):
        one_base = served(ServeConfig(model=str(base), served_model_name="teacher", lora=[f"student={adapter}"],
                                      vllm_args=extra, **common), requests, args)
        rows[f"teacher with the prompt, prefix caching {caching}"] = one_base["teacher"]
        rows[f"student (LoRA on the same server), prefix caching {caching}"] = one_base["student"]
    rows["student merged, served alone, prefix caching on"] = served(ServeConfig(
        model=str(merged(base, adapter, scratch / "merged")), served_model_name="student", **common),
        {"student": student_requests}, args)["student"]

    prompt_words = [sum(len(m["content"].split()) for m in c) for c in (teacher_requests[0], student_requests[0])]
    print(f"\n{len(teacher_requests)} requests; first request: teacher {prompt_words[0]} words of prompt, "
          f"student {prompt_words[1]}; {args.max_tokens} output tokens each")
    width = max(map(len, rows))
    for level, c in enumerate(args.concurrency):
        print(f"\nconcurrency {c}")
        print(" " * width + "".join(f"{label:>14}" for _, label in METRICS))
        for name, measured in rows.items():
            print(name.ljust(width) + "".join(f"{measured[level][key]:>14.1f}" for key, _ in METRICS))
    headlines = []
    for caching in ("on", "off"):
        teacher = rows[f"teacher with the prompt, prefix caching {caching}"]
        for name in (f"student (LoRA on the same server), prefix caching {caching}",
                     *(["student merged, served alone, prefix caching on"] if caching == "on" else [])):
            ratios = [s["ttft_ms_p50"] / t["ttft_ms_p50"] for s, t in zip(rows[name], teacher)]
            print(f"TTFT p50, {name} / teacher: " + ", ".join(
                f"{r:.2f} at concurrency {c}" for r, c in zip(ratios, args.concurrency)))
            headlines.append(Headline(f"TTFT p50 at concurrency {args.concurrency[0]}: {name}",
                                      f"{rows[name][0]['ttft_ms_p50']:.0f} ms",
                                      f"{ratios[0]:.2f} of the teacher with the prompt"))
    return headlines


if __name__ == "__main__":
    emit(main())
