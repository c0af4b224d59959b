"""Duplicates across the corpus: exact (normalised hash) and near (MinHash LSH). The first record
seen is kept; later ones are rejected naming the id they duplicate."""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill import corpus, disk_state
from distill.curation.base import Filter, prompt_text, response_text
from distill.curation.words import Words, response_words, translated


def normalise(text: str) -> str:
    """Lower case, whitespace runs as one space, none at the ends (`str.split` splits on what `\\s` matches)."""
    return " ".join(text.lower().split())


# An ASCII text's `normalise` in bytes: one `bytes.translate` (upper case to lower, each byte that
# `str.split` splits on to a space), then only the spaces between two words kept.
_ASCII_NORMAL = bytes(32 if chr(c).isspace() else c + 32 if 65 <= c <= 90 else c for c in range(128)) \
    + bytes(range(128, 256))


def normalised(texts: pa.Array) -> pa.LargeStringArray:
    """`normalise` of each text (a null text: ""). The ASCII texts' bytes are translated as one
    buffer (`_ASCII_NORMAL`), trimmed, and their runs of spaces cut to one with numpy, ~2x faster
    than `normalise` per answer (docs/results/scale.md); the others go through `normalise`."""
    batch = translated(texts, _ASCII_NORMAL)
    trimmed = pc.ascii_trim(batch.texts, " ")
    spelled, starts = corpus.binary_values(trimmed)
    # each text now starts and ends with a word: of a run of spaces, keep the first
    keep = spelled != 32
    keep[1:] |= spelled[:-1] != 32
    lengths = np.zeros(len(trimmed), dtype=np.int64)
    filled = starts[:-1] < starts[1:]
    if filled.any():
        lengths[filled] = np.add.reduceat(keep, starts[:-1][filled], dtype=np.int64)
    bulk = pa.LargeStringArray.from_buffers(len(trimmed), pa.py_buffer(np.r_[0, np.cumsum(lengths)]),
                                            pa.py_buffer(spelled[keep].tobytes()))
    return batch.restore(bulk, [normalise(t) for t in batch.originals])


def digests(texts: pa.Array) -> list[str]:
    """The 16-byte BLAKE2b digest of each text's UTF-8 bytes, in hex."""
    data, offsets = corpus.binary_values(texts)
    data, offsets = memoryview(data), offsets.tolist()
    return [hashlib.blake2b(data[a:b], digest_size=16).hexdigest() for a, b in zip(offsets, offsets[1:])]


class ExactDedupFilter(Filter):
    """A 16-byte BLAKE2b digest of the normalised text; the digests seen, each with the id of its
    first record, are on disk (`disk_state.SeenStrings`)."""
    name = "dedup_exact"
    remembers = True
    columns = ("id", "messages", "response")
    key: Literal["response", "prompt_response"] = "response"

    def model_post_init(self, _):
        self._seen = disk_state.SeenStrings(self.name, labelled=True)

    def reads(self):
        return self.columns if self.key == "prompt_response" else ("id", "response")

    def reserve(self, records: int) -> None:
        self._seen.reserve(records)

    def check(self, record):
        columns = {"response": [response_text(record)]}
        if self.key == "prompt_response":
            columns["messages"] = [record.get("messages") or []]
        first = self._seen.first(self.prepare(pa.RecordBatch.from_pydict(columns)), [record["id"]])[0]
        return None if first is None else f"duplicate of {first}"

    def prepare(self, batch) -> list[str]:
        """Every row's digest: of its `normalise`d response; with `key: prompt_response`, of its
        normalised prompt (the messages' contents, one per line), a NUL, then that."""
        text = normalised(batch.column("response"))
        if self.key == "prompt_response":
            prompts = [prompt_text({"messages": m}) for m in batch.column("messages").to_pylist()]
            text = pc.binary_join_element_wise(normalised(pa.array(prompts, pa.large_string())), text,
                                              pa.scalar("\x00", pa.large_string()))
        return digests(text)

    def check_batch(self, batch, rows, prepared: list[str] | None = None):
        digests = prepared if prepared is not None else self.prepare(batch)
        ids = batch.column("id").to_pylist()
        firsts = self._seen.first([digests[i] for i in rows], [ids[i] for i in rows])
        return {i: f"duplicate of {first}" for i, first in zip(rows, firsts) if first is not None}


class NearDedupFilter(Filter):
    """Word n-gram shingles -> MinHash signature (`num_perm` hashes) -> LSH with `bands` bands;
    a candidate counts as a duplicate when its estimated Jaccard similarity >= `threshold`.

    A batch's signatures are computed together (one vectorised MinHash over all its shingles);
    then its records are decided in order, each against every earlier kept record, so the kept
    set is what record-at-a-time checking gives. What is kept per record is on disk
    (`disk_state`: ~0.7 KB at the defaults, file-backed, not heap): its signature as `num_perm`
    uint32, its id, and per band a 64-bit hash of the band in one hash index. A hash collision
    can only add a candidate, which the signature comparison then checks."""
    name = "dedup_near"
    remembers = True
    columns = ("id", "response")
    threshold: float = 0.8
    shingle: int = 5
    num_perm: int = 128
    bands: int = 16
    seed: int = 0

    def model_post_init(self, _):
        if self.num_perm % self.bands:
            raise ValueError(f"`num_perm` ({self.num_perm}) must be a multiple of `bands` ({self.bands})")
        rng = np.random.default_rng(self.seed)
        # Multiply-shift hashing: h(x) = ((a * x + b) mod 2^64) >> 32 with odd a; uint64
        # arithmetic wraps, which is the mod.
        self._a = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)
        self._folder = disk_state.Folder(self.name)
        self._signatures = disk_state.Rows(self._folder, "signatures", np.uint32, self.num_perm)
        self._ids = disk_state.Strings(self._folder, "ids")
        self._bands = disk_state.HashIndex(self._folder, "bands")

    def reserve(self, records: int) -> None:
        self._bands.reserve(records * self.bands)

    def signatures(self, words: Words) -> tuple[np.ndarray, np.ndarray]:
        """MinHash signatures [rows with words, num_perm] and which rows have words (bool per row)."""
        counts = np.diff(words.offsets)
        hashes = words.crc32
        has = counts > 0
        counts = counts[has]
        if not len(counts):
            return np.empty((0, self.num_perm), dtype=np.uint32), has
        starts = words.offsets[:-1][has]  # each text's first word
        n = np.minimum(self.shingle, counts)  # words per shingle (all of a shorter text's)
        windows = counts - n + 1
        text_of = np.repeat(np.arange(len(counts)), windows)
        first = starts[text_of] + np.arange(len(text_of)) - np.repeat(np.cumsum(windows) - windows, windows)
        shingles = np.zeros(len(first), dtype=np.uint64)
        for j in range(self.shingle):  # polynomial combination of the n word hashes
            inside = j < n[text_of]
            word = hashes[np.minimum(first + j, len(hashes) - 1)]
            shingles = np.where(inside, shingles * np.uint64(1_000_003) + word, shingles)
        out = np.empty((len(counts), self.num_perm), dtype=np.uint32)
        bounds = np.cumsum(windows) - windows
        # texts per [num_perm, shingles] block: ~4 MB, which stays in the cache (16 MB blocks: 1.4x slower)
        step = max(1, (1 << 12) // int(windows.mean()))
        for lo in range(0, len(counts), step):
            hi = min(lo + step, len(counts))
            block = shingles[bounds[lo]: bounds[hi - 1] + windows[hi - 1]]
            hashed = np.multiply(self._a[:, None], block[None, :])  # in place from here: one [num_perm, S] array
            hashed += self._b[:, None]
            # `>> 32` keeps the order of unsigned values, so it is taken after the minimum, on [num_perm, texts]
            out[lo:hi] = (np.minimum.reduceat(hashed, bounds[lo:hi] - bounds[lo], axis=1) >> np.uint64(32)).T
        return out, has

    def signature(self, text: str) -> np.ndarray | None:
        sigs, has = self.signatures(Words.split([text]))
        return sigs[0] if has[0] else None

    def check(self, record):
        sig = self.signature(response_text(record))
        if sig is None:
            return None
        match = self.nearest(sig)
        if match is not None:
            return f"near duplicate of {match[0]} (Jaccard ~{match[1]:.2f})"
        self.add(sig, record["id"])
        return None

    def prepare(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """Every row's signature: `signatures` of the batch's responses."""
        return self.signatures(response_words(batch))

    def check_batch(self, batch, rows, prepared: tuple[np.ndarray, np.ndarray] | None = None):
        ids = batch.column("id").to_pylist()
        every, has = prepared if prepared is not None else self.prepare(batch)
        at = np.cumsum(has) - 1  # row -> its row of `every` (rows with words)
        rows = [i for i in rows if has[i]]  # a text without words has no shingle: kept, not remembered
        sigs = every[at[rows]] if rows else every[:0]
        keys = self._keys(sigs)
        earlier = self._candidates(keys)  # position in `rows` -> stored rows sharing a band
        in_batch = _sharing(keys)  # position in `rows` -> earlier positions sharing a band
        failed, kept = {}, []
        row_of: dict[int, int] = {}  # position in `rows` of a kept record -> its stored row
        base = self._signatures.count
        for j, i in enumerate(rows):
            candidates = []
            if j in earlier or j in in_batch:  # most records share no band with anything: nothing to build
                candidates = [(self._ids, c, self._signatures[c]) for c in sorted(earlier.get(j, ()))]
                candidates += [(None, q, sigs[q]) for q in sorted(in_batch.get(j, ())) if q in row_of]
            for stored, c, sig in candidates:  # the first kept (oldest) similar enough, as one by one
                similarity = float(np.mean(sig == sigs[j]))
                if similarity >= self.threshold:
                    who = stored[c] if stored is not None else ids[rows[c]]
                    failed[i] = f"near duplicate of {who} (Jaccard ~{similarity:.2f})"
                    break
            else:
                row_of[j] = base + len(kept)
                kept.append(j)
        self._remember(sigs[kept], keys[kept], [ids[rows[j]] for j in kept])
        return failed

    def _keys(self, sigs: np.ndarray) -> np.ndarray:
        """[records, bands] uint64: a hash of each band's rows of the signature, and of the band's number."""
        rows = self.num_perm // self.bands
        banded = sigs.reshape(len(sigs), self.bands, rows).astype(np.uint64)
        keys = np.arange(self.bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        for r in range(rows):
            keys = (keys ^ banded[:, :, r]) * np.uint64(0x100000001B3)
        return keys ^ (keys >> np.uint64(29))

    def _candidates(self, keys: np.ndarray) -> dict[int, set[int]]:
        at, found = self._bands.find(keys.ravel())
        candidates: dict[int, set[int]] = {}
        for position, row in zip((at // self.bands).tolist(), found.tolist()):
            candidates.setdefault(position, set()).add(row)
        return candidates

    def nearest(self, sig: np.ndarray) -> tuple[str, float] | None:
        """(id, estimated Jaccard) of the first text seen that is at least `threshold` similar."""
        for c in sorted(self._candidates(self._keys(sig[None].astype(np.uint32))).get(0, ())):
            similarity = float(np.mean(self._signatures[c] == sig))
            if similarity >= self.threshold:
                return self._ids[c], similarity
        return None

    def add(self, sig: np.ndarray, record_id: str) -> None:
        sig = sig[None].astype(np.uint32)
        self._remember(sig, self._keys(sig), [record_id])

    def _remember(self, sigs: np.ndarray, keys: np.ndarray, ids: list[str]) -> None:
        rows = self._signatures.count + np.arange(len(sigs))
        self._signatures.append(sigs)
        self._ids.append(ids)
        self._bands.insert(keys.ravel(), np.repeat(rows, self.bands))


def _sharing(keys: np.ndarray) -> dict[int, set[int]]:
    """Record (row of `keys`) -> the earlier records that share one of its band keys."""
    flat = keys.ravel()
    order = np.argsort(flat, kind="stable")  # equal keys stay in record order
    ordered, record = flat[order], order // keys.shape[1]
    shared: dict[int, set[int]] = {}
    for at in (np.flatnonzero(ordered[1:] == ordered[:-1]) + 1).tolist():  # equal to the one before
        k = at - 1
        while k >= 0 and ordered[k] == ordered[at]:
            if record[k] < record[at]:
                shared.setdefault(int(record[at]), set()).add(int(record[k]))
            k -= 1
    return shared
