"""The validation stamp: a shard's footer saying "the validator's top-k checks passed on these
top-k bytes", so that a reader trusting it can skip decoding the top-k (docs/corpus-format.md).

The stamp binds a digest of the stored top-k (the shard's encoding, then per top-k column its
stored type, the lengths at every list level and the value bytes: what decoding reads) and the
largest top-k id. A reader that finds the digest equal to that of the bytes it read knows those
bytes are the ones that were checked; any edit to them (the footer kept) makes the digest differ,
and the shard is validated in full. Hashing reads the stored bytes once, without decoding them:
SHA-256 (about 1.5 GB/s where the CPU has SHA instructions, twice BLAKE2b's speed there).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill.corpus.codec import LOGPROB_CODES, PACKED_IDS, _is_list, shard_encoding

STAMP_KEY = b"distill.validated"
# The version of the top-k rules a stamp vouches for (`validate._batch_problems`: widths, sorted
# best first, finite, in the vocabulary). Bump it when they change: readers then trust only stamps
# of the rules they would check.
STAMP_VERSION = 1
# The stored top-k columns, per encoding: the packed byte strings, or the nested lists.
STORED_TOPK = {"quantized": (PACKED_IDS, LOGPROB_CODES)}
LOGICAL_TOPK = ("topk_token_ids", "topk_logprobs")


def stored_topk_columns(encoding: dict) -> tuple[str, str]:
    """The columns holding a shard's top-k as stored, for its `encoding` (`shard_encoding`)."""
    return STORED_TOPK.get(encoding["encoding"], LOGICAL_TOPK)


@dataclass(frozen=True)
class Stamp:
    """A shard's `distill.validated` footer: its top-k (`digest`) passed the top-k checks of rules
    `version` for rows of `top_k` entries. `max_topk_id`: the largest top-k id of the shard, or an
    upper bound of it (a shard of rows taken from stamped shards carries their largest)."""

    digest: str
    top_k: int
    max_topk_id: int
    version: int = STAMP_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Stamp | None:
        """The stamp, or None where it is unreadable or of other rules (then not trusted)."""
        try:
            fields = json.loads(data)
            stamp = cls(digest=str(fields["digest"]), top_k=int(fields["top_k"]),
                        max_topk_id=int(fields["max_topk_id"]), version=int(fields["version"]))
        except (ValueError, KeyError, TypeError):
            return None
        return stamp if stamp.version == STAMP_VERSION else None


@dataclass(frozen=True)
class TopkChecked:
    """What a writer knows of a table's top-k: it passed the validator's top-k checks for rows of
    `top_k` (checked by `validate.topk_checked`, or rows taken from validated shards, as curate
    takes them); `max_topk_id`: its largest id, or an upper bound of it. `store.write_shard`
    stamps the shard with it, hashing the top-k it writes (`stamp_of`)."""

    top_k: int
    max_topk_id: int


class TopkDigest:
    """The digest of a shard's stored top-k, fed batch after batch: the same for any split of the
    rows into batches (each part is hashed as one stream of lengths and one of values). `None`
    from `hexdigest` where a top-k value is null (such a shard is never stamped)."""

    def __init__(self, encoding: dict):
        self.encoding = encoding
        self.columns = stored_topk_columns(encoding)
        self.parts: dict[str, hashlib._Hash] = {}
        self.has_nulls = False

    def update(self, data: pa.Table | pa.RecordBatch) -> None:
        for name in self.columns:
            column = data[name]
            chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
            for array in chunks:
                self._array(name, array)

    def _array(self, part: str, array: pa.Array) -> None:
        level = 0
        while _is_list(array.type) or pa.types.is_large_binary(array.type) or pa.types.is_binary(array.type):
            self.has_nulls |= array.null_count > 0
            lengths = pc.binary_length(array) if not _is_list(array.type) else pc.list_value_length(array)
            self._hash(f"{part}/lengths{level}", lengths.to_numpy(zero_copy_only=False).astype("<i8"))
            if not _is_list(array.type):  # binary: its bytes are the values
                self._hash(f"{part}/values:binary", _binary_values(array))
                return
            array, level = array.flatten(), level + 1
        self.has_nulls |= array.null_count > 0
        # the leaf type (not the list types: Parquet renames their item fields)
        self._hash(f"{part}/values:{array.type}", array.to_numpy(zero_copy_only=False))

    def _hash(self, part: str, values: np.ndarray) -> None:
        if part not in self.parts:
            self.parts[part] = hashlib.sha256()
        self.parts[part].update(np.ascontiguousarray(values).view(np.uint8))

    def hexdigest(self) -> str | None:
        if self.has_nulls:
            return None
        whole = hashlib.sha256(json.dumps(self.encoding, sort_keys=True).encode())
        for part in sorted(self.parts):
            whole.update(part.encode() + b"=" + self.parts[part].digest())
        return whole.hexdigest()


def _binary_values(array: pa.Array) -> np.ndarray:
    """A binary array's value bytes: only those of its rows, wherever it was sliced."""
    array = array.cast(pa.large_binary())
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset:array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8) if array.buffers()[2] else np.zeros(0, np.uint8)
    return data[offsets[0]:offsets[-1]]


def topk_digest(table: pa.Table | pa.RecordBatch, encoding: dict | None = None) -> str | None:
    """The digest of a stored table's top-k (`encoding`: its shard's, when `table` lost its footer)."""
    digest = TopkDigest(encoding or shard_encoding(table.schema))
    digest.update(table)
    return digest.hexdigest()


def stamp_of(table: pa.Table, top_k: int, max_topk_id: int) -> Stamp:
    """The stamp of a stored table whose top-k passed the validator's top-k checks for rows of
    `top_k`: e.g. rows taken from validated (or stamped) shards, as curate writes them.
    `max_topk_id`: the largest top-k id of the table, or an upper bound of it (the largest of the
    source shards' stamps).
    Raises ValueError for a table with null top-k values (it cannot be stamped)."""
    digest = topk_digest(table)
    if digest is None:
        raise ValueError("a table with null top-k values cannot be stamped")
    return Stamp(digest, int(top_k), int(max_topk_id))


def read_stamp(path: Path) -> Stamp | None:
    """A shard's stamp as its footer states it (not checked against its data: see `verified_stamp`)."""
    return stamp_in(pq.read_schema(path))


def stamp_in(schema: pa.Schema) -> Stamp | None:
    data = (schema.metadata or {}).get(STAMP_KEY)
    return None if data is None else Stamp.from_json(data)


def verified_stamp(path: Path) -> Stamp | None:
    """A shard's stamp where the top-k it holds is the one the stamp vouches for (its stored top-k
    read and hashed, not decoded); None where the shard has no stamp, or another top-k."""
    shard = pq.ParquetFile(path)
    stamp = stamp_in(shard.schema_arrow)
    if stamp is None:
        return None
    encoding = shard_encoding(shard.schema_arrow)
    digest = TopkDigest(encoding)
    for batch in shard.iter_batches(columns=list(stored_topk_columns(encoding))):
        digest.update(batch)
    return stamp if digest.hexdigest() == stamp.digest else None
