"""benchmarks/gpu_suite.py runs end to end on the CPU with a tiny student (`--quick`): both
training steps learn, and the chunked and plain KD losses agree. No GPU number comes from here."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow  # five processes importing torch: ~25 s of CPU
def test_gpu_suite_runs_on_cpu_with_a_tiny_student():
    done = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--quick", "--device", "cpu", "--tokens", "32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "CPU (no GPU: not a GPU number)" in out
    for objective in ("kd", "sft"):
        row = re.search(rf"^{objective}\s+float32\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+) -> ([\d.]+)$", out, re.MULTILINE)
        assert row, out
        first, last = float(row[4]), float(row[5])
        assert 0 < last < first, f"{objective}: a step on the same batch must lower its loss ({first} -> {last})"
    losses = re.search(r"loss ([\d.]+) vs ([\d.]+)", out)
    assert losses and abs(float(losses[1]) - float(losses[2])) < 1e-4, out
