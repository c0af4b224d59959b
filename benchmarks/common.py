"""What the benchmark scripts share: the `--quick` flag, the headline rows that `run_all.py`
tabulates, and the tiny test models.

A benchmark script is run as a script (`python benchmarks/NAME.py [--quick]`): it prints its own
tables, and `main` returns its headline rows, which `emit` hands to `run_all.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Shared with the test suite's `tiny_models` fixture: one copy of the models, removed by `make clean`.
TINY_MODELS_CACHE = ROOT / "tests" / ".cache"
# The file run_all.py wants a script's headline rows in (JSON); unset when a script runs alone.
ROWS_FILE_ENV = "DISTILL_BENCH_ROWS"


@dataclass
class Headline:
    """One line of `make bench`'s table. `value` and `ratio` are display text with their units
    (the ratio names its baseline and target); `met`: whether the target was reached (None: no
    target)."""

    metric: str
    value: str
    ratio: str = ""
    met: bool | None = None


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, quick: dict) -> argparse.Namespace:
    """`parser`'s arguments plus `--quick`, which swaps the defaults for `quick`'s small sizes
    (flags given on the command line still win). The full mode's defaults stay the parser's own."""
    shown = ", ".join(f"--{name.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                      for name, v in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"small sizes for `make bench`: {shown}")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def emit(rows: list[Headline]) -> None:
    """Hand a script's headline rows to run_all.py (the file its environment names); nothing when
    the script runs alone, which has printed its own tables."""
    path = os.environ.get(ROWS_FILE_ENV)
    if path:
        Path(path).write_text(json.dumps([asdict(row) for row in rows]))


def tiny_models() -> dict[str, Path]:
    """The tiny test models (`distill.tiny`), built once and cached beside the test suite's."""
    from distill.tiny import build_cached

    return build_cached(TINY_MODELS_CACHE)


def train_until_first_step(flags: list[str]) -> None:
    """Run `distill train FLAGS` as the command line does; print the time its first training step
    starts and exit there (what the start-up benchmarks time)."""
    import time

    import transformers

    def first_step(self, *args, **kwargs):
        # the real stdout: `distill train` sends `print` to stderr while it runs (distill/cli.py)
        print(json.dumps({"first_step_at": time.time()}), file=sys.__stdout__, flush=True)
        os._exit(0)

    transformers.Trainer.training_step = first_step  # every DistillTrainer step starts here
    from distill.cli import main

    main(["train", *flags])
    raise SystemExit("training ended without a step")
