"""Writing and reading a quantized shard, with and without a Parquet dictionary on the packed top-k
columns: microseconds per record to write (`pq.write_table` as `corpus.write_shard` calls it) and to
read back (all columns, and the packed top-k alone), bytes per record. 1,024 realistic records
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
from corpus_scale import SHARD, K, base_records

from distill import corpus
from distill.corpus import store

PACKED = [corpus.PACKED_IDS, corpus.LOGPROB_CODES]


def write(table, path: Path, packed_dictionary: bool) -> None:
    """`write_shard`'s settings; `packed_dictionary`: let Parquet try a dictionary on the packed
    columns too (pyarrow's default, and distill's before this benchmark)."""
    others = [c for c in table.column_names if c not in PACKED]
    pq.write_table(table, path, compression="zstd", write_page_checksum=True,
                   compression_level={c: store.TOPK_ZSTD_LEVEL if c in PACKED else store.OTHER_ZSTD_LEVEL
                                      for c in table.column_names},
                   write_statistics=others, use_dictionary=True if packed_dictionary else others)


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
    if args.corpus:
        tables = [pq.read_table(p) for p in corpus.shard_paths(args.corpus)[:args.shards]]
    else:
        tables = [corpus.records_to_table(base_records(SHARD), K)]
    records = sum(t.num_rows for t in tables)
    print(f"{args.corpus or 'synthetic'}: {len(tables)} shard(s), {records:,} records; median of {args.repeat}")
    print(f"{'packed columns':>22}{'write us/rec':>14}{'read us/rec':>13}{'read top-k us/rec':>19}{'B/rec':>9}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, dictionary in (("dictionary tried", True), ("no dictionary", False)):
            paths = [Path(tmp) / f"{dictionary}-{i}.parquet" for i in range(len(tables))]
            w = timed(lambda: [write(t, p, dictionary) for t, p in zip(tables, paths)], args.repeat)
            r = timed(lambda: [pq.read_table(p) for p in paths], args.repeat)
            rk = timed(lambda: [pq.read_table(p, columns=PACKED) for p in paths], args.repeat)
            size = sum(p.stat().st_size for p in paths)
            rows[label] = per_record = [x / records * 1e6 for x in (w, r, rk)] + [size / records]
            print(f"{label:>22}" + "".join(f"{v:>{width}.1f}" for v, width in zip(per_record, (14, 13, 19, 9))))
    new, old = rows["no dictionary"], rows["dictionary tried"]
    ratios = [a / b for a, b in zip(new, old)]
    print(f"{'no dictionary / tried':>22}" + "".join(f"{r:>{width}.2f}" for r, width in zip(ratios, (14, 13, 19, 9))))
    return [Headline("shard write, us/record (no dictionary on top-k)", f"{new[0]:.1f}",
                     f"{ratios[0]:.2f}x with a dictionary tried; read {ratios[1]:.2f}x, bytes {ratios[3]:.3f}x")]


if __name__ == "__main__":
    emit(main())
