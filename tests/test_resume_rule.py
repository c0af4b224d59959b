"""Where a rerun of `distill train` starts, from what its `out` holds (train/resume.py): the same
settings resume, other settings or a finished student are refused unless `--overwrite` /
`--resume`. Directory layouts only: no model loads (test_train.py runs the rule for real)."""

from __future__ import annotations

import pytest

from distill import files
from distill.config import TrainConfig
from distill.train.resume import CHECKPOINT_DONE, SETTINGS_FILE, check_out, start_from


def config(tmp_path, **fields) -> TrainConfig:
    return TrainConfig(corpus=tmp_path / "corpus", student="org/student", out=tmp_path / "out", **fields)


def killed_run(cfg: TrainConfig, steps=(2, 4, 6), complete=(2, 4)):
    """`out` as a killed run leaves it: its settings, checkpoints (the newest half written), metrics."""
    start_from(cfg, cfg.out)
    for step in steps:
        checkpoint = cfg.out / "checkpoints" / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        if step in complete:
            (checkpoint / CHECKPOINT_DONE).write_text("")
    (cfg.out / "metrics.jsonl").write_text("{}\n")
    return cfg.out


def test_an_empty_or_missing_out_starts_fresh(tmp_path):
    assert check_out(config(tmp_path), tmp_path / "out") is None
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / files.LOCK_NAME).write_text("1\n")
    assert start_from(config(tmp_path), tmp_path / "out") is None
    assert (tmp_path / "out" / SETTINGS_FILE).exists()


def test_a_rank_that_looks_while_the_first_writes_its_settings_starts_fresh(tmp_path):
    """Under torchrun every rank checks `out` while rank 0 may be writing the settings file: its
    temp file is not a result (a DeepSpeed test's rank 1 was refused "not empty" once)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / f".{SETTINGS_FILE}.tmp-12345").write_text("{")
    assert check_out(config(tmp_path), out) is None


def test_the_same_settings_resume_from_the_newest_complete_checkpoint(tmp_path):
    out = killed_run(config(tmp_path, max_steps=8))
    assert check_out(config(tmp_path, max_steps=8), out) == out / "checkpoints" / "checkpoint-4"
    # how to treat `out` and its corpus is not part of the settings
    assert check_out(config(tmp_path, max_steps=8, allow_incomplete=True), out) == out / "checkpoints" / "checkpoint-4"


def test_other_settings_are_refused_naming_them_unless_resume_or_overwrite(tmp_path):
    out = killed_run(config(tmp_path, max_steps=8))
    with pytest.raises(FileExistsError, match=r"other settings \(learning_rate, max_steps differ\).*--overwrite"):
        check_out(config(tmp_path, max_steps=16, learning_rate=1e-3), out)
    assert check_out(config(tmp_path, max_steps=16, resume=True), out) == out / "checkpoints" / "checkpoint-4"
    assert start_from(config(tmp_path, max_steps=16, overwrite=True), out) is None
    assert sorted(p.name for p in out.iterdir()) == [SETTINGS_FILE]  # the old run's files are gone


def test_a_finished_student_or_a_foreign_folder_is_refused(tmp_path):
    out = killed_run(config(tmp_path))
    (out / "distill.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds a finished student.*--overwrite"):
        check_out(config(tmp_path), out)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no train run"):
        check_out(TrainConfig(corpus=tmp_path / "corpus", student="org/student", out=foreign), foreign)
