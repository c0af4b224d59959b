"""Experiment tracking: one run per trained student, in the trackers people already use.

`distill train --report-to tensorboard,mlflow` hands the trackers to the transformers Trainer
(its own integrations log the loss, kd, ce, on-policy KL, learning rate ... at every
`logging_steps`) and opens the run first, here, so that distill's settings (teacher, corpus
hash, alpha, temperature, loss, k, on-policy settings) are its parameters and so that later
stages can log to the same run: `distill eval` reads `<student>/tracking.json` and adds its
headline numbers and report.

Offline by default. Where the files go (`tracking_dir`, default the student's `out`):

- TensorBoard: event files in `TRACKING_DIR/tensorboard/RUN_NAME` (`tensorboard --logdir
  TRACKING_DIR/tensorboard` shows every run of that folder side by side);
- MLflow: `$MLFLOW_TRACKING_URI` when set, else a sqlite store `TRACKING_DIR/mlflow.db` with its
  artifacts in `TRACKING_DIR/mlartifacts`; the run belongs to the experiment `experiment`.

The Python API, for anything that records runs (a sweep records each trial as one run of one
experiment): `open_run(out, ...)` opens the run of an output directory or continues the one it
holds, `load_run(out)` finds it again, and a `TrackedRun` logs parameters, metrics and artifacts
to each of its trackers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from distill import files

# The trackers `report_to` accepts: transformers' integrations of these names log training.
Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio"]
TRACKERS: tuple[str, ...] = typing.get_args(Tracker)
# The module each one needs (`pip install 'distill[track]'` installs the first two).
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
# The trackers distill logs to itself (parameters, eval numbers, reports); wandb and trackio get
# the Trainer's metrics through transformers only.
LOGGED_BY_DISTILL = ("tensorboard", "mlflow")
RUN_FILE = "tracking.json"
DEFAULT_EXPERIMENT = "distill"


def parse_trackers(value: Any) -> Any:
    """`--report-to tensorboard,mlflow` (or repeated flags, or a YAML list, or `none`) -> a list of
    names; an unknown name is one line naming the choices."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        return value
    names = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    names = [] if names == ["none"] else names
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r}: choose from {', '.join(TRACKERS)} (or none)")
    return list(dict.fromkeys(names))


def check_installed(trackers: list[str]) -> None:
    """Refuse, before anything trains, a tracker whose package is missing."""
    for name in trackers:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ValueError(f"`report_to: {name}` needs the `{PACKAGES[name]}` package: pip install "
                             + ("'distill[track]'" if name in LOGGED_BY_DISTILL else PACKAGES[name]))


def mlflow_uri(tracking_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI when set, else a sqlite store in `tracking_dir` (mlflow 3 refuses its
    plain file store unless MLFLOW_ALLOW_FILE_STORE=true; sqlite needs no server and no network)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(tracking_dir).resolve() / 'mlflow.db'}"


class TrackedRun(BaseModel):
    """One run, as `RUN_FILE` records it: enough for any later process to log to it again."""

    trackers: list[str]
    run_name: str
    experiment: str
    tracking_dir: str
    tensorboard_dir: str | None = None
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None

    def _mlflow(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_uri)

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=self.tensorboard_dir)

    def log_params(self, params: dict[str, Any], tags: dict[str, str] | None = None) -> None:
        """Parameters (MLflow params, a TensorBoard text table); a continued run keeps its first values."""
        if self.mlflow_run_id:
            from mlflow.entities import Param, RunTag

            client = self._mlflow()
            logged = client.get_run(self.mlflow_run_id).data.params
            new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
            for start in range(0, len(new), 100):  # MLflow's batch limit
                client.log_batch(self.mlflow_run_id, params=new[start:start + 100])
            client.log_batch(self.mlflow_run_id, tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
        if self.tensorboard_dir:
            with self._tensorboard() as writer:
                rows = [f"| {k} | {v} |" for k, v in {**params, **(tags or {})}.items()]
                writer.add_text("distill/params", "\n".join(["| parameter | value |", "|---|---|", *rows]))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Scalars at `step` (None values are skipped)."""
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        if self.mlflow_run_id:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._mlflow().log_batch(self.mlflow_run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
        if self.tensorboard_dir:
            with self._tensorboard() as writer:
                for key, value in metrics.items():
                    writer.add_scalar(key, value, step)

    def log_artifact(self, path: Path, folder: str | None = None, text: bool = False) -> None:
        """A file: an MLflow artifact (under `folder`); with `text`, also its contents as TensorBoard
        text (TensorBoard has no artifacts: it renders Markdown, not HTML)."""
        if self.mlflow_run_id:
            self._mlflow().log_artifact(self.mlflow_run_id, str(path), artifact_path=folder)
        if self.tensorboard_dir and text:
            with self._tensorboard() as writer:
                writer.add_text(f"{folder or 'files'}/{Path(path).name}", Path(path).read_text())

    def finish(self) -> None:
        """Mark the MLflow run finished (a later `log_*` still adds to it)."""
        if self.mlflow_run_id:
            self._mlflow().set_terminated(self.mlflow_run_id)


def open_run(out: Path, trackers: list[str], run_name: str | None = None, experiment: str | None = None,
             tracking_dir: Path | None = None, continue_run: bool = True) -> TrackedRun:
    """The run of `out`: the one `out/tracking.json` records (if `continue_run` and it used the same
    trackers and store), else a new one, recorded there. `run_name` defaults to `out`'s name,
    `tracking_dir` to `out`, `experiment` to "distill"."""
    out = Path(out)
    tracking_dir = Path(tracking_dir or out).resolve()
    run = TrackedRun(trackers=list(trackers), run_name=run_name or out.resolve().name,
                     experiment=experiment or DEFAULT_EXPERIMENT, tracking_dir=str(tracking_dir))
    if "tensorboard" in trackers:
        run.tensorboard_dir = str(tracking_dir / "tensorboard" / run.run_name)
    if "mlflow" in trackers:
        run.mlflow_uri = mlflow_uri(tracking_dir)
    before = load_run(out)
    if continue_run and before and before.model_dump(exclude={"mlflow_run_id"}) == run.model_dump(exclude={"mlflow_run_id"}):
        return before
    if run.mlflow_uri:
        run.mlflow_run_id = _new_mlflow_run(run)
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / RUN_FILE, run.model_dump())
    return run


def load_run(out: Path) -> TrackedRun | None:
    """The run `out` was tracked in, or None when it was not."""
    path = Path(out) / RUN_FILE
    return TrackedRun.model_validate(json.loads(path.read_text())) if path.exists() else None


def _new_mlflow_run(run: TrackedRun) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=run.mlflow_uri)
    experiment = client.get_experiment_by_name(run.experiment)
    if experiment is None:
        # Our own sqlite store keeps its artifacts beside it (mlflow's default is ./mlartifacts of
        # whatever directory the process runs in); a store the user named decides for itself.
        local = run.mlflow_uri == f"sqlite:///{Path(run.tracking_dir) / 'mlflow.db'}"
        location = (Path(run.tracking_dir) / "mlartifacts").as_uri() if local else None
        experiment_id = client.create_experiment(run.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    return client.create_run(experiment_id, run_name=run.run_name).info.run_id
