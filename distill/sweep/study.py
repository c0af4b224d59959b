"""`distill sweep CONFIG.yaml --out DIR`: the corpus once, then trials on one Optuna study.

The study lives in `DIR/study.db` (SQLite) unless `--storage URL` names another database
(PostgreSQL, MySQL: workers on many machines share it). A rerun continues the study: trials
finished before count, a trial whose worker died (kill -9, a lost machine) is marked failed
and never counted; the budget is `trials` finished (completed or pruned) trials in all.
`--parallel P` runs P worker processes on the study; each asks the study for its next trial.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from distill.config import (
    RunConfig,
    SweepSection,
    format_validation_error,
    load_yaml,
)

STUDY_DB = "study.db"
RUN = "run"  # DIR/run: the corpus and its curation, as `distill run` makes them
HELD_OUT = "held-out-teacher-answers"
# A trial's worker, so that a rerun on this machine recognises the trials of dead workers at once.
WORKER_ATTR = "worker"


@dataclass(frozen=True)
class SweepPlan:
    """A sweep config, read and checked: the run config (its corpus and stages), the sweep section
    and the file's own data (`best.yaml` is that data with the winning values)."""

    run: RunConfig
    sweep: SweepSection
    data: dict[str, Any]
    source: Path


def load_plan(path: Path, out: Path, overrides: list[str] = ()) -> SweepPlan:
    from distill.pipeline import apply_overrides, config_from_data

    data = load_yaml(path) or {}
    if not isinstance(data, dict) or not isinstance(data.get("sweep"), dict):
        raise ValueError(f"`{path}`: expected a `distill run` config with a `sweep:` section (space, objective, trials)")
    run_data = apply_overrides({k: v for k, v in data.items() if k != "sweep"}, overrides)
    try:
        sweep = SweepSection(**data["sweep"])
    except ValidationError as e:
        lines = format_validation_error(e, "").replace("`space", "`sweep.space").replace("`start_with", "`sweep.start_with")
        raise ValueError(f"invalid sweep config `{path}`: " + "; ".join(lines.splitlines())) from None
    run = config_from_data({**run_data, "out": str(Path(out) / RUN)}, path)
    if run.teachers is not None:
        raise ValueError(f"invalid sweep config `{path}`: a sweep judges trials against one teacher: give `teacher`, "
                         "not `teachers`")
    if sweep.objective == "score" and not run.eval.scorer:
        raise ValueError(f"invalid sweep config `{path}`: `sweep.objective: score` needs `eval.scorer`")
    return SweepPlan(run, sweep, run_data, Path(path))


def storage_url(out: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{Path(out).resolve() / STUDY_DB}"


def open_storage(url: str, tries: int = 3):
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    if url.startswith("sqlite"):  # several local processes write it: wait for the lock instead of failing
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    try:
        # Workers on other machines: a trial whose worker stops beating for 3 minutes is failed.
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    except (IntegrityError, ProgrammingError):
        # Two workers creating Optuna's tables in an empty database at once: the later one's
        # CREATE collides with the earlier one's (PostgreSQL: a unique violation while the first
        # is uncommitted, "relation already exists" once it committed after the later one looked);
        # by the next try the tables exist.
        if tries <= 1:
            raise
        return open_storage(url, tries - 1)


def settings_hash(plan: SweepPlan) -> str:
    """What the study's trials mean: the search space, the objective and the run config (not the budget)."""
    sweep = plan.sweep.model_dump(mode="json", include={"space", "objective", "direction", "prompts", "report_every"})
    return hashlib.sha256(json.dumps([sweep, plan.data], sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_study(plan: SweepPlan, storage, seed: int = 0):
    """Create or continue the study on `storage` (`open_storage`); a study made with another space
    or config is refused."""
    import optuna

    sweep = plan.sweep
    startup = sweep.startup_trials or min(10, max(1, sweep.trials // 2))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials) if sweep.pruner == "median" \
        else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, study_name=sweep.study, load_if_exists=True,
                                direction="maximize" if sweep.maximise else "minimize", sampler=sampler, pruner=pruner)
    stored, current = study.user_attrs.get("settings"), settings_hash(plan)
    if stored is None:
        study.set_user_attr("settings", current)
        for params in sweep.start_with:
            study.enqueue_trial(params)
    elif stored != current:
        raise ValueError(f"study `{sweep.study}` was made with another search space or run config: choose "
                         "another --out (or `sweep.study`), or restore the config")
    return study


def worker_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started(os.getpid())}


def started(pid: int) -> float:
    """When process `pid` started, in seconds since boot (Linux's /proc), so that a step of the wall
    clock (NTP on a machine that just booted) cannot make a live worker look like another process,
    as psutil's create_time() (boot time in wall-clock seconds + ticks) can; elsewhere create_time().
    Raises psutil.NoSuchProcess where there is no such process."""
    import psutil

    stat = Path(f"/proc/{pid}/stat")
    if not stat.parent.parent.is_dir():  # no procfs (macOS)
        return psutil.Process(pid).create_time()
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()  # the command name, in (), may hold spaces
    except (FileNotFoundError, ProcessLookupError):
        raise psutil.NoSuchProcess(pid) from None
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks since boot


def alive(trial) -> bool:
    """A running trial's worker is alive (on another machine: assumed, its heartbeat decides)."""
    import psutil

    worker = trial.user_attrs.get(WORKER_ATTR)
    if not worker or worker["host"] != socket.gethostname():
        return True
    try:
        return started(worker["pid"]) == worker["started"]
    except psutil.NoSuchProcess:
        return False


def fail_dead_trials(study, storage) -> list[int]:
    """Mark failed the running trials whose worker on this machine is gone (a kill -9): never counted."""
    from optuna.trial import TrialState

    dead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if not alive(t)]
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in dead:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "failure", "its worker died (killed?) before it finished")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    return [t.number for t in dead]


def counted(study) -> int:
    """Trials that count against the budget: finished ones, and running ones whose worker lives."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    return sum(1 for t in trials if t.state != TrialState.RUNNING or alive(t))

