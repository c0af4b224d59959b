"""A real teacher across tokenizers: SmolLM2-135M-Instruct's ShareGPT corpus trains a small
random-init student of another tokenizer (built here, offline), and the student is measured at
step 0 and at every checkpoint. Results in docs/results/cross-tokenizer.md ("A real teacher").

    OMP_NUM_THREADS=1 python experiments/cross_tokenizer_smollm2.py [--out runs/cross-smollm2] \
        [--seeds 0] [--arms span sft] [--steps 300] [--save-steps 50]

1. The student's tokenizer: byte-level BPE (`distill.tiny.build_tokenizer`, 8,192 tokens, digits
   not split, ChatML template) trained on ShareGPT first human turns (`distill.demo.sharegpt`),
   leaving out the held-out prompts. The teacher's is SmolLM2's 49,152-token BPE. The student:
   a random-init Llama (`distill.tiny.build_model`, tied embeddings), one init per seed.
2. Training: `distill.train.trainer.train` on the curated SmolLM2 corpus (185 records, top-20 at
   T=0.7 on ShareGPT prompts; made by the synth-vs-sharegpt run), full fine-tune, across
   tokenizers as `distill train` detects it; arms `span` (alpha 0.9) and `sft` (alpha 0: CE on the
   student's tokens of the teacher's text), same seed, init and data order; a checkpoint every
   `--save-steps`.
3. At step 0 and every checkpoint, on the 48 held-out prompts:
   - `cross_fidelity` along the teacher's greedy answers to them (aligned share, span KL, top-1
     agreement, the student's NLL per byte of the teacher's text);
   - the teacher's NLL per byte of the student's greedy answers (up to `--max-new-tokens`
     student tokens): SmolLM2 in transformers reads its own chat-template tokens of the prompt
     (stored with its answers) then its tokens of the student's answer text, as `distill eval`'s
     `teacher_nll_per_byte` does with a vLLM engine; summed by `nll_per_byte`. Repetitive text is
     cheap for the teacher too, so each row also says how repetitive the answers are.
`OUT/results.json` is rewritten after every measurement, so a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from distill import corpus, files

RUN = Path("/work/runs/synth-vs-sharegpt")
ARMS = {"span": {"alpha": 0.9}, "sft": {"alpha": 0.0}}
# hidden 256, 4 layers, head_dim 64: about 5M parameters with the 8,192-token tied embedding
STUDENT_SIZE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2)
MAX_POSITIONS = 1024  # held-out prompts are at most ~125 teacher tokens; answers up to 128


def held_out(prompts: Path) -> list[dict]:
    return [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]


def build_student(out: Path, seed: int, vocab_size: int, exclude: set[str]) -> Path:
    """The tokenizer (built once, from ShareGPT text minus the held-out prompts) and a random-init
    student of seed `seed` on it; kept if built."""
    from distill import tiny
    from distill.demo.sharegpt import first_turns

    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        texts = [text for _, text in first_turns() if text not in exclude]
        print(f"[smollm2] student tokenizer: BPE {vocab_size} on {len(texts):,} ShareGPT first turns", flush=True)
        tiny.build_tokenizer(tokenizer, vocab_size=vocab_size, model_max_length=MAX_POSITIONS, texts=texts)
    init = out / f"init-seed{seed}"
    if not (init / "config.json").exists():
        tiny.build_model(init, tokenizer, "llama", STUDENT_SIZE, seed=seed, max_position_embeddings=MAX_POSITIONS,
                         init_std=0.02, tie_word_embeddings=True)
    return init


def greedy_answers(student: Path, prompts: list[dict], max_new_tokens: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for p in prompts:
            # the template writes BOS itself
            text = tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


class TeacherScorer:
    """SmolLM2 (transformers, float32 on CPU) scoring answer texts after its own tokens of the prompt."""

    def __init__(self, teacher_answers: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        manifest = corpus.read_manifest(teacher_answers)
        self.tokenizer = AutoTokenizer.from_pretrained(manifest.teacher.model)
        self.model = AutoModelForCausalLM.from_pretrained(manifest.teacher.model, dtype=torch.float32).eval()
        self.prompts = {r["prompt_id"]: list(r["prompt_token_ids"])
                        for r in corpus.iter_records(teacher_answers, columns=["prompt_id", "prompt_token_ids"])}

    def __call__(self, prompt_ids: list[str], answers: list[str]) -> dict:
        from distill.evaluation.cross_tokenizer import nll_per_byte

        logprobs, texts = [], []
        with torch.no_grad():
            for pid, text in zip(prompt_ids, answers):
                if not text:  # spells no bytes: nothing to score (as teacher_nll_per_byte)
                    continue
                prompt = self.prompts[pid]
                ids = torch.tensor([prompt + self.tokenizer(text, add_special_tokens=False)["input_ids"]])
                lp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), -1)
                lp = lp.gather(1, ids[0, 1:, None])[:, 0][len(prompt) - 1:]
                logprobs.append(lp.tolist())
                texts.append(text)
        if not texts:
            return {"answers": 0}
        return nll_per_byte(logprobs, texts).__dict__


def repetition(answers: list[str], n: int = 10) -> float:
    """Share of each answer's character n-grams that repeat an earlier one in it, over all answers
    (0: nothing repeats; near 1: a loop such as `zzzz...` or `the the the ...`)."""
    total = distinct = 0
    for a in answers:
        grams = [a[i:i + n] for i in range(len(a) - n + 1)]
        total += len(grams)
        distinct += len(set(grams))
    return 1 - distinct / total if total else 0.0


def measure(student: Path, step: int, prompts: list[dict], teacher_answers: Path, scorer: TeacherScorer,
            max_new_tokens: int, dump: Path) -> dict:
    from distill.evaluation.cross_tokenizer import cross_fidelity

    t0 = time.time()
    fidelity = cross_fidelity(student, teacher_answers)
    answers = greedy_answers(student, prompts, max_new_tokens)
    files.atomic_write(dump, "".join(json.dumps({"prompt_id": p["id"], "answer": a}) + "\n"
                                     for p, a in zip(prompts, answers)))
    scored = scorer([p["id"] for p in prompts], answers)
    row = {"step": step, **fidelity.as_dict(), "teacher_scored": scored, "empty_answers": sum(not a for a in answers),
           "mean_answer_bytes": sum(len(a.encode()) for a in answers) / len(answers),
           "repeated_10char_share": repetition(answers), "seconds": round(time.time() - t0, 1)}
    print(f"[smollm2] step {step}: aligned {fidelity.aligned_share:.3f}, span KL {fidelity.span_kl:.3f}, "
          f"agreement {fidelity.agreement:.3f}, student NLL/byte {fidelity.nll_per_byte:.3f}, teacher-scored "
          f"NLL/byte {scored.get('nll_per_byte', float('nan')):.3f}, "
          f"repeated 10-char grams {row['repeated_10char_share']:.2f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/cross-smollm2"))
    ap.add_argument("--corpus", type=Path, default=RUN / "sharegpt" / "curated")
    ap.add_argument("--teacher-answers", type=Path, default=RUN / "sharegpt" / "eval" / "teacher-answers")
    ap.add_argument("--prompts", type=Path, default=RUN / "prompts" / "eval.jsonl", help="the held-out prompts")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--save-steps", type=int, default=50)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from distill.config import TrainConfig
    from distill.train.trainer import train

    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = held_out(args.prompts)
    exclude = {m["content"].strip() for p in prompts for m in p["messages"] if m["role"] == "user"}
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    scorer = TeacherScorer(args.teacher_answers)
    if "repeated_10char_share" not in results.get("teacher_own_answers", {}):
        # reference: the teacher's NLL per byte of its own greedy answers to the same prompts
        own = {r["prompt_id"]: r["response"] for r in corpus.iter_records(args.teacher_answers,
                                                                           columns=["prompt_id", "response"])}
        results["teacher_own_answers"] = {**scorer(list(own), list(own.values())),
                                          "mean_answer_bytes": sum(len(a.encode()) for a in own.values()) / len(own),
                                          "repeated_10char_share": repetition(list(own.values()))}
        files.atomic_write(results_path, json.dumps(results, indent=1))
    print(f"[smollm2] teacher's own answers: NLL/byte {results['teacher_own_answers']['nll_per_byte']:.3f}", flush=True)

    def save() -> None:
        files.atomic_write(results_path, json.dumps(results, indent=1))

    for seed in args.seeds:
        init = build_student(args.out, seed, args.vocab_size, exclude)
        for arm in args.arms:
            name = f"{arm}-seed{seed}"
            run = results.setdefault(name, {"steps": {}})
            out = args.out / name
            if not (out / "distill.json").exists():
                t0 = time.time()
                train(TrainConfig(corpus=args.corpus, student=str(init), out=out, cross_tokenizer="span", lora=False,
                                  max_steps=args.steps, save_steps=args.save_steps, learning_rate=1e-3,
                                  lr_scheduler="cosine", warmup_ratio=0.05, batch_size=8, max_length=512,
                                  eval_fraction=0.0, logging_steps=10, seed=seed, resume=True, report_to=[],
                                  **ARMS[arm]))
                run["train_seconds"] = round(time.time() - t0)
            card = json.loads((out / "distill.json").read_text())
            run["coverage"] = card.get("cross_tokenizer")
            run["train_metrics"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            save()
            checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            if "0" not in run["steps"]:  # the init is the same for every arm of a seed: measured once
                run["steps"]["0"] = next((results[other]["steps"]["0"] for other in (f"{a}-seed{seed}" for a in ARMS)
                                          if "0" in results.get(other, {}).get("steps", {})), None) \
                    or measure(init, 0, prompts, args.teacher_answers, scorer, args.max_new_tokens,
                               args.out / f"answers-init-seed{seed}.jsonl")
                save()
            for step, model in [(int(c.name.split("-")[1]), c) for c in checkpoints]:
                if str(step) in run["steps"]:
                    continue
                run["steps"][str(step)] = measure(model, step, prompts, args.teacher_answers, scorer,
                                                  args.max_new_tokens, out / f"answers-step{step}.jsonl")
                save()
    print(f"[smollm2] wall time {time.time() - started:.0f} s; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
