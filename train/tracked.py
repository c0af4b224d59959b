"""A training run in the trackers of `report_to` (see `distill.tracking`): the run is opened
before the Trainer starts, with distill's settings as its parameters; the Trainer's own
integrations then log every metric it logs (loss, kd, ce, on_policy_kl, ...) into it; after the
last step the held-out numbers and the model card join them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from distill import corpus, tracking
from distill.config import TrainConfig
from distill.tracking import TrackedRun

# The Trainer's integrations this module sets up itself (where the event files go), not by name.
SET_UP_HERE = ("tensorboard",)


def distill_params(cfg: TrainConfig, manifest: corpus.Manifest) -> tuple[dict, dict]:
    """(parameters, tags) of a run: what makes one distillation differ from another."""
    params = {
        "teacher": manifest.teacher.model, "corpus": ",".join(str(p) for p in cfg.corpora), "corpus_manifest_sha256": manifest.sha256(),
        "corpus_records": manifest.stats.records, "top_k": manifest.generation.top_k, "student": cfg.student,
        "alpha": cfg.alpha, "kd_temperature": cfg.kd_temperature, "loss": cfg.loss, "tail": cfg.tail,
        "lora": cfg.lora, "learning_rate": cfg.learning_rate, "max_steps": cfg.max_steps, "epochs": cfg.epochs,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "max_length": cfg.max_length, "seed": cfg.seed,
        "on_policy": cfg.on_policy,
    }
    if cfg.loss == "jsd":
        params["beta"] = cfg.beta
    if cfg.on_policy:
        params |= {"lmbda": cfg.lmbda, "on_policy_loss": cfg.on_policy_loss, "teacher_top_k": cfg.teacher_top_k,
                   "sample_temperature": cfg.sample_temperature, "max_new_tokens": cfg.max_new_tokens}
    mode = "on-policy" if cfg.on_policy else ("sft" if cfg.alpha == 0 else "kd")
    tags = {"distill.stage": "train", "distill.mode": mode, "distill.teacher": manifest.teacher.model,
            "distill.loss": cfg.loss}
    return {f"distill.{k}": v for k, v in params.items()}, tags


def open_training_run(cfg: TrainConfig, manifest: corpus.Manifest, continues: bool) -> TrackedRun | None:
    """The run of `cfg.out` (`continues`: the one it holds, when training resumes with the same settings),
    its parameters logged; None without `report_to`."""
    if not cfg.report_to:
        return None
    run = tracking.open_run(cfg.out, cfg.report_to, run_name=cfg.run_name, experiment=cfg.experiment,
                            tracking_dir=cfg.tracking_dir, continue_run=continues)
    run.log_params(*distill_params(cfg, manifest))
    return run


def trainer_report_to(cfg: TrainConfig) -> list[str]:
    """What `report_to` passes to the Trainer by name (the rest comes as callbacks)."""
    return [name for name in cfg.report_to if name not in SET_UP_HERE]


def trainer_callbacks(run: TrackedRun | None) -> list:
    """transformers' TensorBoard callback writing into the run's folder (by name it would pick
    `output_dir/runs/DATE_HOST`)."""
    if run is None or run.tensorboard_dir is None:
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(SummaryWriter(log_dir=run.tensorboard_dir))]


@contextlib.contextmanager
def active(run: TrackedRun | None) -> Iterator[None]:
    """While training: the run is MLflow's active run, so the Trainer's MLflow callback logs into it
    (it starts a run of its own only when none is active)."""
    if run is None or run.mlflow_run_id is None:
        yield
        return
    import mlflow

    mlflow.set_tracking_uri(run.mlflow_uri)
    mlflow.start_run(run_id=run.mlflow_run_id)
    try:
        yield
    finally:
        mlflow.end_run()


def log_result(run: TrackedRun | None, out: Path, steps: int, initial: dict, final: dict) -> None:
    """Held-out numbers before (step 0) and after training, the card and the loss plot."""
    if run is None:
        return
    for step, metrics in ((0, initial), (steps, final)):
        if metrics:
            run.log_metrics({f"held_out/{k.removeprefix('eval_')}": v for k, v in metrics.items()}, step)
    for name in ("distill.json", "loss.png"):
        if (out / name).exists():
            run.log_artifact(out / name, "student")
    run.finish()
