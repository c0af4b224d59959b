"""Evidence for `distill sweep` on the demo skills: the sweep's best train config against the
demo's own (distill/demo/demo.yaml), each retrained on fresh seeds, on the 300 held-out prompts
of `distill/demo/prompts/eval.jsonl` (the sweep judged its trials on `validation.jsonl` instead,
so the winner is not compared on the prompts it was picked on).

    python experiments/sweep_evidence.py --sweep runs/sweep-demo [--out runs/sweep-evidence] [--seeds 1 2 3]

Per seed s (student init s, data order s, as `distill demo`'s seeds; the sweep's trials used seed
0): both configs train on the sweep's curated corpus (`SWEEP/run/curated`), two students at a time,
and `evaluate` scores each in vLLM, greedy: accuracy (the demo's checker), top-1 agreement and
KL(teacher || student) along the teacher's answers. Results: `OUT/results.json` and a table.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from distill import files

ROOT = Path(__file__).resolve().parent.parent
MEASURES = ("accuracy", "top1_agreement", "kl")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", type=Path, required=True, help="A finished `distill sweep examples/sweep-demo.yaml` directory.")
    ap.add_argument("--out", type=Path, default=Path("runs/sweep-evidence"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args(argv)

    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from distill import pipeline
    from distill.demo.run import CONFIG, PROMPTS, student_init
    from distill.demo.students import evaluate_many, train_many
    from distill.evaluation.report import EvalReport
    from distill.sweep.job import held_out_answers

    out = args.out
    arms = {"default": pipeline.load_config(CONFIG, [f"out={out / 'unused'}"]),
            "best": pipeline.load_config(args.sweep / "best.yaml", [f"out={out / 'unused'}"])}
    configs = {arm: pipeline.stage_configs(cfg) for arm, cfg in arms.items()}
    curated = args.sweep / "run" / "curated"
    eval_cfg = configs["default"]["eval"].model_copy(update={"prompts": PROMPTS / "eval.jsonl"})
    teacher_answers = held_out_answers(eval_cfg, PROMPTS / "eval.jsonl", out / "teacher-answers")

    def student(arm: str, seed: int):
        init = student_init(out / "students" / f"init-seed{seed}", seed)
        return configs[arm]["train"].model_copy(update={"corpus": curated, "student": str(init), "seed": seed,
                                                        "out": out / "students" / f"{arm}-seed{seed}", "resume": True})

    todo = [student(arm, s) for s in args.seeds for arm in arms]
    train_many(todo)
    evaluate_many([Path(c.out) for c in todo], eval_cfg, teacher_answers=teacher_answers)
    results = {"sweep": str(args.sweep), "prompts": str(PROMPTS / "eval.jsonl"), "seeds": args.seeds,
               "train": {arm: {k: configs[arm]["train"].model_dump(mode="json")[k]
                               for k in ("alpha", "kd_temperature", "loss")} for arm in arms}}
    for arm in arms:
        rows = []
        for s in args.seeds:
            report = EvalReport.load(out / "students" / f"{arm}-seed{s}" / "eval")
            rows.append({"seed": s, "accuracy": report.answers.student.score,
                         "top1_agreement": report.fidelity.top1_agreement, "kl": report.fidelity.kl})
        results[arm] = {"per_seed": rows, **{m: [statistics.mean(r[m] for r in rows),
                                                 statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0]
                                             for m in MEASURES}}
    files.write_json(out / "results.json", results)
    print("| seed | " + " | ".join(f"{arm} {m}" for m in MEASURES for arm in arms) + " |")
    for i, s in enumerate(args.seeds):
        print(f"| {s} | " + " | ".join(f"{results[arm]['per_seed'][i][m]:.4f}" for m in MEASURES for arm in arms) + " |")
    print("| mean ± std | " + " | ".join(f"{results[arm][m][0]:.4f} ± {results[arm][m][1]:.4f}"
                                        for m in MEASURES for arm in arms) + " |")
    return results


if __name__ == "__main__":
    main()
