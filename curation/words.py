"""The words of a batch's responses, split once for every filter that counts words.

`repetition` and `dedup_near` both read a response as its lower-cased `\\w+` words; splitting is
the larger part of either's work on a realistic answer, so the batch is split once and both read
the same `Words` (`response_words` remembers the last batch it split)."""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill import corpus
from distill.curation.base import WORD

# An ASCII text's `WORD.findall(text.lower())`, as bytes, is one `bytes.translate` (upper case to
# lower, every other byte outside `\w` to a space) and a split on the spaces.
_ASCII_WORDS = bytes(c + 32 if 65 <= c <= 90 else c if WORD.fullmatch(chr(c)) else 32 for c in range(128)) \
    + bytes(range(128, 256))


@dataclass(frozen=True)
class Translated:
    """A batch's texts through a byte table (`translated`): what Arrow and numpy then treat in bulk
    holds for the ASCII texts; the others (`other`) are worked out in Python and put back in
    place (`restore`)."""
    texts: pa.LargeStringArray  # every text translated (a non-ASCII one too, and to no use)
    other: np.ndarray  # rows (ascending) of the texts that are not ASCII
    originals: list[str]  # those texts as they were

    def restore(self, bulk: pa.Array, done: list) -> pa.Array:
        """`bulk` (a value per text) with the `other` rows' values replaced by `done`, in order."""
        if not len(self.other):
            return bulk
        ascii = np.ones(len(bulk), dtype=bool)
        ascii[self.other] = False
        return pa.concat_arrays([bulk.filter(pa.array(ascii)), pa.array(done, bulk.type)]).take(
            np.argsort(np.r_[np.flatnonzero(ascii), self.other]))


def translated(texts: pa.Array, table: bytes) -> Translated:
    """`texts` (a null one: "") with every byte mapped by `table` (`bytes.translate`) as one buffer:
    a byte keeps its place, so each text keeps its offsets."""
    texts = pc.fill_null(texts.cast(pa.large_string()), "")
    data, starts = corpus.binary_values(texts)
    other = np.flatnonzero(~pc.string_is_ascii(texts).to_numpy(zero_copy_only=False))
    return Translated(pa.LargeStringArray.from_buffers(len(texts), pa.py_buffer(starts),
                                                       pa.py_buffer(data.tobytes().translate(table))),
                      other, texts.take(other).to_pylist())


@dataclass(frozen=True)
class Words:
    """Every row's words as ids into `vocabulary`, row after row."""
    vocabulary: list[bytes]  # the distinct words in UTF-8, in the order first seen
    ids: np.ndarray  # int64, every word of every row
    offsets: np.ndarray  # int64 [rows + 1]: row r's words are ids[offsets[r]:offsets[r + 1]]

    @classmethod
    def split(cls, texts: pa.Array | list[str]) -> Words:
        """Each text's `WORD.findall(text.lower())` (a null text has no words). ASCII texts go
        through Arrow: translated (`_ASCII_WORDS`), split on spaces and dictionary-encoded, ~3x faster
        than in Python per realistic answer (docs/results/scale.md); the others through the regex."""
        batch = translated(pa.array(texts, pa.large_string()) if isinstance(texts, list) else texts, _ASCII_WORDS)
        split = pc.ascii_split_whitespace(batch.texts)
        words = batch.restore(split, [WORD.findall(t.lower()) for t in batch.originals])
        flat = words.flatten()
        row = np.repeat(np.arange(len(words)), pc.list_value_length(words).to_numpy(zero_copy_only=False))
        word = pc.greater(pc.binary_length(flat), 0)  # Arrow keeps an empty string before and after spaces
        encoded = pc.dictionary_encode(flat.filter(word))
        offsets = np.zeros(len(words) + 1, dtype=np.int64)
        np.cumsum(np.bincount(row[word.to_numpy(zero_copy_only=False)], minlength=len(words)), out=offsets[1:])
        return cls(encoded.dictionary.cast(pa.large_binary()).to_pylist(),
                   encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), offsets)

    @cached_property
    def lengths(self) -> np.ndarray:
        """Characters of each word of `ids` (int64)."""
        per_word = np.fromiter((len(w) if w.isascii() else len(w.decode()) for w in self.vocabulary),
                               dtype=np.int64, count=len(self.vocabulary))
        return per_word[self.ids]

    @cached_property
    def crc32(self) -> np.ndarray:
        """zlib.crc32 of each word of `ids` (uint64); computed once per distinct word."""
        per_word = np.fromiter(map(zlib.crc32, self.vocabulary), dtype=np.uint64, count=len(self.vocabulary))
        return per_word[self.ids]

    def text(self, start: int, n: int) -> str:
        """The `n` words from position `start` of `ids`, joined by spaces."""
        return " ".join(self.vocabulary[i].decode() for i in self.ids[start:start + n].tolist())


_last: tuple[pa.RecordBatch, Words] | None = None


def response_words(batch: pa.RecordBatch) -> Words:
    """`Words` of the batch's `response` column; the filters of one batch share one split."""
    global _last
    if _last is None or _last[0] is not batch:
        _last = (batch, Words.split(batch.column("response")))
    return _last[1]


@dataclass(frozen=True)
class NGrams:
    """Every n-gram occurrence inside some rows of a `Words`, in position order (so row by row)."""
    row: np.ndarray  # index into the rows asked for
    start: np.ndarray  # position in `Words.ids` of its first word
    first: np.ndarray  # bool: the first occurrence of this n-gram in its row
    count: np.ndarray  # occurrences of this n-gram in its row


def windows(words: Words, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each n-gram of `rows` starts: (its row, as an index into `rows`; its position in `ids`)."""
    starts = words.offsets[rows]
    counts = np.maximum(words.offsets[rows + 1] - starts - (n - 1), 0)
    row = np.repeat(np.arange(len(rows)), counts)
    return row, np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + starts[row]


def most_repeated(words: Words, rows: np.ndarray, n: int) -> np.ndarray:
    """Per row of `rows`: the occurrences of its most frequent n-gram (0 for a row without one).
    A key per occurrence: the row, then the n-gram, exactly where the word ids fit in it (pairs of
    a batch's words), else a hash of the n-gram, whose collisions can only raise a count: such a
    count is an upper bound, for deciding which rows `ngrams` must group. Only the keys that share
    a bucket of a multiplicative hash with another key can repeat, so only those are sorted and
    counted: 10 % of a batch's pairs on corpus_scale.py's records, 41 % on real SmolLM2 answers,
    fewer for longer n-grams (docs/results/scale.md)."""
    row, start = windows(words, rows, n)
    if not len(start):
        return np.zeros(len(rows), dtype=np.int64)
    vocabulary = max(len(words.vocabulary), 1)
    exact = len(rows) * vocabulary ** n < 2 ** 63
    if exact:
        key = row.copy()
        for j in range(n):
            key = key * vocabulary + words.ids[start + j]
        key = key.view(np.uint64)
    else:
        shift = np.uint64(64 - int(len(rows)).bit_length())
        hashed = _mix(words.ids[start].astype(np.uint64))
        for j in range(1, n):
            hashed = _mix(hashed + words.ids[start + j].astype(np.uint64))
        key = (row.astype(np.uint64) << shift) | (hashed >> (np.uint64(64) - shift))
    bits = min(int(len(key)).bit_length() + 3, 22)  # 8-16 buckets per key, at most 32 MB of counts
    bucket = ((key * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits)).astype(np.intp)
    most = np.zeros(len(rows), dtype=np.int64)
    most[row] = 1  # a key alone in its bucket occurs once
    key = np.sort(key[np.bincount(bucket, minlength=1 << bits)[bucket] > 1])
    if len(key):
        heads = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        row_of = (key[heads] // np.uint64(vocabulary ** n) if exact else key[heads] >> shift).astype(np.int64)
        np.maximum.at(most, row_of, np.diff(np.r_[heads, len(key)]))
    return most


def row_max(row: np.ndarray, values: np.ndarray, rows: int) -> np.ndarray:
    """The largest of `values` (>= 0) per row (0 for a row without any); `row` ascending."""
    out = np.zeros(rows, dtype=np.int64)
    if len(row):
        heads = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        out[row[heads]] = np.maximum.reduceat(values, heads)
    return out


def ngrams(words: Words, rows: np.ndarray, n: int) -> NGrams:
    """The n-grams of `rows` (indices into `words.offsets`), grouped by a 64-bit hash of the row and
    the n word ids; every group is checked member by member and a collision draws another hash."""
    row, start = windows(words, rows, n)
    first = np.zeros(len(start), dtype=bool)
    count = np.zeros(len(start), dtype=np.int64)
    if not len(start):
        return NGrams(row, start, first, count)
    for seed in itertools.count(1):
        key = _mix(row.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed))
        for j in range(n):
            key = _mix(key + words.ids[start + j].astype(np.uint64))
        order = np.argsort(key)
        ordered = key[order]
        heads = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # each group's place in `order`
        sizes = np.diff(np.r_[heads, len(order)])
        group = np.repeat(np.arange(len(heads)), sizes)
        shared = sizes[group] > 1  # only a group of several can hold a collision
        member, head = order[shared], order[heads][group[shared]]
        if np.array_equal(row[member], row[head]) and all(
                np.array_equal(words.ids[start[member] + j], words.ids[start[head] + j]) for j in range(n)):
            break
    earliest = np.minimum.reduceat(order, heads)  # occurrences are in position order
    first[order] = order == earliest[group]
    count[order] = sizes[group]
    return NGrams(row, start, first, count)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
