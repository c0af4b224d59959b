"""Layouts 3 and 4's range coder (`_topk_coder.c`, compiled at install) behind numpy functions,
and layout 4's `Dictionary`.

Each record is coded alone, ids and codes as two byte strings per record; the C file's header
says what the models are. ctypes instead of a Python C-API wrapper: the C side stays plain
loops over arrays, and one call codes a whole batch."""

from __future__ import annotations

import base64
import ctypes
import zlib
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


@cache
def _library() -> ctypes.CDLL:
    try:
        from distill.corpus import _topk_coder  # the compiled module: its file is the library
    except ImportError:
        raise ImportError("distill's compiled top-k coder (distill/corpus/_topk_coder.c) is not built: install "
                          "distill with pip (`pip install -e .` in a checkout; it needs a C compiler)") from None
    lib = ctypes.CDLL(_topk_coder.__file__)
    lib.topk_encode.restype = lib.topk_decode.restype = _I64
    dictionary = [ctypes.c_int, _PTR, _PTR, _PTR, _PTR]
    lib.topk_encode.argtypes = [_I64, _PTR, ctypes.c_int, _PTR, _PTR, _PTR, _PTR, *dictionary, _PTR, _PTR, _I64, _PTR,
                                _PTR, _I64, _PTR]
    lib.topk_decode.argtypes = [_I64, _PTR, ctypes.c_int, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64,
                                *dictionary, _PTR, _PTR]
    return lib


MODELS = (32 + 32 * 16) * 8  # the C file's MODELS: adaptive probabilities per model set (ids', codes')
MAX_ID = 1 << 24
# Layout 4's literal classes: ids that at least DICTIONARY_MIN_RECORDS records of the learning
# shard hold, at most DICTIONARY_IDS of them (the most frequent), in classes of document frequency
# within a factor of 2. With the models' probabilities that is ~5 KB of footer per shard: ~0.004 B
# per entry of a 1,024-record shard of 64-token answers; 256 or 1,024 ids code worse there and
# cost less footer (docs/results/scale.md, "Layout 4").
DICTIONARY_MIN_RECORDS = 2
DICTIONARY_IDS = 4096
# the escape class's least share of the literals: ids missing from the learning shard are more
# frequent in the shards that follow it
ESCAPE_SHARE = 1 / 32
_FREQ_TOTAL = 1 << 15  # the classes' frequencies sum to about this (the coder divides its range by them)
_MAX_DICTIONARY_BYTES = 1 << 22  # a footer's dictionary inflates to no more (4,096 ids: ~10 KB)


@dataclass(frozen=True, eq=False)
class Dictionary:
    """Layout 4's dictionary, learnt from a corpus's first shard (`learn`) and stored in every
    shard's footer (`text`): the literal classes (`ids`, class after class, each ascending; class c
    is ids[start[c]:start[c+1]]; `cum`: the classes' cumulative frequencies, the escape last) and
    each adaptive model's starting probability (`init`, 0: untouched). `text`: as the footer keeps
    it, which `dictionary_of` reads back."""

    ids: np.ndarray  # int32
    start: np.ndarray  # int32 [classes + 1]
    cum: np.ndarray  # uint32 [classes + 2]
    init: np.ndarray  # uint16 [2 * MODELS]
    text: str

    @property
    def classes(self) -> int:
        return len(self.start) - 1


def _text(ids: np.ndarray, start: np.ndarray, cum: np.ndarray, init: np.ndarray) -> str:
    """A dictionary's parts as the footer keeps them: varints and the probabilities' logits in
    1/16 steps as bytes, deflated, in base64."""
    gaps = np.concatenate([np.diff(c, prepend=-1) - 1 for c in np.split(ids, start[1:-1])] or [[]])
    touched = np.flatnonzero(init)
    logit = np.log(init[touched] / (65536.0 - init[touched]))
    quantized = np.clip(np.round(logit * 16) + 128, 1, 255).astype(np.uint8)
    head = _varints([1, len(start) - 1, *np.diff(start), *gaps, *np.diff(cum), len(touched),
                     *(np.diff(touched, prepend=-1) - 1)])
    return base64.b64encode(zlib.compress(head + quantized.tobytes(), 9)).decode()


@lru_cache(maxsize=16)
def dictionary_of(text: str) -> Dictionary:
    """`Dictionary.text` -> the dictionary; ValueError where the text is not one."""
    try:
        inflate = zlib.decompressobj()
        data = inflate.decompress(base64.b64decode(text, validate=True), _MAX_DICTIONARY_BYTES)
        if inflate.unconsumed_tail:
            raise ValueError(f"it inflates beyond {_MAX_DICTIONARY_BYTES} bytes")
        values, end = _read_varints(data, 2)
        version, classes = values
        if version != 1 or not 0 <= classes <= 64:
            raise ValueError(f"version {version}, {classes} classes")
        sizes, end = _read_varints(data, classes, end)
        gaps, end = _read_varints(data, sum(sizes), end)
        freqs, end = _read_varints(data, classes + 1, end)
        (n,), end = _read_varints(data, 1, end)
        steps, end = _read_varints(data, n, end)
        quantized = np.frombuffer(data[end:], dtype=np.uint8)
    except (ValueError, zlib.error, TypeError) as e:
        raise ValueError(f"the top-k dictionary is damaged: {e}") from None
    start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    ids = np.concatenate([np.cumsum(np.asarray(g, np.int64) + 1) - 1 for g in np.split(np.asarray(gaps, np.int64), start[1:-1])]
                         or [np.zeros(0, np.int64)])
    touched = np.cumsum(np.asarray(steps, np.int64) + 1) - 1
    freqs = np.asarray(freqs, np.int64)
    problems = [(len(quantized) != n, "its probabilities and their count differ"),
                (len(ids) and (ids.max() >= MAX_ID or len(np.unique(ids)) != len(ids)), "an id twice or outside [0, 2^24)"),
                (((freqs[:-1] > 0) != (np.asarray(sizes) > 0)).any() or freqs[-1] < 1, "a class's frequency"),
                (freqs.sum() > 1 << 16, "frequencies above 2^16"),
                (n and (touched[-1] >= 2 * MODELS or (quantized == 0).any()), "a probability out of range")]
    for bad, problem in problems:
        if bad:
            raise ValueError(f"the top-k dictionary is damaged: {problem}")
    init = np.zeros(2 * MODELS, np.uint16)
    p = 65536.0 / (1 + np.exp(-(quantized.astype(np.float64) - 128) / 16))
    init[touched] = np.clip(np.round(p), 64, 65536 - 64).astype(np.uint16)
    return Dictionary(ids.astype(np.int32), start, np.concatenate([[0], np.cumsum(freqs)]).astype(np.uint32), init, text)


def _varints(values) -> bytes:
    out = bytearray()
    for v in values:
        v = int(v)
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _read_varints(data: bytes, count: int, at: int = 0) -> tuple[list[int], int]:
    if count > len(data) - at:  # a varint takes a byte at least
        raise ValueError("its numbers end early")
    values = []
    for _ in range(count):
        v = shift = 0
        while True:
            if at >= len(data) or shift > 35:
                raise ValueError("its numbers end early")
            byte = data[at]
            at += 1
            v |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(v)
    return values, at


def learn(tokens: np.ndarray, ids: np.ndarray, response: np.ndarray, codes: np.ndarray, grid: np.ndarray) -> Dictionary:
    """A dictionary from these records (arguments as `encode`'s): the literal classes from how many
    records hold each id, then the models' probabilities after coding the records one after the
    other with those classes. Where the records' literals code in fewer bytes without the classes
    (a vocabulary of a few hundred ids, which every record holds: the synthetic rows of
    benchmarks/corpus_scale.py), the dictionary has none, only the probabilities."""
    tokens = np.asarray(tokens, dtype=np.int64)
    record = np.repeat(np.arange(len(tokens)), tokens * ids.shape[1])
    held = np.unique(record << 24 | ids.reshape(-1).astype(np.int64)) & (MAX_ID - 1)  # (record, id) pairs
    counts = np.bincount(held, minlength=1) if len(held) else np.zeros(1, np.int64)
    kept = np.flatnonzero(counts >= DICTIONARY_MIN_RECORDS)
    kept = kept[np.argsort(-counts[kept], kind="stable")[:DICTIONARY_IDS]]
    escape = int(counts.sum() - counts[kept].sum())
    cls = np.log2(counts[kept] / (counts[kept].min() if len(kept) else 1)).astype(np.int64)
    order = np.lexsort((kept, cls))
    members = [kept[order][cls[order] == c] for c in range(int(cls.max(initial=0)) + 1)]
    freqs = np.array([counts[m].sum() for m in members] + [escape], np.float64)
    freqs[-1] = max(freqs[-1], ESCAPE_SHARE * freqs.sum(), 1)
    freqs = np.where(freqs > 0, np.maximum(np.round(freqs / freqs.sum() * _FREQ_TOTAL), 1), 0).astype(np.int64)
    with_classes = (np.concatenate(members).astype(np.int32), np.concatenate([[0], np.cumsum([len(m) for m in members])]),
                    np.concatenate([[0], np.cumsum(freqs)]))
    without = (np.zeros(0, np.int32), np.zeros(1), np.array([0, 1]))
    best = None
    for members, start, cum in (with_classes, without):
        start, cum = start.astype(np.int32), cum.astype(np.uint32)
        learnt = np.zeros(2 * MODELS, np.uint16)
        id_bytes = _encode(tokens, ids, response, codes, grid,
                           Dictionary(members, start, cum, np.zeros(2 * MODELS, np.uint16), ""), learnt)[0]
        if best is None or len(id_bytes) < best[0]:
            best = len(id_bytes), members, start, cum, learnt
    return dictionary_of(_text(*best[1:]))  # with the footer's rounding


def _ptr(array: np.ndarray) -> int:
    return array.ctypes.data


def _dictionary_args(dictionary: Dictionary | None) -> list:
    if dictionary is None:
        return [0, None, None, None, None]
    return [dictionary.classes, _ptr(dictionary.ids), _ptr(dictionary.start), _ptr(dictionary.cum), _ptr(dictionary.init)]


def encode(tokens: np.ndarray, ids: np.ndarray, response: np.ndarray, codes: np.ndarray, grid: np.ndarray,
           dictionary: Dictionary | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Records of `tokens` rows each: ids [n, k], the sampled response token of each row [n],
    codes [n, k+1] (the tail code, then the grid codes of `grid`), with layout 4's `dictionary`
    (None: layout 3) -> (id bytes, their end per record, code bytes, their end per record)."""
    return _encode(tokens, ids, response, codes, grid, dictionary, None)


def _encode(tokens, ids, response, codes, grid, dictionary: Dictionary | None, learnt: np.ndarray | None):
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    response = np.ascontiguousarray(response, dtype=np.int64)
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    grid = np.ascontiguousarray(grid, dtype=np.int64)
    records, k = len(tokens), ids.shape[1]
    id_ends, code_ends = np.zeros(records, np.int64), np.zeros(records, np.int64)
    id_cap, code_cap = 4 * ids.size + 16 * records + 64, 3 * codes.size + 16 * records + 64
    while True:  # the capacities hold any real rows; hostile ones may need a second pass
        id_out, code_out = np.empty(id_cap, np.uint8), np.empty(code_cap, np.uint8)
        status = _library().topk_encode(records, _ptr(tokens), k, _ptr(ids), _ptr(response), _ptr(codes), _ptr(grid),
                                        *_dictionary_args(dictionary), None if learnt is None else _ptr(learnt),
                                        _ptr(id_out), id_cap, _ptr(id_ends), _ptr(code_out), code_cap, _ptr(code_ends))
        if status == -2:
            raise MemoryError("the top-k range coder could not allocate its tables")
        if status == 0:
            return id_out[:id_ends[-1] if records else 0], id_ends, code_out[:code_ends[-1] if records else 0], code_ends
        id_cap, code_cap = max(id_cap, int(id_ends[-1])), max(code_cap, int(code_ends[-1]))


def decode(tokens: np.ndarray, k: int, id_bytes: np.ndarray, id_offsets: np.ndarray, code_bytes: np.ndarray,
           code_starts: np.ndarray, code_ends: np.ndarray, response: np.ndarray, grid: np.ndarray,
           code_max: int, dictionary: Dictionary | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The inverse of `encode` over each record's byte ranges -> (ids [n, k], codes [n, k+1], the
    first record whose bytes are not a record's top-k, or -1)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    n = int(tokens.sum())
    ids, codes = np.zeros((n, k), np.int32), np.zeros((n, k + 1), np.int64)
    # every array handed over by address is held by a name until the call returns
    id_starts, id_ends = (np.ascontiguousarray(a, dtype=np.int64) for a in (id_offsets[:-1], id_offsets[1:]))
    starts, ends = (np.ascontiguousarray(a, dtype=np.int64) for a in (code_starts, code_ends))
    response = np.ascontiguousarray(response, dtype=np.int64)
    grid = np.ascontiguousarray(grid, dtype=np.int64)
    id_bytes, code_bytes = np.ascontiguousarray(id_bytes), np.ascontiguousarray(code_bytes)
    bad = _library().topk_decode(len(tokens), _ptr(tokens), k, _ptr(id_bytes), _ptr(id_starts), _ptr(id_ends),
                                 _ptr(code_bytes), _ptr(starts), _ptr(ends),
                                 _ptr(response), _ptr(grid), code_max, *_dictionary_args(dictionary), _ptr(ids), _ptr(codes))
    if bad == -2:
        raise MemoryError("the top-k range coder could not allocate its tables")
    return ids, codes, int(bad)
