"""Training step time on-policy vs offline: the same student, corpus, batch size and steps, with a
share `lmbda` of each batch sampled from the student and scored by the teacher behind a vLLM
server (lmbda 0 = offline KD), and where an on-policy step's time goes (sampling / teacher
scoring / forward + backward, from `metrics.jsonl`).

    python benchmarks/onpolicy_step.py [--teacher DIR] [--student DIR] [--prompts FILE] [--records 64]
        [--batch-size 8] [--steps 8] [--max-new-tokens 16] [--lmbda 0 0.5 1] [--quick]

Defaults: the demo's teacher and student (`distill/demo/`) and its training prompts. The teacher
answers the prompts through the same server first (the offline corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from common import Headline, emit, parse_args

DEMO = Path(__file__).resolve().parent.parent / "distill" / "demo"


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default=str(DEMO / "teacher"))
    ap.add_argument("--student", default=str(DEMO / "student-init"))
    ap.add_argument("--prompts", type=Path, default=DEMO / "prompts" / "train.jsonl")
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--lmbda", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parse_args(ap, argv, quick={"records": 16, "batch_size": 4, "steps": 2, "max_new_tokens": 8,
                                       "lmbda": [0.0, 1.0]})
    from distill.config import GenerateConfig, ServeConfig, TrainConfig
    from distill.generate import generate
    from distill.launcher import start_server
    from distill.train.trainer import train

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    work = Path(tempfile.mkdtemp(prefix="onpolicy-step-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(args.prompts.read_text().splitlines(keepends=True)[:args.records]))
    with start_server(ServeConfig(model=args.teacher, port=0, vllm_args=["--no-enable-prefix-caching"])) as server:
        data = generate(GenerateConfig(teacher=args.teacher, prompts=prompts, out=work / "corpus", backend="endpoint",
                                       urls=[server.url],
                                       max_tokens=args.max_new_tokens, top_k=20)).path
        rows = []
        for lmbda in args.lmbda:
            out = train(TrainConfig(corpus=data, student=args.student, out=work / f"student-{lmbda}", lora=False,
                                    max_steps=args.steps, batch_size=args.batch_size, eval_fraction=0.0,
                                    logging_steps=args.steps, save_steps=10**6, learning_rate=1e-3,
                                    on_policy=lmbda > 0, teacher_endpoint=server.url, lmbda=lmbda,
                                    max_new_tokens=args.max_new_tokens, teacher_top_k=20)).path
            logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            step = next(m for m in logs if "loss" in m)
            runtime = next(m["train_runtime"] for m in logs if "train_runtime" in m)
            rows.append((lmbda, runtime / args.steps, step))
    offline = next((seconds for lmbda, seconds, _ in rows if lmbda == 0), None)
    print(f"student {args.student}, teacher {args.teacher} (vLLM server), batch {args.batch_size}, "
          f"{args.steps} steps, max_new_tokens {args.max_new_tokens}, K = 20, CPU threads {os.cpu_count()}")
    print("| lmbda | s/step | vs offline | sampling | teacher scoring | forward+backward | teacher tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for lmbda, seconds, step in rows:
        ratio = f"{seconds / offline:.2f}x" if offline else "-"
        shares = [f"{step[f'{key}_s']:.3f} s ({step[f'{key}_share']:.0%})" if f"{key}_s" in step else "-"
                  for key in ("sample", "score", "optimise")]
        tokens = f"{step['teacher_tokens_per_s']:.0f}" if "teacher_tokens_per_s" in step else "-"
        print(f"| {lmbda:g} | {seconds:.3f} | {ratio} | {' | '.join(shares)} | {tokens} |")
    return [Headline(f"training step, lmbda {lmbda:g}", f"{seconds:.3f} s/step",
                     f"{seconds / offline:.2f}x offline" if offline and lmbda else "") for lmbda, seconds, _ in rows]


if __name__ == "__main__":
    emit(main())
