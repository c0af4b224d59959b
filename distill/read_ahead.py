"""`read_ahead(items)`: an iterator produced by a background thread a few items ahead of its
consumer, so that reading one batch (Parquet decompression, hashing: C code that releases the
GIL) overlaps the consumer's work on the previous one (writing it out). Train's pass over a
1M-record corpus read for 20 s and wrote for 24 s one after the other."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """The items of `items` in order, at most `depth` produced ahead. An exception of `items`
    reaches the consumer after the items produced before it. A consumer that stops early (break,
    an exception of its own) stops the producer and closes `items` (its `finally` runs)."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Raised(e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name="distill-read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item = handoff.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        producer.join()
