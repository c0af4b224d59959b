"""Files a later run trusts (shards, manifests, run state, model cards, checkpoint markers) are
written whole or not at all: a temp file beside the target, fsync, rename, fsync of the folder.
A kill at any moment leaves the old file or the new one, never half of one; the temp files a
killed writer leaves (`.NAME.tmp-PID`) are removed by `remove_partial_files`.

One writer per output directory: every command that writes one holds `exclusive(out)` (an
`flock` on `out/.distill.lock`) while it writes."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PARTIAL_GLOB = ".*.tmp-*"
LOCK_NAME = ".distill.lock"


class OutputInUse(RuntimeError):
    """Another process holds the output directory."""


class DiskFull(OSError):
    """ENOSPC, said in one line (what was being written, what to do)."""


def is_disk_full(error: BaseException, where: Path) -> bool:
    """ENOSPC anywhere in `error`'s chain; or a writer that hides it (torch's serializer: "file
    write failed", "iostream error", "unexpected pos") while the disk holding `where` has no room
    left (under 1 MiB: the partial file it leaves took the rest)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, RuntimeError):
        try:
            return shutil.disk_usage(where).free < 2**20
        except OSError:
            return False
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temp path to write; on success it becomes `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFull(f"no space left on device writing `{path}`; free space and rerun") from None
        raise
    _fsync_dir(path.parent)


def atomic_write(path: Path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def remove_partial_files(root: Path) -> None:
    """Delete temp files a killed writer left behind (complete files are never touched)."""
    for tmp in Path(root).rglob(PARTIAL_GLOB):
        tmp.unlink()


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def require_file(path: Path, what: str) -> Path:
    """`path` if it is a readable file; else one line saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"`{path}` is a directory, not a {what}")
    if not path.exists():
        raise FileNotFoundError(f"`{path}`: {what} not found")
    return path


def is_empty(directory: Path, scratch: tuple[str, ...] = ()) -> bool:
    """True if `directory` is missing or holds nothing but the lock file, temp files of writes in
    progress (under torchrun another rank may be writing one now) and the entries named in
    `scratch` (a stage's working files). None of these is a result."""
    directory = Path(directory)
    return not directory.exists() or all(p.name in (LOCK_NAME, *scratch) or fnmatch.fnmatch(p.name, PARTIAL_GLOB)
                                         for p in directory.iterdir())


def clear_dir(directory: Path, scratch: tuple[str, ...] = ()) -> None:
    """Delete what `directory` holds, except the lock file its writer holds and the entries named in
    `scratch` (working files that processes of the same run may be writing now)."""
    for p in Path(directory).iterdir():
        if p.name in (LOCK_NAME, *scratch):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_not_being_written(directory: Path, field: str) -> None:
    """Refuse an input directory that a running command holds (`exclusive`): its files are not final."""
    lock = Path(directory) / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        raise OutputInUse(f"`{field}` `{directory}` is being written by pid {holder}: wait for it to finish") from None
    finally:
        os.close(fd)


@contextmanager
def exclusive(out: Path) -> Iterator[Path]:
    """Hold the output directory `out` (created if needed) for this process: a second command
    writing into it fails at once, naming the pid that holds it, instead of mixing its files
    with ours. On exit the lock file goes, and `out` too if this call created it and it is empty."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"`{out}` is a file, not a directory: choose another output directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise FileExistsError(f"cannot create `{out}`: part of its path is a file") from None
    lock = out / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputInUse(f"`{out}` is in use by pid {holder}: wait for it to finish or choose another "
                              "output directory") from None
        try:  # the previous holder may have removed the file between our open and our lock
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield out
    finally:
        lock.unlink(missing_ok=True)  # while still locked: a waiting opener sees the inode change
        os.close(fd)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
