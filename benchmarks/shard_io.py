"""Writing and reading a quantized shard with a Parquet dictionary tried on every column (pyarrow's
default), on every column but the packed top-k, and on none (`corpus.write_shard`'s choice):
microseconds per record to write (`pq.write_table` with write_shard's other settings) and to read
back (all columns, and the packed top-k alone), bytes per record. 1,024 realistic records
(corpus_scale.py's), or with `--corpus DIR` the shards of a corpus (as stored).

    python benchmarks/shard_io.py [--corpus DIR] [--shards 4] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from common import Headline, emit, parse_args
from corpus_scale import stored_shards

from distill import corpus
from distill.corpus import store

PACKED = [corpus.PACKED_IDS, corpus.LOGPROB_CODES]


# Where Parquet may try a dictionary: label -> the columns (of a table) it may try one on.
DICTIONARY = {"every column": lambda columns: columns,
              "all but the top-k": lambda columns: [c for c in columns if c not in PACKED],
              "none": lambda columns: []}


def write(table, path: Path, dictionary: str) -> None:
    """`write_shard`'s settings but the dictionary (`DICTIONARY`)."""
    others = [c for c in table.column_names if c not in PACKED]
    pq.write_table(table, path, compression="zstd", write_page_checksum=True,
                   compression_level={c: store.TOPK_ZSTD_LEVEL if c in PACKED else store.OTHER_ZSTD_LEVEL
                                      for c in table.column_names},
                   write_statistics=others, use_dictionary=DICTIONARY[dictionary](table.column_names) or False)


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, help="a quantized corpus instead of the synthetic shard")
    ap.add_argument("--shards", type=int, default=4, help="shards of `--corpus` to use")
    ap.add_argument("--repeat", type=int, default=5)
    args = parse_args(ap, argv, quick={"repeat": 2})
    tables = stored_shards(args.corpus, args.shards)
    records = sum(t.num_rows for t in tables)
    print(f"{args.corpus or 'synthetic'}: {len(tables)} shard(s), {records:,} records; median of {args.repeat}")
    print(f"{'dictionary tried on':>26}{'write us/rec':>14}{'read us/rec':>13}{'read top-k us/rec':>19}{'B/rec':>9}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, dictionary in enumerate(DICTIONARY):
            paths = [Path(tmp) / f"{n}-{i}.parquet" for i in range(len(tables))]
            w = timed(lambda: [write(t, p, dictionary) for t, p in zip(tables, paths)], args.repeat)
            r = timed(lambda: [pq.read_table(p) for p in paths], args.repeat)
            rk = timed(lambda: [pq.read_table(p, columns=PACKED) for p in paths], args.repeat)
            size = sum(p.stat().st_size for p in paths)
            rows[dictionary] = per_record = [x / records * 1e6 for x in (w, r, rk)] + [size / records]
            print(f"{dictionary:>26}" + "".join(f"{v:>{width}.1f}" for v, width in zip(per_record, (14, 13, 19, 9))))
    ratios = {old: [a / b for a, b in zip(rows["none"], rows[old])] for old in ("every column", "all but the top-k")}
    for old, r in ratios.items():
        print(f"{'none / ' + old:>26}" + "".join(f"{x:>{width}.2f}" for x, width in zip(r, (14, 13, 19, 9))))
    r = ratios["all but the top-k"]
    return [Headline("shard write, us/record (no dictionary)", f"{rows['none'][0]:.1f}",
                     f"{r[0]:.2f}x with one tried on all but the top-k; read {r[1]:.2f}x, bytes {r[3]:.3f}x")]


if __name__ == "__main__":
    emit(main())
