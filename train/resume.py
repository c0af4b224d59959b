"""Where a `distill train` starts, given what its `out` already holds: the rule every stage
follows (a rerun of the same command resumes; other settings or a finished result are refused
without `--overwrite`).

- `out` empty or missing: a fresh run.
- `out` holds an unfinished run (checkpoints, metrics) made with the same settings: it resumes
  from the newest complete checkpoint, so "rerun the same command to resume" is true.
- other settings, a finished student (`distill.json`), or files that no train run wrote:
  refused, naming what differs, unless `overwrite` (start over: `out` is emptied) or `resume`
  (continue from the newest checkpoint anyway, e.g. with a larger `max_steps`).

The run's settings are stored in `out/train-config.json` when it starts. Fields that say how to
reach things rather than what to compute (the teacher's URL and key, the flags below) are left
out of the comparison (where the run is tracked too); local paths compare resolved, so a rerun from another folder matches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from distill import files
from distill.config import TRACKING_FIELDS, TrainConfig
from distill.train.card import CARD

SETTINGS_FILE = "train-config.json"
# Written (atomically) into a checkpoint folder once it is whole: only such checkpoints resume.
CHECKPOINT_DONE = "distill-checkpoint-complete"
# The decoded training records, one folder per process (train/data.py): working files, not a
# result. Under torchrun another rank may be writing its own while this one checks `out`.
TRAINING_DATA = ".training-data"
# Not part of a run's identity: what to do with `out`, where the teacher answers (its key is a secret), and
# how many processes collate the same batches.
NOT_SETTINGS = {"out", "resume", "overwrite", "allow_incomplete", "teacher_endpoint", "teacher_endpoints", "teacher_api_key",
                "dataloader_workers", *TRACKING_FIELDS}
MULTI_TEACHER_FIELDS = ("mix", "ensemble", "teacher_weights")


def run_settings(cfg: TrainConfig) -> dict:
    settings = cfg.model_dump(mode="json", exclude=NOT_SETTINGS)
    def resolved(path) -> str:
        return str(Path(path).resolve() if Path(path).exists() else path)

    corpora = [resolved(path) for path in cfg.corpora]
    settings["corpus"] = corpora[0] if len(corpora) == 1 else corpora  # one corpus: as runs stored it before lists
    settings["student"] = resolved(settings["student"])
    for key in MULTI_TEACHER_FIELDS:  # unused: left out, so runs stored before these fields existed still resume
        if not settings[key]:
            del settings[key]
    return settings


def newest_complete_checkpoint(out: Path) -> Path | None:
    """A kill can leave the newest checkpoint half written: the newest one marked complete."""
    complete = [c for c in (out / "checkpoints").glob("checkpoint-*") if (c / CHECKPOINT_DONE).exists()]
    return max(complete, key=lambda c: int(c.name.split("-")[-1]), default=None)


def changed_settings(cfg: TrainConfig, out: Path) -> list[str]:
    """The settings of `cfg` that differ from those of the run stored in `out` (none stored: none differ)."""
    stored_path = out / SETTINGS_FILE
    if not stored_path.exists():
        return []
    stored, settings = json.loads(stored_path.read_text()), run_settings(cfg)
    return sorted(k for k in stored.keys() | settings.keys() if stored.get(k) != settings.get(k))


def check_out(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint to resume from (None: from step 0), or FileExistsError saying why `out`
    may not be used as it is. Changes nothing."""
    if cfg.overwrite or files.is_empty(out, scratch=(TRAINING_DATA,)):
        return None
    if cfg.resume:
        return newest_complete_checkpoint(out)
    if (out / CARD).exists():
        raise FileExistsError(f"`{out}` holds a finished student: choose another `out` or pass `--overwrite` to replace it")
    stored_path = out / SETTINGS_FILE
    if not stored_path.exists():
        raise FileExistsError(f"`{out}` is not empty and holds no train run: choose another `out` or pass `--overwrite`")
    changed = changed_settings(cfg, out)
    if changed:
        raise FileExistsError(f"`{out}` holds a train run with other settings ({', '.join(changed)} differ): rerun "
                              "with the same settings to resume, `--resume` to continue it anyway, or `--overwrite` "
                              "to start over")
    return newest_complete_checkpoint(out)


def is_first_process() -> bool:
    """The process that writes `out` for all: rank 0 under torchrun / accelerate, else the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def start_from(cfg: TrainConfig, out: Path) -> Path | None:
    """`check_out`, then (on the first process only: under torchrun every rank calls this)
    empty `out` for `overwrite` and store this run's settings. Returns the checkpoint to resume from."""
    checkpoint = check_out(cfg, out)
    if is_first_process():
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            files.clear_dir(out, scratch=(TRAINING_DATA,))
        files.write_json(out / SETTINGS_FILE, run_settings(cfg))
    return checkpoint
