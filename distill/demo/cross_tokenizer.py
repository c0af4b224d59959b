"""`distill demo --cross-tokenizer`: the demo teacher distilled into a student of *another*
tokenizer, against the same student trained SFT-only (docs/results/cross-tokenizer.md).

1. The demo's corpus as `distill demo` makes it (`demo.yaml`: the shipped teacher answers the
   2,000 train prompts at T=1 with its top-20, vLLM; curated with the demo's filters; reused when
   `distill demo` already ran in OUT). The corpus stores the teacher's tokenizer files. The
   teacher also answers the 300 held-out prompts the same way: the held-out fidelity set.
2. Per seed s: the student of `student_tokenizer.py` (byte-level BPE, 640 tokens, digits not
   split: `253` may be one student token against the teacher's three), initialised with seed s,
   trained on that corpus with `demo.yaml`'s settings except the steps, in each arm: `sft`
   (alpha 0), `span` and `uld` (the cross-tokenizer losses, alpha 0.9); and, as the reference,
   `same_tokenizer_kd` (the demo's own student, the teacher's tokenizer, ordinary KD).
3. Each student: greedy exact match on the 300 held-out prompts (per skill), and along the
   teacher's held-out answers `cross_fidelity` (span KL, top-1 agreement, NLL per byte).
   `OUT/cross-tokenizer/results.json` is rewritten after each student, so a rerun continues;
   `report.md` holds the per-seed table and the paired differences to SFT-only.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from distill import files

ARMS = {"sft": {"alpha": 0.0, "cross_tokenizer": "span"}, "span": {"cross_tokenizer": "span"},
        "uld": {"cross_tokenizer": "uld"}, "same_tokenizer_kd": {}}
DEFAULT_ARMS = ("sft", "span")
# demo.yaml's steps: two arms x 3 seeds trained in ~6 minutes on 2 quiet cores (docs/results/cross-tokenizer.md)
DEFAULT_STEPS = 500


def corpora(out: Path) -> tuple[Path, Path, dict]:
    """The curated demo corpus (`distill demo`'s, in `out`) and the teacher's answers to the
    held-out prompts, each made once; and the demo's train settings."""
    from distill import pipeline
    from distill.curation.pipeline import curate
    from distill.demo.run import CONFIG, PROMPTS, STUDENT_INIT
    from distill.demo.teacher import SHIPPED
    from distill.generate import generate

    configs = pipeline.stage_configs(pipeline.load_config(CONFIG, [
        f"out={out}", f"teacher.model={SHIPPED}", f"student.model={STUDENT_INIT}",
        f"prompts.train={PROMPTS / 'train.jsonl'}", f"prompts.eval={PROMPTS / 'eval.jsonl'}"]))
    gen, curated = configs["generate"], configs["curate"]
    if not (Path(curated.out) / "manifest.json").exists():
        generate(gen)
        curate(curated)
    held_out = out / "cross-tokenizer" / "held-out-answers"
    if not (held_out / "manifest.json").exists():
        generate(gen.model_copy(update={"prompts": PROMPTS / "eval.jsonl", "out": held_out}))
    return Path(curated.out), held_out, configs["train"].model_dump()


def main(out: Path, seeds: int = 3, steps: int = DEFAULT_STEPS, arms: tuple[str, ...] = DEFAULT_ARMS) -> int:
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or "sft" not in arms:
        raise ValueError(f"arms must include `sft` (the baseline) and be among {', '.join(ARMS)}; got {', '.join(arms)}")
    # as `distill demo`: the demo's models are tiny (1 GiB of KV cache), the engine core in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from distill.config import TrainConfig
    from distill.demo.run import PROMPTS, STUDENT_INIT, student_init
    from distill.demo.student_tokenizer import build_student
    from distill.demo.students import train_many
    from distill.demo.teacher import exact_match
    from distill.evaluation.cross_tokenizer import cross_fidelity

    started = time.time()
    out = Path(out)
    here = out / "cross-tokenizer"
    here.mkdir(parents=True, exist_ok=True)
    curated, held_out, base = corpora(out)
    print(f"[cross] corpora ready in {time.time() - started:.0f} s", flush=True)
    base = TrainConfig(**(base | {"max_steps": steps, "save_steps": 10**6, "resume": True, "report_to": []}))

    def student(arm: str, seed: int) -> TrainConfig:
        if arm == "same_tokenizer_kd":
            init = STUDENT_INIT if seed == 0 else student_init(here / "init" / f"same-seed{seed}", seed)
        else:
            init = build_student(here / "init" / f"cross-seed{seed}", seed)
        return base.model_copy(update={"corpus": curated, "student": str(init), "seed": seed,
                                       "out": here / f"{steps}-steps" / f"{arm}-seed{seed}", "run_name": f"{arm}-seed{seed}",
                                       **ARMS[arm]})

    configs = {(arm, s): student(arm, s) for s in range(seeds) for arm in arms}
    train_many(list(configs.values()))
    examples = [json.loads(line) for line in (PROMPTS / "eval.jsonl").read_text().splitlines()]
    results_path = here / f"{steps}-steps" / "results.json"
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
    report = markdown(results, steps, list(arms)) + f"\nWall time {time.time() - started:.0f} s.\n"
    files.atomic_write(results_path.parent / "report.md", report)
    print(report)
    return 0


def markdown(results: dict, steps: int, arms: list[str]) -> str:
    """Per seed, mean ± std, and the paired differences of each cross-tokenizer arm to SFT-only."""
    seeds = sorted(results, key=int)
    skills = sorted(next(iter(results.values()))["sft"]["per_skill"])
    lines = [f"# A student of another tokenizer: {steps} steps per student, seeds {', '.join(seeds)}", "",
             "| metric | arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|---|" + "---|" * (len(seeds) + 1)]

    def row(label: str, arm: str, values: list[float]) -> None:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {label} | {arm} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {statistics.mean(values):.3f} ± {std:.3f} |")

    metrics = [("accuracy", "accuracy, 300 held-out"), *[(f"skill:{s}", f"accuracy, {s}") for s in skills],
               ("span_kl", "span KL (held-out)"), ("agreement", "top-1 agreement"), ("nll_per_byte", "NLL per byte")]
    for key, label in metrics:
        for arm in arms:
            values = [results[s][arm]["per_skill"].get(key[6:], 0.0) if key.startswith("skill:") else results[s][arm][key]
                      for s in seeds if arm in results[s]]
            row(label, arm, values)
        if key in ("accuracy", "span_kl"):
            for arm in [a for a in ("span", "uld") if a in arms]:
                row(label, f"{arm} − sft", [results[s][arm][key] - results[s]["sft"][key] for s in seeds])
    return "\n".join(lines) + "\n"
