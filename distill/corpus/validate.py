"""The validator: every invariant of the corpus contract checked against the shards, each
problem named by shard (and record where it has one)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from distill import disk_state
from distill.corpus.codec import (
    COLUMNS,
    STUDENT_PROMPT_IDS,
    STUDENT_VIEW_COLUMNS,
    TOKEN_COLUMNS,
    TOKEN_ID_COLUMNS,
    CorpusError,
    conform,
    decode,
    encode,
    leaves,
    locate,
    logical_table,
    shard_encoding,
    stored_topk_columns,
)
from distill.corpus.manifest import SCHEMA, CorpusStats, Manifest, read_manifest
from distill.corpus.stamp import Stamp, TopkChecked, stamp_in, vouches
from distill.corpus.store import READ_ERRORS, shard_paths, unreadable


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


# Below this many records a worker process's start-up (its imports) costs more than it saves.
PARALLEL_MIN_RECORDS = 10_000


def default_workers(records: int, cpus: int | None) -> int:
    """Worker processes for a pass over `records` records on `cpus` CPUs (None: unknown, one):
    one per CPU from PARALLEL_MIN_RECORDS, else none. Validation, curation and the cross-tokenizer
    alignment share it."""
    return (cpus or 1) if records >= PARALLEL_MIN_RECORDS else 0


def validate(root: Path, subdir: str = "data", max_problems: int = 20, workers: int | None = None) -> dict[str, int]:
    """Check every invariant of docs/corpus-format.md on every byte (stamps are not trusted: this is
    the check of everything); return the stats or raise `CorpusError` listing the problems.
    `workers`: processes checking shards in parallel (None: one per CPU from PARALLEL_MIN_RECORDS
    records; 0: none). They are spawned: a script calling this needs the `if __name__ == "__main__":`
    guard, as for any spawned process."""
    manifest = read_manifest(root)
    stats = _expected_stats(manifest, subdir)  # what the shards hold, once checked equal
    if workers is None:
        workers = default_workers(stats.records, os.cpu_count())
    if not workers:
        check_records(root, subdir, max_problems, trust_stamps=False)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            check_records(root, subdir, max_problems, trust_stamps=False, map_shards=pool.map)
        finally:  # the shards not yet checked (after `max_problems`, or an error) are dropped
            pool.shutdown(wait=True, cancel_futures=True)
    return {"records": stats.records, "response_tokens": stats.response_tokens}


@dataclass(frozen=True)
class CheckedBatch:
    """Records that passed every check. `stored`: their columns with the contract's types, the top-k
    as the shard stores it (`encoding`: the shard's); `max_topk_id`: the largest top-k id, or where
    the shard's stamp vouched for its top-k, the stamp's (of the shard; for rows taken from other
    shards, an upper bound)."""

    stored: pa.RecordBatch
    encoding: dict
    max_topk_id: int

    def decoded(self) -> pa.RecordBatch:
        """The logical columns of docs/corpus-format.md."""
        return decode(self.stored, self.encoding)


def checked_batches(root: Path, subdir: str = "data", max_problems: int = 20, batch_size: int = 1024,
                    trust_stamps: bool = False) -> Iterator[CheckedBatch]:
    """The corpus's records in batches, each checked as it is read (every page against its
    checksum, every invariant of docs/corpus-format.md): validation and reading in one pass. Only
    batches without a problem are yielded; after the last one (or `max_problems`) the problems
    found are raised as one `CorpusError`.

    `trust_stamps`: a shard whose stamp vouches for the top-k it holds (`stamp.py`: the digest of
    its stored top-k bytes and response lengths equal, the stamp's version, the manifest's k,
    below its `vocab_size`) is read without decoding its top-k, whose own checks (widths, sorted,
    finite, in the vocabulary, one row per response token) are skipped; every other check runs.
    Such a shard is read whole before its first batch is yielded (its digest is known only then);
    any other is validated in full, as without `trust_stamps`."""
    root = Path(root)
    manifest = read_manifest(root)
    seen = _ids_seen(manifest, subdir)
    totals = _Totals(manifest, subdir, max_problems)
    for path in shard_paths(root, subdir):
        shard = yield from _check_shard(path, root, manifest, batch_size, trust_stamps, seen,
                                        max_problems - len(totals.problems))
        if not totals.add(shard):
            break
    totals.raise_problems(root)


def check_records(root: Path, subdir: str = "data", max_problems: int = 20, trust_stamps: bool = False,
                  map_shards: Callable = map, batch_size: int = 1024) -> int:
    """`checked_batches` without the records, shard by shard through `map_shards`: a process pool's
    `map` checks the shards in parallel (each alone; the ids unique across shards are checked here,
    in shard order). The problems are those `checked_batches` finds (in another order within a
    shard), raised as one `CorpusError`; else the largest top-k id, as `checked_batches` reports it
    (a vouching stamp's bound)."""
    root = Path(root)
    manifest = read_manifest(root)
    seen = _ids_seen(manifest, subdir)
    totals = _Totals(manifest, subdir, max_problems)
    largest = 0
    repeat = itertools.repeat
    paths = shard_paths(root, subdir)
    with tqdm(total=len(paths), unit="shard", desc="check", file=sys.stderr, dynamic_ncols=True) as bar:
        for shard in map_shards(_shard_summary, paths, repeat(root), repeat(manifest),
                                repeat(batch_size), repeat(trust_stamps), repeat(max_problems)):
            shard.problems += _repeated_ids(shard.where, shard.ids, seen)
            largest = max(largest, shard.max_topk_id)
            bar.update()
            if not totals.add(shard):
                break
    totals.raise_problems(root)
    return largest


@dataclass
class ShardCheck:
    """What the checks of one shard found."""

    where: str  # the shard, as its problems name it
    problems: list[str] = field(default_factory=list)
    records: int = 0
    tokens: int = 0
    counted: bool = True  # False: some of the shard was not read, so the corpus's totals are unknown
    max_topk_id: int = 0  # of its clean batches
    ids: list[str] = field(default_factory=list)  # where the caller checks them for repeats: every id read


class _Totals:
    """The problems and counts over the shards in order; at the end, the counts against the manifest's."""

    def __init__(self, manifest: Manifest, subdir: str, max_problems: int):
        self.problems: list[str] = []
        if manifest.schema_ != SCHEMA:
            self.problems.append(f"manifest `schema` is {manifest.schema_!r}, expected {SCHEMA!r}")
        self._stats, self._max_problems = _expected_stats(manifest, subdir), max_problems
        self._records = self._tokens = 0
        self._every_shard_counted = True  # else the totals are unknown: no follow-on "the shards hold 0"

    def add(self, shard: ShardCheck) -> bool:
        """Count one shard in; False: enough problems, stop."""
        self.problems += shard.problems
        self._records += shard.records
        self._tokens += shard.tokens
        self._every_shard_counted &= shard.counted and len(self.problems) < self._max_problems
        return len(self.problems) < self._max_problems

    def raise_problems(self, root: Path) -> None:
        for key, actual in (("records", self._records), ("response_tokens", self._tokens)):
            if self._every_shard_counted and getattr(self._stats, key) != actual:
                self.problems.append(f"manifest `stats.{key}` is {getattr(self._stats, key)!r} but the shards "
                                     f"hold {actual}")
        if self.problems:
            more = "\n  ... and more" if len(self.problems) > self._max_problems else ""
            listed = "\n  ".join(self.problems[:self._max_problems])
            raise CorpusError(f"`{root}` is not a valid corpus:\n  {listed}{more}")


def _shard_summary(path: Path, root: Path, manifest: Manifest, batch_size: int, trust_stamps: bool,
                   max_problems: int) -> ShardCheck:
    """`check_records`'s work on one shard (in a worker process where it maps over a pool): the
    shard's checks run to the end, its batches dropped (a top-k that its stamp vouches for unread)."""
    batches = _check_shard(path, root, manifest, batch_size, trust_stamps, None, max_problems, read_topk=False)
    while True:
        try:
            next(batches)
        except StopIteration as done:
            return done.value


def _check_shard(path: Path, root: Path, manifest: Manifest, batch_size: int, trust_stamps: bool,
                 seen: disk_state.SeenStrings | None, room: int,
                 read_topk: bool = True) -> Generator[CheckedBatch, None, ShardCheck]:
    """One shard's checks, batch by batch: yields its clean batches, returns what it found (up to
    `room` problems). `seen`: the ids read so far, checked for repeats batch by batch (None: the
    shard's ids are returned for the caller to check). `read_topk`: False where the caller only
    wants the verdict: a top-k that the shard's stamp vouches for is then not read at all (its
    batches are yielded without it)."""
    k, encoding_named = manifest.generation.top_k, manifest.generation.logprob_encoding
    vocab_size = manifest.teacher.vocab_size
    where = f"{path.relative_to(root)}"
    found = ShardCheck(where)
    try:  # every page checked against its checksum as it is read
        shard = pq.ParquetFile(path, page_checksum_verification=True)
        shard.schema_arrow.names  # decoded lazily: a damaged name fails here
        encoding = shard_encoding(shard.schema_arrow)
        stamp = stamp_in(shard.schema_arrow) if trust_stamps else None
        stored = None
        if stamp is not None:
            stored, stamp = _vouched(path, shard, stamp, encoding, k, vocab_size, batch_size, read_topk)
        if stored is None:
            stored = shard.iter_batches(batch_size=batch_size)
    except CorpusError as e:
        return ShardCheck(where, [f"{where}: {e}"], counted=False)
    except READ_ERRORS as e:
        return ShardCheck(where, [str(unreadable(where, e))], counted=False)
    clean = encoding_named is None or encoding["encoding"] == encoding_named
    if not clean:
        found.problems.append(f"{where}: stored as `{encoding['encoding']}` but the manifest says "
                              f"`generation.logprob_encoding: {encoding_named}`")
    first = True
    while len(found.problems) < room:
        try:
            batch = next(stored, None)
        except READ_ERRORS as e:
            found.problems.append(str(unreadable(where, e)))
            found.counted = False
            break
        if batch is None:
            break
        try:  # decoding also casts the stored widths to the contract's, or names a type problem
            if stamp is None:
                table = pa.Table.from_batches([decode(batch, encoding)])
            else:  # the top-k vouched for: only the other columns are decoded and checked
                batch = conform(batch)
                table = pa.Table.from_batches([batch])
                table = table.drop_columns([c for c in stored_topk_columns(encoding) if c in table.column_names])
        except (CorpusError, pa.ArrowException, KeyError) as e:
            found.problems.append(f"{where}: {e}")
            found.counted = False
            break
        if first:  # the shard's columns: once per shard
            first = False
            held = set(table.column_names) | ({"topk_token_ids", "topk_logprobs"} if stamp else set())
            missing = [c for c in COLUMNS if c not in held]
            if missing:
                found.problems.append(f"{where}: missing columns {missing}")
                found.counted = False
                break
        problems = _batch_problems(table, where, k, vocab_size, seen)
        found.problems += problems
        if seen is None:
            found.ids += table["id"].to_pylist()
        found.records += table.num_rows
        found.tokens += int(pc.sum(pc.list_value_length(table["response_token_ids"])).as_py() or 0)
        if clean and not problems:
            if stamp is None:
                top = leaves(table["topk_token_ids"])
                checked = CheckedBatch(conform(batch), encoding, (pc.max(top).as_py() if len(top) else None) or 0)
            else:
                checked = CheckedBatch(batch, encoding, stamp.max_topk_id)
            found.max_topk_id = max(found.max_topk_id, checked.max_topk_id)
            yield checked
    return found


def _vouched(path: Path, shard: pq.ParquetFile, stamp: Stamp, encoding: dict, k: int, vocab_size: int | None,
             batch_size: int, read_topk: bool) -> tuple[Iterator[pa.RecordBatch] | None, Stamp | None]:
    """A stamped shard's batches (read whole; without its top-k unless `read_topk`), and its stamp
    where it vouches for the top-k the file holds under this manifest: the digest of the stored
    top-k and the response lengths equal to the stamp's, rows of the manifest's k, ids below its
    `vocab_size`. No stamp: the shard is validated in full, from the batches returned, or where
    they lack the top-k (None) from a fresh read."""
    if stamp.top_k != k or (vocab_size is not None and stamp.max_topk_id >= vocab_size):
        return None, None
    topk = stored_topk_columns(encoding)
    columns = None if read_topk else [c for c in shard.schema_arrow.names if c not in topk]
    batches = list(shard.iter_batches(batch_size=batch_size, columns=columns))
    if not vouches(stamp, shard, path, batches):  # a column missing too: the full validation names it
        return (iter(batches) if read_topk else None), None
    return iter(batches), stamp


def records_to_checked_table(records: Sequence[dict[str, Any]], k: int, encoding: str, vocab_size: int | None,
                             dictionary: str | None = None) -> tuple[pa.Table, TopkChecked | None]:
    """`codec.records_to_table` (with the corpus's top-k `dictionary`: `store.corpus_dictionary`),
    and what its checks found (`topk_checked`): what the stages that have the decoded top-k in hand
    write with `store.write_shard(..., checked=)`."""
    logical = logical_table(records, k)
    return encode(logical, k, encoding, dictionary=dictionary), topk_checked(logical, k, vocab_size)


def topk_checked(logical: pa.Table, k: int, vocab_size: int | None) -> TopkChecked | None:
    """Where the records of a shard about to be written (`logical`: its decoded columns) pass the
    validator's checks of one batch (`_batch_problems`: the top-k's widths for `k`, sorted,
    finite, in the vocabulary; ids unique within it), what `write_shard` stamps it with; None
    where any fails: the shard is then written without a stamp, and the validator reports the
    problem as for any shard."""
    if _batch_problems(logical, "", k, vocab_size, disk_state.SeenStrings("ids")):
        return None
    top = leaves(logical["topk_token_ids"])
    return TopkChecked(k, (pc.max(top).as_py() if len(top) else None) or 0)


def _ids_seen(manifest: Manifest, subdir: str) -> disk_state.SeenStrings:
    """The set of the ids read, sized for the records the manifest counts (the ids on disk: ~100 B
    per id would be 1 GB of heap at 10M records; its hash index, 512 MiB at 10M, on the heap)."""
    seen = disk_state.SeenStrings("ids")
    seen.reserve(_expected_stats(manifest, subdir).records)
    return seen


def _expected_stats(manifest: Manifest, subdir: str) -> CorpusStats:
    return manifest.stats if subdir == "data" else manifest.rejected_stats or CorpusStats()


def _batch_problems(table: pa.Table, where: str, k: int, vocab_size: int | None,
                    seen: disk_state.SeenStrings | None) -> list[str]:
    """What is wrong in these records of a shard with the right columns; `seen`: the ids read so far.
    Each check looks only at the columns `table` holds: where the shard's stamp vouched for its
    top-k, `table` lacks it (its rows per record were bound to the response lengths by the stamp's
    digest). None `seen`: the ids are not checked for repeats."""
    problems = []
    n_tokens = pc.list_value_length(table["response_token_ids"])
    lengths = {col: pc.list_value_length(table[col]) for col in TOKEN_COLUMNS if col in table.column_names}
    for col, length in lengths.items():
        problems += _rows(table, pc.not_equal(length, n_tokens), f"{where}: `{col}` length differs from `response_token_ids`")
    for col in ("topk_token_ids", "topk_logprobs"):
        if col not in table.column_names:
            continue
        rows = pc.list_flatten(table[col])
        widths = pc.list_value_length(rows)
        if len(widths) and pc.any(pc.not_equal(widths, k)).as_py():
            problems.append(f"{where}: `{col}` has rows with {pc.min_max(widths).as_py()} entries, expected k={k}")
    problems += _rows(table, pc.equal(pc.list_value_length(table["prompt_token_ids"]), 0),
                      f"{where}: empty `prompt_token_ids`")
    view = [c for c in STUDENT_VIEW_COLUMNS if c in table.column_names]
    if view and len(view) != len(STUDENT_VIEW_COLUMNS):
        problems.append(f"{where}: `{view[0]}` without `{(set(STUDENT_VIEW_COLUMNS) - set(view)).pop()}`: a student "
                        "view needs both columns")
    if STUDENT_PROMPT_IDS in table.column_names:
        problems += _rows(table, pc.equal(pc.list_value_length(table[STUDENT_PROMPT_IDS]), 0),
                          f"{where}: empty `{STUDENT_PROMPT_IDS}`")
    problems += _unsorted_topk(table, where)
    problems += _non_finite(table, where)
    problems += _out_of_vocabulary(table, where, vocab_size)
    if seen is not None:
        problems += _repeated_ids(where, table["id"].to_pylist(), seen)
    return problems


def _repeated_ids(where: str, ids: list[str], seen: disk_state.SeenStrings) -> list[str]:
    """A problem per id of `ids` read before (`seen`, which remembers them from here on)."""
    return [f"{where}: duplicate id {rid!r}" for rid, before in zip(ids, seen.add(ids)) if before]


def _rows(table: pa.Table, mask: pa.ChunkedArray, message: str) -> list[str]:
    bad = pc.filter(table["id"], mask).to_pylist()
    return [f"{message} (record ids {bad[:3]}{' ...' if len(bad) > 3 else ''})"] if bad else []


def _non_finite(table: pa.Table, where: str) -> list[str]:
    """NaN or infinite logprobs (a NaN passes every comparison, so no other check catches it)."""
    problems = []
    for col in [c for c in ("response_logprobs", "topk_logprobs") if c in table.column_names]:
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
    if "topk_logprobs" not in table.column_names:
        return []
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


def _out_of_vocabulary(table: pa.Table, where: str, vocab_size: int | None) -> list[str]:
    """Token ids below 0 or, where the manifest records the teacher's `vocab_size`, not below it
    (a min/max per column; the values are looked at only to name the first bad one)."""
    problems = []
    outside = f"outside the teacher's vocabulary [0, {vocab_size})" if vocab_size else "below 0"
    for col in [c for c in (*TOKEN_ID_COLUMNS, STUDENT_PROMPT_IDS) if c in table.column_names]:
        values = leaves(table[col])
        low, high = (v.as_py() for v in pc.min_max(values).values())
        if low is None or (low >= 0 and (vocab_size is None or high < vocab_size)):
            continue
        ids = values.to_numpy(zero_copy_only=False)
        bad = (ids < 0) | (ids >= vocab_size) if vocab_size else ids < 0
        first = int(np.argmax(bad))
        record, position = locate(table[col], first)
        at = "prompt position" if col in ("prompt_token_ids", STUDENT_PROMPT_IDS) else "response position"
        n = int(bad.sum())
        problems.append(f"{where}: `{col}` holds {n} {'id' if n == 1 else 'ids'} {outside} (first: record "
                        f"{table['id'][record].as_py()!r}, {at} {position}: {ids[first]})")
    return problems
