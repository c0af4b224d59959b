"""`read_ahead`: the same items in order, produced ahead of the consumer in a thread; the
source's exception after the items before it; a consumer that stops early closes the source."""

from __future__ import annotations

import threading

import pytest

from distill.read_ahead import read_ahead


def test_items_come_in_order_and_are_produced_ahead_of_the_consumer():
    produced, third_made = [], threading.Event()

    def source():
        for i in range(10):
            produced.append(i)
            if i == 2:
                third_made.set()
            yield i

    items = read_ahead(source(), depth=2)
    assert next(items) == 0
    # while the consumer holds item 0, the thread goes on: items 1 and 2 wait in the queue
    assert third_made.wait(timeout=60), produced
    assert list(items) == list(range(1, 10)) and produced == list(range(10))


def test_the_sources_error_reaches_the_consumer_after_the_items_before_it():
    def source():
        yield from (1, 2)
        raise ValueError("shard 3 is damaged")

    seen = []
    with pytest.raises(ValueError, match="shard 3 is damaged"):
        for item in read_ahead(source()):
            seen.append(item)
    assert seen == [1, 2]


def test_a_consumer_that_stops_early_stops_the_thread_and_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            for i in range(1_000_000):
                yield i
        finally:
            closed.set()

    items = read_ahead(source(), depth=3)
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    items.close()  # as a `for` loop that breaks or raises does when the generator is collected
    assert closed.is_set()
    assert not any(t.name == "distill-read-ahead" and t.is_alive() for t in threading.enumerate())
