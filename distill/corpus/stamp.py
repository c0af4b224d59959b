"""The validation stamp: a shard's footer saying "the validator's top-k checks passed on these
top-k bytes", so that a reader trusting it can skip reading and checking the top-k
(docs/corpus-format.md).

The stamp binds a digest of the top-k as the file stores it: the shard's encoding, then per
stored top-k column its Arrow type and its column chunks (their bytes, compressed pages with their
headers, and how the footer says to read them: what decoding reads), and last the top-k rows of
each record. A reader hashes the same chunk bytes straight from the file, without decompressing
them, and the response length of each record in place of its top-k rows: the digest equal to the
stamp's, the top-k bytes are the ones that were checked and every record has one top-k row per
response token. Any edit to the
top-k (the footer kept), or to a response's length, makes the digest differ, and the shard is
validated in full. SHA-256: about 1.5 GB/s where the CPU has SHA instructions.

A writer knows the digest only once the chunks are written: `pending` is the stamp written into
the footer, with a placeholder digest of the same length, and `seal` writes the digest over it
in place, in both copies of the footer's metadata (Parquet's key-value list and the Arrow
schema that pyarrow stores beside it, base64-encoded).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill.corpus.codec import _is_list, shard_encoding, stored_topk_columns

STAMP_KEY = b"distill.validated"
# The version of the stamp: of the top-k rules it vouches for (`validate._batch_problems`: widths,
# sorted best first, finite, in the vocabulary) and of what its digest binds. Bump it when either
# changes: readers then trust only stamps they would compute and check alike. Version 1 hashed the
# decoded top-k values; its shards are validated in full.
STAMP_VERSION = 2
_PENDING = "?" * 64  # a digest's length: `seal` writes the digest over it


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
        return stamp if stamp.version == STAMP_VERSION and stamp.digest != _PENDING else None


@dataclass(frozen=True)
class TopkChecked:
    """What a writer knows of a table's top-k: it passed the validator's top-k checks for rows of
    `top_k` (checked by `validate.topk_checked`, or rows taken from validated shards, as curate
    takes them); `max_topk_id`: its largest id, or an upper bound of it. `store.write_shard`
    stamps the shard with it (`pending`, then `seal`)."""

    top_k: int
    max_topk_id: int


def pending(table: pa.Table, checked: TopkChecked) -> bytes:
    """The stamp to put in the footer of `table`'s shard before writing it; `seal` completes it.
    Raises ValueError for a table with null top-k values (it cannot be stamped)."""
    for name in stored_topk_columns(shard_encoding(table.schema)):
        if any(_has_nulls(chunk) for chunk in table[name].chunks):
            raise ValueError("a table with null top-k values cannot be stamped")
    return Stamp(_PENDING, int(checked.top_k), int(checked.max_topk_id)).to_json()


def seal(path: Path, rows: np.ndarray) -> Stamp:
    """Write the digest of a shard just written with a `pending` stamp over its placeholder;
    `rows`: the top-k rows of each of its records (`codec.topk_rows` of the table written)."""
    shard = pq.ParquetFile(path)
    meta = shard.metadata.metadata
    written = meta[STAMP_KEY]
    stamp = replace(Stamp(**json.loads(written)), digest=file_digest(shard, path, rows))
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 8)
        length = int.from_bytes(f.read(4), "little")
        f.seek(size - 8 - length)
        footer = f.read(length)
        footer = _swap(footer, written, stamp.to_json(), path)  # Parquet's key-value copy
        arrow = meta.get(b"ARROW:schema")
        if arrow is not None:  # the Arrow schema's copy, which pyarrow's readers take
            inner = _swap(base64.b64decode(arrow), written, stamp.to_json(), path)
            footer = _swap(footer, arrow, base64.b64encode(inner), path)
        f.seek(size - 8 - length)
        f.write(footer)
    return stamp


def _swap(data: bytes, old: bytes, new: bytes, path: Path) -> bytes:
    if len(old) != len(new) or data.count(old) != 1:
        raise RuntimeError(f"cannot seal the stamp of `{path}`: its footer does not hold the pending stamp once")
    return data.replace(old, new)


def file_digest(shard: pq.ParquetFile, path: Path, rows: np.ndarray) -> str:
    """The digest of a shard's stored top-k as the file at `path` holds it (`shard`: that file
    opened), and of `rows`, the top-k rows of each record. Raises KeyError for a missing top-k
    column."""
    encoding = shard_encoding(shard.schema_arrow)
    metadata = shard.metadata
    leaves: dict[str, list[int]] = {}  # column -> its Parquet leaf columns (one, or a nested list's)
    for i in range(metadata.num_columns):
        leaves.setdefault(metadata.schema.column(i).path.split(".")[0], []).append(i)
    whole = hashlib.sha256(json.dumps(encoding, sort_keys=True).encode())
    with open(path, "rb") as f:
        for name in stored_topk_columns(encoding):
            whole.update(f"{name}:{shard.schema_arrow.field(name).type}".encode())
            for group in range(metadata.num_row_groups):
                row_group = metadata.row_group(group)
                whole.update(np.int64(row_group.num_rows).tobytes())
                for i in leaves[name]:
                    chunk = row_group.column(i)
                    # how the footer says to read the bytes, and the bytes
                    whole.update(f"{chunk.physical_type}:{chunk.compression}:{chunk.encodings}:{chunk.num_values}".encode())
                    f.seek(chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset)
                    whole.update(f.read(chunk.total_compressed_size))
    whole.update(np.ascontiguousarray(rows, dtype="<i8").view(np.uint8))
    return whole.hexdigest()


def response_rows(data: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The response length of each record: the top-k rows a stamp's digest must bind."""
    return pc.fill_null(pc.list_value_length(data["response_token_ids"]), 0).to_numpy(zero_copy_only=False)


def _has_nulls(array: pa.Array) -> bool:
    while True:
        if array.null_count:
            return True
        if not _is_list(array.type):
            return False
        array = array.flatten()


def read_stamp(path: Path) -> Stamp | None:
    """A shard's stamp as its footer states it (not checked against its data: see `verified_stamp`)."""
    return stamp_in(pq.read_schema(path))


def stamp_in(schema: pa.Schema) -> Stamp | None:
    data = (schema.metadata or {}).get(STAMP_KEY)
    return None if data is None else Stamp.from_json(data)


def verified_stamp(path: Path) -> Stamp | None:
    """A shard's stamp where the top-k it holds is the one the stamp vouches for, with one row per
    response token (its stored top-k hashed, not read); None where the shard has no stamp, or
    another top-k."""
    shard = pq.ParquetFile(path)
    stamp = stamp_in(shard.schema_arrow)
    if stamp is None:
        return None
    return stamp if vouches(stamp, shard, path, shard.iter_batches(columns=["response_token_ids"])) else None


def vouches(stamp: Stamp, shard: pq.ParquetFile, path: Path, batches: Iterable[pa.RecordBatch]) -> bool:
    """Whether `stamp`'s digest is that of the shard at `path` (`shard`: that file opened), the
    response lengths of `batches` (all its rows, in order) standing for its top-k rows. False
    where a column the digest reads is missing."""
    try:
        rows = np.concatenate([response_rows(b) for b in batches] or [np.zeros(0, np.int64)])
        return file_digest(shard, path, rows) == stamp.digest
    except KeyError:
        return False
