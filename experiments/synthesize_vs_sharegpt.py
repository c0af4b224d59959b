"""Evidence for `distill synthesize` (docs/results/synthesize.md, "Students"): how much of the
real-prompt result do the teacher's own prompts give?

Two runs of `distill/demo/real.yaml` (SmolLM2-135M-Instruct -> its 10-layer pruned student, KD),
identical but for where the training prompts come from:
- `synthetic`: `prompts.train` unset and a `synthesize:` section, so `distill run` writes the
  prompts itself (Magpie) and goes on through generate, curate, train and eval;
- `sharegpt`: the first N ShareGPT first turns of `distill demo-real`'s prompt file, N = the
  number of prompts the synthetic run kept.
Both arms train seeds 0-2 (seed 0 inside the run, 1 and 2 on the same curated corpus), and every
student is scored on the same 48 held-out ShareGPT prompts (teacher-forced on the teacher's greedy
answers: KL, top-1 agreement). A rerun resumes.

    python experiments/synthesize_vs_sharegpt.py --out runs/synth-vs-sharegpt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from distill import files

SEEDS = 3
SYNTHESIZE = {"n": 330, "max_tokens": 96, "temperature": 1.0, "top_p": 0.9, "chunk_size": 100}


def run_arm(out: Path, teacher: str, student: str, eval_prompts: Path, train_prompts: Path | None):
    """One `distill run` of real.yaml; returns its stage configs."""
    from distill import pipeline
    from distill.demo.real import CONFIG

    overrides = [f"out={out}", f"teacher.model={teacher}", f"student.model={student}", f"prompts.eval={eval_prompts}",
                 f"prompts.train={json.dumps(str(train_prompts)) if train_prompts else 'null'}"]
    if train_prompts is None:
        overrides.append(f"synthesize={json.dumps(SYNTHESIZE)}")
    cfg = pipeline.load_config(CONFIG, overrides)
    pipeline.run(cfg)
    return pipeline.stage_configs(cfg)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/synth-vs-sharegpt"))
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from distill import corpus
    from distill.config import InitStudentConfig
    from distill.demo import students
    from distill.demo.real import STUDENT_LAYERS, teacher_gguf, write_prompts
    from distill.evaluation.report import EvalReport
    from distill.models import resolve
    from distill.train.init_student import init_student

    out = args.out
    teacher = resolve(str(teacher_gguf()))
    sharegpt_train, eval_prompts = write_prompts(out / "prompts", teacher)
    init = out / "student-init"
    if not (init / "config.json").exists():
        init_student(InitStudentConfig(teacher=teacher, num_layers=STUDENT_LAYERS, out=init, overwrite=True))

    synthetic = run_arm(out / "synthetic", teacher, str(init), eval_prompts, None)
    n = len((out / "synthetic" / "synthesize" / "prompts.jsonl").read_text().splitlines())
    sharegpt_lines = sharegpt_train.read_text().splitlines()
    if n > len(sharegpt_lines):
        raise SystemExit(f"the synthetic run kept {n} prompts, more than the {len(sharegpt_lines)} ShareGPT ones")
    same_n = out / "prompts" / f"sharegpt-{n}.jsonl"
    files.atomic_write(same_n, "".join(line + "\n" for line in sharegpt_lines[:n]))
    sharegpt = run_arm(out / "sharegpt", teacher, str(init), eval_prompts, same_n)

    arms = {"synthetic": synthetic, "sharegpt": sharegpt}
    # seed 0 is the run's own student
    paths = {arm: [Path(c["train"].out), *(Path(c["train"].out).parent / "students" / f"seed{s}" for s in range(1, SEEDS))]
             for arm, c in arms.items()}
    students.train_many([arms[arm]["train"].model_copy(update={"out": p, "seed": s, "resume": True})
                         for arm, ps in paths.items() for s, p in enumerate(ps) if s > 0])
    teacher_answers = out / "sharegpt" / "eval" / "teacher-answers"  # one set of held-out answers for every student
    students.evaluate_many([init, *(p for ps in paths.values() for p in ps)], sharegpt["eval"], teacher_answers)

    def fidelity(student: Path) -> dict:
        f = EvalReport.load(student / "eval").fidelity
        return {"kl": f.kl, "top1_agreement": f.top1_agreement, "perplexity": f.perplexity}

    per_seed = {arm: [fidelity(p) for p in ps] for arm, ps in paths.items()}
    summary = {arm: {m: {"mean": statistics.mean(r[m] for r in rows), "std": statistics.stdev(r[m] for r in rows)}
                     for m in ("kl", "top1_agreement", "perplexity")} for arm, rows in per_seed.items()}
    untrained = fidelity(init)
    # Share of the real-prompt improvement over the untrained student that synthetic prompts give, per seed.
    share = [(untrained["kl"] - s["kl"]) / (untrained["kl"] - r["kl"])
             for s, r in zip(per_seed["synthetic"], per_seed["sharegpt"])]
    report = {
        "prompts": n, "held_out_prompts": len(eval_prompts.read_text().splitlines()),
        "synthesized": json.loads((out / "synthetic" / "synthesize" / "manifest.json").read_text())["counts"],
        "curated_records": {arm: corpus.read_manifest(c["train"].corpora[0]).stats.records for arm, c in arms.items()},
        "train_steps": synthetic["train"].max_steps, "untrained": untrained, "per_seed": per_seed,
        "summary": summary, "kl_gain_share_per_seed": share,
    }
    files.write_json(out / "report.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
