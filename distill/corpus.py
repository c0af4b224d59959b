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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
# How `topk_token_ids` / `topk_logprobs` are stored (`--logprob-encoding`; the manifest's
# `generation.logprob_encoding` names it, and each shard's footer too). Readers decode every
# encoding to the logical columns of DESIGN.md, so consumers never see the difference.
# - quantized (default): the top-k data packed per record (see `_pack_topk`): ids exact, a
#   top-k logprob within QUANTIZED_MAX_ERROR (1/64 nat) of the float32 value, the mass outside
#   the top-k (the KD loss's tail bin) within 0.8 % relative. `response_logprobs` stay float16.
# - float16: `response_logprobs` and `topk_logprobs` as float16, 11 significant bits: a stored
#   logprob x is within |x| * 2**-11 of the float32 value (0.005 nats at x = -10).
# - float32: exact.
# benchmarks/storage.py measures the bytes per token and the KD-loss error of each.
LOGPROB_ENCODINGS = ("quantized", "float16", "float32")
DEFAULT_ENCODING = "quantized"
FLOAT16_RELATIVE_ERROR = 2.0**-11
ENCODING_KEY = b"distill.encoding"
# quantized: the top-k columns' physical stand-ins (both binary, one value per record).
PACKED_IDS, LOGPROB_CODES = "topk_token_ids_packed", "topk_logprob_codes"
QUANT_STEP = 2.0**-6  # grid of the top-k logprobs, nats
TAIL_STEP = 2.0**-6  # grid of log(mass outside the top-k), nats
# half a grid step, plus the mass correction (clipped to half a step); benchmarks/storage.py
# measured what coarser / finer grids cost in bytes and KD-loss error
QUANTIZED_MAX_ERROR = QUANT_STEP
_CODE_MAX = 2**16 - 1  # codes are uint16: logprobs below -1023.98 nats (65535 steps; -inf) store as that


class CorpusError(ValueError):
    """A corpus directory violates the contract of DESIGN.md."""


def arrow_schema(encoding: str = DEFAULT_ENCODING, loss_mask: bool = False) -> pa.Schema:
    """The stored schema. Readers return the columns of `arrow_schema("float32")` (float16 values
    stay float16; decoded top-k logprobs are float32)."""
    lp = pa.float32() if encoding == "float32" else pa.float16()
    topk = [pa.field(PACKED_IDS, pa.large_binary()), pa.field(LOGPROB_CODES, pa.large_binary())] \
        if encoding == "quantized" else \
        [pa.field("topk_token_ids", pa.list_(pa.list_(pa.int32()))), pa.field("topk_logprobs", pa.list_(pa.list_(lp)))]
    fields = [
        pa.field("id", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        pa.field("response", pa.string()),
        pa.field("prompt_token_ids", pa.list_(pa.int32())),
        pa.field("response_token_ids", pa.list_(pa.int32())),
        pa.field("response_logprobs", pa.list_(lp)),
        *topk,
        pa.field("finish_reason", pa.string()),
    ]
    if loss_mask:
        fields.append(pa.field("loss_mask", pa.list_(pa.bool_())))
    return pa.schema(fields)


def logprob_tolerance(encoding: str, values: np.ndarray) -> np.ndarray:
    """Per stored top-k logprob: how far it may be from the engine's float32 value."""
    values = np.abs(np.asarray(values, dtype=np.float64))
    if encoding == "quantized":  # plus the float32 rounding of the decoded value
        return QUANTIZED_MAX_ERROR + values * 2.0**-23
    return values * (FLOAT16_RELATIVE_ERROR if encoding == "float16" else 0.0)


def _lists(rows: Sequence[Any], dtype: pa.DataType, k: int | None = None) -> pa.Array:
    """Per-record `[T_i]` (or `[T_i, k]` when `k` is given) arrays -> list<dtype> (or
    list<list<dtype>>), built from one concatenated numpy buffer instead of per-token objects."""
    arrays = [np.asarray(r).reshape(-1, k) if k else np.asarray(r).reshape(-1) for r in rows]
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays) if arrays else np.zeros((0, k) if k else 0)
    return _nested(flat.reshape(-1).astype(dtype.to_pandas_dtype()), lengths, k, dtype)


def _nested(values: np.ndarray, lengths: np.ndarray, k: int | None, dtype: pa.DataType) -> pa.Array:
    values = pa.array(values, type=dtype)
    if k:
        values = pa.ListArray.from_arrays(np.arange(0, len(values) + 1, k, dtype=np.int32), values)
    return pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), values)


def records_to_table(records: Sequence[dict[str, Any]], k: int, encoding: str = DEFAULT_ENCODING) -> pa.Table:
    """Records as produced by the stages (top-k as `[T, k]` numpy arrays) -> a stored Arrow table."""
    has_mask = any(r.get("loss_mask") is not None for r in records)
    schema = arrow_schema("float32", loss_mask=has_mask)
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
    return encode(pa.table(columns, schema=schema), k, encoding)


def encode(table: pa.Table, k: int, encoding: str) -> pa.Table:
    """A logical table (as readers return it) -> the stored form of `encoding`. A decoded
    `quantized` table encodes back to the same grid points, so its values stay within the bound of
    the original float32 ones (copy stored shards as they are where you can, as curation does)."""
    if encoding not in LOGPROB_ENCODINGS:
        raise ValueError(f"logprob encoding must be one of {LOGPROB_ENCODINGS}, got {encoding!r}")
    schema = arrow_schema(encoding, loss_mask="loss_mask" in table.column_names)
    extra = [n for n in table.column_names if n not in schema.names and n not in ("topk_token_ids", "topk_logprobs")]
    columns = {}
    if encoding == "quantized":
        columns[PACKED_IDS], columns[LOGPROB_CODES] = _pack_topk(table, k)
    for name in schema.names:
        if name not in columns:
            columns[name] = table[name].cast(schema.field(name).type)
    for name in extra:  # e.g. `reject_reason` of rejected records
        schema = schema.append(table.schema.field(name))
        columns[name] = table[name]
    meta = {ENCODING_KEY: json.dumps({"encoding": encoding, "k": k, "step": QUANT_STEP, "tail_step": TAIL_STEP}
                                     if encoding == "quantized" else {"encoding": encoding}).encode()}
    return pa.table([columns[n] for n in schema.names], schema=schema.with_metadata(meta))


def _pack_topk(table: pa.Table, k: int) -> tuple[pa.Array, pa.Array]:
    """The quantized encoding: per record, two byte strings.

    `topk_token_ids_packed`: the T*k ids, row after row, as little-endian unsigned ints of 2
    bytes (3 when the table holds an id >= 65536). Exact.

    `topk_logprob_codes`: T*(k+1) uint16 codes stored as two byte planes (every high byte, then
    every low byte: zstd sees the nearly all-zero high plane apart). Per response token: first
    the tail code round(-log(1 - sum_i p_i) / TAIL_STEP) (_CODE_MAX when the top-k hold all the
    mass), then q_0, q_1 - q_0, ..., q_{k-1} - q_{k-2} with q_i = round(-logprob_i / QUANT_STEP);
    rows are best first, so the differences are small non-negative ints (~5 bits of entropy)."""
    names = table["id"].to_pylist()
    ids_col, lp_col = table["topk_token_ids"].combine_chunks(), table["topk_logprobs"].combine_chunks()
    for name, col in (("topk_token_ids", ids_col), ("topk_logprobs", lp_col)):
        widths = pc.list_value_length(pc.list_flatten(col)).to_numpy(zero_copy_only=False)
        if len(widths) and (widths != k).any():
            record = int(pc.list_parent_indices(col).to_numpy()[np.argmax(widths != k)])
            raise CorpusError(f"record {names[record]!r}: `{name}` has a row of {widths[widths != k][0]} entries, expected k={k}")
    tokens = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    if (pc.list_value_length(lp_col).to_numpy(zero_copy_only=False) != tokens).any():
        record = int(np.argmax(pc.list_value_length(lp_col).to_numpy(zero_copy_only=False) != tokens))
        raise CorpusError(f"record {names[record]!r}: `topk_token_ids` and `topk_logprobs` differ in length")
    ids = pc.list_flatten(pc.list_flatten(ids_col)).to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, k)
    lps = pc.list_flatten(pc.list_flatten(lp_col)).to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, k)
    token_of = np.repeat(np.arange(len(tokens)), tokens)

    def refuse(bad: np.ndarray, problem: str) -> None:
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            record = int(token_of[row])
            raise CorpusError(f"record {names[record]!r}, response position {row - int(tokens[:record].sum())}: "
                              f"{problem}; the `quantized` encoding cannot store it")

    refuse((ids < 0) | (ids >= 2**24), "a top-k token id outside [0, 2^24)")
    refuse(np.isnan(lps) | (lps > 1e-3), "a NaN or positive top-k logprob")
    refuse(np.diff(lps, axis=1) > 1e-3, "top-k logprobs not sorted best first")
    width = 2 if ids.size == 0 or ids.max() < 2**16 else 3
    id_bytes = ids.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :width].reshape(-1)

    with np.errstate(divide="ignore", invalid="ignore"):
        tail = -np.expm1(_logsumexp(lps))  # the mass outside the top-k
        tail_code = np.where(tail > 0, np.round(-np.log(tail) / TAIL_STEP), _CODE_MAX)
    q = np.maximum.accumulate(np.clip(np.round(-lps / QUANT_STEP), 0, _CODE_MAX), axis=1)  # -inf -> _CODE_MAX
    codes = np.concatenate([np.clip(tail_code, 0, _CODE_MAX)[:, None], np.diff(q, axis=1, prepend=0)], axis=1)
    codes = codes.astype(np.uint16).reshape(-1)
    # byte planes per record: record r's codes [a_r, b_r) -> high bytes at a_r + j, low bytes at b_r + j
    starts = np.concatenate([[0], np.cumsum(tokens)]) * (k + 1)
    a, b = np.repeat(starts[:-1], tokens * (k + 1)), np.repeat(starts[1:], tokens * (k + 1))
    j = np.arange(len(codes))
    planes = np.empty(2 * len(codes), dtype=np.uint8)
    planes[a + j], planes[b + j] = codes >> 8, codes & 0xFF
    return (_binary(id_bytes, np.concatenate([[0], np.cumsum(tokens)]) * k * width),
            _binary(planes, 2 * starts))


def _binary(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(offsets) - 1,
                                            [None, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(data)])


def _blobs(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A binary column -> (its bytes, per-record offsets into them)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    array = array.cast(pa.large_binary())
    if array.null_count:
        raise CorpusError(f"{array.null_count} records have no top-k data (null)")
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset:array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8) if array.buffers()[2] else np.zeros(0, np.uint8)
    return data[offsets[0]:offsets[-1]], offsets - offsets[0]


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def _unpack_topk(data: pa.Table | pa.RecordBatch, params: dict) -> tuple[pa.Array, pa.Array]:
    """Inverse of `_pack_topk`: the logical `topk_token_ids` and `topk_logprobs` (float32).
    Raises `CorpusError` naming the record when the byte strings do not fit together."""
    k, step, tail_step = params["k"], params["step"], params["tail_step"]
    names = data["id"].to_pylist() if "id" in data.column_names else list(range(data.num_rows))
    planes, code_offsets = _blobs(data[LOGPROB_CODES])
    id_bytes, id_offsets = _blobs(data[PACKED_IDS])
    code_len, id_len = np.diff(code_offsets), np.diff(id_offsets)
    tokens = code_len // (2 * (k + 1))
    width = np.where(tokens > 0, id_len // np.maximum(tokens * k, 1), 2)
    bad = (code_len % (2 * (k + 1)) != 0) | (id_len != tokens * k * width) | ~np.isin(width, (2, 3))
    if bad.any():
        r = int(np.argmax(bad))
        raise CorpusError(f"record {names[r]!r}: top-k byte strings of {id_len[r]} (ids) and {code_len[r]} (codes) "
                          f"bytes do not hold whole rows of k={k}: corrupted")
    n = int(tokens.sum())
    starts = np.concatenate([[0], np.cumsum(tokens)]) * (k + 1)
    a, b = np.repeat(starts[:-1], tokens * (k + 1)), np.repeat(starts[1:], tokens * (k + 1))
    j = np.arange(n * (k + 1))
    codes = ((planes[a + j].astype(np.int64) << 8) | planes[b + j]).reshape(n, k + 1)
    # ids: 2 or 3 bytes each (the width may differ between records of different shards)
    id_width = np.repeat(width, tokens * k)
    first = np.repeat(np.concatenate([[0], np.cumsum(tokens * k)])[:-1], tokens * k)  # its record's first id
    at = np.repeat(id_offsets[:-1], tokens * k) + (np.arange(n * k) - first) * id_width
    ids = id_bytes[at].astype(np.int64) | (id_bytes[at + 1].astype(np.int64) << 8)
    wide = id_width == 3
    ids[wide] |= id_bytes[at[wide] + 2].astype(np.int64) << 16

    grid = -np.cumsum(codes[:, 1:], axis=1) * step
    tail = np.exp(-codes[:, 0] * tail_step)  # the stored mass outside the top-k
    empty = codes[:, 0] == _CODE_MAX
    # Put the top-k mass back where the stored tail knows it better than the grid (tail <= 1/2),
    # moving every logprob by less than half a step so each stays within QUANTIZED_MAX_ERROR.
    with np.errstate(divide="ignore"):
        target = np.where(empty, 0.0, np.log1p(-np.minimum(tail, 0.5)))
    shift = np.where(empty | (tail <= 0.5), target - _logsumexp(grid), 0.0)
    shift = np.clip(shift, -0.499 * step, 0.499 * step)  # re-encoding rounds back to the same grid point
    logprobs = (grid + shift[:, None]).astype(np.float32)
    return _nested(ids.astype(np.int32), tokens, k, pa.int32()), _nested(logprobs.reshape(-1), tokens, k, pa.float32())


def shard_encoding(schema: pa.Schema) -> dict:
    """The encoding a shard was written with (from its footer; shards from before encodings had
    names: from the stored logprob type)."""
    meta = (schema.metadata or {}).get(ENCODING_KEY)
    if meta is not None:
        return json.loads(meta)
    if PACKED_IDS in schema.names:
        raise CorpusError(f"a shard holds `{PACKED_IDS}` but no `{ENCODING_KEY.decode()}` footer: cannot decode it")
    lp = schema.field("topk_logprobs").type.value_type.value_type if "topk_logprobs" in schema.names else None
    return {"encoding": "float32" if lp == pa.float32() else "float16"}


def decode(data: pa.Table | pa.RecordBatch, params: dict | None = None) -> pa.Table | pa.RecordBatch:
    """Stored columns -> the logical columns of DESIGN.md (float16 and float32 shards already
    hold them). `params`: the shard's encoding, when `data` lost its footer metadata."""
    params = params or shard_encoding(data.schema)
    if params["encoding"] != "quantized" or PACKED_IDS not in data.column_names:
        return data
    ids, logprobs = _unpack_topk(data, params)
    names, arrays = [], []
    for name in data.column_names:
        if name == PACKED_IDS:
            names += ["topk_token_ids", "topk_logprobs"]
            arrays += [ids, logprobs]
        elif name != LOGPROB_CODES:
            names.append(name)
            arrays.append(data[name])
    make = pa.Table.from_arrays if isinstance(data, pa.Table) else pa.RecordBatch.from_arrays
    return make(arrays, names=names)


def _stored_columns(schema: pa.Schema, columns: Sequence[str] | None) -> list[str] | None:
    """The stored columns to read for these logical ones."""
    if columns is None or PACKED_IDS not in schema.names:
        return None if columns is None else list(columns)
    out = [c for c in columns if c not in ("topk_token_ids", "topk_logprobs")]
    if len(out) < len(columns):
        out += [PACKED_IDS, LOGPROB_CODES]
    return out


def _select(data, columns: Sequence[str] | None):
    return data if columns is None else data.select(list(columns))


def write_shard(root: Path, index: int, table: pa.Table, subdir: str = "data") -> Path:
    """Write one shard atomically: readers see the whole shard or none of it. Its record and
    token counts go into the Parquet footer, so stats never need a scan."""
    tokens = int(pc.sum(pc.list_value_length(table.column("response_token_ids"))).as_py() or 0)
    stats = json.dumps({"records": table.num_rows, "response_tokens": tokens}).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), STATS_KEY: stats})
    path = Path(root) / subdir / f"part-{index:05d}.parquet"
    packed = [c for c in (PACKED_IDS, LOGPROB_CODES) if c in table.column_names]
    try:
        with atomic_path(path) as tmp:
            # Page checksums: `validate` finds a flipped byte in the data instead of reading it.
            # The packed top-k columns: zstd level 17 (5 % smaller there than 6; 18-19 gain nothing
            # more and are 2-5x slower), and no min/max statistics (they would copy two whole byte
            # strings per page into the file).
            pq.write_table(table, tmp, compression="zstd", write_page_checksum=True,
                           compression_level={c: 17 if c in packed else 6 for c in table.column_names},
                           write_statistics=[c for c in table.column_names if c not in packed])
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
    logprob_encoding: str = DEFAULT_ENCODING

    @model_validator(mode="before")
    @classmethod
    def _named_dtype(cls, data: Any) -> Any:
        """Manifests written before `logprob_encoding` named it `logprob_dtype`."""
        if isinstance(data, dict) and "logprob_dtype" in data and "logprob_encoding" not in data:
            data = {("logprob_encoding" if key == "logprob_dtype" else key): value for key, value in data.items()}
        return data
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
    """Record batches with the logical columns, whatever the shards' encoding."""
    for path in shard_paths(root, subdir):
        shard = pq.ParquetFile(path)
        for batch in shard.iter_batches(batch_size=batch_size, columns=_stored_columns(shard.schema_arrow, columns)):
            yield _select(decode(batch), columns)


def iter_records(root: Path, subdir: str = "data", columns: Sequence[str] | None = None) -> Iterator[dict]:
    """Records as plain Python dicts, shard by shard (memory stays at one batch)."""
    for batch in iter_batches(root, subdir, columns):
        yield from batch.to_pylist()


def read_shard(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """One shard with the logical columns."""
    schema = pq.read_schema(path)
    return _select(decode(pq.read_table(path, columns=_stored_columns(schema, columns))), columns)


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
    dataset = datasets.Dataset.from_parquet([str(p) for p in paths])
    params = shard_encoding(pq.read_schema(paths[0])) if paths else {"encoding": "float32"}
    if params["encoding"] != "quantized":
        return dataset
    # decoded into the dataset's own cache files, batch by batch, as Arrow tables
    return dataset.with_format("arrow").map(lambda t: decode(t, params), batched=True,
                                            remove_columns=[PACKED_IDS, LOGPROB_CODES]).with_format(None)


def validate(root: Path, subdir: str = "data", max_problems: int = 20) -> dict[str, int]:
    """Check every invariant of DESIGN.md; return the stats or raise `CorpusError` listing problems."""
    for _ in validated_batches(root, subdir, max_problems):
        pass
    stats = _expected_stats(read_manifest(root), subdir)  # what the shards hold: checked equal
    return {"records": stats.records, "response_tokens": stats.response_tokens}


def validated_batches(root: Path, subdir: str = "data", max_problems: int = 20,
                      batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """The corpus's records as decoded record batches, each checked as it is read (every page
    against its checksum, every invariant of DESIGN.md): validation and reading in one pass.
    Only batches without a problem are yielded; after the last one (or `max_problems`) the
    problems found are raised as one `CorpusError`, as `validate` raises them."""
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
        try:  # every page checked against its checksum as it is read
            shard = pq.ParquetFile(path, page_checksum_verification=True)
            shard.schema_arrow.names  # decoded lazily: a damaged name fails here
            encoding = shard_encoding(shard.schema_arrow)
            stored = shard.iter_batches(batch_size=batch_size)
        except CorpusError as e:
            problems.append(f"{where}: {e}")
            continue
        except READ_ERRORS as e:
            problems.append(str(unreadable(where, e)))
            continue
        clean = encoding["encoding"] == manifest.generation.logprob_encoding
        if not clean:
            problems.append(f"{where}: stored as `{encoding['encoding']}` but the manifest says "
                            f"`generation.logprob_encoding: {manifest.generation.logprob_encoding}`")
        first = True
        while len(problems) < max_problems:
            try:
                batch = next(stored, None)
            except READ_ERRORS as e:
                problems.append(str(unreadable(where, e)))
                break
            if batch is None:
                break
            try:
                batch = decode(batch, encoding)
            except (CorpusError, pa.ArrowException, KeyError) as e:
                problems.append(f"{where}: {e}")
                break
            table = pa.Table.from_batches([batch])
            if first:  # the shard's columns and types: once per shard
                first = False
                missing = [c for c in COLUMNS if c not in table.column_names]
                wrong = _wrong_types(table)
                if missing or wrong:
                    problems.append(f"{where}: missing columns {missing}" if missing else f"{where}: {wrong}")
                    break
            found = _batch_problems(table, where, k, seen)
            problems += found
            records += table.num_rows
            tokens += int(pc.sum(pc.list_value_length(table["response_token_ids"])).as_py() or 0)
            if clean and not found:
                yield batch
        if len(problems) >= max_problems:
            break
    stats = _expected_stats(manifest, subdir)
    for key, actual in (("records", records), ("response_tokens", tokens)):
        if getattr(stats, key) != actual:
            problems.append(f"manifest `stats.{key}` is {getattr(stats, key)!r} but the shards hold {actual}")
    if problems:
        more = "\n  ... and more" if len(problems) > max_problems else ""
        raise CorpusError(f"`{root}` is not a valid corpus:\n  " + "\n  ".join(problems[:max_problems]) + more)


def _expected_stats(manifest: Manifest, subdir: str) -> CorpusStats:
    return manifest.stats if subdir == "data" else manifest.rejected_stats or CorpusStats()


def _batch_problems(table: pa.Table, where: str, k: int, seen: set[str]) -> list[str]:
    """What is wrong in these records of a shard with the right columns; `seen`: the ids read so far."""
    problems = []
    n_tokens = pc.list_value_length(table["response_token_ids"])
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
    return problems


def _wrong_types(table: pa.Table) -> str | None:
    """The first column whose type is not the contract's (a logprob column: float16 or float32,
    as stored or decoded)."""
    schemas = [arrow_schema(encoding, loss_mask=True) for encoding in ("float16", "float32")]
    allowed = {name: {_unnamed(schema.field(name).type) for schema in schemas} for name in schemas[0].names}
    for column in table.column_names:
        if column in allowed and _unnamed(table.schema.field(column).type) not in allowed[column]:
            expected = " or ".join(sorted(str(t) for t in allowed[column]))
            return f"`{column}` has type {table.schema.field(column).type}, expected {expected}"
    return None


def _unnamed(t: pa.DataType) -> pa.DataType:
    """`t` with every list's item field named `item` (Parquet readers may name it `element`)."""
    if pa.types.is_list(t):
        return pa.list_(_unnamed(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _unnamed(f.type)) for f in t])
    return t


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
