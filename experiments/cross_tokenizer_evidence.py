"""Evidence on the demo skills: a student with *another* tokenizer than the demo teacher's,
trained on the teacher's corpus SFT-only, with the `span` loss and with ULD; the same-tokenizer
KD student as the reference. Paired seeds; results in docs/results/cross-tokenizer.md.

    python experiments/cross_tokenizer_evidence.py [--out runs/cross-tokenizer] [--seeds 0 1 2] [--steps 500]

1. The demo's corpus as `distill demo` makes it (`demo.yaml`: the shipped teacher answers the
   2,000 train prompts at T=1 with its top-20, vLLM; curated with the demo's filters); the
   corpus stores the teacher's tokenizer files. The teacher also answers the 300 held-out
   prompts the same way (the held-out fidelity set).
2. Per seed s: the student of `distill/demo/student_tokenizer.py` (another BPE, 640 tokens,
   digits not split), initialised with seed s, trained with `demo.yaml`'s settings (alpha 0.9,
   lr 1e-3 cosine, batch 64) in arms `sft` (alpha 0), `span` and `uld`; and the demo's own student
   (the teacher's tokenizer) with KD, seed s, as the reference `same_tokenizer_kd`.
3. Each student: greedy exact match on the 300 held-out prompts (per skill), and the
   cross-tokenizer fidelity (`distill.evaluation.cross_tokenizer.cross_fidelity`) along the
   teacher's held-out answers: span KL, top-1 agreement, NLL per byte.
`OUT/results.json` is rewritten after each student, so a rerun continues.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from distill import files

DEMO = Path(__file__).resolve().parent.parent / "distill" / "demo"
ARMS = {"sft": {"alpha": 0.0, "cross_tokenizer": "span"}, "span": {"cross_tokenizer": "span"},
        "uld": {"cross_tokenizer": "uld"}, "same_tokenizer_kd": {}}


def corpora(out: Path) -> tuple[Path, Path, dict]:
    """The curated demo corpus and the teacher's answers to the held-out prompts (made once)."""
    from distill import pipeline
    from distill.curation.pipeline import curate
    from distill.demo.run import STUDENT_INIT
    from distill.demo.teacher import SHIPPED
    from distill.generate import generate

    configs = pipeline.stage_configs(pipeline.load_config(DEMO / "demo.yaml", [
        f"out={out}", f"teacher.model={SHIPPED}", f"student.model={STUDENT_INIT}",
        f"prompts.train={DEMO / 'prompts' / 'train.jsonl'}", f"prompts.eval={DEMO / 'prompts' / 'eval.jsonl'}"]))
    gen, curated = configs["generate"], configs["curate"]
    if not (Path(curated.out) / "manifest.json").exists():
        generate(gen)
        curate(curated)
    held_out = out / "held-out-answers"
    if not (held_out / "manifest.json").exists():
        generate(gen.model_copy(update={"prompts": DEMO / "prompts" / "eval.jsonl", "out": held_out}))
    return Path(curated.out), held_out, configs["train"].model_dump()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/cross-tokenizer"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=500, help="optimiser steps of every student (demo.yaml: 500)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from distill.config import TrainConfig
    from distill.demo.run import STUDENT_INIT, student_init
    from distill.demo.student_tokenizer import build_student
    from distill.demo.students import train_many
    from distill.demo.teacher import exact_match
    from distill.evaluation.cross_tokenizer import cross_fidelity

    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    curated, held_out, base = corpora(args.out)
    print(f"[cross] corpora ready in {time.time() - started:.0f} s", flush=True)
    base = TrainConfig(**(base | {"max_steps": args.steps, "save_steps": 10**6, "resume": True, "report_to": []}))

    def student(arm: str, seed: int) -> TrainConfig:
        if arm == "same_tokenizer_kd":
            init = STUDENT_INIT if seed == 0 else student_init(args.out / "init" / f"same-seed{seed}", seed)
        else:
            init = build_student(args.out / "init" / f"cross-seed{seed}", seed)
        return base.model_copy(update={"corpus": curated, "student": str(init), "seed": seed,
                                       "out": args.out / f"{arm}-seed{seed}", "run_name": f"{arm}-seed{seed}",
                                       **ARMS[arm]})

    configs = {(arm, s): student(arm, s) for s in args.seeds for arm in args.arms}
    t0 = time.time()
    train_many(list(configs.values()))
    trained = time.time() - t0
    examples = [json.loads(line) for line in (DEMO / "prompts" / "eval.jsonl").read_text().splitlines()]
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for (arm, seed), cfg in configs.items():
        if arm in results.get(str(seed), {}):
            continue
        accuracy = exact_match(Path(cfg.out), examples)
        fidelity = cross_fidelity(Path(cfg.out), held_out)
        card = json.loads((Path(cfg.out) / "distill.json").read_text())
        results.setdefault(str(seed), {})[arm] = {"accuracy": accuracy["overall"], "per_skill": accuracy["per_skill"],
                                                  **fidelity.as_dict(), "coverage": card.get("cross_tokenizer")}
        files.atomic_write(results_path, json.dumps(results, indent=1))
        print(f"[cross] seed {seed} {arm}: accuracy {accuracy['overall']:.3f}, span KL {fidelity.span_kl:.4f}, "
              f"agreement {fidelity.agreement:.3f}, NLL/byte {fidelity.nll_per_byte:.4f}", flush=True)
    summarise(results, args.steps, args.arms)
    print(f"training {trained:.0f} s; wall time {time.time() - started:.0f} s; load average {os.getloadavg()}")


def summarise(results: dict, steps: int, arms: list[str]) -> None:
    """Per seed, mean ± std, and the paired differences of each cross-tokenizer arm to SFT-only."""
    seeds = sorted(results, key=int)
    skills = sorted(next(iter(results.values()))["sft"]["per_skill"])
    print(f"\n{steps} steps per student; seeds {', '.join(seeds)}")
    print("| metric | arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |")
    print("|---|---|" + "---|" * (len(seeds) + 1))

    def row(label: str, arm: str, values: list[float]) -> None:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {label} | {arm} | " + " | ".join(f"{v:.3f}" for v in values)
              + f" | {statistics.mean(values):.3f} ± {std:.3f} |")

    metrics = [("accuracy", "accuracy, 300 held-out"), *[(f"skill:{s}", f"accuracy, {s}") for s in skills],
               ("span_kl", "span KL (held-out)"), ("agreement", "top-1 agreement"), ("nll_per_byte", "NLL per byte")]
    for key, label in metrics:
        for arm in arms:
            values = [results[s][arm]["per_skill"][key[6:]] if key.startswith("skill:") else results[s][arm][key]
                      for s in seeds if arm in results[s]]
            row(label, arm, values)
        if key in ("accuracy", "span_kl"):
            for arm in [a for a in ("span", "uld") if a in arms]:
                row(label, f"{arm} − sft", [results[s][arm][key] - results[s]["sft"][key] for s in seeds])


if __name__ == "__main__":
    main()
