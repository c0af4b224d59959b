"""`distill generate` killed with SIGKILL mid-run, then rerun: nothing lost, nothing twice."""

import os
import signal
import subprocess
import sys
import time

import pytest

from distill import corpus
from distill.config import GenerateConfig
from distill.generate import generate
from tests.conftest import write_jsonl

pytestmark = pytest.mark.engine

N_PROMPTS, CHUNK, MAX_TOKENS = 240, 16, 48


def cli(*args):
    return [sys.executable, "-m", "distill.cli", "generate", *args]


def snapshot(out):
    return sorted((r["id"], r["prompt_id"], tuple(r["response_token_ids"]), tuple(map(tuple, r["topk_token_ids"])))
                  for r in corpus.iter_records(out))


def test_kill_9_then_rerun_equals_uninterrupted_run(tmp_path, tiny_models, teacher):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Reverse the list {i} {i * 7 % 13} {i % 5}"}
                                                 for i in range(N_PROMPTS)])
    out = tmp_path / "killed"
    args = cli("--teacher", str(tiny_models["llama-teacher"]), "--prompts", str(prompts), "--out", str(out),
               "--max-tokens", str(MAX_TOKENS), "--chunk-size", str(CHUNK), "--max-model-len", "512")
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not corpus.shard_paths(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: make it longer"
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its engine processes, no cleanup
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    kept = {p.name: p.stat().st_mtime_ns for p in corpus.shard_paths(out)}
    total_shards = -(-N_PROMPTS // CHUNK)
    assert 0 < len(kept) < total_shards
    killed = corpus.read_manifest(out)
    assert killed.stats.complete is False
    # the killed job already says what it was: curate and train carry this history forward
    assert [(h["stage"], h["complete"]) for h in killed.history] == [("generate", False)]

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({len(kept)} shards kept from an earlier run)" in resumed.stderr
    assert all(p.stat().st_mtime_ns == kept[p.name] for p in corpus.shard_paths(out) if p.name in kept)
    assert corpus.validate(out)["records"] == N_PROMPTS
    assert [(h["stage"], h["complete"]) for h in corpus.read_manifest(out).history] == \
        [("generate", False), ("generate", True)]

    reference = generate(GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts=prompts,
                                        out=tmp_path / "reference", max_tokens=MAX_TOKENS, chunk_size=CHUNK),
                         teacher=teacher)
    assert snapshot(out) == snapshot(reference)
