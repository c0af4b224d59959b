"""Duplicates across the corpus: exact (normalised hash) and near (MinHash LSH). The first record
seen is kept; later ones are rejected naming the id they duplicate."""

from __future__ import annotations

import hashlib
import re
import zlib
from typing import Literal

import numpy as np

from distill.curation.base import WORD, Filter, prompt_text, response_text

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text.lower()).strip()


class ExactDedupFilter(Filter):
    name = "dedup_exact"
    columns = ("id", "messages", "response")
    key: Literal["response", "prompt_response"] = "response"

    def model_post_init(self, _):
        self._seen: dict[bytes, str] = {}

    def reads(self):
        return self.columns if self.key == "prompt_response" else ("id", "response")

    def check(self, record):
        text = normalise(response_text(record))
        if self.key == "prompt_response":
            text = normalise(prompt_text(record)) + "\x00" + text
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        first = self._seen.setdefault(digest, record["id"])
        return None if first == record["id"] else f"duplicate of {first}"


class NearDedupFilter(Filter):
    """Word n-gram shingles -> MinHash signature (`num_perm` hashes) -> LSH with `bands` bands;
    a candidate counts as a duplicate when its estimated Jaccard similarity >= `threshold`.

    Memory per kept record (~1.7 KB at the defaults, was ~5 KB): its signature as `num_perm`
    uint32 in one growing array (the hashes are 32-bit), and per band a 64-bit hash of the band
    (not its bytes) mapping to the record's index (a list only when several share it). A hash
    collision can only add a candidate, which the signature comparison then checks."""
    name = "dedup_near"
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
        self._buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self._signatures = np.empty((1024, self.num_perm), dtype=np.uint32)  # rows [0, len(_ids)) in use
        self._ids: list[str] = []

    def signature(self, text: str) -> np.ndarray | None:
        words = WORD.findall(text.lower())
        if not words:
            return None
        n = min(self.shingle, len(words))
        word_hashes = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
        shingles = np.zeros(len(words) - n + 1, dtype=np.uint64)
        for j in range(n):  # polynomial combination of the n word hashes
            shingles = shingles * np.uint64(1_000_003) + word_hashes[j: len(words) - n + 1 + j]
        shingles = np.unique(shingles)
        return ((self._a[:, None] * shingles[None, :] + self._b[:, None]) >> np.uint64(32)).min(axis=1)  # [num_perm]

    def check(self, record):
        sig = self.signature(response_text(record))
        if sig is None:
            return None
        match = self.nearest(sig)
        if match is not None:
            return f"near duplicate of {match[0]} (Jaccard ~{match[1]:.2f})"
        self.add(sig, record["id"])
        return None

    def _keys(self, sig: np.ndarray) -> list[int]:
        rows = self.num_perm // self.bands
        return [hash(sig[b * rows:(b + 1) * rows].tobytes()) for b in range(self.bands)]

    def nearest(self, sig: np.ndarray) -> tuple[str, float] | None:
        """(id, estimated Jaccard) of the first text seen that is at least `threshold` similar."""
        candidates = set()
        for band, key in zip(self._buckets, self._keys(sig)):
            found = band.get(key)
            if found is not None:
                candidates.update(found if isinstance(found, list) else (found,))
        for c in sorted(candidates):
            similarity = float(np.mean(self._signatures[c] == sig))
            if similarity >= self.threshold:
                return self._ids[c], similarity
        return None

    def add(self, sig: np.ndarray, record_id: str) -> None:
        index = len(self._ids)
        if index == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        self._signatures[index] = sig
        self._ids.append(record_id)
        for band, key in zip(self._buckets, self._keys(sig)):
            found = band.setdefault(key, index)
            if found != index:
                if isinstance(found, list):
                    found.append(index)
                else:
                    band[key] = [found, index]
