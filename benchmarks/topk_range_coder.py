"""How far below zstd can a real entropy coder take the quantized top-k, record by record?

A design study for issue 23's storage target (<= 2.0 B per top-k entry at k = 20 on SmolLM2), not
a layout distill writes. Every record is coded alone (as layout 2's byte strings decode alone) by an
adaptive binary / multi-symbol range coder (LZMA's carry scheme) compiled with numba:

- ids: each id is "seen in this record before" (one adaptive bit per slot) or a literal. A seen id
  is coded by its count among the record's earlier ids, this row's ids excluded (a row holds an id
  once): PPM order 0 over the record. A literal: its bit length then its top 4 bits adaptively, the
  rest as they are (a BPE vocabulary numbers frequent tokens first). With `response` context, each
  row first codes the slot holding the sampled response token (which the corpus stores anyway;
  99 % of SmolLM2's rows hold it, 75 % in slot 0), then skips it.
- logprob codes (the quantized encoding's tail code, q_0 and the k-1 differences): one adaptive
  Exp-Golomb model per slot, the tail relative to the row's last level.

It checks that every record decodes back to the same values, prints B per entry beside layout 2 as
`write_shard` stores it (zstd level 1), and then what coarser grids for the low-probability slots
save in code bytes and cost in KD loss (`storage.py`'s perturbed students, against float32: the
corpus should be generated with `--logprob-encoding float32`).

    python benchmarks/topk_range_coder.py --corpus DIR
    python benchmarks/topk_range_coder.py --quick      # generates a tiny-teacher corpus first
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba as nb
import numpy as np
from common import Headline, emit, parse_args
from storage import LOSSES, kd_loss, perturbed_students, rewrite

# --- the range coder: state in an int64 array (numba has no mutable scalars across calls) ---
LOW, RANGE, CACHE, CSIZE, POS, CODE, END = range(7)
TOP = 1 << 24
PROB_BITS = 16
ONE = 1 << PROB_BITS
RATE_LIMIT = 30  # a probability adapts at 1/(n + 1.6) for its first n updates, then at 1/31.6
RECIP = np.array([int(65536 / (n + 1.6)) for n in range(RATE_LIMIT + 1)], dtype=np.int64)
INT_MODEL = 32 + 32 * 16  # an integer's model: bit-length tree, then 16 top-bit nodes per length
TOP_BITS = 4
FENWICK = 1 << 16  # distinct ids a record may hold
MAX_TOTAL = 1 << 16  # counts are halved beyond this (the coder divides its range by the total)


@nb.njit(inline="always")
def _shift_low(st, out):
    low = st[LOW]
    if low < 0xFF000000 or low >= (1 << 32):
        carry, byte = low >> 32, st[CACHE]
        while True:
            out[st[POS]] = (byte + carry) & 0xFF
            st[POS] += 1
            byte = 0xFF
            st[CSIZE] -= 1
            if st[CSIZE] == 0:
                break
        st[CACHE] = (low >> 24) & 0xFF
    st[CSIZE] += 1
    st[LOW] = (low & 0x00FFFFFF) << 8


@nb.njit(inline="always")
def _next_byte(st, data):
    i = st[POS]
    st[POS] = i + 1
    return data[i] if i < st[END] else 0


@nb.njit(inline="always")
def _normalize(st, out, data, encode):
    while st[RANGE] < TOP:
        st[RANGE] <<= 8
        if encode:
            _shift_low(st, out)
        else:
            st[CODE] = ((st[CODE] << 8) | _next_byte(st, data)) & 0xFFFFFFFF


@nb.njit(inline="always")
def _start(st, data, start, end, encode):
    st[LOW], st[RANGE], st[CACHE], st[CSIZE], st[CODE] = 0, 0xFFFFFFFF, 0, 1, 0
    if not encode:
        st[POS], st[END] = start, end
        for _ in range(5):
            st[CODE] = ((st[CODE] << 8) | _next_byte(st, data)) & 0xFFFFFFFF


@nb.njit(inline="always")
def _bit(st, out, data, encode, p, n, i, bit):
    """Code one bit with adaptive probability p[i] (of a 0); returns the bit (decoded or given)."""
    bound = (st[RANGE] >> PROB_BITS) * p[i]
    if not encode:
        bit = 0 if st[CODE] < bound else 1
        if bit:
            st[CODE] -= bound
    if bit == 0:
        st[RANGE] = bound
        p[i] += ((ONE - p[i]) * RECIP[n[i]]) >> 16
    else:
        st[LOW] += bound if encode else 0
        st[RANGE] -= bound
        p[i] -= (p[i] * RECIP[n[i]]) >> 16
    p[i] = min(max(p[i], 64), ONE - 64)
    n[i] = min(n[i] + 1, RATE_LIMIT)
    _normalize(st, out, data, encode)
    return bit


@nb.njit(inline="always")
def _raw_bits(st, out, data, encode, v, bits):
    got = 0
    for b in range(bits - 1, -1, -1):
        st[RANGE] >>= 1
        bit = (v >> b) & 1
        if encode:
            st[LOW] += st[RANGE] if bit else 0
        else:
            bit = 1 if st[CODE] >= st[RANGE] else 0
            st[CODE] -= st[RANGE] if bit else 0
        got = (got << 1) | bit
        _normalize(st, out, data, encode)
    return got


@nb.njit(inline="always")
def _uint(st, out, data, encode, p, n, base, v):
    """An unsigned int: its bit length (5-bit tree), then its top bits adaptively, the rest raw."""
    length = 0
    while encode and (v >> length) > 0:
        length += 1
    node = 1
    for b in range(4, -1, -1):
        node = node * 2 + _bit(st, out, data, encode, p, n, base + node, (length >> b) & 1)
    length = node - 32
    if length <= 1:
        return length
    rest = length - 1
    top = min(rest, TOP_BITS)
    node, tree = 1, base + 32 + length * 16
    for b in range(rest - 1, rest - 1 - top, -1):
        node = node * 2 + _bit(st, out, data, encode, p, n, tree + node, (v >> b) & 1)
    got = (1 << top) | (node - (1 << top))
    return (got << (rest - top)) | _raw_bits(st, out, data, encode, v & ((1 << (rest - top)) - 1), rest - top)


@nb.njit(inline="always")
def _fenwick_add(tree, i, d):
    i += 1
    while i < len(tree):
        tree[i] += d
        i += i & (-i)


@nb.njit(inline="always")
def _fenwick_below(tree, i):
    s = 0
    while i > 0:
        s += tree[i]
        i -= i & (-i)
    return s


@nb.njit(inline="always")
def _fenwick_find(tree, target):
    """The index whose cumulative interval holds `target`."""
    pos, step = 0, 1
    while step * 2 < len(tree):
        step *= 2
    while step > 0:
        if pos + step < len(tree) and tree[pos + step] <= target:
            pos += step
            target -= tree[pos]
        step //= 2
    return pos


@nb.njit(cache=True)
def code_ids(ids, data, offsets, tokens, vocab, encode, response, use_response):
    """encode: ids [n, k] -> (bytes, offsets per record); else bytes + offsets -> ids."""
    k = ids.shape[1]
    out = np.zeros(ids.size * 4 + 64 if encode else 1, np.uint8)
    local = np.full(vocab, -1, np.int64)  # id -> its index among the record's distinct ids
    st = np.zeros(7, np.int64)
    tree, count, id_of = np.zeros(FENWICK + 1, np.int64), np.zeros(FENWICK, np.int64), np.zeros(FENWICK, np.int64)
    in_row, row_ids = np.zeros(FENWICK, np.bool_), np.zeros(k, np.int64)
    slot_model, seen_model = INT_MODEL, 2 * INT_MODEL
    p, n = np.full(2 * INT_MODEL + k, ONE // 2, np.int64), np.zeros(2 * INT_MODEL + k, np.int64)
    row = 0
    for r in range(len(tokens)):
        _start(st, data, offsets[r], offsets[r + 1], encode)
        p[:], n[:] = ONE // 2, 0
        distinct = total = 0
        for _ in range(tokens[r]):
            removed, sampled = 0, -1
            if use_response:
                for j in range(k if encode else 0):
                    if ids[row, j] == response[row]:
                        sampled = j
                        break
                sampled = _uint(st, out, data, encode, p, n, slot_model, k if encode and sampled < 0 else sampled)
            for j in range(k):
                left = total - removed
                if j == sampled:
                    s = response[row]
                    li = local[s]
                    seen = li >= 0  # its earlier occurrences still count below
                elif encode:
                    s = ids[row, j]
                    li = local[s]
                    seen = li >= 0 and not in_row[li]
                    if left > 0:
                        _bit(st, out, data, True, p, n, seen_model + j, 0 if seen else 1)
                    if seen:
                        r_ = st[RANGE] // left
                        st[LOW] += _fenwick_below(tree, li) * r_
                        st[RANGE] = count[li] * r_
                        _normalize(st, out, data, True)
                    else:
                        _uint(st, out, data, True, p, n, 0, s)
                else:
                    seen = left > 0 and _bit(st, out, data, False, p, n, seen_model + j, 0) == 0
                    if seen:
                        r_ = st[RANGE] // left
                        li = _fenwick_find(tree, min(st[CODE] // r_, left - 1))
                        st[CODE] -= _fenwick_below(tree, li) * r_
                        st[RANGE] = count[li] * r_
                        _normalize(st, out, data, False)
                        s = id_of[li]
                    else:
                        s = _uint(st, out, data, False, p, n, 0, 0)
                        if s >= vocab:
                            return out, offsets, ids  # corrupted: what is decoded so far
                        li = local[s]
                if not encode:
                    ids[row, j] = s
                if li < 0:
                    li, distinct = distinct, distinct + 1
                    local[s], id_of[li], count[li] = li, s, 0
                row_ids[j] = -1
                if not in_row[li]:
                    in_row[li], row_ids[j] = True, li
                    if count[li] > 0:
                        _fenwick_add(tree, li, -count[li])
                        removed += count[li]
            for j in range(k):
                li = row_ids[j]
                if li >= 0:
                    count[li] += 1
                    total += 1
                    _fenwick_add(tree, li, count[li])
                    in_row[li] = False
            if total + k >= MAX_TOTAL:
                tree[:], total = 0, 0
                for i in range(distinct):
                    count[i] = (count[i] + 1) >> 1
                    total += count[i]
                    _fenwick_add(tree, i, count[i])
            row += 1
        if encode:
            for _ in range(5):
                _shift_low(st, out)
            offsets[r + 1] = st[POS]
        for i in range(distinct):
            local[id_of[i]] = -1
        tree[:] = 0
    return out[: st[POS]] if encode else out, offsets, ids


@nb.njit(cache=True)
def code_codes(codes, data, offsets, tokens, encode):
    """encode: codes [n, k+1] (tail, q_0, differences) -> (bytes, offsets); else the reverse."""
    k1 = codes.shape[1]
    out = np.zeros(codes.size * 4 + 64 if encode else 1, np.uint8)
    st = np.zeros(7, np.int64)
    p, n = np.full(INT_MODEL * k1, ONE // 2, np.int64), np.zeros(INT_MODEL * k1, np.int64)
    row = 0
    for r in range(len(tokens)):
        _start(st, data, offsets[r], offsets[r + 1], encode)
        p[:], n[:] = ONE // 2, 0
        for _ in range(tokens[r]):
            level = 0
            for j in range(1, k1):
                codes[row, j] = _uint(st, out, data, encode, p, n, INT_MODEL * j, codes[row, j])
                level += codes[row, j]
            d = codes[row, 0] - level
            z = _uint(st, out, data, encode, p, n, 0, 2 * d if d >= 0 else -2 * d - 1)  # zigzag
            codes[row, 0] = level + (z // 2 if z % 2 == 0 else -(z + 1) // 2)
            row += 1
        if encode:
            for _ in range(5):
                _shift_low(st, out)
            offsets[r + 1] = st[POS]
    return out[: st[POS]] if encode else out, offsets, codes


# --- the grids: the quantized encoding's, and coarser ones below a level ---
def quantize(lps: np.ndarray, coarse_from: float, doubling: float, max_doublings: int) -> tuple[np.ndarray, np.ndarray]:
    """The quantized encoding's codes of float32 rows, except that slot j's step doubles for every
    `doubling` nats by which the row's previous decoded logprob lies below -`coarse_from` (at most
    `max_doublings` times; 0: the encoding's own grid). Closed loop, as a decoder would see it.
    Returns (codes [n, k+1], decoded -logprobs [n, k])."""
    from distill.corpus import codec

    n, k = lps.shape
    x = -lps.astype(np.float64)
    codes, level = np.zeros((n, k + 1), np.int64), np.zeros((n, k))
    codes[:, 0] = codec.tail_codes(lps.astype(np.float64))
    previous = np.zeros(n)
    for j in range(k):
        doublings = 0 if j == 0 else np.minimum(max_doublings, np.floor(np.maximum(0.0, previous - coarse_from) / doubling))
        step = codec.QUANT_STEP * 2.0 ** doublings
        codes[:, j + 1] = np.maximum(0, np.round((x[:, j] - previous) / step))
        previous = previous + codes[:, j + 1] * step
        level[:, j] = previous
    return codes, level


def dequantize(codes: np.ndarray, level: np.ndarray) -> np.ndarray:
    """The reader's logprobs: the decoded grid, moved by at most half a fine step towards the stored tail."""
    from distill.corpus import codec

    return codec.logprobs_of_grid(-level, codes[:, 0], codec.QUANT_STEP, codec.TAIL_STEP)


GRIDS = ((0.0, 1.0, 0), (1.0, 1.0, 1), (2.0, 2.0, 3), (1.0, 1.5, 4))  # (coarse_from, doubling, max_doublings)


def coded(fn, values: np.ndarray, tokens: np.ndarray, *extra) -> tuple[int, float, float]:
    """(bytes, encode s, decode s) of one coder over every record, after checking the round trip."""
    offsets = np.zeros(len(tokens) + 1, np.int64)
    fn(values[:1], np.zeros(1, np.uint8), offsets.copy(), tokens[:1] * 0, *extra[:1], True, *extra[1:])  # compile
    start = time.perf_counter()
    data, offsets, _ = fn(values, np.zeros(1, np.uint8), offsets, tokens, *extra[:1], True, *extra[1:])
    mid = time.perf_counter()
    _, _, back = fn(np.zeros_like(values), data, offsets, tokens, *extra[:1], False, *extra[1:])
    end = time.perf_counter()
    assert np.array_equal(back, values), f"{fn.__name__}: a record decoded to other values"
    return len(data), mid - start, end - mid


def generated_corpus(prompts: int, max_tokens: int, work: Path) -> Path:
    """`storage.py`'s float32 corpus of the tiny teacher, generated in a child process: vLLM 0.32's
    CPU workers import the main script again, then scan every loaded module for Triton kernels and
    fail on one of llvmlite's objects (numba's compiler): `'_lib_fn_wrapper' object has no attribute 'get'`."""
    code = (f"import sys, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r}); from storage import generate_corpus; "
            f"print(generate_corpus(None, {prompts}, {max_tokens}, 20, pathlib.Path({str(work)!r})))")
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, help="corpus to code (float32 for the grids' KD-loss errors)")
    ap.add_argument("--prompts", type=int, default=64, help="without --corpus: prompts of the generated corpus")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = parse_args(ap, argv, quick={"prompts": 16, "max_tokens": 64})

    import pyarrow.compute as pc

    from distill import corpus

    work = Path(tempfile.mkdtemp(prefix="distill-range-coder-"))
    source = args.corpus or generated_corpus(args.prompts, args.max_tokens, work)
    k = corpus.read_manifest(source).generation.top_k
    table = corpus.read_table(source, columns=["topk_token_ids", "topk_logprobs", "response_token_ids"])
    tokens = pc.list_value_length(table["response_token_ids"]).to_numpy().astype(np.int64)
    ids = pc.list_flatten(pc.list_flatten(table["topk_token_ids"])).to_numpy().astype(np.int64).reshape(-1, k)
    lps = pc.list_flatten(pc.list_flatten(table["topk_logprobs"])).to_numpy().astype(np.float32).reshape(-1, k)
    response = pc.list_flatten(table["response_token_ids"]).to_numpy().astype(np.int64)
    entries, vocab = ids.size, 1 << int(ids.max()).bit_length()
    print(f"corpus {source}: {len(tokens)} records, {len(ids)} response tokens, k={k}, {entries} entries; "
          f"slot 0 is the response token in {(ids[:, 0] == response).mean():.1%} of rows, "
          f"a slot in {(ids == response[:, None]).any(axis=1).mean():.1%}")

    stored = rewrite(source, "quantized", work / "layout2")
    zstd_ids, zstd_codes = stored[corpus.PACKED_IDS] / entries, stored[corpus.LOGPROB_CODES] / entries
    codes, _ = quantize(lps, *GRIDS[0])
    id_bytes, id_enc, id_dec = coded(code_ids, ids, tokens, vocab, response, False)
    sampled_bytes, _, _ = coded(code_ids, ids, tokens, vocab, response, True)
    code_bytes, code_enc, code_dec = coded(code_codes, codes, tokens)
    print("\nB per entry (ids + codes = top-k), every record decoded back to the same values")
    print(f"  layout 2, zstd 1 (as written)          {zstd_ids:.3f} + {zstd_codes:.3f} = {zstd_ids + zstd_codes:.3f}")
    print(f"  range coder, per record                {id_bytes / entries:.3f} + {code_bytes / entries:.3f} = "
          f"{(id_bytes + code_bytes) / entries:.3f}")
    print(f"  range coder, ids given the response    {sampled_bytes / entries:.3f} + {code_bytes / entries:.3f} = "
          f"{(sampled_bytes + code_bytes) / entries:.3f}")
    rate = len(ids) / 1e3
    print(f"  range coder speed (one core): ids {rate / id_enc:.0f}k / {rate / id_dec:.0f}k rows/s, "
          f"codes {rate / code_enc:.0f}k / {rate / code_dec:.0f}k rows/s (encode / decode)")

    students = perturbed_students(lps)
    reference = {(name, loss): kd_loss(s, lps, *loss) for name, s in students.items() for loss in LOSSES}
    print("\ncoarser grids below a level: code bytes (range coder), max |logprob error| (nats), and the worst "
          "relative KD-loss error over forward / reverse KL, JSD and forward KL at T = 2, per student "
          "(its forward KL to the teacher)")
    print("  students: " + ", ".join(f"{name} ({reference[(name, LOSSES[0])]:.3f})" for name in students))
    for grid in GRIDS:
        codes, level = quantize(lps, *grid)
        size, _, _ = coded(code_codes, codes, tokens)
        decoded = dequantize(codes, level)
        finite = np.isfinite(lps)
        errors = [max(abs(kd_loss(s, decoded, *loss) - reference[(name, loss)]) / reference[(name, loss)] for loss in LOSSES)
                  for name, s in students.items()]
        label = f"from {grid[0]} nats, x2 every {grid[1]} nats, at most x{2 ** grid[2]}" if grid[2] else "the encoding's grid"
        print(f"  {label}: {size / entries:.3f} B/entry, "
              f"max error {np.abs(decoded[finite] - lps[finite]).max():.3f}; " + ", ".join(f"{e:.1e}" for e in errors))
    best = (sampled_bytes + code_bytes) / entries
    return [Headline("top-k data, range coder per record, B per entry", f"{best:.2f} B",
                     f"{best / (zstd_ids + zstd_codes):.3f} of layout 2 + zstd 1; the target: <= 2.0 B on SmolLM2",
                     met=best <= 2.0)]


if __name__ == "__main__":
    emit(main())
