"""The corpus contract: writer, reader and a validator that catches every broken invariant."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from distill import corpus, files
from tests.helpers import K, make_corpus, record


def test_roundtrip_and_validate(tmp_path):
    recs = [record(i, n_tokens=2 + i) for i in range(5)]
    root = make_corpus(tmp_path / "c", recs)
    assert corpus.validate(root) == {"records": 5, "response_tokens": sum(2 + i for i in range(5))}
    back = list(corpus.iter_records(root))
    assert [r["id"] for r in back] == [r["id"] for r in recs]
    np.testing.assert_array_equal(np.array(back[2]["topk_token_ids"]), recs[2]["topk_token_ids"])
    # float16 storage: the documented bound |x| * 2^-11
    stored, exact = np.array(back[2]["topk_logprobs"]), recs[2]["topk_logprobs"]
    assert np.all(np.abs(stored - exact) <= np.abs(exact) * corpus.FLOAT16_RELATIVE_ERROR + 1e-7)
    assert list(corpus.load_dataset(root)["id"]) == [r["id"] for r in recs]
    assert not list((root / "data").glob(".*tmp*"))  # the atomic write left no temp file
    # Plain pyarrow reads it, and each shard carries its own counts.
    assert pq.read_table(root / "data" / "part-00000.parquet").num_rows == 5
    assert corpus.shard_stats(root / "data" / "part-00000.parquet")["records"] == 5


def test_float32_storage_is_exact(tmp_path):
    recs = [record(0)]
    root = make_corpus(tmp_path / "c", recs, logprob_dtype="float32")
    back = next(corpus.iter_records(root))
    np.testing.assert_array_equal(np.array(back["topk_logprobs"], dtype=np.float32), recs[0]["topk_logprobs"])


@pytest.mark.parametrize("break_it, message", [
    (lambda r: r.__setitem__("response_logprobs", r["response_logprobs"][:-1]), "`response_logprobs` length differs"),
    (lambda r: r.__setitem__("topk_token_ids", r["topk_token_ids"][:-1]), "`topk_token_ids` length differs"),
    (lambda r: r.__setitem__("id", "r0"), "duplicate id 'r0'"),
    (lambda r: r.__setitem__("prompt_token_ids", []), "empty `prompt_token_ids`"),
    (lambda r: r.__setitem__("topk_logprobs", r["topk_logprobs"][:, ::-1].copy()), "not sorted best first"),
    (lambda r: r.__setitem__("loss_mask", [True]), "`loss_mask` length differs"),
    (lambda r: r["topk_logprobs"].__setitem__((1, 2), np.nan),
     "`topk_logprobs` holds 1 non-finite values (first: record 'r1', response position 1)"),
    (lambda r: r["response_logprobs"].__setitem__(2, -np.inf),
     "`response_logprobs` holds 1 non-finite values (first: record 'r1', response position 2)"),
])
def test_validate_names_each_broken_invariant(tmp_path, break_it, message):
    recs = [record(0), record(1)]
    break_it(recs[1])
    with pytest.raises(corpus.CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")):
        corpus.validate(make_corpus(tmp_path / "c", recs))


def test_validate_checks_k_and_manifest_stats(tmp_path):
    root = make_corpus(tmp_path / "c", [record(0), record(1)])
    manifest = corpus.read_manifest(root)
    manifest.generation.top_k = K + 1
    manifest.stats.records = 3
    corpus.write_manifest(root, manifest)
    with pytest.raises(corpus.CorpusError) as err:
        corpus.validate(root)
    assert f"expected k={K + 1}" in str(err.value) and "`stats.records` is 3 but the shards hold 2" in str(err.value)


def test_not_a_corpus(tmp_path):
    with pytest.raises(corpus.CorpusError, match="does not exist: not a distill corpus"):
        corpus.validate(tmp_path)


def test_partial_files_are_removed_but_shards_kept(tmp_path):
    root = make_corpus(tmp_path / "c", [record(0)])
    (root / "data" / ".part-00001.parquet.tmp-123").write_bytes(b"half a shard")
    files.remove_partial_files(root)
    assert [p.name for p in (root / "data").iterdir()] == ["part-00000.parquet"]
    assert json.loads((root / "manifest.json").read_text())["stats"]["records"] == 1
