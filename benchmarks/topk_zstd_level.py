"""Which zstd level for the packed top-k columns? Bytes per top-k entry and seconds to write one
shard at several levels: 1,024 realistic records (corpus_scale.py's: Zipf-drawn ids over the demo
teacher's small vocabulary), or with `--corpus DIR` a real teacher's corpus, its shards joined
and encoded in the current layout. `corpus.TOPK_ZSTD_LEVEL` is the level `write_shard` uses; the
other columns stay at level 6 throughout.

    python benchmarks/topk_zstd_level.py [--corpus DIR] [--levels 1 3 6 9 17] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import Headline, emit, parse_args
from corpus_scale import SHARD, K, base_records

from distill import corpus


def write(table, path: Path, level: int) -> float:
    packed = [corpus.PACKED_IDS, corpus.LOGPROB_CODES]
    started = time.perf_counter()
    pq.write_table(table, path, compression="zstd", write_page_checksum=True,
                   compression_level={c: level if c in packed else 6 for c in table.column_names},
                   write_statistics=[c for c in table.column_names if c not in packed])
    return time.perf_counter() - started


def topk_bytes(path: Path) -> int:
    meta = pq.ParquetFile(path).metadata
    packed = {corpus.PACKED_IDS, corpus.LOGPROB_CODES}
    return sum(meta.row_group(g).column(c).total_compressed_size for g in range(meta.num_row_groups)
               for c in range(meta.num_columns) if meta.row_group(g).column(c).path_in_schema in packed)


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, help="a real corpus instead of the synthetic shard")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 3, 6, 9, 17])
    ap.add_argument("--repeat", type=int, default=3)
    args = parse_args(ap, argv, quick={"levels": [1, 17], "repeat": 1})
    if args.corpus:
        k = corpus.read_manifest(args.corpus).generation.top_k
        table = corpus.encode(corpus.read_table(args.corpus), k, "quantized")
    else:
        k, table = K, corpus.records_to_table(base_records(SHARD), K)
    entries = int(pc.sum(pc.list_value_length(table["response_token_ids"])).as_py()) * k
    print(f"{args.corpus or 'synthetic'}: {table.num_rows:,} records, {entries // k:,} response tokens, k = {k}; "
          f"the current level is {corpus.TOPK_ZSTD_LEVEL}")
    print(f"{'level':>6}{'B/entry (top-k)':>18}{'write s (median)':>18}{'bytes vs 17':>14}{'time vs 17':>12}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in args.levels:
            path = Path(tmp) / f"l{level}.parquet"
            seconds = statistics.median(write(table, path, level) for _ in range(args.repeat))
            rows[level] = (topk_bytes(path) / entries, seconds)
    ref = rows.get(17, next(iter(rows.values())))
    for level, (b, s) in rows.items():
        print(f"{level:>6}{b:>18.3f}{s:>18.3f}{b / ref[0]:>14.3f}{s / ref[1]:>12.2f}")
    b, s = rows.get(corpus.TOPK_ZSTD_LEVEL, ref)
    return [Headline(f"top-k at zstd {corpus.TOPK_ZSTD_LEVEL}, B/entry", f"{b:.3f}", f"{b / ref[0]:.3f}x level 17's bytes, "
                     f"{s / ref[1]:.2f}x its time")]


if __name__ == "__main__":
    emit(main())
