"""State that grows with the corpus, on disk: what curation's dedup filters remember of every
kept record (10M records at the defaults: 14.3 GB, measured) and the ids the validator has read live in
memory-mapped files under a temporary folder. Their pages are file-backed, which the OS reclaims
under pressure, and the process's heap (RssAnon) stays flat however many records pass. The one
exception is a hash index of at most `IN_MEMORY_BYTES`: it lives on the heap (below).

`HashIndex` is a multimap from 64-bit keys to row numbers (open addressing, linear probing,
vectorised over many keys at once); `Rows` an append-only table of fixed-width rows; `Strings`
append-only strings; `SeenStrings` a set of strings. The folder goes when the state is
garbage-collected or the process ends.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

_EMPTY = np.uint64(0)  # a key of 0 is stored as 1 (`_stored_keys`): a collision can only add a candidate
_GROW_STEP = 1 << 20  # entries re-inserted at once when a hash index doubles
# `reserve` sizes for at most this many entries (32 GB of sparse files): the count it is given comes
# from a manifest, which is read before it is checked; beyond it the index grows as it fills.
_MAX_RESERVED = 1 << 30
# A hash index's two arrays up to this size (a 1M-record corpus's near-dedup bands: 512 MiB) are
# anonymous memory, beyond it memory-mapped files. Every insert writes a random page, and each page
# the kernel's writeback has cleaned faults again at its next write: at 1M records the file-backed
# bands cost the curating process 8-13 s more system CPU (11.2-16.2 s against 3.0-3.2 s; two runs
# each, docs/results/scale.md). Appended rows and strings are written once and stay on disk.
IN_MEMORY_BYTES = 1 << 30


class Folder:
    """A temporary folder for one filter's files, removed with the filter (or at exit)."""

    def __init__(self, prefix: str):
        self.path = Path(tempfile.mkdtemp(prefix=f"distill-{prefix}-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)

    def file(self, name: str) -> Path:
        return self.path / name


def _mapped(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A zero-filled array of `shape` in a new (sparse) file at `path`: a plain ndarray over the
    mapping (`np.memmap`'s own indexing runs Python code on every access)."""
    return np.asarray(np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape))


class Rows:
    """Append-only rows of `width` values of `dtype`, in files of `block` rows each (no file is
    ever copied to grow)."""

    def __init__(self, folder: Folder, name: str, dtype, width: int = 1, block: int = 1 << 16):
        self._folder, self._name, self._dtype, self._width, self._block = folder, name, dtype, width, block
        self._blocks: list[np.ndarray] = []
        self.count = 0

    def append(self, rows: np.ndarray) -> None:
        rows = rows.reshape(-1, self._width)
        done = 0
        while done < len(rows):
            block, at = divmod(self.count, self._block)
            if block == len(self._blocks):
                self._blocks.append(_mapped(self._folder.file(f"{self._name}-{block:05d}.npy"), self._dtype,
                                            (self._block, self._width)))
            n = min(self._block - at, len(rows) - done)
            self._blocks[block][at:at + n] = rows[done:done + n]
            done += n
            self.count += n

    def __getitem__(self, row: int) -> np.ndarray:
        block, at = divmod(int(row), self._block)
        return self._blocks[block][at]


class Strings:
    """Append-only strings (UTF-8 bytes in one file, their end offsets as `Rows`)."""

    def __init__(self, folder: Folder, name: str):
        self._data = open(folder.file(f"{name}.bin"), "w+b")  # noqa: SIM115 (closed when this object goes)
        weakref.finalize(self, self._data.close)
        self._ends = Rows(folder, f"{name}-ends", np.int64)
        self._size = 0

    def append(self, texts: list[str]) -> None:
        encoded = [t.encode() for t in texts]
        self._data.seek(self._size)
        self._data.write(b"".join(encoded))
        ends = self._size + np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self._ends.append(ends)
        self._size = int(ends[-1]) if len(ends) else self._size

    def __getitem__(self, row: int) -> str:
        start = int(self._ends[row - 1][0]) if row else 0
        self._data.seek(start)
        return self._data.read(int(self._ends[row][0]) - start).decode()

    def __len__(self) -> int:
        return self._ends.count


class HashIndex:
    """Multimap uint64 key -> row number (int64), in two arrays (memory-mapped files beyond
    `IN_MEMORY_BYTES`): open addressing with linear probing, doubled (every entry re-inserted) when
    more than half full."""

    def __init__(self, folder: Folder, name: str, capacity: int = 1 << 16):
        self._folder, self._name, self._generation = folder, name, 0
        self.count = 0
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self._generation += 1
        old = [self._folder.file(f"{self._name}-{part}-{self._generation - 1}.npy") for part in ("keys", "rows")]
        on_disk = 16 * capacity > IN_MEMORY_BYTES

        def zeros(part: str, dtype) -> np.ndarray:
            path = self._folder.file(f"{self._name}-{part}-{self._generation}.npy")
            return _mapped(path, dtype, (capacity,)) if on_disk else np.zeros(capacity, dtype)

        self._keys, self._rows = zeros("keys", np.uint64), zeros("rows", np.int64)
        self._mask = np.uint64(capacity - 1)
        for path in old:
            path.unlink(missing_ok=True)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (query position, row) pair whose stored key equals `keys[query position]`."""
        keys = _stored_keys(keys)
        active = np.arange(len(keys))
        slots = _slots(keys, self._mask)
        found_at, found_rows = [active[:0]], [active[:0]]  # so that no keys find nothing
        while len(active):
            stored = self._keys[slots]
            hit = stored == keys[active]
            found_at.append(active[hit])
            found_rows.append(self._rows[slots[hit]])
            more = stored != _EMPTY
            active, slots = active[more], (slots[more] + np.uint64(1)) & self._mask
        return np.concatenate(found_at), np.concatenate(found_rows)

    def reserve(self, entries: int) -> None:
        """Room for `entries` in all without doubling: every doubling re-inserts what is stored
        (sized once, 16M entries went in with half the work of a table grown to that size)."""
        entries = min(entries, _MAX_RESERVED)
        if 2 * entries > len(self._keys):
            self._grow(entries)

    def insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if 2 * (self.count + len(keys)) > len(self._keys):
            self._grow(self.count + len(keys))
        self._place(_stored_keys(keys), np.asarray(rows, dtype=np.int64))
        self.count += len(keys)

    def _grow(self, entries: int) -> None:
        old_keys, old_rows = self._keys, self._rows  # still mapped after their files are unlinked
        capacity = len(old_keys)
        while 2 * entries > capacity:
            capacity *= 2
        self._allocate(capacity)
        for start in range(0, len(old_keys), _GROW_STEP):  # a slice at a time: the heap stays small
            keys = np.asarray(old_keys[start:start + _GROW_STEP])
            used = keys != _EMPTY
            self._place(keys[used], np.asarray(old_rows[start:start + _GROW_STEP])[used])

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        slots = _slots(keys, self._mask)
        pending = np.arange(len(keys))
        while len(pending):
            free = self._keys[slots] == _EMPTY
            # One key per free slot takes it: every key that reached one writes its number into the
            # slot's row, one write stands, and the key whose number reads back is in (no sort).
            claimants, claimed = pending[free], slots[free]
            self._rows[claimed] = claimants
            won = self._rows[claimed] == claimants
            self._keys[claimed[won]] = keys[claimants[won]]
            self._rows[claimed[won]] = rows[claimants[won]]
            left = ~free
            left[np.flatnonzero(free)[~won]] = True
            # the rest found their slot taken (before, or by the winner): the next slot
            pending, slots = pending[left], (slots[left] + np.uint64(1)) & self._mask


def _stored_keys(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.uint64)
    return np.where(keys == _EMPTY, np.uint64(1), keys)


def _slots(keys: np.ndarray, mask: np.uint64) -> np.ndarray:
    # the keys are hashes already; a multiply mixes their high bits into the slot's low ones
    return ((keys * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(17)) & mask


class SeenStrings:
    """A set of strings; `labelled`: each with the label it was first seen with (else its label is
    itself, not stored twice)."""

    def __init__(self, prefix: str, labelled: bool = False):
        self._folder = Folder(prefix)
        self._strings = Strings(self._folder, "strings")
        self._labels = Strings(self._folder, "labels") if labelled else self._strings
        self._index = HashIndex(self._folder, "strings")

    def reserve(self, strings: int) -> None:
        """Room for `strings` in all (`HashIndex.reserve`)."""
        self._index.reserve(strings)

    def add(self, strings: list[str]) -> list[bool]:
        """Whether each of `strings` was added before (by this call too); adds those that were not."""
        return [first is not None for first in self.first(strings, strings)]

    def first(self, strings: list[str], labels: list[str]) -> list[str | None]:
        """Per string in turn: the label it was first seen with (in this call too), or None: then it
        is new, and remembered with its label (`labels`, ignored where the set is not `labelled`)."""
        # Python's string hash: salted per process, as long-lived as this set; a collision only adds
        # a candidate, compared in full
        keys = np.fromiter(map(hash, strings), dtype=np.int64, count=len(strings)).view(np.uint64)
        at, found = self._index.find(keys)
        if not len(at) and len(set(strings)) == len(strings):  # the common case: all new
            firsts, remember = [None] * len(strings), list(range(len(strings)))
        else:
            stored: dict[int, list[int]] = {}
            for position, row in zip(at.tolist(), found.tolist()):
                stored.setdefault(position, []).append(row)
            new: dict[str, str] = {}  # string -> label, of this call's new strings
            firsts, remember = [], []
            for j, s in enumerate(strings):
                first = next((self._labels[r] for r in stored.get(j, ()) if self._strings[r] == s), None) or new.get(s)
                if first is None:
                    new[s] = labels[j]
                    remember.append(j)
                firsts.append(first)
        rows = len(self._strings) + np.arange(len(remember))
        self._strings.append([strings[j] for j in remember])
        if self._labels is not self._strings:
            self._labels.append([labels[j] for j in remember])
        self._index.insert(keys[remember], rows)
        return firsts
