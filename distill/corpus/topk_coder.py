"""Layout 3's range coder (`_topk_coder.c`, compiled at install) behind two numpy functions.

Each record is coded alone, ids and codes as two byte strings per record; the C file's header
says what the models are. ctypes instead of a Python C-API wrapper: the C side stays plain
loops over arrays, and one call codes a whole batch."""

from __future__ import annotations

import ctypes
from functools import cache

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
    lib.topk_encode.argtypes = [_I64, _PTR, ctypes.c_int, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR]
    lib.topk_decode.argtypes = [_I64, _PTR, ctypes.c_int, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64,
                                _PTR, _PTR]
    return lib


def _ptr(array: np.ndarray) -> int:
    return array.ctypes.data


def encode(tokens: np.ndarray, ids: np.ndarray, response: np.ndarray, codes: np.ndarray,
           grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Records of `tokens` rows each: ids [n, k], the sampled response token of each row [n],
    codes [n, k+1] (the tail code, then the grid codes of `grid`) -> (id bytes, their end per
    record, code bytes, their end per record)."""
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
                                        _ptr(id_out), id_cap, _ptr(id_ends), _ptr(code_out), code_cap, _ptr(code_ends))
        if status == -2:
            raise MemoryError("the top-k range coder could not allocate its tables")
        if status == 0:
            return id_out[:id_ends[-1] if records else 0], id_ends, code_out[:code_ends[-1] if records else 0], code_ends
        id_cap, code_cap = max(id_cap, int(id_ends[-1])), max(code_cap, int(code_ends[-1]))


def decode(tokens: np.ndarray, k: int, id_bytes: np.ndarray, id_offsets: np.ndarray, code_bytes: np.ndarray,
           code_starts: np.ndarray, code_ends: np.ndarray, response: np.ndarray, grid: np.ndarray,
           code_max: int) -> tuple[np.ndarray, np.ndarray, int]:
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
                                 _ptr(response), _ptr(grid), code_max, _ptr(ids), _ptr(codes))
    if bad == -2:
        raise MemoryError("the top-k range coder could not allocate its tables")
    return ids, codes, int(bad)
