"""Per-record filter work, run ahead in worker processes.

A filter's verdict on a record depends only on that record unless the filter `remembers` the
records before it (the dedup filters, plug-ins). The others run here, over whole shards, a few
shards ahead of the curating process, in as many processes as `workers`, and it only looks their
verdicts up. They judge every row of a batch (not only the rows that earlier filters kept), which
gives the same verdict on the rows that count: a record is still charged to the first filter, in
the configured order, that rejects it. Of a remembering filter only what it computes from each
record alone (`Filter.prepare`: MinHash signatures, digests) is computed here; its matching
against the records before stays in the curating process, in corpus order. The workers also
write the curated shards (`Writes`): the curating process keeps only what needs corpus order, so
that it does not bound curate's speed however many workers there are.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import corpus
from distill.curation.base import Filter


@dataclass(frozen=True)
class BatchVerdicts:
    rows: int  # the batch's row count (the curating process reads the same batches: checked)
    failed: dict[int, dict[int, str]]  # filter index -> {row: detail} over every row of the batch
    masks: dict[int, list[bool]]  # row -> loss mask, for the rows the PII masker matched
    prepared: dict[int, Any]  # remembering filter index -> its `prepare` of the batch


def independent(filters: list[Filter]) -> list[int]:
    """Indices of the filters that judge each record alone."""
    return [n for n, f in enumerate(filters) if not f.remembers]


def preparing(filters: list[Filter]) -> list[int]:
    """Indices of the remembering filters with per-record work to compute ahead (`Filter.prepare`)."""
    return [n for n, f in enumerate(filters) if f.remembers and type(f).prepare is not Filter.prepare]


def offloaded(filters: list[Filter]) -> list[int]:
    """Indices of the filters with work for the workers."""
    return independent(filters) + preparing(filters)


class Ahead:
    """Submits shards to the worker pool, at most `2 * workers` ahead of the one being read; `for
    verdicts in ahead.shards(paths)` yields each shard's batch verdicts in order. `map` and
    `submit` lend the pool to other work (the corpus's checks before curating, the writing)."""

    def __init__(self, filters: list[Filter], masker: Filter | None, root: Path, batch_size: int, workers: int):
        self._indices = offloaded(filters)
        self._masker = filters.index(masker) if masker is not None else None
        self._columns = sorted({c for n in self._indices for c in filters[n].reads()})
        self._batch_size, self.workers = batch_size, workers
        specs = [filters[n].settings() for n in self._indices]
        # spawn: the curating process holds threads (tqdm's, the pool's own) that a fork would copy mid-state
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start, initargs=(specs, self._indices, self._masker, str(root)))

    def map(self, fn: Callable, *iterables) -> Iterator:
        """`fn` over the iterables in the worker processes, results in order (`Executor.map`)."""
        return self._pool.map(fn, *iterables)

    def submit(self, fn: Callable, *args) -> Future:
        """`fn(*args)` in a worker process (`Executor.submit`)."""
        return self._pool.submit(fn, *args)

    def shards(self, paths: list[Path]) -> Iterator[list[BatchVerdicts]]:
        pending: deque[Future] = deque()
        upcoming = iter(paths)
        for _ in paths:
            while len(pending) < 2 * self.workers:
                path = next(upcoming, None)
                if path is None:
                    break
                pending.append(self._pool.submit(_judge, path, self._columns, self._batch_size))
            yield result(pending.popleft())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Writes:
    """The curated shards' writing, in order of submission: in the worker processes where there
    are workers (`ahead`), else on one thread of the curating process. At most two shards per
    worker (one on a thread) are in flight: `submit` waits for the oldest, and raises its error."""

    def __init__(self, ahead: Ahead | None):
        self._thread = None if ahead else ThreadPoolExecutor(1, thread_name_prefix="curate-writer")
        self._executor: Ahead | Executor = ahead or self._thread
        self._depth = 2 * ahead.workers if ahead else 1
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable, *args) -> None:
        while len(self._pending) >= self._depth:
            result(self._pending.popleft())
        self._pending.append(self._executor.submit(fn, *args))

    def __enter__(self) -> Writes:
        return self

    def __exit__(self, error_type, *_) -> None:
        try:
            while self._pending and error_type is None:
                result(self._pending.popleft())
        finally:
            for future in self._pending:
                future.cancel()
            if self._thread is not None:
                self._thread.shutdown(wait=True)


def result(future: Future) -> Any:
    """A worker's result; its pool broken, what to do about it."""
    try:
        return future.result()
    except BrokenProcessPool as e:
        raise RuntimeError("curate's worker processes died (a script that calls `curate()` needs an "
                           "`if __name__ == \"__main__\":` guard, as for any spawned process; or set "
                           "`workers: 0`)") from e


# In each worker process: the independent filters, built once from their settings.
_filters: dict[int, Filter] = {}
_masking: tuple[int, object] | None = None  # (masker index, token decoder)


def _start(specs: list[dict], indices: list[int], masker: int | None, root: str) -> None:
    from distill.curation.pipeline import build_filters, decoder

    global _masking
    _filters.update(zip(indices, build_filters(specs)))
    if masker is not None:
        _masking = (masker, decoder(corpus.read_manifest(root)))


def _judge(path: Path, columns: list[str], batch_size: int) -> list[BatchVerdicts]:
    from distill.curation.pipeline import pii_masks

    verdicts = []
    # the batches of the curating process (`corpus.stored_batches`), from the columns read here
    for batch in corpus.stored_batches(path, corpus.read_stored(path, columns), columns, batch_size):
        every = list(range(batch.num_rows))
        failed = {n: f.check_batch(batch, every) for n, f in _filters.items() if not f.remembers}
        masks = {}
        if _masking is not None:
            n, decode = _masking
            masks = pii_masks(batch, list(failed[n]), _filters[n], decode)
        prepared = {n: f.prepare(batch) for n, f in _filters.items() if f.remembers}
        verdicts.append(BatchVerdicts(batch.num_rows, failed, masks, prepared))
    return verdicts
