"""The validation stamp: written only over checked top-k, trusted only over the same bytes."""

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from distill import corpus
from tests.helpers import K, make_corpus, record

VOCAB = 512


def shard(root):
    return corpus.shard_paths(root)[0]


def rewrite(root, change) -> None:
    """Rewrite the shard with `change(table)` applied, its footer (stamp, encoding, stats) kept and
    written as `write_shard` writes: an edit in place that the stamp does not know of."""
    path = shard(root)
    table = pq.read_table(path)
    pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), path,
                   **corpus.store.write_options(table.column_names))


def set_topk_id(table: pa.Table, value: int) -> pa.Table:
    """The first top-k id of the first record set to `value`, in the stored form of any encoding."""
    if corpus.PACKED_IDS in table.column_names:  # re-encode the decoded rows, as stored
        logical = corpus.decode(table).to_pylist()
        logical[0]["topk_token_ids"][0][0] = value
        encoding = corpus.shard_encoding(table.schema)
        stored = corpus.encode(pa.Table.from_pylist(logical), encoding["k"], "quantized", encoding["layout"],
                               encoding.get("dictionary"))
        return table.set_column(table.schema.get_field_index(corpus.PACKED_IDS), corpus.PACKED_IDS,
                                stored[corpus.PACKED_IDS])
    rows = table["topk_token_ids"].to_pylist()
    rows[0][0][0] = value
    return table.set_column(table.schema.get_field_index("topk_token_ids"), "topk_token_ids",
                            pa.array(rows, type=table.schema.field("topk_token_ids").type))


def digest_of(path) -> str:
    """The digest of a shard as a reader computes it: the stored top-k bytes, the response lengths."""
    shard_file = pq.ParquetFile(path)
    return corpus.file_digest(shard_file, path, corpus.stamp.response_rows(shard_file.read()))


@pytest.mark.parametrize("encoding", corpus.LOGPROB_ENCODINGS)
def test_a_stamp_binds_the_stored_top_k(tmp_path, encoding):
    recs = [record(i, n_tokens=2 + i) for i in range(5)]
    root = make_corpus(tmp_path / "c", recs, encoding=encoding, vocab_size=VOCAB, stamped=True)
    stamp = corpus.read_stamp(shard(root))
    largest = max(int(np.max(r["topk_token_ids"])) for r in recs)
    assert stamp == corpus.Stamp(digest_of(shard(root)), K, largest)
    assert corpus.verified_stamp(shard(root)) == stamp
    # sealed in both copies of the footer's metadata: the Arrow schema's and Parquet's own
    assert pq.ParquetFile(shard(root)).metadata.metadata[corpus.STAMP_KEY] == stamp.to_json()
    rewrite(root, lambda t: set_topk_id(t, 7))
    assert corpus.read_stamp(shard(root)) == stamp and corpus.verified_stamp(shard(root)) is None


def test_stamps_of_other_versions_or_unsealed_are_not_trusted(tmp_path):
    root = make_corpus(tmp_path / "c", [record(0)], vocab_size=VOCAB, stamped=True)
    stamp = corpus.read_stamp(shard(root))
    assert corpus.Stamp.from_json(stamp.to_json()) == stamp
    assert corpus.Stamp.from_json(dataclasses.replace(stamp, version=1).to_json()) is None  # hashed decoded values
    table = pq.read_table(shard(root))
    assert corpus.Stamp.from_json(corpus.pending(table, corpus.TopkChecked(K, 3))) is None


def test_records_that_fail_a_check_are_written_without_a_stamp():
    recs = [record(0), record(1, topk_ids=np.full((3, K), 600))]  # outside the vocabulary of 512
    table, checked = corpus.records_to_checked_table(recs, K, "quantized", VOCAB)
    assert checked is None and table.num_rows == 2
    assert corpus.records_to_checked_table(recs, K, "quantized", None)[1] is not None  # no vocabulary known
    assert corpus.records_to_checked_table([record(0), record(0)], K, "quantized", VOCAB)[1] is None  # id twice


def test_write_shard_stamps_the_top_k_it_writes_and_nothing_else(tmp_path):
    table, checked = corpus.records_to_checked_table([record(0)], K, "quantized", VOCAB)
    path = corpus.write_shard(tmp_path, 1, table, checked=checked)
    assert corpus.read_stamp(path) == corpus.Stamp(digest_of(path), K, checked.max_topk_id)
    assert corpus.verified_stamp(path) is not None
    # a table read from a stamped shard and written without `checked` keeps no stale stamp
    assert corpus.read_stamp(corpus.write_shard(tmp_path, 2, pq.read_table(path))) is None


def test_rows_taken_from_stamped_shards_are_stamped_with_their_bound(tmp_path):
    """What curate writes: a subset of a stamped shard's stored rows, stamped with the source's
    largest id as the bound; trusted like generate's."""
    recs = [record(i) for i in range(6)]
    source = make_corpus(tmp_path / "src", recs, vocab_size=VOCAB, stamped=True)
    bound = corpus.read_stamp(shard(source)).max_topk_id
    subset = pq.read_table(shard(source)).filter(pc.is_in(pc.field("id"), pa.array(["r1", "r4"])))
    out = tmp_path / "sub"
    corpus.write_shard(out, 0, subset, checked=corpus.TopkChecked(K, bound))
    corpus.write_manifest(out, corpus.read_manifest(source).model_copy(update={"stats": corpus.corpus_stats(out)}))
    assert corpus.verified_stamp(shard(out)).max_topk_id == bound
    assert [b.max_topk_id for b in corpus.checked_batches(out, trust_stamps=True)] == [bound]


def lying_stamp(root) -> None:
    """The shard's top-k made invalid (an id outside the vocabulary) and its stamp recomputed over
    the new bytes, as if a checked writer had written them: what only a full check can catch."""
    path = shard(root)
    table = set_topk_id(pq.read_table(path), VOCAB + 5)
    meta = dict(table.schema.metadata)
    old = corpus.Stamp.from_json(meta[corpus.STAMP_KEY])
    meta[corpus.STAMP_KEY] = corpus.pending(table, corpus.TopkChecked(old.top_k, old.max_topk_id))
    pq.write_table(table.replace_schema_metadata(meta), path, compression="zstd", write_page_checksum=True)
    corpus.seal(path, corpus.topk_rows(table, corpus.shard_encoding(table.schema)))


@pytest.mark.parametrize("encoding", corpus.LOGPROB_ENCODINGS)
def test_a_reader_trusting_stamps_skips_the_top_k_checks_and_validate_never_does(tmp_path, encoding):
    root = make_corpus(tmp_path / "c", [record(i) for i in range(4)], encoding=encoding, vocab_size=VOCAB, stamped=True)
    lying_stamp(root)
    assert [b.max_topk_id for b in corpus.checked_batches(root, trust_stamps=True)]  # trusted: not decoded
    message = rf"record 'r0', response position 0: {VOCAB + 5}"
    with pytest.raises(corpus.CorpusError, match=message):
        corpus.validate(root)
    with pytest.raises(corpus.CorpusError, match=message):
        list(corpus.checked_batches(root))


def checks(trusting: str):
    """The two readers that trust stamps: train's (the records) and curate's (the verdict only, the
    vouched top-k never read)."""
    if trusting == "checked_batches":
        return lambda root: list(corpus.checked_batches(root, trust_stamps=True))
    return lambda root: corpus.check_records(root, trust_stamps=True)


@pytest.mark.parametrize("trusting", ["checked_batches", "check_records"])
@pytest.mark.parametrize("encoding", corpus.LOGPROB_ENCODINGS)
def test_top_k_edited_under_a_kept_stamp_is_validated_in_full(tmp_path, encoding, trusting):
    root = make_corpus(tmp_path / "c", [record(i) for i in range(4)], encoding=encoding, vocab_size=VOCAB, stamped=True)
    assert checks(trusting)(root)  # trusted
    rewrite(root, lambda t: set_topk_id(t, VOCAB + 5))
    with pytest.raises(corpus.CorpusError) as err:
        checks(trusting)(root)
    assert str(err.value).splitlines()[1] == (
        f"  data/part-00000.parquet: `topk_token_ids` holds 1 id outside the teacher's vocabulary [0, {VOCAB}) "
        f"(first: record 'r0', response position 0: {VOCAB + 5})")


@pytest.mark.parametrize("trusting", ["checked_batches", "check_records"])
def test_a_trusted_shard_still_gets_every_other_check(tmp_path, trusting):
    """The stamp covers the top-k only: a prompt id outside the vocabulary under a kept stamp is
    found without decoding the top-k. A response edited to another length no longer matches the
    top-k rows that the digest binds: the shard is validated in full, which names the length."""
    root = make_corpus(tmp_path / "c", [record(i) for i in range(3)], vocab_size=VOCAB, stamped=True)

    def set_column(table, name, rows):
        return table.set_column(table.schema.get_field_index(name), name, pa.array(rows, type=pa.list_(pa.int32())))

    def prompt_outside(table):
        prompts = table["prompt_token_ids"].to_pylist()
        prompts[2][0] = VOCAB
        return set_column(table, "prompt_token_ids", prompts)

    def longer(table):
        rows = table["response_token_ids"].to_pylist()
        rows[1].append(0)
        return set_column(table, "response_token_ids", rows)

    rewrite(root, prompt_outside)
    assert corpus.verified_stamp(shard(root)) is not None
    with pytest.raises(corpus.CorpusError) as err:
        checks(trusting)(root)
    assert f"`prompt_token_ids` holds 1 id outside the teacher's vocabulary [0, {VOCAB}) (first: record 'r2'" \
        in str(err.value)
    rewrite(root, longer)
    assert corpus.verified_stamp(shard(root)) is None
    with pytest.raises(corpus.CorpusError) as err:
        checks(trusting)(root)
    # layout 3 decodes the top-k given the response tokens: its decoder names the lengths first
    assert "  data/part-00000.parquet: record 'r1': its top-k holds 3 rows but `response_token_ids` 4 tokens" \
        in str(err.value).splitlines()[1:]


@pytest.mark.parametrize("manifest", [{"generation": {"top_k": K + 1}}, {"teacher": {"vocab_size": 400}}])
def test_a_stamp_for_another_k_or_vocabulary_is_not_trusted(tmp_path, manifest):
    """A manifest whose k or vocabulary differs from what the stamp vouched for: the shard is checked
    in full, and refused with the message of the full check."""
    recs = [record(i, topk_ids=np.full((3, K), 450)) for i in range(2)]
    root = make_corpus(tmp_path / "c", recs, vocab_size=VOCAB, stamped=True)
    data = json.loads((root / corpus.MANIFEST).read_text())
    for section, values in manifest.items():
        data[section].update(values)
    (root / corpus.MANIFEST).write_text(json.dumps(data))
    expected = "expected k=5" if "generation" in manifest else "outside the teacher's vocabulary [0, 400)"
    with pytest.raises(corpus.CorpusError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        list(corpus.checked_batches(root, trust_stamps=True))
