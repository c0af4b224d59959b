"""`distill generate` stopped mid-run by SIGTERM, then by SIGKILL (of the CLI process only, as a
scheduler or the OOM killer does), then rerun: no process it started outlives it by more than
15 s, nothing is lost, nothing is done twice, and the finished run is quiet."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from distill import corpus
from distill.config import GenerateConfig
from distill.generate import generate
from tests.helpers import write_jsonl

pytestmark = pytest.mark.engine

# Long answers: the kill lands after the first new shard, and the run must still be far from done
# then (48 tokens left ~2.4 s after it, which a loaded CI machine once slept through; 192 leave ~9 s).
N_PROMPTS, CHUNK, MAX_TOKENS = 240, 16, 192
ORPHAN_LIMIT_S = 15


def cli(*args):
    return [sys.executable, "-m", "distill.cli", "generate", *args]


def engine_processes() -> dict[str, str]:
    """The environment of a run whose engine runs in its own processes, as by default (the tests'
    children run it in-process: tests/child_site/sitecustomize.py): those are what must not
    outlive a stopped run."""
    return {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


def snapshot(out):
    return sorted((r["id"], r["prompt_id"], tuple(r["response_token_ids"]), tuple(map(tuple, r["topk_token_ids"])))
                  for r in corpus.iter_records(out))


def alive(processes: list[psutil.Process]) -> list[str]:
    found = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return found


def stop_mid_run(args, out, sig) -> tuple[int, str, list[str]]:
    """Start the CLI, wait for a shard beyond those already there, send `sig` to the CLI process
    alone; returns (exit code, stderr, its descendants still alive `ORPHAN_LIMIT_S` after it ended)."""
    before = len(corpus.shard_paths(out)) if out.exists() else 0
    log = out.parent / f"stderr-{signal.Signals(sig).name}.txt"  # a file: a full pipe would stall the run
    # Its own session: if the test fails, `finally` can still kill everything it started.
    with open(log, "w") as err:
        proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err,
                                env=engine_processes())
    try:
        deadline = time.time() + 300
        while len(corpus.shard_paths(out)) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped: make it longer"
        started = psutil.Process(proc.pid).children(recursive=True)  # engine core, worker, resource tracker
        assert started, "no engine processes found"
        proc.send_signal(sig)
        proc.wait(timeout=120)
        deadline = time.time() + ORPHAN_LIMIT_S
        while alive(started) and time.time() < deadline:
            time.sleep(0.2)
        return proc.returncode, log.read_text(), alive(started)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_and_sigkill_leave_no_process_behind_and_the_rerun_equals_an_uninterrupted_run(
        tmp_path, tiny_models, teacher):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Reverse the list {i} {i * 7 % 13} {i % 5}"}
                                                 for i in range(N_PROMPTS)])
    out = tmp_path / "stopped"
    args = cli("--teacher", str(tiny_models["llama-teacher"]), "--prompts", str(prompts), "--out", str(out),
               "--max-tokens", str(MAX_TOKENS), "--chunk-size", str(CHUNK), "--max-model-len", "512")

    code, stderr, orphans = stop_mid_run(args, out, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "distill generate: interrupted (SIGTERM); rerun the same command to resume." in stderr
    assert "Traceback" not in stderr and "leaked" not in stderr, stderr[-3000:]
    assert not orphans, f"alive {ORPHAN_LIMIT_S} s after SIGTERM: {orphans}"

    code, _, orphans = stop_mid_run(args, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not orphans, f"alive {ORPHAN_LIMIT_S} s after SIGKILL of the CLI: {orphans}"

    kept = {p.name: p.stat().st_mtime_ns for p in corpus.shard_paths(out)}
    assert 1 < len(kept) < -(-N_PROMPTS // CHUNK)
    killed = corpus.read_manifest(out)
    assert killed.stats.complete is False
    # the stopped job already says what it was: curate and train carry this history forward
    assert [(h["stage"], h["complete"]) for h in killed.history] == [("generate", False)] * 2

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600, env=engine_processes())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({len(kept)} shards kept from an earlier run)" in resumed.stderr
    assert all(p.stat().st_mtime_ns == kept[p.name] for p in corpus.shard_paths(out) if p.name in kept)
    assert corpus.validate(out)["records"] == N_PROMPTS
    assert [(h["stage"], h["complete"]) for h in corpus.read_manifest(out).history] == \
        [("generate", False)] * 2 + [("generate", True)]
    # Quiet: the result alone on stdout; no vLLM INFO lines, no shared memory left to the resource tracker.
    assert resumed.stdout.strip() == str(out)
    assert not re.search(r"\) INFO ", resumed.stderr) and "leaked" not in resumed.stderr, resumed.stderr[-3000:]
    rates = re.search(r"throughput  ([\d.,]+) tok/s while generating .*; ([\d.,]+) tok/s over the whole run",
                      resumed.stderr)
    assert rates and all(float(r.replace(",", "")) > 0 for r in rates.groups()), resumed.stderr[-1000:]

    reference = generate(GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts=prompts,
                                        out=tmp_path / "reference", max_tokens=MAX_TOKENS, chunk_size=CHUNK),
                         teacher=teacher)
    assert snapshot(out) == snapshot(reference)
