"""`backend: ray`: the teacher in a Ray actor on a local Ray started here (2 CPUs, 1 actor).

Greedy records must equal the in-process engine's bit for bit (same engine settings, same token
ids in); a batch that raises inside the actor is retried, and one that keeps failing stops the
job with its batch named while every finished shard stays and a rerun completes the corpus.
The failures are raised inside the actor by the test hook `RayTeacher.fail_batches`. A driver
killed with SIGKILL mid-run resumes at shard granularity, nothing lost or twice.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill import corpus
from distill.config import GenerateConfig, ScoreConfig
from distill.generate import generate, score
from tests.helpers import MAX_MODEL_LEN, PROMPTS, write_jsonl

pytestmark = pytest.mark.engine
ray = pytest.importorskip("ray", reason="install the `scale` extra: pip install -e '.[scale]'")

CHUNK = 2  # 6 prompts -> 3 shards; window 4 -> batches of 2 (one actor, two batches queued)


@pytest.fixture(scope="module")
def ray_teacher(tiny_models):
    from distill.generate.ray_teacher import RayTeacher

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts="unused", out="unused", backend="ray")
    teacher = RayTeacher(cfg, max_logprobs=20, max_model_len=MAX_MODEL_LEN)
    yield teacher
    teacher.close()
    ray.shutdown()


def config(tmp_path, tiny_models, name, **kw):
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        write_jsonl(prompts, PROMPTS)
    return GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts=prompts, out=tmp_path / name,
                          max_tokens=12, temperature=0.0, top_k=5, chunk_size=CHUNK, max_model_len=MAX_MODEL_LEN,
                          logprob_encoding="float32", **kw)


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command of the live processes of session `sid` (Ray gives its workers their own
    process groups, so `killpg` misses them)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found[int(stat.parent.name)] = text.split("(", 1)[1].rsplit(")", 1)[0]
    return found


# Ray's per-node agents: after a bare `ray.init()` driver was SIGKILLed they lived on for 60-90 s
# here, with or without distill; then they exit by themselves.
RAY_AGENTS = ("ray::DashboardA", "ray::RuntimeEnv")


def ours(processes: dict[int, str]) -> dict[int, str]:
    return {pid: name for pid, name in processes.items() if name not in RAY_AGENTS}


def shards(out):
    return {p.name: corpus.read_shard(p) for p in corpus.shard_paths(out)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models, teacher):
    """The in-process corpus."""
    return shards(generate(config(tmp_path_factory.mktemp("local"), tiny_models, "corpus"), teacher=teacher).path)


def test_driver_killed_with_sigkill_then_rerun_loses_and_repeats_nothing(request, tmp_path, tiny_models, teacher):
    """First in the module: the killed CLI starts its own local Ray, before this process starts one."""
    n_prompts, chunk = 720, 16  # many shards: the driver must still be far from done after its first
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Reverse the list {i} {i * 7 % 13} {i % 5}"}
                                                 for i in range(n_prompts)])
    cfg = GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts=prompts, out=tmp_path / "killed",
                         max_tokens=48, chunk_size=chunk, max_model_len=MAX_MODEL_LEN, backend="ray")
    args = [sys.executable, "-m", "distill.cli", "generate", "--backend", "ray", "--teacher", cfg.teacher,
            "--prompts", str(prompts), "--out", str(cfg.out), "--max-tokens", "48", "--chunk-size", str(chunk),
            "--max-model-len", str(MAX_MODEL_LEN)]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not corpus.shard_paths(cfg.out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: make it longer"
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: Ray and the engine are left to notice
        proc.wait()
        deadline = time.time() + 30
        while (orphans := ours(session_processes(proc.pid))) and time.time() < deadline:
            time.sleep(0.5)
        assert not orphans, f"processes outlived the killed driver: {orphans}"  # the engine above all
    finally:
        for pid in session_processes(proc.pid):  # whatever this test started and is still alive
            os.kill(pid, signal.SIGKILL)
    kept = {p.name: p.stat().st_mtime_ns for p in corpus.shard_paths(cfg.out)}
    assert 0 < len(kept) < -(-n_prompts // chunk)
    assert corpus.read_manifest(cfg.out).stats.complete is False

    resumed = generate(cfg, teacher=request.getfixturevalue("ray_teacher")).path
    assert all(p.stat().st_mtime_ns == kept[p.name] for p in corpus.shard_paths(resumed) if p.name in kept)
    reference = generate(cfg.model_copy(update={"out": tmp_path / "local", "backend": "local"}), teacher=teacher).path
    got, want = shards(resumed), shards(reference)
    assert sorted(got) == sorted(want)
    assert all(table.equals(want[name]) for name, table in got.items())  # every record once, as uninterrupted


def test_ray_corpus_equals_in_process_corpus(tmp_path, tiny_models, ray_teacher, reference):
    out = generate(config(tmp_path, tiny_models, "ray", backend="ray"), teacher=ray_teacher).path
    got = shards(out)
    assert sorted(got) == sorted(reference) and len(got) == 3
    for name, table in got.items():
        assert table.equals(reference[name]), name
    assert corpus.read_manifest(out).stats.complete


def test_failed_batch_is_retried(tmp_path, tiny_models, ray_teacher, reference):
    ray_teacher.fail_batches = {1: 2}  # the second batch raises twice, then runs
    try:
        out = generate(config(tmp_path, tiny_models, "ray"), teacher=ray_teacher).path
    finally:
        ray_teacher.fail_batches = {}
    got = shards(out)
    assert sorted(got) == sorted(reference)
    assert all(table.equals(reference[name]) for name, table in got.items())


def test_batch_failing_every_attempt_is_reported_and_finished_shards_kept(tmp_path, tiny_models, ray_teacher,
                                                                          reference):
    from distill.cli import USER_ERRORS
    from distill.generate.ray_teacher import MAX_ATTEMPTS, RayTeacherError

    cfg = config(tmp_path, tiny_models, "ray")
    ray_teacher.fail_batches = {1: MAX_ATTEMPTS}
    try:
        with pytest.raises(RayTeacherError, match=r"batch 1 \(requests 2-3\) failed 3 times.*InjectedFailure") as failed:
            generate(cfg, teacher=ray_teacher)
        assert isinstance(failed.value, USER_ERRORS)  # the CLI prints it as one line, no traceback
    finally:
        ray_teacher.fail_batches = {}
    kept = shards(cfg.out)
    assert "part-00000.parquet" in kept and "part-00001.parquet" not in kept, sorted(kept)
    assert all(table.equals(reference[name]) for name, table in kept.items())
    assert corpus.read_manifest(cfg.out).stats.complete is False

    out = generate(cfg, teacher=ray_teacher).path  # the rerun fills in the missing shard only
    got = shards(out)
    assert sorted(got) == sorted(reference)
    assert all(table.equals(reference[name]) for name, table in got.items())
    assert corpus.read_manifest(out).stats.complete


def test_score_on_ray_equals_in_process(tmp_path, tiny_models, teacher, ray_teacher):
    data = write_jsonl(tmp_path / "answers.jsonl", [
        {"messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]},
        {"messages": [{"role": "user", "content": "Sort 3 1"}, {"role": "assistant", "content": "1 3"}]}])

    def cfg(name, **kw):
        return ScoreConfig(teacher=str(tiny_models["llama-teacher"]), data=data, out=tmp_path / name, top_k=5,
                           chunk_size=CHUNK, max_model_len=MAX_MODEL_LEN, logprob_encoding="float32", **kw)

    local = shards(score(cfg("local"), teacher=teacher).path)
    remote = shards(score(cfg("ray", backend="ray"), teacher=ray_teacher).path)
    assert sorted(local) == sorted(remote) and len(local) == 2
    assert all(table.equals(local[name]) for name, table in remote.items())
