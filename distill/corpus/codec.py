"""The logical columns and the logprob encodings they are stored in (quantized / float16 /
float32): Arrow tables in, Arrow tables out. Knows nothing of files, shards or manifests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill.corpus import topk_coder

COLUMNS = (
    "id", "prompt_id", "messages", "response", "prompt_token_ids", "response_token_ids",
    "response_logprobs", "topk_token_ids", "topk_logprobs", "finish_reason",
)
# Per-token columns: each must have one entry per response token (`loss_mask` is optional:
# absent means every token trains).
TOKEN_COLUMNS = ("response_logprobs", "topk_token_ids", "topk_logprobs", "loss_mask")
# The columns of token ids: each must be a token of the teacher's vocabulary.
TOKEN_ID_COLUMNS = ("prompt_token_ids", "response_token_ids", "topk_token_ids")
# The student view (`distill generate --student-view`): what the student is shown of the prompt
# where it differs from what the teacher answered (context distillation). Optional, both or
# neither; absent means the student sees the teacher's prompt.
STUDENT_MESSAGES, STUDENT_PROMPT_IDS = "student_messages", "student_prompt_token_ids"
STUDENT_VIEW_COLUMNS = (STUDENT_MESSAGES, STUDENT_PROMPT_IDS)
# How `topk_token_ids` / `topk_logprobs` are stored (`--logprob-encoding`; the manifest's
# `generation.logprob_encoding` names it, and each shard's footer too). Readers decode every
# encoding to the logical columns of docs/corpus-format.md, so consumers never see the difference.
# - quantized (default): the top-k data packed per record (see `_pack_topk`): ids exact, a
#   top-k logprob within QUANTIZED_MAX_ERROR (3/128 nat) of the float32 value, the mass outside
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
# Layout 3's grid below the top of the row, in QUANT_STEPs (`_grid_codes`): (from, every, at most):
# a slot's step doubles for every `every` steps by which the slot above lies below `from`, at most
# `at most` times. (64, 64, 1): 1/32 nat below -1 nat, where a logprob's error weighs by its small
# probability: 0.10 B per entry less in layout 3's coder, and at most 4.6e-4 relative KD-loss error
# against float32 for students at 0.03 nats of KL (2.1e-4 on the fine grid; docs/results/scale.md).
# Layouts 1 and 2: every step the fine one; layout 4: layout 3's.
LAYOUT3_GRID = (64, 64, 1)
FINE_GRID = (0, 1, 0)
# half of the coarsest step (layout 3's; layouts 1 and 2: half of QUANT_STEP), plus the mass
# correction (clipped to half a fine step)
QUANTIZED_MAX_ERROR = QUANT_STEP * (2 ** LAYOUT3_GRID[2] + 1) / 2
_CODE_MAX = 2**16 - 1  # codes are uint16: logprobs below -1023.98 nats (65535 steps; -inf) store as that
# The byte layout of the two quantized columns (the footer's `layout`; absent: 1). Layouts 1 and 2
# hold the same values (ids exact, the same logprob codes), layout 3 the same ids and its grid's
# codes; readers decode each. `encode` writes TOPK_LAYOUT; layouts 1 and 2 stay writable, for
# benchmarks/storage.py's comparison and for re-encoding without coarsening (distill.demo's subsets).
# - 1: ids as fixed-width ints; codes as two uint16 byte planes (`_layout1`).
# - 2: ids as references to the same id in the previous rows or literals; codes as bytes
#   (`_layout2`). On real SmolLM2 rows 3-4 % fewer top-k bytes at the same zstd level, for
#   1.35-2.1x layout 1's encode + write time and 1.5-2x its read + decode time.
# - 3: both range-coded per record (`_layout3`, `topk_coder.py`), the codes on LAYOUT3_GRID; the
#   ids given the record's `response_token_ids`, which its reader needs too (`decode_inputs`).
#   On real SmolLM2 rows ~18 % fewer top-k bytes than layout 2 (benchmarks/storage.py).
# - 4: layout 3 with a dictionary (`topk_coder.Dictionary`: classes of frequent literal ids and
#   the models' starting probabilities), learnt from the first shard a corpus writes and kept in
#   every shard's footer (`dictionary`); a writer of later shards passes it on (`corpus_dictionary`).
#   On SmolLM2's 64-token answers 5 % fewer top-k bytes than layout 3 (128 tokens: 1-3 %), the
#   dictionary included.
TOPK_LAYOUTS = (1, 2, 3, 4)
TOPK_LAYOUT = 4
RANGE_CODED = (3, 4)  # the layouts of `topk_coder`, decoded with the response tokens


class CorpusError(ValueError):
    """A corpus directory violates the contract of docs/corpus-format.md."""


def arrow_schema(encoding: str = DEFAULT_ENCODING, loss_mask: bool = False, student_view: bool = False) -> pa.Schema:
    """The stored schema. Readers return the columns of `arrow_schema("float32")` (float16 values
    stay float16; decoded top-k logprobs are float32). `student_view`: with STUDENT_VIEW_COLUMNS."""
    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    lp = pa.float32() if encoding == "float32" else pa.float16()
    topk = [pa.field(PACKED_IDS, pa.large_binary()), pa.field(LOGPROB_CODES, pa.large_binary())] \
        if encoding == "quantized" else \
        [pa.field("topk_token_ids", pa.list_(pa.list_(pa.int32()))), pa.field("topk_logprobs", pa.list_(pa.list_(lp)))]
    fields = [
        pa.field("id", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("messages", message),
        pa.field("response", pa.string()),
        pa.field("prompt_token_ids", pa.list_(pa.int32())),
        pa.field("response_token_ids", pa.list_(pa.int32())),
        pa.field("response_logprobs", pa.list_(lp)),
        *topk,
        pa.field("finish_reason", pa.string()),
    ]
    if loss_mask:
        fields.append(pa.field("loss_mask", pa.list_(pa.bool_())))
    if student_view:
        fields += [pa.field(STUDENT_MESSAGES, message), pa.field(STUDENT_PROMPT_IDS, pa.list_(pa.int32()))]
    return pa.schema(fields)


def as_student_view(data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """`data` with `prompt_token_ids` replaced by the student's (`student_prompt_token_ids` where a
    record has one): what the student reads before the teacher's answer. The student columns go."""
    if STUDENT_PROMPT_IDS not in data.column_names:
        return data
    student = pc.if_else(pc.is_null(data[STUDENT_PROMPT_IDS]), data["prompt_token_ids"],
                         data[STUDENT_PROMPT_IDS].cast(data.schema.field("prompt_token_ids").type))
    data = data.set_column(data.schema.get_field_index("prompt_token_ids"), "prompt_token_ids", student)
    for name in STUDENT_VIEW_COLUMNS:
        if name in data.column_names:
            data = data.drop_columns([name]) if isinstance(data, pa.Table) else \
                data.select([n for n in data.column_names if n != name])
    return data


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
    return encode(logical_table(records, k), k, encoding)


def logical_table(records: Sequence[dict[str, Any]], k: int) -> pa.Table:
    """Records as produced by the stages -> the logical table (float32 logprobs)."""
    has_mask = any(r.get("loss_mask") is not None for r in records)
    has_view = any(r.get(STUDENT_PROMPT_IDS) is not None for r in records)
    schema = arrow_schema("float32", loss_mask=has_mask, student_view=has_view)
    columns = {}
    for name in schema.names:
        field = schema.field(name)
        if name in ("topk_token_ids", "topk_logprobs"):
            columns[name] = _lists([r[name] for r in records], field.type.value_type.value_type, k)
        elif name in ("prompt_token_ids", "response_token_ids", "response_logprobs", STUDENT_PROMPT_IDS):
            columns[name] = _lists([r[name] for r in records], field.type.value_type)
        elif name == "loss_mask":
            columns[name] = pa.array(
                [r.get(name) if r.get(name) is not None else [True] * len(r["response_token_ids"])
                 for r in records], type=field.type)
        else:
            columns[name] = pa.array([r[name] for r in records], type=field.type)
    return pa.table(columns, schema=schema)


def encode(table: pa.Table, k: int, encoding: str, layout: int = TOPK_LAYOUT, dictionary: str | None = None) -> pa.Table:
    """A logical table (as readers return it) -> the stored form of `encoding` (`quantized`: in
    byte `layout`). A decoded `quantized` table encodes back to the same grid points, so its values
    stay within the bound of the original float32 ones (copy stored shards as they are where you
    can, as curation does). `dictionary`: layout 4's, as the corpus's earlier shards keep it
    (`corpus_dictionary`); None: learnt from this table."""
    if encoding not in LOGPROB_ENCODINGS:
        raise ValueError(f"logprob encoding must be one of {LOGPROB_ENCODINGS}, got {encoding!r}")
    schema = arrow_schema(encoding, loss_mask="loss_mask" in table.column_names,
                          student_view=STUDENT_PROMPT_IDS in table.column_names)
    extra = [n for n in table.column_names if n not in schema.names and n not in ("topk_token_ids", "topk_logprobs")]
    columns = {}
    if encoding == "quantized":
        columns[PACKED_IDS], columns[LOGPROB_CODES], dictionary = _pack_topk(table, k, layout, dictionary)
    for name in schema.names:
        if name not in columns:
            columns[name] = table[name].cast(schema.field(name).type)
    for name in extra:  # e.g. `reject_reason` of rejected records
        schema = schema.append(table.schema.field(name))
        columns[name] = table[name]
    # layout 1 shards were written before the key existed: leaving it out keeps them byte-identical
    quantized = {"encoding": encoding, "k": k, "step": QUANT_STEP, "tail_step": TAIL_STEP} | \
        ({} if layout == 1 else {"layout": layout}) | ({"grid": list(LAYOUT3_GRID)} if layout in RANGE_CODED else {}) | \
        ({"dictionary": dictionary} if layout == 4 else {})
    meta = {ENCODING_KEY: json.dumps(quantized if encoding == "quantized" else {"encoding": encoding}).encode()}
    return pa.table([columns[n] for n in schema.names], schema=schema.with_metadata(meta))


def _pack_topk(table: pa.Table, k: int, layout: int, dictionary: str | None) -> tuple[pa.Array, pa.Array, str | None]:
    """The quantized encoding: per record, two byte strings (`topk_token_ids_packed`,
    `topk_logprob_codes`) in byte `layout`, and layout 4's dictionary (`dictionary`, or learnt).

    The values: the T*k ids, exact; and per response token k+1 codes: first the tail code
    round(-log(1 - sum_i p_i) / TAIL_STEP) (_CODE_MAX when the top-k hold all the mass), then the
    row's grid codes (`_grid_codes`): on the fine grid q_0, q_1 - q_0, ..., q_{k-1} - q_{k-2} with
    q_i = round(-logprob_i / QUANT_STEP); rows are best first, so the differences are small
    non-negative ints (~5 bits of entropy)."""
    if layout not in TOPK_LAYOUTS:
        raise ValueError(f"top-k layout must be one of {TOPK_LAYOUTS}, got {layout!r}")
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
    grid = LAYOUT3_GRID if layout in RANGE_CODED else FINE_GRID
    codes = np.concatenate([tail_codes(lps)[:, None].astype(np.int64), _grid_codes(lps, grid)], axis=1)
    if layout in RANGE_CODED:
        response = pc.list_flatten(table["response_token_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(response) != len(ids):
            record = int(np.argmax(pc.list_value_length(table["response_token_ids"]).to_numpy(zero_copy_only=False) != tokens))
            raise CorpusError(f"record {names[record]!r}: `topk_token_ids` and `response_token_ids` differ in length")
        learnt = None
        if layout == 4:
            learnt = topk_coder.learn(tokens, ids, response, codes, np.asarray(grid)) if dictionary is None \
                else _dictionary(dictionary)
        return *_layout3(ids, codes, tokens, response, learnt), None if learnt is None else learnt.text
    width = 2 if ids.size == 0 or ids.max() < 2**16 else 3
    return *(_layout1 if layout == 1 else _layout2)(ids, codes, tokens, k, width), None


def _doublings(level: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """How many times the step of the slot below a slot at `level` (in QUANT_STEPs) doubles."""
    start, every, most = grid
    return np.minimum(most, np.maximum(level - start, 0) // every)


def _grid_codes(lps: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Rows of logprobs [n, k] (best first) -> their codes [n, k] on `grid` (LAYOUT3_GRID,
    FINE_GRID): slot 0's level in QUANT_STEPs, then each slot's steps down from the level decoded
    for the slot above (closed loop: the reader rebuilds the same levels, `_grid_levels`). On the
    fine grid these are the differences of q = round(-logprob / QUANT_STEP) (made non-increasing)."""
    x = np.clip(-lps / QUANT_STEP, 0, _CODE_MAX)  # -inf -> _CODE_MAX
    codes = np.empty(x.shape, dtype=np.int64)
    level = np.zeros(len(x), dtype=np.int64)
    for j in range(x.shape[1]):
        shift = _doublings(level, grid) if j else np.zeros_like(level)
        code = np.where(shift == 0, np.round(x[:, j]) - level, np.round((x[:, j] - level) / (1 << shift)))
        codes[:, j] = np.maximum(code, 0)
        level += codes[:, j] << shift
    return codes


def _grid_levels(codes: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """`_grid_codes`'s inverse: the levels [n, k] in QUANT_STEPs."""
    if grid[2] == 0:
        return np.cumsum(codes, axis=1)
    levels = np.empty(codes.shape, dtype=np.int64)
    level = np.zeros(len(codes), dtype=np.int64)
    for j in range(codes.shape[1]):
        level = level + (codes[:, j] << (_doublings(level, grid) if j else 0))
        levels[:, j] = level
    return levels


def _layout1(ids: np.ndarray, codes: np.ndarray, tokens: np.ndarray, k: int, width: int) -> tuple[pa.Array, pa.Array]:
    """Layout 1. Ids: row after row, little-endian unsigned ints of `width` bytes. Codes: the
    T*(k+1) uint16 codes as two byte planes (every high byte, then every low byte)."""
    id_bytes = ids.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :width].reshape(-1)
    codes = codes.reshape(-1)
    # byte planes per record: record r's codes [a_r, b_r) -> high bytes at a_r + j, low bytes at b_r + j
    starts = np.concatenate([[0], np.cumsum(tokens)]) * (k + 1)
    a, b = np.repeat(starts[:-1], tokens * (k + 1)), np.repeat(starts[1:], tokens * (k + 1))
    j = np.arange(len(codes))
    planes = np.empty(2 * len(codes), dtype=np.uint8)
    planes[a + j], planes[b + j] = codes >> 8, codes & 0xFF
    return (_binary(id_bytes, np.concatenate([[0], np.cumsum(tokens)]) * k * width),
            _binary(planes, 2 * starts))


def _max_back(k: int) -> int:
    """Layout 2: how many rows back an id may be referenced (a reference is one byte, 1..255)."""
    return 255 // k


def _layout2(ids: np.ndarray, codes: np.ndarray, tokens: np.ndarray, k: int, width: int) -> tuple[pa.Array, pa.Array]:
    """Layout 2: the slot order is kept (it is the rank, and the codes follow it).

    Ids: T*k reference bytes, row after row, then the literal ids as little-endian ints of
    `width` bytes. A reference 1 + (d - 1) * k + j says "the id in slot j, d rows up" (the
    latest such row; d <= 255 // k); 0 says "the next literal". A teacher's top-k at
    neighbouring positions share ids: on real SmolLM2 rows (k = 20) about half of the ids are
    references, and the ids take 5 % fewer bytes after zstd than layout 1's (benchmarks/storage.py).

    Codes: T as uint32 LE (the one length the reader cannot infer), then the tail codes' high
    bytes, q_0's high bytes, the tail codes' low bytes, q_0's low bytes (T each), then the k-1
    differences as one byte each, row after row, 255 meaning "escaped": the escaped values
    follow as uint16, high bytes then low bytes. k + 3 bytes per row before zstd where layout 1
    had 2(k + 1) (its high plane nearly all zero); 2-3 % fewer after."""
    n = len(ids)
    record_of = np.repeat(np.arange(len(tokens)), tokens)
    first_row = np.concatenate([[0], np.cumsum(tokens)])
    # the latest earlier occurrence of each id in its record: a stable sort by (record, id)
    flat, entry = ids.reshape(-1), np.arange(n * k)
    key = (np.repeat(record_of, k) << 24) | flat  # ids < 2**24 (checked)
    order = np.argsort(key, kind="stable")
    repeat = np.zeros(n * k, dtype=bool)
    repeat[1:] = key[order[1:]] == key[order[:-1]]
    earlier = np.full(n * k, -1)
    earlier[order[repeat]] = order[np.flatnonzero(repeat) - 1]
    back = entry // k - earlier // k
    hit = (earlier >= 0) & (back >= 1) & (back <= _max_back(k))  # an id twice in one row: a literal
    refs = np.where(hit, 1 + (back - 1) * k + earlier % k, 0).astype(np.uint8)
    plain = flat.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :width]
    # References pay where ids are costly and recur (a real teacher's vocabulary); over a few
    # hundred ids a plain id is cheaper than its reference (benchmarks/storage.py on the tiny
    # teacher, topk_zstd_level.py's Zipf rows: 4-8 % more bytes). Keep them only where they shrink
    # the bytes' order-0 entropy, which ranked the two as zstd did on all of those; without
    # them the reference bytes are all 0 and cost next to nothing after zstd.
    if _entropy(np.concatenate([refs, plain[~hit].reshape(-1)])) >= _entropy(plain.reshape(-1)):
        hit[:], refs[:] = False, 0
    literals = plain[~hit]
    literal_count = np.bincount(record_of, weights=(~hit).reshape(n, k).sum(1), minlength=len(tokens)).astype(np.int64)
    id_len = tokens * k + literal_count * width
    ref_at = _spread(np.concatenate([[0], np.cumsum(id_len)])[:-1], tokens * k)
    literal_at = _spread(np.concatenate([[0], np.cumsum(id_len)])[:-1] + tokens * k, literal_count * width)
    id_bytes = np.empty(int(id_len.sum()), dtype=np.uint8)
    id_bytes[ref_at], id_bytes[literal_at] = refs, literals.reshape(-1)

    stored = codes[:, 2:].reshape(-1)  # the k-1 differences per row
    escaped = stored >= 255
    escape_count = np.bincount(np.repeat(np.arange(len(tokens)), (k - 1) * tokens), weights=escaped,
                               minlength=len(tokens)).astype(np.int64)
    code_len = 4 + (k + 3) * tokens + 2 * escape_count
    starts = np.concatenate([[0], np.cumsum(code_len)])[:-1]
    out = np.empty(int(code_len.sum()), dtype=np.uint8)
    out[_spread(starts, np.full(len(tokens), 4))] = tokens.astype("<u4").view(np.uint8)
    heads = np.stack([codes[:, 0] >> 8, codes[:, 1] >> 8, codes[:, 0] & 0xFF, codes[:, 1] & 0xFF])  # [4, n]
    head_at = starts[record_of] + 4 + (np.arange(n) - first_row[record_of])  # + part * T
    for part in range(4):
        out[head_at + part * tokens[record_of]] = heads[part]
    out[_spread(starts + 4 + 4 * tokens, (k - 1) * tokens)] = np.minimum(stored, 255)
    values = stored[escaped]
    escape_at = _spread(starts + 4 + (k + 3) * tokens, escape_count)
    out[escape_at] = values >> 8
    out[escape_at + np.repeat(escape_count, escape_count)] = values & 0xFF
    return _binary(id_bytes, np.concatenate([[0], np.cumsum(id_len)])), _binary(out, np.concatenate([[0], np.cumsum(code_len)]))


def _layout3(ids: np.ndarray, codes: np.ndarray, tokens: np.ndarray, response: np.ndarray,
             dictionary: topk_coder.Dictionary | None) -> tuple[pa.Array, pa.Array]:
    """Layouts 3 and 4 (with `dictionary`): each record's ids and codes range-coded alone
    (`topk_coder`; the codes on LAYOUT3_GRID, the ids given `response`, the sampled token of each
    row). The codes' string starts with T as uint32 LE, as layout 2's does (`topk_rows` reads it
    without decoding). Written at zstd level 1 like the others, which finds nothing left to take."""
    id_bytes, id_ends, code_bytes, code_ends = topk_coder.encode(tokens, ids, response, codes, np.asarray(LAYOUT3_GRID),
                                                                 dictionary)
    code_len = np.diff(code_ends, prepend=0) + 4
    offsets = np.concatenate([[0], np.cumsum(code_len)])
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    out[_spread(offsets[:-1], np.full(len(tokens), 4))] = tokens.astype("<u4").view(np.uint8)
    out[_spread(offsets[:-1] + 4, code_len - 4)] = code_bytes
    return _binary(id_bytes, np.concatenate([[0], id_ends])), _binary(out, offsets)


def _entropy(data: np.ndarray) -> float:
    """The order-0 entropy of a byte array, in bytes: about what zstd's entropy stage makes of it."""
    counts = np.bincount(data, minlength=256)
    p = counts[counts > 0] / max(len(data), 1)
    return float(-(p * np.log2(p)).sum() * len(data) / 8)


def _spread(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[starts[0], starts[0] + 1, ..., starts[0] + counts[0] - 1, starts[1], ...]: the positions of
    consecutive runs, for every run at once."""
    counts = np.asarray(counts, dtype=np.int64)
    if not counts.sum():
        return np.zeros(0, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    return np.repeat(np.asarray(starts, dtype=np.int64) - first, counts) + np.arange(int(counts.sum()))


def _binary(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(offsets) - 1,
                                            [None, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(data)])


def binary_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A binary or string column -> (its bytes as uint8, per-value offsets into them from 0; a null
    value is empty). Zero-copy where the column is one large array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    array = array.cast(pa.large_binary())
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset:array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8) if array.buffers()[2] else np.zeros(0, np.uint8)
    return data[offsets[0]:offsets[-1]], offsets - offsets[0]


def _blobs(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A top-k binary column -> (its bytes, per-record offsets into them); no record may lack it."""
    if column.null_count:
        raise CorpusError(f"{column.null_count} records have no top-k data (null)")
    return binary_values(column)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def _unpack_topk(data: pa.Table | pa.RecordBatch, params: dict) -> tuple[pa.Array, pa.Array]:
    """Inverse of `_pack_topk`: the logical `topk_token_ids` and `topk_logprobs` (float32).
    Raises `CorpusError` naming the record when the byte strings do not fit together."""
    k, step, tail_step = params["k"], params["step"], params["tail_step"]
    layout = params.get("layout", 1)
    if layout not in TOPK_LAYOUTS:
        raise CorpusError(f"top-k layout {layout!r} is unknown (this distill reads {TOPK_LAYOUTS}): "
                          "written by a newer distill?")
    names = data["id"].to_pylist() if "id" in data.column_names else list(range(data.num_rows))
    planes, code_offsets = _blobs(data[LOGPROB_CODES])
    id_bytes, id_offsets = _blobs(data[PACKED_IDS])
    if layout in RANGE_CODED:
        dictionary = _dictionary(params.get("dictionary")) if layout == 4 else None
        ids, codes, tokens = _unlayout3(id_bytes, id_offsets, planes, code_offsets, k, names, data, params["grid"],
                                        dictionary)
    else:
        unpack = _unlayout1 if layout == 1 else _unlayout2
        ids, codes, tokens = unpack(id_bytes, id_offsets, planes, code_offsets, k, names)

    levels = _grid_levels(codes[:, 1:], params.get("grid", FINE_GRID))
    logprobs = logprobs_of_grid(-levels * step, codes[:, 0], step, tail_step)
    return _nested(ids.reshape(-1).astype(np.int32, copy=False), tokens, k, pa.int32()), _nested(logprobs.reshape(-1), tokens, k, pa.float32())


def tail_codes(lps: np.ndarray) -> np.ndarray:
    """Per row of logprobs [n, k]: the tail code round(-log(1 - sum_i p_i) / TAIL_STEP), in [0,
    _CODE_MAX]; _CODE_MAX where the row holds all the mass."""
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = -np.expm1(_logsumexp(lps))  # the mass outside the top-k
        return np.clip(np.where(tail > 0, np.round(-np.log(tail) / TAIL_STEP), _CODE_MAX), 0, _CODE_MAX)


def logprobs_of_grid(grid: np.ndarray, tail_code: np.ndarray, step: float, tail_step: float) -> np.ndarray:
    """The reader's float32 logprobs of rows decoded to grid points [n, k] with their tail codes:
    the top-k mass is put back where the stored tail knows it better than the grid (tail <= 1/2),
    every logprob moving by less than half of `step` (the grid's finest step), so each stays within
    QUANTIZED_MAX_ERROR and re-encoding rounds back to the same grid point."""
    tail = np.exp(-tail_code * tail_step)  # the stored mass outside the top-k
    empty = tail_code == _CODE_MAX
    with np.errstate(divide="ignore"):
        target = np.where(empty, 0.0, np.log1p(-np.minimum(tail, 0.5)))
    shift = np.clip(np.where(empty | (tail <= 0.5), target - _logsumexp(grid), 0.0), -0.499 * step, 0.499 * step)
    return (grid + shift[:, None]).astype(np.float32)


def _corrupted(names: list, record: int, id_len: np.ndarray, code_len: np.ndarray, why: str) -> CorpusError:
    return CorpusError(f"record {names[record]!r}: top-k byte strings of {id_len[record]} (ids) and {code_len[record]} "
                       f"(codes) bytes {why}: corrupted")


def _unlayout1(id_bytes, id_offsets, planes, code_offsets, k, names) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layout 1's byte strings -> (ids [n, k], codes [n, k+1], tokens per record)."""
    code_len, id_len = np.diff(code_offsets), np.diff(id_offsets)
    tokens = code_len // (2 * (k + 1))
    width = np.where(tokens > 0, id_len // np.maximum(tokens * k, 1), 2)
    bad = (code_len % (2 * (k + 1)) != 0) | (id_len != tokens * k * width) | ~np.isin(width, (2, 3))
    if bad.any():
        raise _corrupted(names, int(np.argmax(bad)), id_len, code_len, f"do not hold whole rows of k={k}")
    n = int(tokens.sum())
    starts = np.concatenate([[0], np.cumsum(tokens)]) * (k + 1)
    a, b = np.repeat(starts[:-1], tokens * (k + 1)), np.repeat(starts[1:], tokens * (k + 1))
    j = np.arange(n * (k + 1))
    codes = ((planes[a + j].astype(np.int64) << 8) | planes[b + j]).reshape(n, k + 1)
    # ids: 2 or 3 bytes each (the width may differ between records of different shards)
    id_width = np.repeat(width, tokens * k)
    first = np.repeat(np.concatenate([[0], np.cumsum(tokens * k)])[:-1], tokens * k)  # its record's first id
    at = np.repeat(id_offsets[:-1], tokens * k) + (np.arange(n * k) - first) * id_width
    return _ints(id_bytes, at, id_width).reshape(n, k), codes, tokens


def _ints(data: np.ndarray, at: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The little-endian ints of 2 or 3 bytes (`width`, per int) starting at `at`."""
    ints = data[at].astype(np.int64) | (data[at + 1].astype(np.int64) << 8)
    wide = width == 3
    ints[wide] |= data[at[wide] + 2].astype(np.int64) << 16
    return ints


def _unlayout2(id_bytes, id_offsets, out, code_offsets, k, names) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layout 2's byte strings (see `_layout2`) -> (ids [n, k], codes [n, k+1], tokens per record)."""
    code_len, id_len = np.diff(code_offsets), np.diff(id_offsets)
    records = len(code_len)
    short = code_len < 4
    if short.any():
        raise _corrupted(names, int(np.argmax(short)), id_len, code_len, "are too short to hold a length")
    tokens = _row_counts(out, code_offsets[:-1])
    fits = (code_len >= 4 + (k + 3) * tokens) & (id_len >= tokens * k)
    if not fits.all():
        raise _corrupted(names, int(np.argmax(~fits)), id_len, code_len, f"are too short for their rows of k={k}")
    n = int(tokens.sum())
    record_of = np.repeat(np.arange(records), tokens)
    first_row = np.concatenate([[0], np.cumsum(tokens)])
    starts = code_offsets[:-1]

    # codes
    stored = out[_spread(starts + 4 + 4 * tokens, (k - 1) * tokens)].astype(np.int64)
    escaped = stored == 255
    escape_count = np.bincount(np.repeat(np.arange(records), (k - 1) * tokens), weights=escaped,
                               minlength=records).astype(np.int64)
    bad = code_len != 4 + (k + 3) * tokens + 2 * escape_count
    if bad.any():
        raise _corrupted(names, int(np.argmax(bad)), id_len, code_len,
                         f"do not hold {k + 3} bytes per row plus the escaped differences")
    escape_at = _spread(starts + 4 + (k + 3) * tokens, escape_count)
    stored[escaped] = (out[escape_at].astype(np.int64) << 8) | out[escape_at + np.repeat(escape_count, escape_count)]
    codes = np.empty((n, k + 1), dtype=np.int64)
    head_at = starts[record_of] + 4 + (np.arange(n) - first_row[record_of])
    head = [out[head_at + part * tokens[record_of]].astype(np.int64) for part in range(4)]
    codes[:, 0], codes[:, 1] = (head[0] << 8) | head[2], (head[1] << 8) | head[3]
    codes[:, 2:] = stored.reshape(n, k - 1)

    # ids: references first, then literals
    refs = id_bytes[_spread(id_offsets[:-1], tokens * k)].astype(np.int64)
    literal = refs == 0
    literal_count = np.bincount(np.repeat(np.arange(records), tokens * k), weights=literal,
                                minlength=records).astype(np.int64)
    literal_bytes = id_len - tokens * k
    width = np.where(literal_count > 0, literal_bytes // np.maximum(literal_count, 1), 2)
    bad = (literal_bytes != literal_count * width) | ~np.isin(width, (2, 3))
    if bad.any():
        raise _corrupted(names, int(np.argmax(bad)), id_len, code_len,
                         "hold a number of literal id bytes that is not 2 or 3 per literal")
    ref = np.flatnonzero(~literal)
    back, slot = (refs[ref] - 1) // k + 1, (refs[ref] - 1) % k
    row = ref // k
    bad = (refs[ref] > _max_back(k) * k) | (back > row - first_row[record_of[row]])
    if bad.any():
        raise _corrupted(names, int(record_of[row[np.argmax(bad)]]), id_len, code_len,
                         "hold a reference to no earlier row of the record")
    source = np.arange(n * k)
    source[ref] = (row - back) * k + slot
    # literals: 2 or 3 bytes each (the width may differ between records of different shards)
    literal_width = np.repeat(width, literal_count)
    literal_bytes_at = _spread(id_offsets[:-1] + tokens * k, literal_count * width)
    ids = np.zeros(n * k, dtype=np.int64)
    ids[literal] = _ints(id_bytes, literal_bytes_at[np.concatenate([[0], np.cumsum(literal_width)])[:-1]], literal_width)
    # A reference points up to an earlier entry, maybe itself a reference: follow the chains to
    # their literals by pointer doubling (log2 of the longest chain rounds, over fewer each round).
    while ref.size:
        source[ref] = source[source[ref]]
        ref = ref[~literal[source[ref]]]
    return ids[source].reshape(n, k), codes, tokens


def _unlayout3(id_bytes, id_offsets, out, code_offsets, k, names, data, grid,
               dictionary: topk_coder.Dictionary | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layout 3 or 4's byte strings (see `_layout3`, on `grid`, with `dictionary`) and the records'
    `response_token_ids` -> (ids [n, k], codes [n, k+1], tokens per record)."""
    if "response_token_ids" not in data.column_names:
        raise CorpusError("top-k layouts 3 and 4 decode with `response_token_ids`: read that column too "
                          "(`decode_inputs`)")
    code_len, id_len = np.diff(code_offsets), np.diff(id_offsets)
    short = code_len < 4
    if short.any():
        raise _corrupted(names, int(np.argmax(short)), id_len, code_len, "are too short to hold a length")
    tokens = _row_counts(out, code_offsets[:-1])
    responses = data["response_token_ids"]
    lengths = pc.list_value_length(responses).to_numpy(zero_copy_only=False)
    if (lengths != tokens).any():
        record = int(np.argmax(lengths != tokens))
        raise CorpusError(f"record {names[record]!r}: its top-k holds {tokens[record]} rows but `response_token_ids` "
                          f"{lengths[record]} tokens")
    response = pc.list_flatten(responses).to_numpy(zero_copy_only=False).astype(np.int64)
    ids, codes, bad = topk_coder.decode(tokens, k, id_bytes, id_offsets, out, code_offsets[:-1] + 4, code_offsets[1:],
                                        response, np.asarray(grid), _CODE_MAX, dictionary)
    if bad >= 0:
        raise _corrupted(names, bad, id_len, code_len, "do not decode to rows of top-k ids and logprob codes")
    return ids, codes, tokens


# The stored top-k columns, per encoding: the packed byte strings, or the nested lists.
STORED_TOPK = {"quantized": (PACKED_IDS, LOGPROB_CODES)}
LOGICAL_TOPK = ("topk_token_ids", "topk_logprobs")


def stored_topk_columns(encoding: dict) -> tuple[str, str]:
    """The columns holding a shard's top-k as stored, for its `encoding` (`shard_encoding`)."""
    return STORED_TOPK.get(encoding["encoding"], LOGICAL_TOPK)


def decode_inputs(params: dict) -> tuple[str, ...]:
    """The stored columns `decode` reads to rebuild the top-k of shards of encoding `params`: the
    stored top-k, and for layouts 3 and 4 the response tokens its ids were coded with."""
    return stored_topk_columns(params) + (("response_token_ids",) if params.get("layout") in RANGE_CODED else ())


def _dictionary(text) -> topk_coder.Dictionary:
    """A footer's layout-4 dictionary, or CorpusError."""
    if not isinstance(text, str):
        raise CorpusError("its top-k dictionary (the encoding footer's `dictionary`) is missing")
    try:
        return topk_coder.dictionary_of(text)
    except ValueError as e:
        raise CorpusError(str(e)) from None


def topk_rows(data: pa.Table | pa.RecordBatch, params: dict) -> np.ndarray:
    """The top-k rows of each record (its response positions), read off the stored columns without
    decoding them: the nested lists' lengths, or the quantized byte strings' (layout 1: their
    length; layouts 2 and 3: the count they start with). Byte strings too short to hold one count 0."""
    if params["encoding"] != "quantized":
        return pc.list_value_length(data["topk_token_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    codes, offsets = _blobs(data[LOGPROB_CODES])
    lengths = np.diff(offsets)
    if params.get("layout", 1) == 1:
        return lengths // (2 * (params["k"] + 1))
    rows = np.zeros(len(lengths), dtype=np.int64)
    whole = lengths >= 4
    rows[whole] = _row_counts(codes, offsets[:-1][whole])
    return rows


def _row_counts(data: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Layouts 2 and 3: the row count T, a little-endian uint32, at each of `starts` in `data`."""
    return data[_spread(starts, np.full(len(starts), 4))].reshape(-1, 4).copy().view("<u4").reshape(-1).astype(np.int64)


def shard_encoding(schema: pa.Schema) -> dict:
    """The encoding a shard was written with (from its footer; shards from before encodings had
    names: from the stored logprob type)."""
    meta = (schema.metadata or {}).get(ENCODING_KEY)
    if meta is not None:
        try:
            params = json.loads(meta)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            params = None
        if not isinstance(params, dict) or params.get("encoding") not in LOGPROB_ENCODINGS:
            raise CorpusError(f"its `{ENCODING_KEY.decode()}` footer is damaged ({meta[:80]!r}): "
                              f"not one of the encodings {LOGPROB_ENCODINGS}")
        return params
    if PACKED_IDS in schema.names:
        raise CorpusError(f"a shard holds `{PACKED_IDS}` but no `{ENCODING_KEY.decode()}` footer: cannot decode it")
    lp = schema.field("topk_logprobs").type.value_type.value_type if "topk_logprobs" in schema.names else None
    return {"encoding": "float16" if lp == pa.float16() else "float32"}  # float64 (pandas) reads as float32


def decode(data: pa.Table | pa.RecordBatch, params: dict | None = None) -> pa.Table | pa.RecordBatch:
    """Stored columns -> the logical columns of docs/corpus-format.md with their contract types
    (float16 and float32 shards already hold them; see `conform`). `params`: the shard's
    encoding, when `data` lost its footer metadata."""
    params = params or shard_encoding(data.schema)
    if params["encoding"] != "quantized" or PACKED_IDS not in data.column_names:
        return conform(data)
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
    return conform(make(arrays, names=names))


# What every reader hands out: the contract's type per logical column (a logprob column may also
# stay float16, as float16 and quantized shards store it).
LOGICAL = arrow_schema("float32", loss_mask=True, student_view=True)
INT32 = (-2**31, 2**31)


def conform(data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """`data` with each logical column cast to its contract type where it is stored with another
    width of the same kind (int64 ids as pandas writes them, float64 logprobs, large lists,
    reordered struct fields). Raises `CorpusError` for another kind of type, or for an id that
    does not fit int32 (naming the first record holding one)."""
    for name, target in logical_types(data.schema).items():
        column = data[name]
        if pa.types.is_integer(_leaf(target)):
            values = leaves(column)
            low, high = (v.as_py() for v in pc.min_max(values).values())
            if low is not None and (low < INT32[0] or high >= INT32[1]):
                array = values.to_numpy(zero_copy_only=False)
                first = int(np.argmax((array < INT32[0]) | (array >= INT32[1])))
                record, position = locate(column, first)
                at = "prompt position" if name in ("prompt_token_ids", STUDENT_PROMPT_IDS) else "response position"
                raise CorpusError(f"record {_name(data, record)!r}, {at} {position}: `{name}` holds "
                                  f"{array[first]}, which does not fit a token id (int32)")
        data = data.set_column(data.schema.get_field_index(name), name, column.cast(target))
    return data


def logical_types(schema: pa.Schema) -> dict[str, pa.DataType]:
    """The logical columns of `schema` stored with another type, each with the type to read it
    as; raises `CorpusError` for one whose type is of another kind."""
    casts = {}
    for field in schema:
        if field.name not in LOGICAL.names:
            continue
        target = _target(field.type, LOGICAL.field(field.name).type)
        if target is None:
            expected = LOGICAL.field(field.name).type
            also = " (or float16)" if pa.types.is_floating(_leaf(expected)) else ""
            raise CorpusError(f"`{field.name}` has type {field.type}, expected {expected}{also}")
        if target != field.type:
            casts[field.name] = target
    return casts


def _target(stored: pa.DataType, expected: pa.DataType) -> pa.DataType | None:
    """The type to read `stored` as, for a column whose contract type is `expected` (None: the
    kinds differ)."""
    if pa.types.is_list(expected):
        inner = _target(stored.value_type, expected.value_type) if _is_list(stored) else None
        return None if inner is None else pa.list_(inner)
    if pa.types.is_struct(expected):
        if not pa.types.is_struct(stored) or {f.name for f in stored} != {f.name for f in expected}:
            return None
        fields = [(f.name, _target(stored.field(f.name).type, f.type)) for f in expected]
        return None if any(t is None for _, t in fields) else pa.struct(fields)
    if pa.types.is_integer(expected):
        return expected if pa.types.is_integer(stored) else None
    if pa.types.is_floating(expected):  # float16 stays float16; float64 narrows to float32
        return stored if stored in (pa.float16(), pa.float32()) else expected if stored == pa.float64() else None
    if pa.types.is_string(expected):
        return expected if pa.types.is_string(stored) or pa.types.is_large_string(stored) else None
    return expected if stored == expected else None


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _leaf(t: pa.DataType) -> pa.DataType:
    while _is_list(t):
        t = t.value_type
    return t


def leaves(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The values of a list column (of values, or of top-k rows), flattened."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    while _is_list(array.type):
        array = array.flatten()
    return array


def topk_arrays(data: pa.Table | pa.RecordBatch) -> dict[str, list[np.ndarray]]:
    """The logical top-k columns as one writable [T, k] array per record (views of one copy of
    each column): what training reads, without a Python object per entry."""
    rows = pc.list_value_length(data["topk_token_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    total, ends = int(rows.sum()), np.cumsum(rows)[:-1]
    out = {}
    for name in ("topk_token_ids", "topk_logprobs"):
        values = leaves(data[name]).to_numpy(zero_copy_only=False)
        out[name] = np.split(values.reshape(total, len(values) // total if total else 0).copy(), ends)
    return out


def locate(column: pa.ChunkedArray | pa.Array, leaf: int) -> tuple[int, int]:
    """Value `leaf` of `leaves(column)` -> (its record, its position in the record: the index in
    a list of values, the response position in a list of top-k rows)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if _is_list(array.type.value_type):
        leaf, _ = _owner(array.flatten(), leaf)  # the top-k row holding it
    return _owner(array, leaf)


def _owner(array: pa.Array, item: int) -> tuple[int, int]:
    """Item `item` of `array.flatten()` -> (the list holding it, its index in that list)."""
    offsets = array.offsets.to_numpy()
    at = offsets[0] + item
    record = int(np.searchsorted(offsets, at, side="right") - 1)
    return record, int(at - offsets[record])


def _name(data: pa.Table | pa.RecordBatch, record: int):
    """What names a record in a message: its id, or its row where the id was not read."""
    return data["id"][record].as_py() if "id" in data.column_names else record
