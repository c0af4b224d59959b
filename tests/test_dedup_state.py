"""The on-disk state (distill/disk_state.py) against plain Python containers, and
the near-dedup filter's batch path against its one-record path."""

from __future__ import annotations

import gc

import numpy as np
import pyarrow as pa
import pytest

from distill import disk_state
from distill.curation.dedup import ExactDedupFilter, NearDedupFilter
from distill.tiny import WORDS


@pytest.mark.parametrize("reserved", [0, 6000])  # 6000: sized for every entry after the first batch
# on the heap, on disk, or moving from the heap to disk as it grows past 1,024 slots
@pytest.mark.parametrize("in_memory", [1 << 30, 0, 16 * 1024])
def test_hash_index_finds_every_row_of_a_key_through_growth(monkeypatch, reserved, in_memory):
    monkeypatch.setattr(disk_state, "_GROW_STEP", 7)  # re-inserted a few slots at a time
    monkeypatch.setattr(disk_state, "IN_MEMORY_BYTES", in_memory)
    rng = np.random.default_rng(0)
    folder = disk_state.Folder("test")
    index = disk_state.HashIndex(folder, "keys", capacity=16)
    expected: dict[int, set[int]] = {}
    row = 0
    for batch in range(30):  # grows from 16 slots to several thousand
        if batch == 1:
            index.reserve(reserved)  # what the first batch stored moves into the reserved table
        keys = rng.integers(0, 400, size=int(rng.integers(1, 200))).astype(np.uint64)  # repeats: a multimap
        keys[:2] = [0, 1]  # 0 is the empty slot's mark: stored as 1, so it may only add a candidate
        rows = np.arange(row, row + len(keys))
        row += len(keys)
        index.insert(keys, rows)
        for k, r in zip(keys.tolist(), rows.tolist()):
            expected.setdefault(k, set()).add(r)
    queries = np.arange(0, 500, dtype=np.uint64)
    at, found = index.find(queries)
    got: dict[int, set[int]] = {}
    for q, r in zip(at.tolist(), found.tolist()):
        got.setdefault(int(queries[q]), set()).add(r)
    for k in range(2, 500):
        assert got.get(k, set()) == expected.get(k, set()), k
    assert got[0] == got[1] == expected[0] | expected[1]
    assert index.count == row
    files = sorted(p.name for p in folder.path.iterdir())  # the current table's, the older ones removed
    assert files == ([] if len(index._keys) * 16 <= in_memory else [f"keys-{part}-{index._generation}.npy"
                                                                    for part in ("keys", "rows")])


def test_rows_and_strings_read_back_across_files():
    folder = disk_state.Folder("test")
    rows, strings = disk_state.Rows(folder, "r", np.uint32, 3, block=4), disk_state.Strings(folder, "s")
    data = np.arange(30, dtype=np.uint32).reshape(10, 3)
    rows.append(data[:3])
    rows.append(data[3:])  # crosses two block files
    texts = ["a", "", "naïve ✓", "r" * 100]
    strings.append(texts[:2])
    strings.append(texts[2:])
    assert [rows[i].tolist() for i in range(10)] == data.tolist()
    assert [strings[i] for i in range(len(strings))] == texts


def test_the_folder_goes_with_the_filter():
    f = NearDedupFilter()
    path = f._folder.path
    f.check_batch(pa.record_batch({"id": ["a"], "response": ["one two three four five six"]}), [0])
    assert any(path.iterdir())
    del f
    gc.collect()
    assert not path.exists()


def texts_with_near_duplicates(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for _ in range(n):
        if texts and rng.random() < 0.3:  # an earlier text, up to 6 words changed (maybe in this batch)
            words = texts[int(rng.integers(max(0, len(texts) - 40), len(texts)))].split()
            for _ in range(int(rng.integers(0, 7))):
                if words:
                    words[int(rng.integers(len(words)))] = WORDS[int(rng.integers(len(WORDS)))]
            texts.append(" ".join(words))
        else:  # 0-3 words: no shingle of 5, or none at all
            size = int(rng.integers(0, 4)) if rng.random() < 0.05 else int(rng.integers(5, 120))
            texts.append(" ".join(WORDS[int(w)] for w in rng.integers(0, len(WORDS), size=size)))
    return texts


def test_near_dedup_in_batches_judges_as_one_record_at_a_time():
    """Duplicates inside a batch, across batches, and rows an earlier filter dropped (never seen)."""
    texts = texts_with_near_duplicates(1500)
    size = 250
    seen = [i for i in range(len(texts)) if (i % size) % 17]
    one_by_one = NearDedupFilter()
    expected = {i: one_by_one.check({"id": f"r{i}", "response": texts[i]}) for i in seen}
    expected = {i: reason for i, reason in expected.items() if reason is not None}
    batched, got = NearDedupFilter(), {}
    for start in range(0, len(texts), size):
        chunk = texts[start:start + size]
        batch = pa.record_batch({"id": [f"r{start + j}" for j in range(len(chunk))], "response": chunk})
        alive = [j for j in range(len(chunk)) if j % 17]
        got.update({start + j: reason for j, reason in batched.check_batch(batch, alive).items()})
    assert len(expected) > 100 and any("Jaccard ~1.00" not in r for r in expected.values())
    assert got == expected


def test_exact_dedup_names_the_first_record_across_batches():
    f = ExactDedupFilter()
    first = pa.record_batch({"id": ["a", "b", "c"], "response": ["Hello  World", "other", "hello world "]})
    second = pa.record_batch({"id": ["d", "e"], "response": ["OTHER", "new"]})
    assert f.check_batch(first, [0, 1, 2]) == {2: "duplicate of a"}
    assert f.check_batch(second, [0, 1]) == {0: "duplicate of b"}
    assert f.check({"id": "f", "response": "new"}) == "duplicate of e"


def test_exact_dedup_on_prompt_and_response():
    f = ExactDedupFilter(key="prompt_response")
    asked = [[{"role": "user", "content": "Hi  there"}], [{"role": "user", "content": "Other"}],
             [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "hi there"}], [{"role": "user", "content": "hi THERE "}]]
    batch = pa.record_batch({"id": ["a", "b", "c", "d"], "messages": asked, "response": ["Same", "same", "same", "same"]})
    assert f.check_batch(batch, [0, 1, 2, 3]) == {3: "duplicate of a"}  # the same prompt and answer, normalised
    assert f.check({"id": "e", "messages": asked[1], "response": " SAME"}) == "duplicate of b"
    assert f.check({"id": "f", "messages": asked[1], "response": "same again"}) is None


def test_seen_strings_is_a_set():
    seen = disk_state.SeenStrings("test")
    assert seen.add(["a", "b", "a", "ü"]) == [False, False, True, False]
    assert seen.add(["b", "c", "c", "ü", ""]) == [True, False, True, True, False]
    rng = np.random.default_rng(1)
    words = [f"r{int(i)}" for i in rng.integers(0, 3000, size=20_000)]
    reference: set[str] = set()
    for start in range(0, len(words), 1000):
        chunk = words[start:start + 1000]
        expected = []
        for w in chunk:
            expected.append(w in reference)
            reference.add(w)
        assert seen.add(chunk) == expected
