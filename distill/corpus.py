"""The corpus: the contract between stages (see DESIGN.md, "The corpus").

A corpus is a directory holding `manifest.json` and zstd Parquet shards under `data/`
(curation adds `rejected/`). Shards are written atomically (temp file, fsync, rename) and
carry their own record/token counts in the Parquet footer, so a reader never sees half a
shard and the manifest's stats can always be recomputed from the shards alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distill.files import DiskFull, atomic_path, write_json
from distill.models import ModelSource

SCHEMA = "distill.corpus/v1"
MANIFEST = "manifest.json"
STATS_KEY = b"distill.stats"
COLUMNS = (
    "id", "prompt_id", "messages", "response", "prompt_token_ids", "response_token_ids",
    "response_logprobs", "topk_token_ids", "topk_logprobs", "finish_reason",
)
# Per-token columns: each must have one entry per response token (`loss_mask` is optional:
# absent means every token trains).
TOKEN_COLUMNS = ("response_logprobs", "topk_token_ids", "topk_logprobs", "loss_mask")
LOGPROB_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
# Storage dtype of `response_logprobs` and `topk_logprobs`. float16 keeps 11 significant bits:
# a stored logprob x differs from the float32 value by at most |x| * 2**-11 (0.005 nats at
# x = -10) and halves the corpus. benchmarks/generate_throughput.py measures both.
FLOAT16_RELATIVE_ERROR = 2.0**-11


class CorpusError(ValueError):
    """A corpus directory violates the contract of DESIGN.md."""


def arrow_schema(logprob_dtype: str = "float16", loss_mask: bool = False) -> pa.Schema:
    lp = LOGPROB_DTYPES[logprob_dtype]
    fields = [
        pa.field("id", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        pa.field("response", pa.string()),
        pa.field("prompt_token_ids", pa.list_(pa.int32())),
        pa.field("response_token_ids", pa.list_(pa.int32())),
        pa.field("response_logprobs", pa.list_(lp)),
        pa.field("topk_token_ids", pa.list_(pa.list_(pa.int32()))),
        pa.field("topk_logprobs", pa.list_(pa.list_(lp))),
        pa.field("finish_reason", pa.string()),
    ]
    if loss_mask:
        fields.append(pa.field("loss_mask", pa.list_(pa.bool_())))
    return pa.schema(fields)


def _lists(rows: Sequence[Any], dtype: pa.DataType, k: int | None = None) -> pa.Array:
    """Per-record `[T_i]` (or `[T_i, k]` when `k` is given) arrays -> list<dtype> (or
    list<list<dtype>>), built from one concatenated numpy buffer instead of per-token objects."""
    arrays = [np.asarray(r).reshape(-1, k) if k else np.asarray(r).reshape(-1) for r in rows]
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays) if arrays else np.zeros((0, k) if k else 0)
    values = pa.array(flat.reshape(-1).astype(dtype.to_pandas_dtype()), type=dtype)
    if k:
        values = pa.ListArray.from_arrays(np.arange(0, flat.shape[0] * k + 1, k, dtype=np.int32), values)
    return pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), values)


def records_to_table(records: Sequence[dict[str, Any]], k: int, logprob_dtype: str = "float16") -> pa.Table:
    """Records as produced by the stages (top-k as `[T, k]` numpy arrays) -> an Arrow table."""
    has_mask = any(r.get("loss_mask") is not None for r in records)
    schema = arrow_schema(logprob_dtype, loss_mask=has_mask)
    columns = {}
    for name in schema.names:
        field = schema.field(name)
        if name in ("topk_token_ids", "topk_logprobs"):
            columns[name] = _lists([r[name] for r in records], field.type.value_type.value_type, k)
        elif name in ("prompt_token_ids", "response_token_ids", "response_logprobs"):
            columns[name] = _lists([r[name] for r in records], field.type.value_type)
        elif name == "loss_mask":
            columns[name] = pa.array(
                [r.get(name) if r.get(name) is not None else [True] * len(r["response_token_ids"])
                 for r in records], type=field.type)
        else:
            columns[name] = pa.array([r[name] for r in records], type=field.type)
    return pa.table(columns, schema=schema)


def write_shard(root: Path, index: int, table: pa.Table, subdir: str = "data") -> Path:
    """Write one shard atomically: readers see the whole shard or none of it. Its record and
    token counts go into the Parquet footer, so stats never need a scan."""
    tokens = int(pc.sum(pc.list_value_length(table.column("response_token_ids"))).as_py() or 0)
    stats = json.dumps({"records": table.num_rows, "response_tokens": tokens}).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), STATS_KEY: stats})
    path = Path(root) / subdir / f"part-{index:05d}.parquet"
    try:
        with atomic_path(path) as tmp:
            # page checksums: `validate` finds a flipped byte in the data instead of reading it
            pq.write_table(table, tmp, compression="zstd", compression_level=6, write_page_checksum=True)
    except DiskFull:
        raise DiskFull(f"no space left on device writing shard {index} (`{path}`); the finished shards are "
                       "kept: free space and rerun") from None
    return path


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


def tokenizer_fingerprint(tokenizer) -> dict[str, str]:
    """Hashes that identify a vocabulary (vocab + merges + added tokens) and a chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        vocab = json.dumps([spec.get("model"), spec.get("added_tokens")], sort_keys=True)
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    template = tokenizer.chat_template or ""
    return {
        "tokenizer_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
    }


def history_entry(stage: str, config: Any, wall_time: float, complete: bool = True) -> dict[str, Any]:
    """One `manifest.history` item: what ran, with which resolved config and package versions;
    `complete: false` while it runs or after it was interrupted (`finished_at`: when written)."""
    import time

    from distill import versions

    return {"stage": stage, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_time_s": round(wall_time, 2),
            "complete": complete, "config": json.loads(config.model_dump_json()), "versions": versions()}


class _Section(BaseModel):
    # Unknown keys are kept: a manifest written by a newer distill still reads and round-trips.
    model_config = ConfigDict(extra="allow")


class TeacherInfo(_Section):
    model: str
    revision: str | None = None
    source: ModelSource | None = None  # the GGUF file `model` was converted from
    tokenizer_sha256: str | None = None
    chat_template_sha256: str | None = None


class GenerationInfo(_Section):
    mode: Literal["sample", "score"] = "sample"
    top_k: int = Field(ge=1)
    logprobs: str = "raw_logprobs"
    logprob_dtype: str = "float16"
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    samples_per_prompt: int | None = None
    seed: int | None = None


class CorpusStats(_Section):
    records: int = 0
    response_tokens: int = 0
    shards: int = 0
    bytes: int = 0
    complete: bool | None = None  # False while a generate job runs or after it was interrupted


class Manifest(_Section):
    """`manifest.json`: what made a corpus (DESIGN.md); every reader and writer goes through it."""

    schema_: str = Field(SCHEMA, alias="schema")
    teacher: TeacherInfo
    generation: GenerationInfo
    source: dict[str, Any] = Field(default_factory=dict)
    stats: CorpusStats = Field(default_factory=CorpusStats)
    history: list[dict[str, Any]] = Field(default_factory=list)
    curation: dict[str, Any] | None = None  # curated corpora: filters and source corpus
    rejected_stats: CorpusStats | None = None
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.dump(), sort_keys=True).encode()).hexdigest()


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise CorpusError(f"`{path}` does not exist: not a distill corpus")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as e:
        problems = "; ".join(f"`{'.'.join(map(str, err['loc']))}`: {err['msg']}" for err in e.errors())
        raise CorpusError(f"`{path}` is not a valid manifest: {problems}") from None


def write_manifest(root: Path, manifest: Manifest) -> None:
    write_json(Path(root) / MANIFEST, manifest.dump())


def check_complete(root: Path, manifest: Manifest, allow_incomplete: bool) -> None:
    """Refuse a corpus whose generate job did not finish (`stats.complete: false`), or one
    curated from such a corpus, unless the user accepts it."""
    if manifest.stats.complete is False and not allow_incomplete:
        raise CorpusError(f"`{root}` is incomplete (its manifest says `complete: false`: the job that wrote it was "
                          f"interrupted after {manifest.stats.records:,} records): rerun that job to finish it, or "
                          "pass `--allow-incomplete` to use it as it is")


def check_shards(root: Path, subdir: str = "data") -> list[str]:
    """What is wrong between the manifest and the shards, reading only each shard's footer:
    unreadable (e.g. truncated) shards, and record or shard counts that differ."""
    root = Path(root)
    stats = read_manifest(root).stats
    problems, records, shards = [], 0, 0
    for path in shard_paths(root, subdir):
        try:
            records += pq.ParquetFile(path).metadata.num_rows
            shards += 1
        except READ_ERRORS as e:
            problems.append(str(unreadable(path.relative_to(root), e)))
    if not problems and (records, shards) != (stats.records, stats.shards):
        problems.append(f"the manifest says {stats.records:,} records in {stats.shards} shards, the shards hold "
                        f"{records:,} records in {shards}")
    return problems


@dataclass(frozen=True)
class Corpus:
    """A corpus directory and its manifest: what the corpus-writing stages return."""

    path: Path
    manifest: Manifest

    def __fspath__(self) -> str:
        return str(self.path)


def iter_batches(root: Path, subdir: str = "data", columns: Sequence[str] | None = None,
                 batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    for path in shard_paths(root, subdir):
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)


def iter_records(root: Path, subdir: str = "data", columns: Sequence[str] | None = None) -> Iterator[dict]:
    """Records as plain Python dicts, shard by shard (memory stays at one batch)."""
    for batch in iter_batches(root, subdir, columns):
        yield from batch.to_pylist()


def read_table(root: Path, subdir: str = "data", columns: Sequence[str] | None = None) -> pa.Table:
    paths = shard_paths(root, subdir)
    if not paths:
        raise CorpusError(f"`{root}/{subdir}` holds no shards")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths], promote_options="permissive")


def load_dataset(root: Path, subdir: str = "data"):
    """The corpus as a `datasets.Dataset` (memory-mapped Arrow cache, like any HF dataset)."""
    import datasets

    return datasets.Dataset.from_parquet([str(p) for p in shard_paths(root, subdir)])


def validate(root: Path, subdir: str = "data", max_problems: int = 20) -> dict[str, int]:
    """Check every invariant of DESIGN.md; return the stats or raise `CorpusError` listing problems."""
    root = Path(root)
    manifest = read_manifest(root)
    problems: list[str] = []
    if manifest.schema_ != SCHEMA:
        problems.append(f"manifest `schema` is {manifest.schema_!r}, expected {SCHEMA!r}")
    k = manifest.generation.top_k
    seen: set[str] = set()
    records = tokens = 0
    for path in shard_paths(root, subdir):
        where = f"{path.relative_to(root)}"
        try:  # the way `iter_batches` reads, every page checked against its checksum
            table = pq.ParquetFile(path, page_checksum_verification=True).read()
            table.schema.names  # decoded lazily: a damaged name fails here
        except READ_ERRORS as e:
            problems.append(str(unreadable(where, e)))
            continue
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            problems.append(f"{where}: missing columns {missing}")
            continue
        wrong = _wrong_types(table)
        if wrong:
            problems.append(f"{where}: {wrong}")
            continue
        records += table.num_rows
        n_tokens = pc.list_value_length(table["response_token_ids"])
        tokens += int(pc.sum(n_tokens).as_py() or 0)
        for col in TOKEN_COLUMNS:
            if col in table.column_names:
                bad = pc.not_equal(pc.list_value_length(table[col]), n_tokens)
                problems += _rows(table, bad, f"{where}: `{col}` length differs from `response_token_ids`")
        for col in ("topk_token_ids", "topk_logprobs"):
            rows = pc.list_flatten(table[col])
            widths = pc.list_value_length(rows)
            if len(widths) and pc.any(pc.not_equal(widths, k)).as_py():
                problems.append(f"{where}: `{col}` has rows with {pc.min_max(widths).as_py()} entries, expected k={k}")
        problems += _rows(table, pc.equal(pc.list_value_length(table["prompt_token_ids"]), 0),
                          f"{where}: empty `prompt_token_ids`")
        problems += _unsorted_topk(table, where)
        problems += _non_finite(table, where)
        for rid in table["id"].to_pylist():
            if rid in seen:
                problems.append(f"{where}: duplicate id {rid!r}")
            seen.add(rid)
        if len(problems) >= max_problems:
            break
    stats = manifest.stats if subdir == "data" else manifest.rejected_stats or CorpusStats()
    for key, actual in (("records", records), ("response_tokens", tokens)):
        if getattr(stats, key) != actual:
            problems.append(f"manifest `stats.{key}` is {getattr(stats, key)!r} but the shards hold {actual}")
    if problems:
        more = "\n  ... and more" if len(problems) > max_problems else ""
        raise CorpusError(f"`{root}` is not a valid corpus:\n  " + "\n  ".join(problems[:max_problems]) + more)
    return {"records": records, "response_tokens": tokens}


def _wrong_types(table: pa.Table) -> str | None:
    """The first column whose type is not the contract's (logprobs: float16 or float32, as stored)."""
    stored = table.schema.field("response_logprobs").type
    expected = arrow_schema("float16" if stored == pa.list_(pa.float16()) else "float32", loss_mask=True)
    for column in table.column_names:
        if column in expected.names and table.schema.field(column).type != expected.field(column).type:
            return f"`{column}` has type {table.schema.field(column).type}, expected {expected.field(column).type}"
    return None


def _rows(table: pa.Table, mask: pa.ChunkedArray, message: str) -> list[str]:
    bad = pc.filter(table["id"], mask).to_pylist()
    return [f"{message} (record ids {bad[:3]}{' ...' if len(bad) > 3 else ''})"] if bad else []


def _non_finite(table: pa.Table, where: str) -> list[str]:
    """NaN or infinite logprobs (a NaN passes every comparison, so no other check catches it)."""
    problems = []
    for col in ("response_logprobs", "topk_logprobs"):
        column = table[col].combine_chunks()  # list per record: of values, or of top-k rows
        positions = pc.list_flatten(column)
        record_of = pc.list_parent_indices(column).to_numpy()
        values, position_of = (pc.list_flatten(positions), pc.list_parent_indices(positions).to_numpy()) \
            if col == "topk_logprobs" else (positions, np.arange(len(positions)))
        bad = ~np.isfinite(values.to_numpy(zero_copy_only=False).astype(np.float32))
        if bad.any():
            position = int(position_of[np.argmax(bad)])
            record = int(record_of[position])
            problems.append(f"{where}: `{col}` holds {int(bad.sum())} non-finite values (first: record "
                            f"{table['id'][record].as_py()!r}, response position {position - column.offsets[record].as_py()})")
    return problems


def _unsorted_topk(table: pa.Table, where: str) -> list[str]:
    rows = pc.list_flatten(table["topk_logprobs"])
    values = pc.list_flatten(rows).to_numpy(zero_copy_only=False).astype(np.float32)
    widths = pc.list_value_length(rows).to_numpy()
    if len(values) == 0 or widths.min() != widths.max():
        return []
    grid = values.reshape(-1, widths[0])
    problems = []
    if (np.diff(grid, axis=1) > 1e-3).any():
        problems.append(f"{where}: `topk_logprobs` rows are not sorted best first")
    if (grid > 1e-3).any():
        problems.append(f"{where}: `topk_logprobs` holds positive log-probabilities")
    return problems
