"""The demo's report: teacher vs KD and SFT-only students (mean ± std over paired seeds), the
paired KD - SFT differences, the learning curve, serving cost; report.json, report.md,
report.html (self-contained: plots inlined) and learning_curve.png in the demo directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill import corpus, files
from distill.demo import skills
from distill.evaluation.report import EvalReport
from distill.html import write_html_report

NAMES = {"student_kd": "KD (alpha 0.9)", "student_sft": "SFT-only (alpha 0)"}


def per_skill(answers: Path) -> dict[str, float]:
    right: dict[str, list[float]] = {}
    for r in corpus.iter_records(answers, columns=["messages", "response"]):
        prompt = r["messages"][-1]["content"]
        right.setdefault(skills.parse(prompt)[0], []).append(skills.check(prompt, r["response"]))
    return {s: float(np.mean(v)) for s, v in sorted(right.items())}


def mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def summarise(out: Path, arms: dict[str, list[dict]], curve: dict[str, dict[int, list[float]]],
              distributions: dict, wall: float) -> dict:
    """`arms`: per arm, one row per seed from the vLLM eval; `curve`: per arm, corpus size ->
    greedy accuracy per seed (transformers); `distributions`: `teacher.distribution_stats` of
    the run's corpus."""
    run_report = EvalReport.load(out / "eval")
    teacher_accuracy = run_report.answers.teacher.score
    report = {
        "n_eval_prompts": run_report.prompts.count,
        "teacher": {"model": run_report.teacher.model, "accuracy": teacher_accuracy,
                    "per_skill": per_skill(out / "eval" / "teacher-answers"),
                    "parameters": run_report.teacher.parameters, "distributions": distributions},
    }
    for arm, rows in arms.items():
        stats = {key: mean_std([r[key] for r in rows]) for key in ("accuracy", "answer_agreement", "top1_agreement", "kl")}
        report[arm] = {"accuracy": stats["accuracy"]["mean"], "accuracy_std": stats["accuracy"]["std"], **{
            k: v for k, v in stats.items() if k != "accuracy"},
            "per_skill": {s: mean_std([r["per_skill"][s] for r in rows]) for s in rows[0]["per_skill"]},
            "parameters": rows[0]["parameters"], "seeds": rows}
    kd, sft = report["student_kd"], report["student_sft"]
    kd["retained"] = kd["accuracy"] / teacher_accuracy
    per_seed = [a["accuracy"] - b["accuracy"] for a, b in zip(kd["seeds"], sft["seeds"])]
    spread = max(kd["accuracy_std"], sft["accuracy_std"])
    report["kd_minus_sft"] = {"accuracy": kd["accuracy"] - sft["accuracy"], "per_seed": per_seed, "spread": spread,
                              "ahead_on_every_seed": all(d > 0 for d in per_seed),
                              "beyond_spread": kd["accuracy"] - sft["accuracy"] > spread,
                              "answer_agreement": kd["answer_agreement"]["mean"] - sft["answer_agreement"]["mean"]}
    report["learning_curve"] = {arm: {str(n): mean_std(v) | {"seeds": v} for n, v in sorted(sizes.items())}
                                for arm, sizes in curve.items()}
    report["cost"] = {role: [row.model_dump() for row in rows] for role, rows in run_report.cost.items()} \
        if run_report.cost else None
    report["wall_seconds"] = round(wall)
    _plot(out / "learning_curve.png", curve, teacher_accuracy)
    (out / "report.md").write_text(_markdown(report))
    write_html_report(out, title="distill demo")
    files.write_json(out / "report.json", report)
    return report


def track(out: Path, report: dict, trackers: list[str], experiment: str) -> None:
    """The demo's headline numbers and its report, as the run `demo` beside the students' runs."""
    from distill import tracking

    run = tracking.open_run(out, trackers, run_name="demo", experiment=experiment, tracking_dir=out)
    kd, sft = report["student_kd"], report["student_sft"]
    student_cost = report["cost"]["student"][-1] if report["cost"] else {}
    run.log_metrics({"demo/teacher_accuracy": report["teacher"]["accuracy"], "demo/kd_accuracy": kd["accuracy"],
                     "demo/sft_accuracy": sft["accuracy"], "demo/kd_minus_sft": report["kd_minus_sft"]["accuracy"],
                     "demo/kd_kl": kd["kl"]["mean"], "demo/sft_kl": sft["kl"]["mean"],
                     "demo/kd_top1_agreement": kd["top1_agreement"]["mean"],
                     "demo/sft_top1_agreement": sft["top1_agreement"]["mean"],
                     "demo/student_tokens_per_s": student_cost.get("tokens_per_s")})
    run.log_params({"demo.seeds": len(kd["seeds"]), "demo.eval_prompts": report["n_eval_prompts"]})
    for name in ("report.html", "report.json", "learning_curve.png"):
        run.log_artifact(out / name, "demo")
    run.log_artifact(out / "report.md", "demo", text=True)
    run.finish()


def _plot(path: Path, curve: dict[str, dict[int, list[float]]], teacher_accuracy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for arm, sizes in curve.items():
        n = sorted(sizes)
        mean = [np.mean(sizes[x]) for x in n]
        std = [np.std(sizes[x], ddof=1) if len(sizes[x]) > 1 else 0.0 for x in n]
        ax.errorbar(n, mean, yerr=std, marker="o", capsize=3, label=NAMES[arm])
    ax.axhline(teacher_accuracy, color="gray", linestyle="--", label="teacher")
    ax.set(xscale="log", xlabel="teacher examples (curated corpus records)", ylabel="held-out greedy accuracy",
           ylim=(0, 1.02), title="Student accuracy vs teacher examples (mean ± std over seeds)")
    sizes = sorted(next(iter(curve.values())))
    ax.minorticks_off()
    ax.set_xticks(sizes, labels=[str(x) for x in sizes])
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(r: dict) -> str:
    kd, t = r["student_kd"], r["teacher"]
    pm = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
    skills_ = list(t["per_skill"])
    dist = t["distributions"]
    lines = [
        "# distill demo", "",
        f"{r['n_eval_prompts']} held-out prompts, greedy answers in vLLM; students: {kd['parameters']:,} parameters "
        f"(teacher {t['parameters']:,}); {len(kd['seeds'])} paired seeds per arm (mean ± std).", "",
        f"The teacher's stored top-20 on its answer digits: median top-1 probability "
        f"{dist['median_top1_probability']:.3f}, mean entropy {dist['mean_topk_entropy']:.3f} nats "
        f"({dist['share_top1_above_0.99']:.1%} of positions above 0.99).", "",
        "| model | accuracy | answer = teacher's | top-1 agreement | KL(teacher‖student) | "
        + " | ".join(skills_) + " |", "|---" * (5 + len(skills_)) + "|",
        f"| teacher | {t['accuracy']:.3f} | | | | " + " | ".join(f"{t['per_skill'][s]:.3f}" for s in skills_) + " |",
    ]
    for arm in ("student_kd", "student_sft"):
        a = r[arm]
        lines.append(f"| student {NAMES[arm]} | {a['accuracy']:.3f} ± {a['accuracy_std']:.3f} | {pm(a['answer_agreement'])} | "
                     f"{pm(a['top1_agreement'])} | {pm(a['kl'])} | "
                     + " | ".join(pm(a["per_skill"][s]) for s in skills_) + " |")
    d = r["kd_minus_sft"]
    lines += ["", f"KD keeps {kd['retained']:.1%} of the teacher's accuracy. KD - SFT: {d['accuracy']:+.3f} "
              f"(per seed {', '.join(f'{x:+.3f}' for x in d['per_seed'])}); "
              f"{'ahead on every seed' if d['ahead_on_every_seed'] else 'NOT ahead on every seed'}, "
              f"{'more' if d['beyond_spread'] else 'NOT more'} than the seeds' spread ({d['spread']:.3f}).", "",
              "## Learning curve", "", "| teacher examples | " + " | ".join(NAMES[a] for a in r["learning_curve"]) + " |",
              "|---|---|---|"]
    sizes = list(next(iter(r["learning_curve"].values())))
    lines += [f"| {n} | " + " | ".join(pm(r["learning_curve"][a][n]) for a in r["learning_curve"]) + " |" for n in sizes]
    lines += ["", "Greedy accuracy with transformers on the same held-out prompts; every size trains for the same "
              "number of epochs as the headline students (the largest size).", "", "![learning curve](learning_curve.png)", ""]
    if r["cost"]:
        lines += ["| served (vLLM OpenAI server) | concurrency | output tok/s | TTFT p50 / p95 (ms) |", "|---|---|---|---|"]
        for role in ("teacher", "student"):
            lines += [f"| {role} | {row['concurrency']} | {row['tokens_per_s']:,.0f} | {row['ttft_ms_p50']:.1f} / "
                      f"{row['ttft_ms_p95']:.1f} |" for row in r["cost"][role]]
    lines += ["", f"Wall time {r['wall_seconds']} s. Per-student reports: `eval/`, `students/*/eval/`.", ""]
    return "\n".join(lines)
