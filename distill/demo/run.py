"""`distill demo`: the whole pipeline offline, and the evidence that distillation worked.

`demo.yaml` (also `distill/demo/demo.yaml`) is run as `distill run` would: the shipped teacher
(calibrated on noisy labels, see `teacher.py`) answers 2,000 prompts it never trained on at T=1
with its top-20 stored, curation keeps them (no verifier: that would hand SFT clean labels), a
student learns them with KD, and eval measures it (vLLM: accuracy, fidelity, tokens/s and
latency). The demo then trains the same student SFT-only (alpha 0) on the same curated corpus,
both arms with more seeds (paired: seed s = init s + data order s), evaluates every student on
the same held-out prompts, repeats both arms on smaller corpora for the learning curve, and
writes `report.md` / `report.json` / `learning_curve.png`. Last, the KD student answers one chat
request over the OpenAI API. With `--report-to`, each headline student's training and eval is a
run in the trackers, and the demo's summary one more (docs/recipes/tracking.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from distill import corpus
from distill.config import TrainConfig
from distill.demo import skills

HERE = Path(__file__).parent
CONFIG = HERE / "demo.yaml"
PROMPTS = HERE / "prompts"
STUDENT_INIT = HERE / "student-init"
# ~0.45M parameters: a quarter of the teacher's 1.85M.
STUDENT_SIZE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4)
N_TRAIN, N_EVAL = 2000, 300
# Learning curve: the first N records of the curated corpus, same epochs as the headline run.
CURVE_SIZES = (250, 500, 1000)
ARMS = {"student_kd": "kd", "student_sft": "sft"}
EXPERIMENT = "distill-demo"  # the trackers' experiment of a tracked demo (`--report-to`)


def build_inputs(seed: int = 0) -> None:
    """The shipped prompt files and the student's random initialisation (deterministic). No
    system prompts: shorter sequences, so each training step costs about a third less."""
    skills.write_prompts(PROMPTS / "train.jsonl", "distill", N_TRAIN, seed, system_prompts=False)
    skills.write_prompts(PROMPTS / "eval.jsonl", "eval", N_EVAL, seed + 1, system_prompts=False)
    validation_prompts(seed + 2)
    student_init(STUDENT_INIT, seed)


def validation_prompts(seed: int) -> Path:
    """`distill sweep`'s held-out prompts (examples/sweep-demo.yaml): the eval split's skills with
    other payloads, none a prompt of eval.jsonl, which stays unseen for comparing the winner after."""
    path = PROMPTS / "validation.jsonl"
    taken = {json.loads(line)["messages"][-1]["content"] for line in (PROMPTS / "eval.jsonl").open()}
    drawn = skills.write_prompts(path, "eval", N_EVAL + 50, seed, system_prompts=False).read_text().splitlines()
    kept = [line for line in drawn if json.loads(line)["messages"][-1]["content"] not in taken][:N_EVAL]
    path.write_text("\n".join(kept) + "\n")
    return path


def student_init(out: Path, seed: int) -> Path:
    from distill import tiny
    from distill.demo.teacher import MAX_POSITIONS, SHIPPED

    if (out / "config.json").exists():
        return out
    return tiny.build_model(out, SHIPPED, "llama", STUDENT_SIZE, seed=seed, max_position_embeddings=MAX_POSITIONS,
                            init_std=0.02, tie_word_embeddings=True)


def main(out: Path, seeds: int = 3, serve: bool = False, build_teacher: bool = False,
         ground_truth: Path | None = None, report_to: list[str] | None = None, cross_tokenizer: bool = False,
         steps: int | None = None, arms: list[str] | None = None) -> int:
    from distill import pipeline, tracking
    from distill.demo import report, students
    from distill.demo.teacher import SHIPPED, distribution_stats

    if cross_tokenizer:
        from distill.demo import cross_tokenizer as cross

        return cross.main(Path(out), seeds, steps or cross.DEFAULT_STEPS, tuple(arms or cross.DEFAULT_ARMS))
    if steps is not None or arms is not None:
        raise ValueError("--steps and --arms apply to `distill demo --cross-tokenizer` only")

    trackers = tracking.parse_trackers(report_to)
    tracking.check_installed(trackers)

    if build_teacher:
        from distill.demo.teacher import build_teacher as build

        result = build(Path(out) / "teacher-build", ground_truth=ground_truth)
        build_inputs()
        print(f"demo teacher: held-out exact match {result['accuracy']['overall']:.3f} -> {SHIPPED}")
        return 0
    start = time.time()
    out = Path(out)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the demo's models are tiny
    # The engine core in this process: a CPU engine starts in ~8 s instead of ~22 s.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # Tracked: every headline student is one run of the experiment `distill-demo`, all in `out`
    # (TensorBoard: out/tensorboard/RUN; MLflow: out/mlflow.db), named by arm and seed.
    tracked = [f"train.report_to={json.dumps(trackers)}", f"train.tracking_dir={out}", f"train.experiment={EXPERIMENT}",
               "train.run_name=kd-seed0"] if trackers else []
    cfg = pipeline.load_config(CONFIG, [f"out={out}", f"teacher.model={SHIPPED}", f"student.model={STUDENT_INIT}",
                                        f"prompts.train={PROMPTS / 'train.jsonl'}", f"prompts.eval={PROMPTS / 'eval.jsonl'}",
                                        *tracked])
    pipeline.run(cfg)  # generate -> curate -> train (KD, seed 0) -> eval
    configs = pipeline.stage_configs(cfg)
    train_cfg, curated = configs["train"], configs["train"].corpora[0]
    n_curated = corpus.read_manifest(curated).stats.records

    def student(arm: str, seed: int, n: int | None = None) -> TrainConfig:
        """Seed s: the student initialised with seed s (seed 0 is the shipped init), data order s."""
        name = f"{ARMS[arm]}-seed{seed}" + (f"-n{n}" if n else "")
        init = STUDENT_INIT if seed == 0 else student_init(out / "students" / f"init-seed{seed}", seed)
        update = {"out": out / "students" / name, "alpha": train_cfg.alpha if arm == "student_kd" else 0.0,
                  "seed": seed, "student": str(init), "resume": True, "run_name": name}
        if n is not None:  # the same number of epochs as the headline students; not tracked (the curve is in the report)
            update |= {"corpus": students.first_records(curated, n, out / "curve" / f"n{n}"),
                       "max_steps": max(1, round(train_cfg.max_steps * n / n_curated)), "report_to": []}
        return train_cfg.model_copy(update=update)

    headline = {arm: [out / "student" if (arm, s) == ("student_kd", 0) else Path(student(arm, s).out)
                      for s in range(seeds)] for arm in ARMS}
    students.train_many([student(arm, s) for arm in ARMS for s in range(seeds) if (arm, s) != ("student_kd", 0)])
    students.evaluate_many([p for paths in headline.values() for p in paths if p != out / "student"],
                           configs["eval"], teacher_answers=out / "eval" / "teacher-answers")
    curve_configs = {(arm, s, n): student(arm, s, n) for n in CURVE_SIZES for arm in ARMS for s in range(seeds)}
    students.train_many(list(curve_configs.values()))
    greedy = students.greedy_accuracy([Path(c.out) for c in curve_configs.values()]
                                      + [p for paths in headline.values() for p in paths], cfg.prompts.eval)
    curve = {arm: {n: [greedy[Path(curve_configs[arm, s, n].out)] for s in range(seeds)] for n in CURVE_SIZES}
             | {n_curated: [greedy[p] for p in headline[arm]]} for arm in ARMS}
    arms = {arm: [student_metrics(p, out / "eval" if p == out / "student" else p / "eval", s)
                  for s, p in enumerate(paths)] for arm, paths in headline.items()}
    summary = report.summarise(out, arms, curve, distribution_stats(out / "corpus"), time.time() - start)
    if trackers:
        report.track(out, summary, trackers, EXPERIMENT)
    print((out / "report.md").read_text())
    chat(out / "student", configs["eval"], keep_serving=serve)
    return 0


def student_metrics(student: Path, report_dir: Path, seed: int) -> dict:
    from distill.demo.report import per_skill
    from distill.evaluation.report import EvalReport

    report = EvalReport.load(report_dir)
    return {"seed": seed, "model": str(student), "accuracy": report.answers.student.score,
            "per_skill": per_skill(report_dir / "student-answers"),
            "answer_agreement": report.answers.exact_match, "top1_agreement": report.fidelity.top1_agreement,
            "kl": report.fidelity.kl, "parameters": report.student.parameters}


def chat(student: Path, engine_cfg, keep_serving: bool) -> None:
    """One chat request to the KD student through the `openai` client (or serve until Ctrl-C)."""
    from distill.demo.students import ask

    example = json.loads((PROMPTS / "eval.jsonl").read_text().splitlines()[0])  # a held-out prompt
    answer = ask(student, engine_cfg, example["messages"], max_tokens=16, keep_serving=keep_serving)
    if answer is not None:
        print(f"  ({'correct' if skills.check(example['messages'][-1]['content'], answer) else 'wrong'}; "
              f"expected {example['answer']})")
