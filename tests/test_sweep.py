"""`distill sweep`: the search space is checked in one line; trials are ranked by the objective's
direction; a pruned trial is recorded as pruned; `best.yaml` reproduces the best trial's train
config; a rerun after kill -9 neither loses nor double-counts a trial; several worker processes
share one study. Real Optuna studies on SQLite and the real trainer on the tiny models, a few
steps each; the corpora are built from records (no vLLM: the sweep takes `sweep.corpus` and
`sweep.held_out`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml

from distill.cli import main
from distill.config import provenance
from distill.pipeline import load_config, stage_configs
from distill.sweep.job import sweep
from distill.sweep.report import BEST_CONFIG, BEST_STUDENT
from distill.sweep.study import STUDY_DB
from distill.train.card import StudentCard
from tests.helpers import ROOT, make_corpus, record, write_jsonl

FAST, FROZEN = 0.03, 1e-7  # a learning rate that learns the teacher in a few steps, and one that does not move


def teacher_records(prefix: str, n: int) -> list[dict]:
    """A teacher that puts most of its mass on tokens 5, 6, 7, 8 at every position: learnable in a
    few steps, so a student that trains scores far better than one that does not."""
    return [record(f"{prefix}{i}", n_tokens=4, topk_ids=[[5, 6, 7, 8]] * 4, top1=-0.5) for i in range(n)]


@pytest.fixture
def sweep_config(tmp_path, tiny_models):
    """`make(**sweep_fields)` -> a sweep config file on a 32-record corpus and 8 held-out records."""
    teacher = str(tiny_models["llama-teacher"])  # the manifests name it: the vocabulary check reads its tokenizer
    train_corpus = make_corpus(tmp_path / "corpus", teacher_records("t", 32), teacher=teacher)
    held_out = make_corpus(tmp_path / "held-out", teacher_records("h", 8), teacher=teacher)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "unused: the corpora are given"}])

    def make(**fields) -> str:
        data = {
            "teacher": {"model": teacher},
            "prompts": {"train": str(prompts), "eval": str(prompts)},
            "student": {"model": str(tiny_models["llama-student"])},
            "train": {"lora": False, "max_steps": 4, "batch_size": 8, "learning_rate": FAST, "logging_steps": 1,
                      "save_steps": 100, "eval_fraction": 0.0, "max_length": 64, "kd_temperature": 1.5},
            "sweep": {"space": {"learning_rate": [FAST, FROZEN]}, "corpus": str(train_corpus),
                      "held_out": str(held_out), "trials": 2, "report_every": 2, "pruner": "none",
                      "start_with": [{"learning_rate": FAST}, {"learning_rate": FROZEN}], **fields},
        }
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return make


def load_study(out):
    import optuna

    return optuna.load_study(study_name="distill-sweep", storage=f"sqlite:///{out / STUDY_DB}")


@pytest.mark.parametrize("space, message", [
    ({"alfa": {"low": 0, "high": 1}}, "`sweep.space.alfa`: not a train field a sweep can search (one of loss"),
    ({"alpha": {"low": 0.5, "high": 0.5}}, "`sweep.space.alpha`: empty range (low 0.5 is not below high 0.5)"),
    ({"loss": []}, "`sweep.space.loss`: no choices"),
    ({"loss": ["forward_kl", "kl_forward"]}, "`sweep.space.loss`: 'kl_forward': Input should be 'forward_kl'"),
    ({"alpha": {"low": 0, "high": 2}}, "`sweep.space.alpha.high`: 2.0: Input should be less than or equal to 1"),
    ({"max_steps": {"low": 10, "high": 20.5}}, "`sweep.space.max_steps`: `max_steps` is an integer"),
    ({"out": ["x"]}, "`sweep.space.out`: not a train field"),
])
def test_an_invalid_search_space_fails_in_one_line(sweep_config, tmp_path, capsys, space, message):
    assert main(["sweep", sweep_config(space=space, start_with=[]), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("distill sweep: error: invalid sweep config") and message in err, err
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_a_valid_search_space_parses_into_its_dimensions(sweep_config, tmp_path):
    from distill.sweep.study import load_plan

    plan = load_plan(sweep_config(space={"alpha": {"low": 0.1, "high": 1}, "kd_temperature": {"low": 0.5, "high": 4, "log": True},
                                         "loss": ["forward_kl", "jsd"], "max_steps": {"low": 2, "high": 8, "step": 2}},
                                  start_with=[]), tmp_path / "s")
    space = plan.sweep.space
    assert space["loss"] == ["forward_kl", "jsd"] and space["kd_temperature"].log and space["max_steps"].step == 2
    assert not plan.sweep.maximise and plan.run.train.kd_temperature == 1.5  # kl is minimised; the run config is read


@pytest.mark.parametrize("objective", ["top1_agreement", "kl"])
def test_the_objective_ranks_trials_in_its_direction_and_best_yaml_reproduces_the_best(sweep_config, tmp_path, objective):
    out = sweep(sweep_config(objective=objective), tmp_path / "s")
    study = load_study(out)
    values = {t.params["learning_rate"]: t.value for t in study.trials}
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    # the student that learnt is better by either measure: more top-1 agreement, less KL
    assert (values[FAST] > values[FROZEN]) if objective == "top1_agreement" else (values[FAST] < values[FROZEN])
    assert study.best_trial.params == {"learning_rate": FAST}
    report = (out / "report.md").read_text()
    assert f"**Best: trial 0**, {objective}" in report
    assert report.index("| 0 | complete") < report.index("| 1 | complete")  # best first
    # best.yaml is a `distill run` config whose train stage is the best trial's config
    best_run = stage_configs(load_config(out / BEST_CONFIG))["train"]
    trained = StudentCard.load(out / BEST_STUDENT).config
    where = {"out", "corpus", "resume", "overwrite"}
    assert {k: v for k, v in provenance(best_run).items() if k not in where} == \
        {k: v for k, v in trained.items() if k not in where}


def test_a_pruned_trial_is_recorded_as_pruned(sweep_config, tmp_path):
    out = sweep(sweep_config(pruner="median", pruner_startup_trials=1), tmp_path / "s")
    first, second = load_study(out).trials
    assert first.state.name == "COMPLETE" and second.state.name == "PRUNED"
    assert second.last_step == 2 and second.intermediate_values[2] > first.intermediate_values[2]  # its KL was worse
    assert not (out / "trials" / "trial-0001" / "distill.json").exists()  # stopped before a student was saved
    assert "| 1 | pruned |" in (out / "report.md").read_text()


def test_each_trial_is_one_tracked_run_of_the_sweeps_experiment(sweep_config, tmp_path):
    """With `report_to` in the train section, every trial is a run of one MLflow experiment (the
    study's name) in one store (the sweep's): its settings, its state and its held-out measures."""
    from mlflow.tracking import MlflowClient

    path = sweep_config(pruner="median", pruner_startup_trials=1)
    data = yaml.safe_load(open(path))
    data["train"]["report_to"] = ["mlflow"]
    open(path, "w").write(yaml.safe_dump(data))
    out = sweep(path, tmp_path / "s")
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("distill-sweep")
    runs = {run.info.run_name: run.data for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["trial-0000", "trial-0001"]
    complete, pruned = runs["trial-0000"], runs["trial-0001"]
    assert (complete.tags["sweep.state"], pruned.tags["sweep.state"]) == ("complete", "pruned")
    assert complete.params["distill.learning_rate"] == str(FAST) and pruned.params["distill.learning_rate"] == str(FROZEN)
    assert complete.metrics["sweep/kl"] == pytest.approx(load_study(out).trials[0].value)
    assert "sweep/kl" not in pruned.metrics


def sweep_command(config: str, out, *flags: str) -> list[str]:
    return [sys.executable, "-m", "distill.cli", "sweep", config, "--out", str(out), *flags]


def test_a_live_worker_stays_alive_when_the_wall_clock_steps(monkeypatch):
    """A worker is known by its pid and start; a step of the wall clock (NTP, mocked: psutil's
    boot time moved by a second) must not make a live one look dead (other workers would fail
    its running trial under it), while another start or a pid that is gone is a dead worker."""
    from types import SimpleNamespace

    import psutil

    from distill.sweep.study import WORKER_ATTR, alive, worker_identity

    me = worker_identity()
    worker = lambda **changed: SimpleNamespace(user_attrs={WORKER_ATTR: {**me, **changed}})  # noqa: E731
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stepped = (lambda boot: lambda: boot() + 1.0)(psutil.boot_time)
    monkeypatch.setattr(psutil, "boot_time", stepped)
    if hasattr(psutil, "_pslinux"):  # where create_time() reads it
        monkeypatch.setattr(psutil._pslinux, "boot_time", stepped)
    assert alive(worker()) and worker_identity() == me
    assert not alive(worker(started=me["started"] - 0.5)) and not alive(worker(pid=child.pid))


@pytest.mark.slow
def test_a_rerun_after_kill_9_neither_loses_nor_double_counts_a_trial(sweep_config, tmp_path):
    config, out = sweep_config(trials=3, start_with=[{"learning_rate": FAST}]), tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(sweep_command(config, out), stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    seen = []
    for line in process.stderr:  # the event: the second trial has started (the first has finished)
        seen.append(line)
        if line.startswith("[sweep] trial 1 started"):
            break
    process.kill()  # SIGKILL, mid-trial
    process.wait()
    assert process.returncode == -signal.SIGKILL and any("trial 0 complete" in line for line in seen), "".join(seen)
    first = load_study(out).trials[0]
    assert load_study(out).trials[1].state.name == "RUNNING"  # as the kill left it

    rerun = subprocess.run(sweep_command(config, out), capture_output=True, text=True, cwd=ROOT, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "trials 1: their worker died; marked failed (not counted)" in rerun.stderr
    assert "1 of 3 trials counted" in rerun.stderr
    trials = load_study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].value == first.value and trials[0].datetime_complete == first.datetime_complete  # kept, not rerun
    assert "3 completed, 0 pruned, 1 failed" in (out / "report.md").read_text()


@pytest.mark.slow
def test_several_worker_processes_share_one_study(sweep_config, tmp_path):
    out = tmp_path / "s"
    done = subprocess.run(sweep_command(sweep_config(trials=4), out, "--parallel", "2"), capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    trials = load_study(out).trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    # each worker checks the budget before asking for a trial: at most P - 1 more may start at once
    assert 4 <= len(finished) <= 5 and len(finished) == len(trials)
    workers = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(workers) == 2, workers  # both processes ran trials on the one SQLite study (they start together)
    assert done.stdout.strip() == str(out)


@pytest.fixture
def postgres():
    """A real PostgreSQL server for this test (Debian's postgresql package: initdb + pg_ctl, run as
    the `postgres` user when the tests run as root; trust authentication on 127.0.0.1)."""
    import shutil
    import socket
    import tempfile
    from pathlib import Path

    pytest.importorskip("psycopg2", reason="the PostgreSQL driver (pip install psycopg2-binary) is not installed")
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="distill-pg-"))
    if as_postgres:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = root / "db"
    subprocess.run([*as_postgres, "initdb", "-D", str(db), "-A", "trust", "-U", "distill"], check=True,
                   capture_output=True)
    subprocess.run([*as_postgres, "pg_ctl", "-D", str(db), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://distill@127.0.0.1:{port}/postgres"  # SQLAlchemy 2.1 defaults to psycopg 3
    finally:
        subprocess.run([*as_postgres, "pg_ctl", "-D", str(db), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("collision", ["IntegrityError", "ProgrammingError"])
def test_a_worker_whose_table_creation_collides_with_another_tries_again(monkeypatch, collision):
    """Two workers creating Optuna's tables in one empty PostgreSQL database: the later CREATE fails
    with a unique violation or "relation already exists", depending on when the earlier one
    committed. That timing cannot be forced on a real server, so the storage here (a mock) fails
    its first creation as the later worker's does; the second try finds the tables."""
    import optuna
    import sqlalchemy.exc

    from distill.sweep.study import open_storage

    made = []

    def storage(url, **kwargs):
        made.append(url)
        if len(made) == 1:
            raise getattr(sqlalchemy.exc, collision)("CREATE TABLE studies", {}, Exception("collided"))
        return "storage"

    monkeypatch.setattr(optuna.storages, "RDBStorage", storage)
    assert open_storage("postgresql+psycopg2://distill@127.0.0.1:5432/postgres") == "storage" and len(made) == 2


@pytest.mark.slow
def test_two_sweeps_on_one_postgresql_study_share_the_budget(sweep_config, tmp_path, postgres):
    """Two `distill sweep` commands, each with its own directory (as on two machines), on one study."""
    import optuna

    config, env = sweep_config(trials=4), {**os.environ, "PYTHONPATH": str(ROOT)}
    machines = [subprocess.Popen(sweep_command(config, tmp_path / name, "--storage", postgres), stderr=subprocess.PIPE,
                                 text=True, cwd=ROOT, env=env) for name in ("a", "b")]
    errors = [m.communicate()[1] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], "\n\n".join(f"{name}: {e[-4000:]}" for name, e in zip("ab", errors))
    trials = optuna.load_study(study_name="distill-sweep", storage=postgres).trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 4 <= len(finished) <= 5 and len(finished) == len(trials)
    assert all("trials counted" in e for e in errors)  # both joined the one study
    # Each trial ran in exactly one of the two directories. (Both commands usually run trials, but one
    # that starts late may find the budget spent: the two are started alike, with no barrier between them.)
    ran_in = {name: {p.name for p in (tmp_path / name / "trials").glob("trial-*") if p.is_dir()} for name in "ab"}
    assert not ran_in["a"] & ran_in["b"] and ran_in["a"] | ran_in["b"] == {f"trial-{t.number:04d}" for t in trials}


def test_the_demo_sweep_judges_on_prompts_apart_from_the_demo_eval_prompts():
    """examples/sweep-demo.yaml picks its winner on validation.jsonl; eval.jsonl stays for comparing it after."""
    import json

    from distill.demo.run import PROMPTS

    def texts(name: str) -> list[str]:
        return [json.loads(line)["messages"][-1]["content"] for line in (PROMPTS / name).read_text().splitlines()]

    validation = texts("validation.jsonl")
    assert len(set(validation)) == 300 and not set(validation) & set(texts("eval.jsonl")) \
        and not set(validation) & set(texts("train.jsonl"))
