"""`distill curate` keeps the same records, with the same reasons and the same stored bytes, as
the per-batch implementation it replaced. tests/data/curate_expectations.json was recorded by the
old implementation (`python -m tests.test_curate_equivalence --record`, run before the rewrite)
on the corpora built here: three shards of records with planted rejects for every default filter
(duplicates across batches and shards included) and a plug-in that reads the decoded top-k, in a
quantized and a float32 corpus, curated in batches of 50 so that batch edges fall inside shards."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill import corpus
from distill.config import CurateConfig
from distill.curation.pipeline import curate
from distill.tiny import WORDS
from tests.helpers import record

EXPECTATIONS = Path(__file__).parent / "data" / "curate_expectations.json"
K = 5
SHARDS, PER_SHARD = 3, 120
FILTERS = ["finish_reason", "length", "repetition", "refusal", "pii", "dedup_exact", "dedup_near",
           "teacher_confidence", {"name": "top_id_sevens", "plugin": "tests.test_curate_equivalence:top_id_sevens"}]


def top_id_sevens(record: dict) -> str | None:
    """A plug-in that reads the decoded top-k: rejects records whose first top-k id is a multiple of 7."""
    return "first top-k id is a multiple of 7" if record["topk_token_ids"][0][0] % 7 == 0 else None


def planted_records() -> list[list[dict]]:
    """Records per shard: mostly clean unique answers, and every few records a planted reject."""
    rng = np.random.default_rng(0)
    texts: list[str] = []
    shards = []
    for s in range(SHARDS):
        records = []
        for j in range(PER_SHARD):
            i = s * PER_SHARD + j
            text = " ".join(WORDS[w] for w in rng.integers(0, len(WORDS), size=int(rng.integers(20, 60))))
            parts: dict = {}
            kind = i % 13
            if kind == 1:
                parts["finish_reason"] = "length"
            elif kind == 2 and i % 2:
                text = "   "
            elif kind == 3:
                text = "I like trains. " * 30
            elif kind == 4:
                text = "As an AI language model, I cannot help with that request."
            elif kind == 5:
                text = f"Write to person{i}@example.com for the details."
            elif kind == 6 and texts:
                text = texts[int(rng.integers(0, len(texts)))].upper()  # exact duplicate, maybe across shards
            elif kind == 7 and texts:
                words = texts[int(rng.integers(0, len(texts)))].split()
                words[len(words) // 2] = "zebra"  # one word changed: a near duplicate
                text = " ".join(words)
            elif kind == 8:
                parts["top1"] = -4.0
            if kind in (0, 9, 10, 11, 12):
                texts.append(text)  # the clean ones: what later records duplicate
            n = int(rng.integers(2, 9))
            records.append(record(i, k=K, n_tokens=n, response=text, **parts))
        shards.append(records)
    return shards


def build(root: Path, encoding: str) -> Path:
    for index, records in enumerate(planted_records()):
        # top-k layout 1, as when the expectations were recorded: curate copies stored bytes in any layout
        logical = corpus.records_to_table(records, K, "float32")
        corpus.write_shard(root, index, corpus.encode(logical, K, encoding, layout=1))
    corpus.write_manifest(root, corpus.Manifest(teacher={"model": "t"}, generation={"top_k": K, "logprob_encoding": encoding},
                                                stats=corpus.corpus_stats(root)))
    return root


def outcome(out: Path) -> dict:
    """Per output shard: the ids in order, the reasons of rejected ones, a digest of the stored columns."""
    result = {}
    for subdir in ("data", "rejected"):
        for path in corpus.shard_paths(out, subdir):
            table = pq.read_table(path)
            rows = json.dumps(table.to_pylist(), sort_keys=True, default=lambda b: b.hex()).encode()
            result[f"{subdir}/{path.name}"] = {
                "ids": table["id"].to_pylist(),
                "reasons": table["reject_reason"].to_pylist() if subdir == "rejected" else None,
                "schema": str(table.schema.remove_metadata()), "metadata": footer(table),
                "sha256": hashlib.sha256(rows).hexdigest()}
    return result


def footer(table) -> dict[str, str]:
    """The shard's footer metadata (its encoding, its stats), but the validation stamp that curate
    now adds (checked by `test_every_curated_shard_is_stamped`)."""
    return {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != corpus.STAMP_KEY}


def run(tmp: Path, encoding: str, workers: int = 0) -> dict:
    source = build(tmp / f"corpus-{encoding}", encoding)
    result = curate(CurateConfig(corpus=source, out=tmp / f"curated-{encoding}", filters=FILTERS, batch_size=50,
                                 workers=workers))
    return {"kept": result.kept, "rejected": result.rejected, "rejected_by_filter": result.rejected_by_filter,
            "shards": outcome(result.path)}


@pytest.mark.parametrize(("encoding", "workers"), [("quantized", 0), ("float32", 0), ("quantized", 2)])
def test_curated_corpus_is_the_old_implementations(tmp_path, encoding, workers):
    """In the curating process alone, and with the filters that judge records alone in 2 workers."""
    expected = json.loads(EXPECTATIONS.read_text())[encoding]
    got = run(tmp_path, encoding, workers)
    assert got["rejected_by_filter"] == expected["rejected_by_filter"]
    assert set(got["shards"]) == set(expected["shards"])
    for name, shard in expected["shards"].items():
        assert got["shards"][name]["ids"] == shard["ids"], name
        assert got["shards"][name]["reasons"] == shard["reasons"], name
        assert got["shards"][name]["schema"] == shard["schema"], name
        assert got["shards"][name]["metadata"] == shard["metadata"], name
        assert got["shards"][name]["sha256"] == shard["sha256"], f"{name}: stored values differ"
    assert (got["kept"], got["rejected"]) == (expected["kept"], expected["rejected"])


def test_every_curated_shard_is_stamped(tmp_path):
    """Curate's shards (kept and rejected) carry a stamp that vouches for their top-k, bounded by
    the source's largest top-k id, so readers skip decoding it."""
    source = build(tmp_path / "corpus", "quantized")
    result = curate(CurateConfig(corpus=source, out=tmp_path / "curated", filters=FILTERS[:-1], batch_size=50))
    largest = max(b.max_topk_id for b in corpus.checked_batches(source))
    paths = corpus.shard_paths(result.path) + corpus.shard_paths(result.path, "rejected")
    assert len(paths) == 2 * SHARDS
    for path in paths:
        stamp = corpus.verified_stamp(path)
        assert stamp is not None and (stamp.top_k, stamp.max_topk_id) == (K, largest), path


def test_a_stamped_shard_whose_top_k_was_edited_is_validated_in_full(tmp_path):
    source = build(tmp_path / "corpus", "float32")  # float32 stores any row, an unsorted one too
    curated = curate(CurateConfig(corpus=source, out=tmp_path / "curated", filters=FILTERS[:-1])).path
    path = corpus.shard_paths(curated)[0]
    stored = pq.read_table(path)
    rows = stored.to_pylist()
    rows[0]["topk_logprobs"][0] = sorted(rows[0]["topk_logprobs"][0])  # worst first
    assert corpus.STAMP_KEY in stored.schema.metadata
    pq.write_table(pa.Table.from_pylist(rows, schema=stored.schema), path)  # the footer (and stamp) kept
    with pytest.raises(corpus.CorpusError, match="part-00000.parquet: `topk_logprobs` rows are not sorted best first"):
        curate(CurateConfig(corpus=curated, out=tmp_path / "again", filters=FILTERS[:-1]))


def test_every_planted_kind_is_rejected():
    """The expectations are not vacuous: every filter of the pipeline rejected something."""
    expected = json.loads(EXPECTATIONS.read_text())
    for encoding in ("quantized", "float32"):
        assert all(n > 0 for n in expected[encoding]["rejected_by_filter"].values()), expected[encoding]
        assert expected[encoding]["kept"] > 100


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        EXPECTATIONS.parent.mkdir(exist_ok=True)
        EXPECTATIONS.write_text(json.dumps({e: run(Path(tmp), e) for e in ("quantized", "float32")}, indent=1) + "\n")
    print(f"wrote {EXPECTATIONS}")
