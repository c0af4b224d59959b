"""Evidence on the demo skills: offline KD vs offline KD followed by an on-policy phase, with the
same total optimiser steps, per seed.

    python experiments/onpolicy_evidence.py --corpus runs/demo/curated [--out runs/onpolicy-evidence]
        [--seeds 0 1 2] [--steps 300] [--on-policy-steps 40] [--phase2-batch-size 32]
        [--phase2-learning-rate 1e-4] [--max-new-tokens 8]

Per seed s (student init s, data order s, as `distill demo`'s seeds):
  phase 1   offline KD for N - M steps on the demo corpus with `demo.yaml`'s train settings;
  offline   phase 1, then M more offline KD steps                       (N offline steps in all);
  on-policy phase 1, then M on-policy steps (lmbda 1) against the teacher behind a vLLM server.
The two M-step continuations start from the same weights and share everything (batch, learning
rate, schedule, prompts) except where the targets come from: the stored corpus or the student's
own samples scored by the teacher. Both continue on the corpus records of the long-output skills
(`reverse`, `sort`: up to 5 answer digits), where exposure bias is plausible. Each student is
scored on the 300 held-out demo prompts: greedy exact match (`teacher.exact_match`, per skill) and
the teacher-scored KL of its own greedy answers (`train.onpolicy.teacher_scored_kl`).
`--corpus`: the curated corpus of a `distill demo` run (`runs/demo/curated`). Results go to
`OUT/results.json`, rewritten after each student so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from distill import files
from distill.config import ServeConfig
from distill.launcher import start_server

DEMO = Path(__file__).resolve().parent.parent / "distill" / "demo"
LONG_SKILLS = ("reverse", "sort")
ARMS = ("phase1", "offline", "on_policy")


def long_output_corpus(source: Path, out: Path) -> Path:
    """The records of `source` whose prompt is a LONG_SKILLS prompt."""
    import pyarrow as pa

    from distill.demo import skills
    from distill.demo.students import subset

    def long_only(table):
        return table.filter(pa.array([skills.parse(m[-1]["content"])[0] in LONG_SKILLS
                                      for m in table.column("messages").to_pylist()]))

    return subset(source, out, long_only, f"{'/'.join(LONG_SKILLS)} records of {source}")


def score(student: Path, examples: list[dict], teacher, max_new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.demo.teacher import exact_match
    from distill.train.onpolicy import teacher_scored_kl

    accuracy = exact_match(student, examples)
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    prompts = [tokenizer(tokenizer.apply_chat_template(e["messages"], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for e in examples]
    kl = {}
    for skill in sorted({e["skill"] for e in examples}):
        chosen = [p for p, e in zip(prompts, examples) if e["skill"] == skill]
        kl[skill] = teacher_scored_kl(model, chosen, teacher, 20, max_new_tokens=max_new_tokens, temperature=0.0,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                      batch_size=64).kl
    return {"accuracy": accuracy["overall"], "accuracy_per_skill": accuracy["per_skill"],
            "accuracy_long": statistics.mean(accuracy["per_skill"][s] for s in LONG_SKILLS),
            "kl_per_skill": kl, "kl_long": statistics.mean(kl[s] for s in LONG_SKILLS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/onpolicy-evidence"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="N: total optimiser steps of every student")
    ap.add_argument("--on-policy-steps", type=int, default=40, help="M: steps of the second phase")
    ap.add_argument("--phase2-batch-size", type=int, default=32)
    ap.add_argument("--phase2-learning-rate", type=float, default=1e-4,
                    help="peak of phase 2's own cosine decay (phase 1 ends at 0)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="answers are at most 5 digits + EOS")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from distill import pipeline
    from distill.demo.run import STUDENT_INIT, student_init
    from distill.demo.teacher import SHIPPED
    from distill.teacher_client import TeacherClient
    from distill.train.trainer import train

    torch.set_num_threads(1)  # the teacher's server gets the other core
    started = time.time()
    base = pipeline.stage_configs(pipeline.load_config(DEMO / "demo.yaml", [
        f"out={args.out}", f"teacher.model={SHIPPED}", f"student.model={STUDENT_INIT}"]))["train"]
    long_corpus = long_output_corpus(args.corpus, args.out / "long-corpus")
    examples = [json.loads(line) for line in (DEMO / "prompts" / "eval.jsonl").read_text().splitlines()]
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    n, m = args.steps, args.on_policy_steps
    with start_server(ServeConfig(model=str(SHIPPED), port=0, max_model_len=128, engine_args={"max_logprobs": 20},
                                  vllm_args=["--no-enable-prefix-caching"])) as server:
        teacher = TeacherClient(server.url)
        for seed in args.seeds:
            init = STUDENT_INIT if seed == 0 else student_init(args.out / f"init-seed{seed}", seed)
            common = {"seed": seed, "resume": True, "save_steps": 10**6, "logging_steps": 10}
            phase1 = base.model_copy(update=common | {"corpus": str(args.corpus), "student": str(init),
                                                      "out": args.out / f"seed{seed}" / "phase1", "max_steps": n - m})
            phase2 = base.model_copy(update=common | {
                "corpus": str(long_corpus), "max_steps": m, "batch_size": args.phase2_batch_size,
                "learning_rate": args.phase2_learning_rate, "lr_scheduler": "cosine", "warmup_ratio": 0.0,
                "teacher_endpoint": server.url, "lmbda": 1.0, "max_new_tokens": args.max_new_tokens,
                "teacher_top_k": 20, "sample_temperature": 1.0})
            for arm in ARMS:
                if arm in results.get(str(seed), {}):
                    continue
                cfg = phase1 if arm == "phase1" else phase2.model_copy(update={
                    "student": str(args.out / f"seed{seed}" / "phase1"), "out": args.out / f"seed{seed}" / arm,
                    "on_policy": arm == "on_policy"})
                t0 = time.time()
                student = train(cfg).path
                seconds = time.time() - t0
                row = score(student, examples, teacher, args.max_new_tokens) | {"train_s": seconds,
                                                                                 "steps": cfg.max_steps}
                results.setdefault(str(seed), {})[arm] = row
                files.atomic_write(results_path, json.dumps(results, indent=1))
                print(f"seed {seed} {arm}: {cfg.max_steps} steps in {seconds:.0f} s, accuracy {row['accuracy']:.3f} "
                      f"(reverse/sort {row['accuracy_long']:.3f}), teacher-scored KL {row['kl_long']:.4f} "
                      f"(reverse/sort)", flush=True)
    summarise(results, n, m)
    print(f"wall time {time.time() - started:.0f} s, load average {os.getloadavg()}")


def summarise(results: dict, n: int, m: int) -> None:
    """Per seed, mean ± std, and paired differences (on-policy - offline) of both N-step arms."""
    seeds = sorted((s for s in results if all(a in results[s] for a in ARMS[1:])), key=int)
    metrics = [("accuracy", "accuracy, all 300"), ("accuracy_long", "accuracy, reverse/sort"),
               ("kl_long", "teacher-scored KL, reverse/sort")]
    print(f"\nN = {n} steps in all; M = {m} on-policy steps; seeds {', '.join(seeds)}")
    print("| metric | arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |")
    print("|---|---|" + "---|" * (len(seeds) + 1))

    def row(label: str, arm: str, values: list[float]) -> None:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {label} | {arm} | " + " | ".join(f"{v:.4f}" for v in values)
              + f" | {statistics.mean(values):.4f} ± {std:.4f} |")

    for key, label in metrics:
        for arm in ARMS:
            row(label, arm, [results[s][arm][key] for s in seeds if arm in results[s]])
        row(label, "on-policy − offline", [results[s]["on_policy"][key] - results[s]["offline"][key] for s in seeds])


if __name__ == "__main__":
    main()
