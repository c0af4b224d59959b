"""Experiment tracking (`report_to`): real TensorBoard event files and a real MLflow sqlite store,
read back with their own readers; nothing about either tracker is mocked."""

import json

import pytest

from distill import corpus, tracking
from distill.cli import main
from distill.config import TrainConfig
from distill.train.trainer import train
from tests.helpers import make_corpus, record

STEPS = 3


def tiny_corpus(root, tiny_models):
    return make_corpus(root, [record(i, n_tokens=6) for i in range(12)], teacher=str(tiny_models["llama-teacher"]))


def train_tracked(tmp_path, tiny_models, trackers, **overrides):
    settings = dict(lora=False, max_steps=STEPS, batch_size=4, logging_steps=1, save_steps=100, eval_fraction=0.25,
                    chunk_size=16, alpha=0.7, report_to=trackers)
    source = tmp_path / "c" if (tmp_path / "c").exists() else tiny_corpus(tmp_path / "c", tiny_models)
    return train(TrainConfig(corpus=source, student=str(tiny_models["llama-student"]), out=tmp_path / "student",
                             **settings | overrides))


def logged(out, key) -> dict[int, float]:
    """step -> value of `key` in the student's metrics.jsonl (distill's own record of the run)."""
    return {m["step"]: m[key] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in m}


def test_tensorboard_event_files_hold_kd_and_ce_as_logged(tmp_path, tiny_models):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train_tracked(tmp_path, tiny_models, ["tensorboard"]).path
    run = tracking.load_run(out)
    assert run.run_name == "student" and run.tensorboard_dir == str((out / "tensorboard" / "student").resolve())
    events = EventAccumulator(run.tensorboard_dir).Reload()
    for key in ("kd", "ce", "loss"):
        scalars = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        expected = logged(out, key)
        assert sorted(scalars) == sorted(expected) == list(range(1, STEPS + 1))
        assert scalars == pytest.approx(expected, rel=1e-6)  # event files store float32
    held_out = {e.step: e.value for e in events.Scalars("held_out/kl")}
    card = json.loads((out / "distill.json").read_text())
    assert held_out == pytest.approx({0: card["initial"]["eval_kl"], STEPS: card["final"]["eval_kl"]}, rel=1e-6)
    assert "distill/params/text_summary" in events.Tags()["tensors"]


def test_mlflow_sqlite_store_holds_the_params_and_metrics(tmp_path, tiny_models, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = train_tracked(tmp_path, tiny_models, ["mlflow"], run_name="kd-alpha0.7", experiment="tracking-test")
    out = result.path
    run = tracking.load_run(out)
    assert run.mlflow_uri == f"sqlite:///{out.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=run.mlflow_uri)
    stored = client.get_run(run.mlflow_run_id)
    assert stored.info.run_name == "kd-alpha0.7" and stored.info.status == "FINISHED"
    assert client.get_experiment(stored.info.experiment_id).name == "tracking-test"
    params, tags = stored.data.params, stored.data.tags
    manifest = corpus.read_manifest(tmp_path / "c")
    assert params["distill.alpha"] == "0.7" and params["distill.loss"] == "forward_kl"
    assert params["distill.kd_temperature"] == "1.0" and params["distill.top_k"] == str(manifest.generation.top_k)
    assert params["distill.corpus_manifest_sha256"] == manifest.sha256()
    assert params["distill.teacher"] == str(tiny_models["llama-teacher"]) and params["distill.on_policy"] == "False"
    assert params["learning_rate"] == str(2e-4)  # the Trainer's own parameters beside distill's
    assert tags["distill.mode"] == "kd"
    for key in ("kd", "ce", "loss"):
        history = {m.step: m.value for m in client.get_metric_history(run.mlflow_run_id, key)}
        assert history == pytest.approx(logged(out, key), rel=1e-6)
    assert {a.path for a in client.list_artifacts(run.mlflow_run_id, "student")} == {"student/distill.json",
                                                                                     "student/loss.png"}


def test_a_resumed_run_continues_its_tracked_run_and_a_fresh_one_opens_another(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = tracking.open_run(tmp_path / "s", ["mlflow"])
    assert tracking.open_run(tmp_path / "s", ["mlflow"]) == first
    fresh = tracking.open_run(tmp_path / "s", ["mlflow"], continue_run=False)
    assert fresh.mlflow_run_id != first.mlflow_run_id and tracking.load_run(tmp_path / "s") == fresh
    other_store = tracking.open_run(tmp_path / "s", ["mlflow"], tracking_dir=tmp_path / "sweep")
    assert other_store.mlflow_uri == f"sqlite:///{(tmp_path / 'sweep' / 'mlflow.db').resolve()}"


@pytest.mark.parametrize("given", [["--report-to", "tensorbord"], ["--report-to", "mlflow,nope"]])
def test_an_unknown_tracker_is_one_line_before_training(tmp_path, capsys, tiny_models, given):
    source = make_corpus(tmp_path / "c", [record(0)])
    code = main(["train", "--corpus", str(source), "--student", str(tiny_models["llama-student"]),
                 "--out", str(tmp_path / "s"), *given])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "unknown tracker" in err
    assert "tensorboard, mlflow, wandb, trackio" in err
    assert not (tmp_path / "s").exists()


def test_a_tracker_that_is_not_installed_is_refused_before_training(tmp_path, tiny_models):
    if tracking.importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ValueError, match="needs the `wandb` package"):
        train(TrainConfig(corpus=make_corpus(tmp_path / "c", [record(0)]), student=str(tiny_models["llama-student"]),
                          out=tmp_path / "s", report_to=["wandb"]))
    assert not (tmp_path / "s").exists()


@pytest.mark.engine
def test_eval_logs_its_numbers_and_report_to_the_students_run(tmp_path, tiny_models, teacher, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distill.config import EvalConfig
    from distill.evaluation.job import evaluate
    from tests.helpers import MAX_MODEL_LEN, write_jsonl

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    student = train_tracked(tmp_path, tiny_models, ["tensorboard", "mlflow"]).path
    prompts = write_jsonl(tmp_path / "held.jsonl", [{"id": f"held-{i}", "messages": [
        {"role": "user", "content": f"Sort {i} {i + 3} please"}]} for i in range(6)])
    # the teacher's engine answers for the student too (test_eval does the same): the logging is under test
    report = evaluate(EvalConfig(student=str(student), teacher=str(tiny_models["llama-teacher"]), prompts=prompts,
                                 out=tmp_path / "eval", max_tokens=8, max_model_len=MAX_MODEL_LEN, latency=False,
                                 engine_args={"max_logprobs": 20}), teacher_engine=teacher, student_engine=teacher)
    run = tracking.load_run(student)
    client = MlflowClient(tracking_uri=run.mlflow_uri)
    metrics = client.get_run(run.mlflow_run_id).data.metrics
    assert metrics["eval_report/kl"] == pytest.approx(report.fidelity.kl)
    assert metrics["eval_report/top1_agreement"] == pytest.approx(report.fidelity.top1_agreement)
    assert [m.step for m in client.get_metric_history(run.mlflow_run_id, "eval_report/kl")] == [STEPS]
    artifacts = {a.path for a in client.list_artifacts(run.mlflow_run_id, "eval")}
    assert artifacts == {"eval/report.html", "eval/report.json", "eval/report.md"}
    local = client.download_artifacts(run.mlflow_run_id, "eval/report.html", str(tmp_path / "downloaded"))
    assert open(local).read() == (tmp_path / "eval" / "report.html").read_text()
    events = EventAccumulator(run.tensorboard_dir).Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval_report/kl")] == [(STEPS, pytest.approx(report.fidelity.kl))]
    assert "eval/report.md/text_summary" in events.Tags()["tensors"]


def test_a_run_resumed_with_other_settings_is_a_new_tracked_run(tmp_path, tiny_models, monkeypatch, capfd):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = tracking.load_run(train_tracked(tmp_path, tiny_models, ["mlflow"], save_steps=1).path)
    # `--resume` with a larger max_steps: the Trainer's params differ, which MLflow refuses in one run
    out = train_tracked(tmp_path, tiny_models, ["mlflow"], save_steps=1, resume=True, max_steps=STEPS + 1).path
    second = tracking.load_run(out)
    assert second.mlflow_run_id != first.mlflow_run_id
    client = MlflowClient(tracking_uri=second.mlflow_uri)
    assert client.get_run(second.mlflow_run_id).data.params["distill.max_steps"] == str(STEPS + 1)
    assert [m.step for m in client.get_metric_history(second.mlflow_run_id, "kd")] == [STEPS + 1]
    assert "Changing param values is not allowed" not in capfd.readouterr().err
