"""`distill demo`: the whole pipeline offline, and the evidence that distillation worked.

`demo.yaml` (also `examples/demo.yaml`) is run as `distill run` would: the shipped teacher
answers prompts it never trained on, curation drops wrong answers, a student learns them with
KD, and eval measures it (fidelity, accuracy, tokens/s and latency behind vLLM's server). The
demo then trains the same student SFT-only (alpha 0) on the same curated corpus, and both arms
with more seeds, evaluates every student on the same held-out prompts, and writes
`report.md` / `report.json`. Last, the KD student answers one chat request over the OpenAI API.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from distill import corpus, files
from distill.demo import skills
from distill.evaluation.report import EvalReport

HERE = Path(__file__).parent
CONFIG = HERE / "demo.yaml"
PROMPTS = HERE / "prompts"
STUDENT_INIT = HERE / "student-init"
# ~0.45M parameters: a quarter of the teacher's 1.85M.
STUDENT_SIZE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4)
N_TRAIN, N_EVAL = 500, 300  # data-limited: where the teacher's distributions should matter most


def build_inputs(seed: int = 0) -> None:
    """The shipped prompt files and the student's random initialisation (deterministic)."""
    skills.write_prompts(PROMPTS / "train.jsonl", "distill", N_TRAIN, seed)
    skills.write_prompts(PROMPTS / "eval.jsonl", "eval", N_EVAL, seed + 1)
    student_init(STUDENT_INIT, seed)


def student_init(out: Path, seed: int) -> Path:
    from distill import tiny
    from distill.demo.teacher import MAX_POSITIONS, SHIPPED

    return tiny.build_model(out, SHIPPED, "llama", STUDENT_SIZE, seed=seed, max_position_embeddings=MAX_POSITIONS,
                            init_std=0.02, tie_word_embeddings=True)


def main(out: Path, seeds: int = 3, serve: bool = False, build_teacher: bool = False) -> int:
    from distill import pipeline
    from distill.demo.teacher import SHIPPED

    if build_teacher:
        from distill.demo.teacher import build_teacher as build

        result = build(Path(out) / "teacher-build")
        build_inputs()
        print(f"demo teacher: held-out exact match {result['accuracy']['overall']:.3f} -> {SHIPPED}")
        return 0
    start = time.time()
    out = Path(out)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the demo's models are tiny
    cfg = pipeline.load_config(CONFIG, [f"out={out}", f"teacher.model={SHIPPED}", f"student.model={STUDENT_INIT}",
                                        f"prompts.train={PROMPTS / 'train.jsonl'}", f"prompts.eval={PROMPTS / 'eval.jsonl'}"])
    pipeline.run(cfg)
    configs = pipeline.stage_configs(cfg)
    arms = {"student_kd": [], "student_sft": []}
    for arm, alpha in (("student_kd", cfg.train.alpha), ("student_sft", 0.0)):
        for seed in range(seeds):
            if arm == "student_kd" and seed == 0:
                student, report = out / "student", out / "eval"  # the run's own student
            else:
                student = out / "students" / f"{arm.removeprefix('student_')}-seed{seed}"
                report = student / "eval"
                train_and_eval(configs, student, report, alpha=alpha, seed=seed, teacher_answers=out / "eval" / "teacher-answers")
            arms[arm].append(student_metrics(student, report, seed))
    summarise(out, arms, time.time() - start)
    print((out / "report.md").read_text())
    chat(out / "student", configs["eval"], keep_serving=serve)
    return 0


def train_and_eval(configs: dict, student: Path, report: Path, alpha: float, seed: int, teacher_answers: Path) -> None:
    """Seed s: the student initialised with seed s (seed 0 is the shipped init), data order s.
    Skipped when both are already there (a rerun of the demo resumes)."""
    from distill.evaluation.job import evaluate
    from distill.train.card import CARD
    from distill.train.trainer import train

    if not (student / CARD).exists():
        print(f"[demo] training {student.name} (alpha {alpha}, seed {seed})")
        init = STUDENT_INIT if seed == 0 else student_init(student.parent / f"init-seed{seed}", seed)
        train(configs["train"].model_copy(update={"out": student, "alpha": alpha, "seed": seed, "student": str(init)}))
    if not (report / "report.json").exists():
        evaluate(configs["eval"].model_copy(update={"student": str(student), "out": report, "corpus": teacher_answers,
                                                    "latency": False}))


def per_skill(answers: Path) -> dict[str, float]:
    right: dict[str, list[float]] = {}
    for r in corpus.iter_records(answers, columns=["messages", "response"]):
        prompt = r["messages"][-1]["content"]
        right.setdefault(skills.parse(prompt)[0], []).append(skills.check(prompt, r["response"]))
    return {s: float(np.mean(v)) for s, v in sorted(right.items())}


def student_metrics(student: Path, report_dir: Path, seed: int) -> dict:
    report = EvalReport.load(report_dir)
    return {"seed": seed, "model": str(student), "accuracy": report.answers.student.score,
            "per_skill": per_skill(report_dir / "student-answers"),
            "answer_agreement": report.answers.exact_match, "top1_agreement": report.fidelity.top1_agreement,
            "kl": report.fidelity.kl, "parameters": report.student.parameters}


def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def summarise(out: Path, arms: dict[str, list[dict]], wall: float) -> None:
    """report.json / report.md: teacher, both arms (mean ± std over seeds), KD - SFT, cost."""
    run_report = EvalReport.load(out / "eval")
    cost = {role: [row.model_dump() for row in rows] for role, rows in run_report.cost.items()} \
        if run_report.cost else None
    report = {
        "n_eval_prompts": run_report.prompts.count,
        "teacher": {"model": run_report.teacher.model, "accuracy": run_report.answers.teacher.score,
                    "per_skill": per_skill(out / "eval" / "teacher-answers"),
                    "parameters": run_report.teacher.parameters},
    }
    for arm, rows in arms.items():
        stats = {key: _mean_std([r[key] for r in rows]) for key in ("accuracy", "answer_agreement", "top1_agreement", "kl")}
        report[arm] = {"accuracy": stats["accuracy"]["mean"], "accuracy_std": stats["accuracy"]["std"], **{
            k: v for k, v in stats.items() if k != "accuracy"},
            "per_skill": {s: _mean_std([r["per_skill"][s] for r in rows]) for s in rows[0]["per_skill"]},
            "parameters": rows[0]["parameters"], "seeds": rows}
    kd, sft = report["student_kd"], report["student_sft"]
    margin = kd["accuracy"] - sft["accuracy"]
    spread = max(kd["accuracy_std"], sft["accuracy_std"])
    report["kd_minus_sft"] = {"accuracy": margin, "spread": spread, "beyond_spread": margin > spread,
                              "answer_agreement": kd["answer_agreement"]["mean"] - sft["answer_agreement"]["mean"]}
    report["cost"] = cost
    report["wall_seconds"] = round(wall)
    files.write_json(out / "report.json", report)
    (out / "report.md").write_text(_markdown(report))


def _markdown(r: dict) -> str:
    kd, sft, t = r["student_kd"], r["student_sft"], r["teacher"]
    pm = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
    skills_ = list(t["per_skill"])
    lines = [
        "# distill demo", "",
        f"{r['n_eval_prompts']} held-out prompts; students: {kd['parameters']:,} parameters "
        f"(teacher {t['parameters']:,}); {len(kd['seeds'])} seeds per arm (mean ± std).", "",
        "| model | accuracy | answer = teacher's | top-1 agreement | KL(teacher‖student) | "
        + " | ".join(skills_) + " |", "|---" * (5 + len(skills_)) + "|",
        f"| teacher | {t['accuracy']:.3f} | | | | " + " | ".join(f"{t['per_skill'][s]:.3f}" for s in skills_) + " |",
    ]
    for name, arm in (("student KD", kd), ("student SFT-only", sft)):
        lines.append(f"| {name} | {arm['accuracy']:.3f} ± {arm['accuracy_std']:.3f} | {pm(arm['answer_agreement'])} | "
                     f"{pm(arm['top1_agreement'])} | {pm(arm['kl'])} | "
                     + " | ".join(pm(arm["per_skill"][s]) for s in skills_) + " |")
    d = r["kd_minus_sft"]
    verdict = "more" if d["beyond_spread"] else "NOT more"
    lines += ["", f"KD - SFT accuracy: {d['accuracy']:+.3f}, {verdict} than the seeds' spread ({d['spread']:.3f}); "
              f"answer agreement with the teacher {d['answer_agreement']:+.3f}.", ""]
    if r["cost"]:
        lines += ["| served (vLLM OpenAI server) | concurrency | output tok/s | TTFT p50 / p95 (ms) |", "|---|---|---|---|"]
        for role in ("teacher", "student"):
            lines += [f"| {role} | {row['concurrency']} | {row['tokens_per_s']:,.0f} | {row['ttft_ms_p50']:.1f} / "
                      f"{row['ttft_ms_p95']:.1f} |" for row in r["cost"][role]]
    lines += ["", f"Wall time {r['wall_seconds']} s. Per-student reports: `eval/`, `students/*/eval/`.", ""]
    return "\n".join(lines)


def chat(student: Path, engine_cfg, keep_serving: bool) -> None:
    """One chat request to the KD student through the `openai` client (or serve until Ctrl-C)."""
    from openai import OpenAI

    from distill.config import ServeConfig
    from distill.launcher import start_server
    from distill.serve.server import serve

    settings = ServeConfig(model=str(student), served_model_name="demo-student", **engine_cfg.engine_settings())
    if keep_serving:
        serve(settings)
        return
    example = next(e for e in skills.examples("eval", 8, seed=7) if e["skill"] == "max")
    with start_server(settings.model_copy(update={"port": 0})) as server:
        reply = OpenAI(base_url=server.url, api_key="EMPTY").chat.completions.create(
            model=server.model, messages=example["messages"], max_tokens=16, temperature=0)
    answer = reply.choices[0].message.content
    print(f"\nchat with the KD student over {server.url}:\n  user: {example['messages'][-1]['content']}\n"
          f"  student: {answer}  ({'correct' if skills.check(example['messages'][-1]['content'], answer) else 'wrong'}; "
          f"expected {example['answer']})")
