"""Shards on disk: atomic writes, paths, footer stats, and the readers (batches, records, tables,
a `datasets.Dataset`), which hand out the logical columns whatever the shards' encoding."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill.corpus.codec import (
    LOGPROB_CODES,
    PACKED_IDS,
    CorpusError,
    decode,
    decode_inputs,
    logical_types,
    shard_encoding,
    topk_arrays,
    topk_rows,
)
from distill.corpus.manifest import CorpusStats
from distill.corpus.stamp import STAMP_KEY, TopkChecked, pending, seal
from distill.files import DiskFull, atomic_path

STATS_KEY = b"distill.stats"
# zstd level of the packed top-k columns (every other column: OTHER_ZSTD_LEVEL). benchmarks/topk_zstd_level.py
# on three real SmolLM2 corpora (docs/results/scale.md): level 1 stores 0.3-1.2 % more bytes than
# 9 and writes 3-4x faster (17: 1.5-2.2 % fewer bytes, 5x slower than 9). The layout has already
# taken out what a slower level would find, and generate and curate write every byte of it.
TOPK_ZSTD_LEVEL = 1
# Texts, token ids, sampled logprobs: level 6 wrote realistic shards in 48.5 us per record, 3 in
# 38.0, in as many bytes (real SmolLM2 shards: 0.1 % more; docs/results/scale.md).
OTHER_ZSTD_LEVEL = 3


def _stored_columns(path: Path, schema: pa.Schema, columns: Sequence[str] | None) -> list[str] | None:
    """The stored columns to read for these logical ones, of the shard at `path`."""
    if columns is None or PACKED_IDS not in schema.names:
        return None if columns is None else list(columns)
    out = [c for c in columns if c not in ("topk_token_ids", "topk_logprobs")]
    if len(out) < len(columns):
        out += [c for c in decode_inputs(_encoding(path, schema)) if c not in out]
    return out


def _select(data, columns: Sequence[str] | None):
    return data if columns is None else data.select(list(columns))


def write_shard(root: Path, index: int, table: pa.Table, subdir: str = "data",
                checked: TopkChecked | None = None) -> Path:
    """Write one shard atomically: readers see the whole shard or none of it. Its record and
    token counts go into the Parquet footer, so stats never need a scan. `checked`: the table's
    top-k passed the validator's checks; the footer then gets its validation stamp (the digest
    of the top-k written here: docs/corpus-format.md)."""
    tokens = int(pc.sum(pc.list_value_length(table.column("response_token_ids"))).as_py() or 0)
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != STAMP_KEY}  # a copied shard's stamp
    meta[STATS_KEY] = json.dumps({"records": table.num_rows, "response_tokens": tokens}).encode()
    if checked is not None:
        meta[STAMP_KEY] = pending(table, checked)
    table = table.replace_schema_metadata(meta)
    path = Path(root) / subdir / f"part-{index:05d}.parquet"
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, **write_options(table.column_names))
            if checked is not None:
                seal(tmp, topk_rows(table, shard_encoding(table.schema)))
    except DiskFull:
        raise DiskFull(f"no space left on device writing shard {index} (`{path}`); the finished shards are "
                       "kept: free space and rerun") from None
    return path


def write_options(columns: Sequence[str]) -> dict:
    """The `pq.write_table` settings of a shard of these columns. Page checksums: `validate` finds a
    flipped byte in the data instead of reading it. The packed top-k columns: TOPK_ZSTD_LEVEL; no
    min/max statistics (they would copy two whole byte strings per page into the file). No Parquet
    dictionary on any column: a record's values are its own (ids, texts, token lists; a prompt is
    asked once), so Parquet built one only to give up, and zstd finds what repeats. Without it, 10
    shards of real ShareGPT answers and of realistic records rewrote in 0.85-0.89x the time in no
    more bytes (docs/results/scale.md); benchmarks/shard_io.py compares the settings."""
    packed = [c for c in (PACKED_IDS, LOGPROB_CODES) if c in columns]
    return {"compression": "zstd", "write_page_checksum": True, "use_dictionary": False,
            "compression_level": {c: TOPK_ZSTD_LEVEL if c in packed else OTHER_ZSTD_LEVEL for c in columns},
            "write_statistics": [c for c in columns if c not in packed]}


def shard_paths(root: Path, subdir: str = "data") -> list[Path]:
    return sorted((Path(root) / subdir).glob("part-*.parquet"))


def shard_index(path: Path) -> int:
    return int(path.stem.split("-")[1])


# What reading a damaged Parquet file raises (ArrowInvalid is a ValueError, ArrowIOError an OSError).
READ_ERRORS = (pa.ArrowException, OSError, ValueError)


def unreadable(path: Path, error: Exception) -> CorpusError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return CorpusError(f"`{path}` is unreadable ({reason})")


def shard_stats(path: Path) -> dict[str, int]:
    try:
        meta = pq.read_schema(path).metadata or {}
        if STATS_KEY in meta:
            return json.loads(meta[STATS_KEY])
        ids = pq.read_table(path, columns=["response_token_ids"]).column(0)
    except READ_ERRORS as e:
        raise unreadable(path, e) from None
    return {"records": len(ids), "response_tokens": int(pc.sum(pc.list_value_length(ids)).as_py() or 0)}


def corpus_stats(root: Path, subdir: str = "data") -> CorpusStats:
    total = CorpusStats()
    for path in shard_paths(root, subdir):
        s = shard_stats(path)
        total.records += s["records"]
        total.response_tokens += s["response_tokens"]
        total.shards += 1
        total.bytes += path.stat().st_size
    return total



def iter_batches(root: Path, subdir: str = "data", columns: Sequence[str] | None = None,
                 batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Record batches with the logical columns, whatever the shards' encoding."""
    for path in shard_paths(root, subdir):
        yield from shard_batches(path, columns, batch_size)


def shard_batches(path: Path, columns: Sequence[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """One shard's record batches with the logical `columns` (None: all), reading and decoding
    only the stored columns they need: without a top-k column, the top-k bytes are never read."""
    shard = pq.ParquetFile(path)
    # The footer's Arrow schema is where validate and read_shard find the encoding; a batch's own
    # metadata comes from the Parquet key-value copy, which a damaged byte can make differ.
    encoding = _encoding(path, shard.schema_arrow)
    for batch in shard.iter_batches(batch_size=batch_size, columns=_stored_columns(path, shard.schema_arrow, columns)):
        yield _select(_decoded(path, batch, encoding), columns)


def iter_records(root: Path, subdir: str = "data", columns: Sequence[str] | None = None,
                 topk_as_arrays: bool = False) -> Iterator[dict]:
    """Records as plain Python dicts (`records_of`), shard by shard (memory stays at one batch)."""
    for batch in iter_batches(root, subdir, columns):
        yield from records_of(batch, topk_as_arrays)


def records_of(batch: pa.RecordBatch | pa.Table, topk_as_arrays: bool = False) -> list[dict]:
    """A batch of logical columns as plain Python dicts. `topk_as_arrays`: each record's top-k as
    [T, k] numpy arrays (`topk_arrays`) instead of nested lists (a Python object per entry)."""
    if not (topk_as_arrays and "topk_token_ids" in batch.schema.names):
        return batch.to_pylist()
    topk = topk_arrays(batch)
    return [{**record, **{name: arrays[i] for name, arrays in topk.items()}}
            for i, record in enumerate(batch.drop_columns(list(topk)).to_pylist())]


def read_shard(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """One shard with the logical columns."""
    table = read_stored(path, columns)
    return _select(_decoded(path, table, _encoding(path, table.schema)), columns)


def read_stored(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """One shard as stored (not decoded): the stored columns that hold the logical `columns` (None: all)."""
    return pq.read_table(path, columns=_stored_columns(path, pq.read_schema(path), columns))


def stored_batches(path: Path, table: pa.Table, columns: Sequence[str] | None = None,
                   batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Batches of `batch_size` rows (the last one shorter) with the logical `columns`, sliced from
    `table`, the shard at `path` as `read_stored` gave it: one read of a shard serves both its
    filtering and the copying of its rows (curate)."""
    encoding = _encoding(path, table.schema)
    stored = table.select(_stored_columns(path, table.schema, columns) or table.column_names).combine_chunks()
    for batch in stored.to_batches(max_chunksize=batch_size):
        yield _select(_decoded(path, batch, encoding), columns)


def _encoding(path: Path, schema: pa.Schema) -> dict:
    """`shard_encoding(schema)`, its error naming the shard."""
    try:
        return shard_encoding(schema)
    except CorpusError as e:
        raise CorpusError(f"`{path}`: {e}") from None


def _decoded(path: Path, data: pa.Table | pa.RecordBatch, encoding: dict) -> pa.Table | pa.RecordBatch:
    """`decode(data, encoding)`, its error naming the shard."""
    try:
        return decode(data, encoding)
    except CorpusError as e:
        raise CorpusError(f"`{path}`: {e}") from None


def corpus_dictionary(root: Path, subdir: str = "data") -> str | None:
    """The top-k dictionary of the corpus's shards (layout 4: learnt from the first shard it wrote,
    kept in every shard's footer), which a writer of more shards passes to `encode`; None where no
    shard has one."""
    for path in shard_paths(root, subdir):
        dictionary = _encoding(path, pq.read_schema(path)).get("dictionary")
        if dictionary is not None:
            return dictionary
    return None


def read_table(root: Path, subdir: str = "data", columns: Sequence[str] | None = None) -> pa.Table:
    paths = shard_paths(root, subdir)
    if not paths:
        raise CorpusError(f"`{root}/{subdir}` holds no shards")
    return pa.concat_tables([read_shard(p, columns) for p in paths], promote_options="permissive")


def load_dataset(root: Path, subdir: str = "data"):
    """The corpus as a `datasets.Dataset` (memory-mapped Arrow cache, like any HF dataset),
    with the logical columns."""
    import datasets

    paths = shard_paths(root, subdir)
    schemas = [pq.read_schema(p) for p in paths]
    params = [shard_encoding(schema) for schema in schemas]
    if any(p != params[0] for p in params):  # e.g. top-k layouts 1 and 2 in a corpus resumed by a newer distill
        return datasets.concatenate_datasets([_dataset([path], schema, p) for path, schema, p in zip(paths, schemas, params)])
    return _dataset(paths, schemas[0] if paths else None, params[0] if paths else {"encoding": "float32"})


def _dataset(paths: list[Path], schema: pa.Schema | None, params: dict):
    """`paths` (shards of one encoding, `params`) as one dataset of the logical columns."""
    import datasets

    dataset = datasets.Dataset.from_parquet([str(p) for p in paths])
    quantized = params["encoding"] == "quantized"
    if not quantized and not (paths and logical_types(schema)):
        return dataset  # stored as the readers hand it out
    # decoded into the dataset's own cache files, batch by batch, as Arrow tables
    return dataset.with_format("arrow").map(lambda t: decode(t, params), batched=True,
                                            remove_columns=[PACKED_IDS, LOGPROB_CODES] if quantized else None
                                            ).with_format(None)

