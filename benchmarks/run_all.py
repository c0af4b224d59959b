"""Every performance benchmark in quick mode, as one table (`make bench`).

The benchmarks are the scripts in benchmarks/ (every `*.py` but this runner and `common.py`, so a
new one is picked up). Each runs as `python benchmarks/NAME.py --quick` in its own process group,
its output going to `LOGS/NAME.log`; the headline rows it emits (`common.emit`) become the table's
lines: benchmark, metric, value, ratio, status. Status `ok`; `off target`: it ran but missed its
target (quick sizes on a shared CPU are noisy, so this does not fail the run); `failed`: non-zero
exit, timeout or no rows, shown with its log's last line, and the runner exits 1.

    python benchmarks/run_all.py [--only NAME ...] [--timeout 600] [--logs runs/bench] [--list]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, ROWS_FILE_ENV, Headline

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {Path(__file__).name, "common.py"}
COLUMNS = ("benchmark", "metric", "value", "ratio", "status")


def benchmark_scripts() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name not in NOT_BENCHMARKS)


def run_one(script: Path, log: Path, timeout: float) -> tuple[list[Headline], str | None]:
    """The script's headline rows, and why it failed (None when it did not)."""
    with tempfile.TemporaryDirectory() as tmp, log.open("w") as out:
        rows_file = Path(tmp) / "rows.json"
        # Its own session: a timeout ends the vLLM engines and servers it started too.
        process = subprocess.Popen([sys.executable, str(script), "--quick"], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, ROWS_FILE_ENV: str(rows_file)},
                                   start_new_session=True)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return [], f"timed out after {timeout:.0f} s"
        rows = [Headline(**row) for row in json.loads(rows_file.read_text())] if rows_file.exists() else []
    if code != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        return rows, f"exit {code}: {lines[-1][:120] if lines else 'no output'}"
    if not rows:
        return rows, "it reported no headline rows"
    return rows, None


def status(row: Headline) -> str:
    return "off target" if row.met is False else "ok"


def print_table(lines: list[tuple[str, ...]]) -> None:
    widths = [max(len(line[i]) for line in (COLUMNS, *lines)) for i in range(len(COLUMNS))]
    for line in (COLUMNS, tuple("-" * w for w in widths), *lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these benchmarks only (file names without .py)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one benchmark may take before it counts as failed")
    ap.add_argument("--logs", type=Path, default=ROOT / "runs" / "bench", help="folder for each benchmark's full output")
    ap.add_argument("--list", action="store_true", help="print the benchmark scripts and exit")
    args = ap.parse_args(argv)
    scripts = benchmark_scripts()
    if args.list:
        print("\n".join(str(s.relative_to(ROOT)) for s in scripts))
        return 0
    if args.only:
        unknown = set(args.only) - {s.stem for s in scripts}
        if unknown:
            ap.error(f"no benchmark named {', '.join(sorted(unknown))} (have: {', '.join(s.stem for s in scripts)})")
        scripts = [s for s in scripts if s.stem in args.only]
    args.logs.mkdir(parents=True, exist_ok=True)
    lines, failed = [], 0
    for i, script in enumerate(scripts, 1):
        print(f"[{i}/{len(scripts)}] {script.stem} ...", end=" ", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rows, failure = run_one(script, args.logs / f"{script.stem}.log", args.timeout)
        print(f"{time.perf_counter() - start:.0f} s{', FAILED: ' + failure if failure else ''}", file=sys.stderr)
        lines += [(script.stem, r.metric, r.value, r.ratio, "failed" if failure else status(r)) for r in rows]
        if failure:
            failed += 1
            lines.append((script.stem, "-", "-", "-", f"failed ({failure})"))
    print()
    print_table(lines)
    print(f"\n{len(scripts) - failed} of {len(scripts)} benchmarks passed (--quick sizes); full output: {args.logs}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
