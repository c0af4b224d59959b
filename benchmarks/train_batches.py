"""How fast does training read its batches? Response positions (top-k rows) per second of the
path each training step takes: `dataset.__getitems__` on the memory-mapped training file (its
stored top-k decoded by `DecodedTopk`), then `DistillCollator`, on one core, in the training
process (the trainer's data loader has no worker processes, so a step waits for it).

Side by side on the same batches: the decoded top-k handed to the collator as one [T, k] array
per record (now) and as nested Python lists (before: `to_pylist`, a Python float per entry).

Records: `corpus_scale.py`'s realistic records (64-128 response tokens, k = 20, quantized layout
2), or `--corpus`'s first shards.

    python benchmarks/train_batches.py [--corpus DIR] [--batch-sizes 8 32] [--batches 200] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Headline, emit, parse_args
from corpus_scale import stored_shards

from distill import corpus
from distill.train.data import DecodedTopk, DistillCollator, write_training_data

TOPK = ("topk_token_ids", "topk_logprobs")


class NestedLists(DecodedTopk):
    """Before: the decoded top-k as nested Python lists."""

    def __call__(self, rows: dict[str, list]) -> dict[str, list]:
        table = self.stored(rows)
        if table is None:
            return rows
        decoded = corpus.decode(table, self.encoding)
        return {**rows, **{c: decoded[c].to_pylist() for c in TOPK}}


def rows_per_second(dataset, collator: DistillCollator, batches: list[list[int]]) -> float:
    start, rows = time.perf_counter(), 0
    for indices in batches:
        records = dataset.__getitems__(indices)
        collator(records)
        rows += sum(len(r["response_token_ids"]) for r in records)
    return rows / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, help="a quantized corpus instead of the synthetic shard")
    ap.add_argument("--shards", type=int, default=4, help="shards of `--corpus` to use")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--batches", type=int, default=200, help="batches timed per batch size and path")
    ap.add_argument("--max-length", type=int, default=4096)
    args = parse_args(ap, argv, quick={"batches": 20})
    tables = stored_shards(args.corpus, args.shards)
    encoding = corpus.shard_encoding(tables[0].schema)
    if encoding["encoding"] != "quantized":
        raise SystemExit(f"{args.corpus}: a {encoding['encoding']} corpus; training keeps only a quantized top-k stored")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_training_data(((b, 0) for t in tables for b in t.to_batches()), args.corpus or Path("synthetic"),
                                   args.max_length, Path(tmp))
        paths = {"arrays (now)": data.dataset.with_transform(DecodedTopk(encoding)),
                 "nested lists (before)": data.dataset.with_transform(NestedLists(encoding))}
        collator = DistillCollator(pad_token_id=0, max_length=args.max_length, top_k=encoding["k"])
        rng = np.random.default_rng(0)
        print(f"{args.corpus or 'synthetic'}: {len(data.dataset):,} records; top-k rows per second, one core")
        print(f"{'batch':>6}{'rows/batch':>12}" + "".join(f"{name:>24}" for name in paths) + f"{'now / before':>14}")
        rates = {}
        for size in args.batch_sizes:
            batches = [rng.integers(0, len(data.dataset), size).tolist() for _ in range(args.batches)]
            rows = sum(len(data.dataset[i]["response_token_ids"]) for b in batches for i in b) / len(batches)
            for name, dataset in paths.items():
                rows_per_second(dataset, collator, batches[:2])  # warm the file's pages
            got = [rows_per_second(dataset, collator, batches) for dataset in paths.values()]
            rates[size] = got
            print(f"{size:>6}{rows:>12,.0f}" + "".join(f"{r:>24,.0f}" for r in got) + f"{got[0] / got[1]:>13.2f}x")
    size = args.batch_sizes[-1]
    now, before = rates[size]
    return [Headline(f"training batches, top-k rows/s (batch {size}, one core)", f"{now:,.0f}",
                     f"{now / before:.2f}x the nested lists of before")]


if __name__ == "__main__":
    emit(main())
