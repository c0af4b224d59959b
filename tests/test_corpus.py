"""The corpus contract: writer, reader and a validator that catches every broken invariant."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill import corpus, files
from tests.helpers import K, make_corpus, record


@pytest.mark.parametrize("encoding", corpus.LOGPROB_ENCODINGS)
def test_roundtrip_and_validate(tmp_path, encoding):
    recs = [record(i, n_tokens=2 + i) for i in range(5)]
    root = make_corpus(tmp_path / "c", recs, encoding=encoding)
    assert corpus.validate(root) == {"records": 5, "response_tokens": sum(2 + i for i in range(5))}
    assert corpus.read_manifest(root).generation.logprob_encoding == encoding
    assert corpus.shard_encoding(pq.read_schema(root / "data" / "part-00000.parquet"))["encoding"] == encoding
    back = list(corpus.iter_records(root))
    assert [r["id"] for r in back] == [r["id"] for r in recs]
    for got, sent in zip(back, recs):
        np.testing.assert_array_equal(np.array(got["topk_token_ids"]), sent["topk_token_ids"])
        stored, exact = np.array(got["topk_logprobs"], dtype=np.float64), sent["topk_logprobs"]
        assert np.all(np.abs(stored - exact) <= corpus.logprob_tolerance(encoding, exact) + 1e-7)
    # every reader gives the same logical records: datasets (training), column subsets, tables
    dataset = corpus.load_dataset(root)
    assert list(dataset["id"]) == [r["id"] for r in recs]
    assert [list(map(list, x)) for x in dataset["topk_token_ids"]] == [r["topk_token_ids"] for r in back]
    assert [list(map(list, x)) for x in dataset["topk_logprobs"]] == [r["topk_logprobs"] for r in back]
    only = next(corpus.iter_batches(root, columns=["topk_logprobs", "id"]))
    assert only.schema.names == ["topk_logprobs", "id"] and only.column(0).to_pylist() == [r["topk_logprobs"] for r in back]
    assert corpus.read_table(root).column_names[:10] == list(corpus.COLUMNS)
    assert not list((root / "data").glob(".*tmp*"))  # the atomic write left no temp file
    # Plain pyarrow reads it, and each shard carries its own counts.
    assert pq.read_table(root / "data" / "part-00000.parquet").num_rows == 5
    assert corpus.shard_stats(root / "data" / "part-00000.parquet")["records"] == 5


def test_float32_storage_is_exact(tmp_path):
    recs = [record(0)]
    root = make_corpus(tmp_path / "c", recs, encoding="float32")
    back = next(corpus.iter_records(root))
    np.testing.assert_array_equal(np.array(back["topk_logprobs"], dtype=np.float32), recs[0]["topk_logprobs"])


def teacher_rows(n: int, k: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of softmax distributions from near one-hot to flat, as a teacher gives them
    (over 4,000 of the `vocab` ids, the rest with probability 0)."""
    rng = np.random.default_rng(seed)
    support = rng.choice(vocab, size=4000, replace=False)
    logits = rng.standard_normal((n, len(support))) * rng.uniform(0.5, 12.0, size=(n, 1))
    logprobs = logits - logits.max(1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(1, keepdims=True))
    best = np.argsort(-logprobs, axis=1)[:, :k]
    return support[best], np.take_along_axis(logprobs, best, axis=1)


def test_quantized_error_bounds_on_teacher_like_rows(tmp_path):
    """Ids exact (also past 65,535: 3-byte ids), every logprob within QUANTIZED_MAX_ERROR, and the
    mass outside the top-k (the KD loss's tail bin) within 0.8 % where it holds at most half."""
    k, vocab = 20, 70_000
    ids, lps = teacher_rows(600, k, vocab)
    lps[0, -1] = -np.inf  # engines may report -inf: stored as -1023.98 nats, probability 0
    recs = [record(i, k=k, topk_ids=ids[100 * i:100 * (i + 1)], topk_logprobs=lps[100 * i:100 * (i + 1)].astype(np.float32))
            for i in range(6)]
    root = make_corpus(tmp_path / "c", recs, k=k)
    back = corpus.read_table(root)
    got_ids = np.array(back["topk_token_ids"].combine_chunks().flatten().flatten()).reshape(-1, k)
    got = np.array(back["topk_logprobs"].combine_chunks().flatten().flatten(), dtype=np.float64).reshape(-1, k)
    np.testing.assert_array_equal(got_ids, ids)
    exact = lps.astype(np.float32).astype(np.float64)
    assert abs(got[0, -1] + 65535 * corpus.QUANT_STEP) < corpus.QUANT_STEP / 2
    finite = np.isfinite(exact)
    assert np.abs(got - exact)[finite].max() <= corpus.QUANTIZED_MAX_ERROR + 1e-5
    tail, tail_back = 1 - np.exp(exact).sum(1), 1 - np.exp(got).sum(1)
    small = tail <= 0.5
    assert np.all(np.abs(tail_back - tail)[small] <= 0.008 * tail[small] + 1e-6)


def test_quantized_writer_refuses_what_it_cannot_store():
    bad = record(1)
    bad["topk_logprobs"][1, 2] = np.nan
    with pytest.raises(corpus.CorpusError, match=r"record 'r1', response position 1: a NaN or positive top-k logprob"):
        corpus.records_to_table([record(0), bad], K)
    unsorted = record(2)
    unsorted["topk_logprobs"] = unsorted["topk_logprobs"][:, ::-1].copy()
    with pytest.raises(corpus.CorpusError, match=r"record 'r2', response position 0: top-k logprobs not sorted best first"):
        corpus.records_to_table([unsorted], K)


def test_validate_detects_a_corrupted_quantized_shard_and_a_wrong_manifest(tmp_path):
    root = make_corpus(tmp_path / "c", [record(0), record(1)])
    shard = root / "data" / "part-00000.parquet"
    table = pq.read_table(shard)
    codes = table[corpus.LOGPROB_CODES].to_pylist()
    codes[1] = codes[1][:-2]  # record r1 loses a code
    broken = table.set_column(table.column_names.index(corpus.LOGPROB_CODES), corpus.LOGPROB_CODES,
                              pa.array(codes, pa.large_binary()))
    pq.write_table(broken, shard)
    with pytest.raises(corpus.CorpusError, match=r"part-00000.parquet: record 'r1': top-k byte strings .* corrupted"):
        corpus.validate(root)
    with pytest.raises(corpus.CorpusError, match="corrupted"):
        list(corpus.iter_records(root))

    fine = make_corpus(tmp_path / "d", [record(0)], encoding="float16")
    manifest = corpus.read_manifest(fine)
    manifest.generation.logprob_encoding = "quantized"
    corpus.write_manifest(fine, manifest)
    with pytest.raises(corpus.CorpusError, match="stored as `float16` but the manifest says `generation.logprob_encoding: quantized`"):
        corpus.validate(fine)


def test_manifests_from_before_encodings_had_names_still_read(tmp_path):
    root = make_corpus(tmp_path / "c", [record(0)], encoding="float32")
    data = json.loads((root / "manifest.json").read_text())
    data["generation"]["logprob_dtype"] = data["generation"].pop("logprob_encoding")
    (root / "manifest.json").write_text(json.dumps(data))
    generation = corpus.read_manifest(root).dump()["generation"]
    assert generation["logprob_encoding"] == "float32" and "logprob_dtype" not in generation
    corpus.validate(root)


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
        corpus.validate(make_corpus(tmp_path / "c", recs, encoding="float16"))  # stored as given


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
