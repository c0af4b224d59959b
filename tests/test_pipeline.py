"""`distill run examples/demo.yaml` with reduced sizes: the real stages (vLLM teacher, curation,
TRL training, eval) into one run directory; reruns skip, a changed section re-runs what
depends on it, a killed run resumes, a bad config runs nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from distill import pipeline
from distill.cli import main
from distill.demo import skills
from distill.train.trainer import CHECKPOINT_DONE
from tests.helpers import ROOT, logged_steps, run_in_child

DEMO = ROOT / "distill" / "demo" / "demo.yaml"


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """`--set` overrides that shrink the demo: 48 training prompts, 24 held out, a few steps."""
    root = tmp_path_factory.mktemp("run")
    train = skills.write_prompts(root / "train.jsonl", "distill", 48, seed=0)
    held_out = skills.write_prompts(root / "eval.jsonl", "eval", 24, seed=1)
    return root / "run", [f"out={root / 'run'}", f"prompts.train={train}", f"prompts.eval={held_out}",
                          "train.max_steps=4", "train.save_steps=2", "train.batch_size=8", "eval.latency=false"]


@pytest.fixture(scope="module")
def first_run(reduced):
    out, overrides = reduced
    return run_in_child(DEMO, out, *(f"--set={o}" for o in overrides))


def statuses(stages: dict) -> dict[str, str]:
    return {name: s["status"] for name, s in stages.items()}


@pytest.mark.engine
def test_run_completes_and_records_what_it_did(first_run, reduced):
    out, _ = reduced
    assert statuses(first_run) == dict.fromkeys(pipeline.STAGES, "ran")
    state = json.loads((out / "run.json").read_text())
    assert state["config"]["train"]["max_steps"] == 4 and state["versions"]["transformers"]
    assert state["stages"]["curate"]["config"]["corpus"] == str(out / "corpus")
    curated = json.loads((out / "curated" / "report.json").read_text())
    assert curated["input"]["records"] == 48 and curated["kept"]["records"] > 40
    assert json.loads((out / "student" / "distill.json").read_text())["steps"] == 4


@pytest.mark.engine
def test_shipped_teacher_answers_held_out_skill_prompts_in_vllm(first_run, reduced):
    out, _ = reduced
    answers = json.loads((out / "eval" / "report.json").read_text())["answers"]
    assert answers["compared"] == 24 and answers["teacher"]["score"] >= 0.9


@pytest.mark.engine
def test_second_run_skips_every_stage(first_run, reduced):
    out, overrides = reduced
    manifest = out / "corpus" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert statuses(pipeline.run(pipeline.load_config(DEMO, overrides))) == dict.fromkeys(pipeline.STAGES, "skipped")
    assert manifest.stat().st_mtime_ns == before
    assert statuses(pipeline.run(pipeline.load_config(DEMO, overrides), only="curate")) == {
        **dict.fromkeys(pipeline.STAGES, "skipped"), "curate": "ran"}


@pytest.mark.engine
@pytest.mark.slow
def test_changed_train_section_reruns_train_and_eval_only_and_resumes_after_a_kill(first_run, reduced):
    """The train section changes; the run is killed mid-training and rerun: generate and curate
    are never redone, train continues from its checkpoint, eval follows."""
    out, overrides = reduced
    cmd = [sys.executable, "-m", "distill.cli", "run", str(DEMO),
           *(f"--set={o}" for o in overrides + ["train.max_steps=40", "train.save_steps=5", "train.logging_steps=1"])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = out / "student" / "checkpoints"
    deadline = time.time() + 300
    first_complete = checkpoints / "checkpoint-5" / CHECKPOINT_DONE
    while not first_complete.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first_complete.exists(), "training never completed its first checkpoint"
    after_kill = json.loads((out / "run.json").read_text())["stages"]
    assert [after_kill[s]["status"] for s in ("generate", "curate", "train")] == ["skipped", "skipped", "running"]
    corpus_written = (out / "corpus" / "manifest.json").stat().st_mtime_ns

    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert statuses(stages) == {"generate": "skipped", "curate": "skipped", "train": "resumed", "eval": "ran"}
    assert (out / "corpus" / "manifest.json").stat().st_mtime_ns == corpus_written
    assert logged_steps(out / "student") == list(range(1, 41)), "the rerun did not continue the curve"
    assert json.loads((out / "student" / "distill.json").read_text())["config"]["max_steps"] == 40


def test_invalid_config_reports_every_error_with_its_path_and_runs_nothing(tmp_path, capsys):
    config = yaml.safe_load(DEMO.read_text())
    config["out"] = str(tmp_path / "run")
    del config["teacher"]["model"]
    config["train"]["alpha"] = 3
    config["generate"]["top_k"] = 0
    config["curate"]["out"] = "elsewhere"
    config["trian"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    for where in ("`teacher.model`", "`train.alpha`", "`generate.top_k`", "`curate.out`", "`trian`"):
        assert where in err, where
    assert not (tmp_path / "run").exists()
