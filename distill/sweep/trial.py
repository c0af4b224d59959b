"""One sweep trial: a student trained with the run's train section plus the trial's values,
scored on the teacher's answers to held-out prompts every `report_every` steps (what the pruner
judges) and once trained (the trial's value).

The scores are the fidelity `distill eval` reports (`distill.evaluation.fidelity`), the same
measure whatever the trial's alpha, temperature or loss: training losses are not comparable
across them.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from distill.config import (
    EvalConfig,
    SearchRange,
    SweepSection,
    TrainConfig,
    is_int_field,
)

# The trial's student, under the sweep directory.
TRIALS = "trials"


@dataclass(frozen=True)
class HeldOut:
    """What every trial is judged on: the teacher's answers to the held-out prompts."""

    corpus: Path  # the teacher's answers (a corpus with its top-k)
    prompts: Path
    prompt_ids: frozenset[str]


@dataclass
class TrialResult:
    number: int
    params: dict[str, Any]
    value: float  # the objective's measure
    measures: dict[str, float] = field(default_factory=dict)  # kl, top1_agreement, nll (and score)
    steps: int = 0
    student: Path | None = None
    wall_seconds: float = 0.0


def suggest(trial, space: dict[str, SearchRange | list[Any]]) -> dict[str, Any]:
    """The trial's value of every search dimension (Optuna's `suggest_*`, by the field's type)."""
    params = {}
    for name, values in space.items():
        if isinstance(values, list):
            params[name] = trial.suggest_categorical(name, values)
        elif is_int_field(name):
            params[name] = trial.suggest_int(name, int(values.low), int(values.high), step=max(1, int(values.step or 1)),
                                             log=values.log)
        else:
            params[name] = trial.suggest_float(name, values.low, values.high, step=values.step, log=values.log)
    return params


def trial_dir(out: Path, number: int) -> Path:
    return Path(out) / TRIALS / f"trial-{number:04d}"


class HeldOutReporter(TrainerCallback):
    """Every `every` steps: the student's held-out measure, reported to the Optuna trial; a trial
    the pruner stops raises `optuna.TrialPruned` out of training (nothing is saved)."""

    def __init__(self, trial, held_out: HeldOut, sweep: SweepSection, batch_size: int):
        self.trial, self.held_out, self.sweep, self.batch_size = trial, held_out, sweep, batch_size
        self.inputs = None

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        if step % self.sweep.report_every or step >= state.max_steps:  # the last step is the trial's value
            return
        import optuna

        from distill.evaluation.fidelity import scoring_inputs
        from distill.train.scoring import teacher_forced

        if self.inputs is None:
            self.inputs = scoring_inputs(self.held_out.corpus, processing_class, model, set(self.held_out.prompt_ids))
        scored = teacher_forced(model, *self.inputs, self.batch_size)
        value = getattr(scored, self.sweep.objective)
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.sweep.objective} {value:.4g} at step {step}")


def run_trial(trial, base: TrainConfig, eval_cfg: EvalConfig, held_out: HeldOut, sweep: SweepSection,
              out: Path) -> TrialResult:
    """Train and score the trial's student in `out/trials/trial-NNNN`; its value is returned (and
    its measures stored on the trial)."""
    import optuna

    from distill.train.trainer import train

    start = time.time()
    params = suggest(trial, sweep.space)
    where = trial_dir(out, trial.number)
    where.parent.mkdir(parents=True, exist_ok=True)
    print(f"[sweep] trial {trial.number} started: {format_params(params)}", file=sys.stderr, flush=True)
    cfg = trial_config(base, params, where, tracked_as=(out, sweep.study, trial.number))
    reporter = [HeldOutReporter(trial, held_out, sweep, eval_cfg.batch_size)] if sweep.objective != "score" else []
    # Training's and scoring's own logs go to the trial's log file: the terminal keeps the sweep's lines.
    with open(where.with_suffix(".log"), "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            result = train(cfg, callbacks=reporter)
        except optuna.TrialPruned:
            track_trial(where, trial.number, "pruned")
            raise
        finally:
            shutil.rmtree(where / "checkpoints", ignore_errors=True)  # a trial never resumes: its checkpoints are waste
        measures = score_student(where, eval_cfg, held_out, sweep)
    trial.set_user_attr("measures", measures)
    trial.set_user_attr("steps", result.card.steps)
    track_trial(where, trial.number, "complete", measures, result.card.steps)
    return TrialResult(trial.number, params, measures[sweep.objective], measures, result.card.steps, where,
                       time.time() - start)


def trial_config(base: TrainConfig, params: dict[str, Any], out: Path,
                 tracked_as: tuple[Path, str, int] | None = None) -> TrainConfig:
    """The run's train config with the trial's values, into `out` (validated as a whole: a
    combination the train config refuses fails the trial before anything loads). With `report_to`,
    `tracked_as` (sweep dir, study, trial number) makes every trial one run of one experiment in
    one store: the sweep's, unless the train section names its own."""
    tracking = {}
    if base.report_to and tracked_as:
        sweep_dir, study, number = tracked_as
        tracking = {"tracking_dir": base.tracking_dir or sweep_dir, "experiment": base.experiment or study,
                    "run_name": f"trial-{number:04d}"}
    return TrainConfig(**{**base.model_dump(), **params, **tracking, "out": out, "resume": False, "overwrite": True})


def track_trial(student: Path, number: int, state: str, measures: dict[str, float] | None = None,
                steps: int = 0) -> None:
    """The trial's outcome in its tracked run (when training opened one): its state and held-out measures."""
    from distill import tracking

    run = tracking.load_run(student)
    if run is None:
        return
    run.log_params({"sweep.trial": number}, tags={"sweep.state": state})
    if measures:
        run.log_metrics({f"sweep/{name}": value for name, value in measures.items()}, step=steps)
    run.finish()


def score_student(student: Path, eval_cfg: EvalConfig, held_out: HeldOut, sweep: SweepSection) -> dict[str, float]:
    from distill.evaluation.fidelity import fidelity

    scored = fidelity(str(student), held_out.corpus, eval_cfg, set(held_out.prompt_ids), batch_size=eval_cfg.batch_size)
    measures = {"kl": scored.kl, "top1_agreement": scored.top1_agreement, "nll": scored.nll}
    if sweep.objective == "score":
        from distill.evaluation.job import evaluate

        report = evaluate(eval_cfg.model_copy(update={
            "student": str(student), "out": student / "eval", "prompts": held_out.prompts, "corpus": held_out.corpus,
            "latency": False, "overwrite": True}))
        measures["score"] = report.answers.student.score
    return measures


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
