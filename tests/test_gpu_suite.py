"""benchmarks/gpu_suite.py runs end to end on the CPU (`--quick`): with a tiny student, both
training steps learn and the chunked and plain KD losses agree; with a tiny dummy-weight teacher,
`distill generate` and raw `LLM.generate` produce the same tokens and the server answers every
request in full at each concurrency. No GPU number comes from here."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

NOT_GPU = "CPU (no GPU: not a GPU number)"


def run_suite(*flags: str) -> str:
    done = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--quick", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow  # five processes importing torch: ~25 s of CPU
def test_gpu_suite_runs_on_cpu_with_a_tiny_student():
    out = run_suite("--only", "train", "--device", "cpu", "--tokens", "32")
    assert NOT_GPU in out
    for objective in ("kd", "sft"):
        row = re.search(rf"^{objective}\s+float32\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+) -> ([\d.]+)$", out, re.MULTILINE)
        assert row, out
        first, last = float(row[4]), float(row[5])
        assert 0 < last < first, f"{objective}: a step on the same batch must lower its loss ({first} -> {last})"
    losses = re.search(r"loss ([\d.]+) vs ([\d.]+)", out)
    assert losses and abs(float(losses[1]) - float(losses[2])) < 1e-4, out
    assert "vLLM" not in out, "--only train must not start the vLLM half"


@pytest.mark.engine  # an engine and a server on the dummy teacher: ~80 s on 2 cores
def test_gpu_suite_vllm_half_runs_on_cpu_with_a_dummy_teacher():
    prompts, max_tokens, requests = 8, 16, 8  # --quick's sizes
    out = run_suite("--only", "generate", "serve")
    assert f"vLLM on {NOT_GPU}" in out
    assert "KD loss alone" not in out, "--only generate serve must not run the training half"

    tokens = {}
    for path in ("LLM.generate, vLLM defaults", "LLM.generate, flat + no detok", "distill generate (end to end)"):
        row = re.search(rf"^{re.escape(path)}\s+([\d,]+)\s+([\d.]+)\s+([\d,]+)$", out, re.MULTILINE)
        assert row, out
        tokens[path] = int(row[1].replace(",", ""))
        assert int(row[3].replace(",", "")) > 0, row[0]
    # The same prompts, sampling and seeds on one engine: the same replies, however each path batches them.
    assert len(set(tokens.values())) == 1, tokens
    assert 0 < tokens["distill generate (end to end)"] <= prompts * max_tokens
    corpus = re.search(r"distill's last corpus: (\d+) records, ([\d,]+) response tokens", out)
    assert corpus and int(corpus[1]) == prompts, out
    assert int(corpus[2].replace(",", "")) == tokens["distill generate (end to end)"]

    levels = {int(m[1]): m for m in re.finditer(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)$",
                                                out, re.MULTILINE)}
    assert set(levels) == {1, 4}, out
    for concurrency, row in levels.items():
        sent, failures, output_tokens = int(row[2]), int(row[3]), int(row[4].replace(",", ""))
        assert (sent, failures) == (requests, 0), row[0]
        assert output_tokens == requests * max_tokens, f"ignore_eos: every reply is max_tokens long ({row[0]})"
        assert int(row[5].replace(",", "")) > 0, row[0]
