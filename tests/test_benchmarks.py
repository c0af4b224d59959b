"""`make bench` (benchmarks/run_all.py) runs every benchmark script with `--quick`: each script must
take the flag, and the runner must show a failed benchmark as failed and exit non-zero."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

RUNNER = ROOT / "benchmarks" / "run_all.py"


def listed_benchmarks() -> list[str]:
    listed = subprocess.run([sys.executable, str(RUNNER), "--list"], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    return listed.stdout.split()


def test_the_runner_lists_every_script_but_its_own_support():
    scripts = {p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").glob("*.py")}
    assert set(listed_benchmarks()) == scripts - {"benchmarks/run_all.py", "benchmarks/common.py"}


@pytest.mark.parametrize("script", listed_benchmarks())
def test_every_benchmark_takes_quick(script):
    shown = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "--quick" in shown.stdout, f"{script} has no --quick flag: `make bench` runs every benchmark with it"


FINE = """\
import argparse
from common import Headline, emit, parse_args

args = parse_args(argparse.ArgumentParser(), None, quick={})
emit([Headline("speed", "12 tok/s", "0.95 of raw (target >= 0.90)", met=True),
      Headline("size", "3 B", "2.0 of float32 (target <= 1)", met=False)])
"""
BOOM = """\
import argparse
from common import parse_args

parse_args(argparse.ArgumentParser(), None, quick={})
raise SystemExit("no engine today")
"""


def test_a_failed_benchmark_is_a_failed_row_and_a_non_zero_exit(tmp_path):
    """The runner and two stand-in benchmarks in a copy of benchmarks/: one reports rows, one fails."""
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    for name in ("run_all.py", "common.py"):
        shutil.copy(ROOT / "benchmarks" / name, bench / name)
    (bench / "boom.py").write_text(BOOM)
    (bench / "fine.py").write_text(FINE)
    done = subprocess.run([sys.executable, str(bench / "run_all.py"), "--logs", str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    table = {tuple(re.split(r"\s{2,}", line.strip())) for line in done.stdout.splitlines()}
    assert ("fine", "speed", "12 tok/s", "0.95 of raw (target >= 0.90)", "ok") in table
    assert ("fine", "size", "3 B", "2.0 of float32 (target <= 1)", "off target") in table
    assert ("boom", "-", "-", "-", "failed (exit 1: no engine today)") in table
    assert "1 of 2 benchmarks passed" in done.stdout
    assert (tmp_path / "logs" / "boom.log").read_text().strip() == "no engine today"
