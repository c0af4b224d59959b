"""The corpus contract: writer, reader and a validator that catches every broken invariant."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill import corpus, files
from distill.corpus import topk_coder
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


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("width", ["w2", "w3"])
def test_layout1_shards_still_read_identically(width):
    """tests/data/quantized-layout1-*.parquet were written by the layout-1 codec of c11cb65
    (`records_to_table`, before the footer named a layout; k = 4, 3-byte ids in w3, an empty
    response, -inf, a row repeated); the JSON holds what that codec decoded them to. Re-encoded,
    they come back the same in layout 2."""
    path = DATA / f"quantized-layout1-{width}.parquet"
    expected = json.loads((DATA / "quantized-layout1.json").read_text())[width]
    params = corpus.shard_encoding(pq.read_schema(path))
    assert "layout" not in params
    back = corpus.read_shard(path)
    assert back["topk_token_ids"].to_pylist() == expected["topk_token_ids"]
    assert back["topk_logprobs"].to_pylist() == expected["topk_logprobs"]
    encoded = corpus.encode(back, params["k"], "quantized", layout=2)
    assert corpus.shard_encoding(encoded.schema)["layout"] == 2
    again = corpus.decode(encoded)
    assert again["topk_token_ids"].to_pylist() == expected["topk_token_ids"]
    assert again["topk_logprobs"].to_pylist() == expected["topk_logprobs"]
    # the default layout's grid is coarser below -1 nat: the same ids, values within its bound
    encoded = corpus.encode(back, params["k"], "quantized")
    assert corpus.shard_encoding(encoded.schema)["layout"] == corpus.TOPK_LAYOUT == 4
    again = corpus.decode(encoded)
    assert again["topk_token_ids"].to_pylist() == expected["topk_token_ids"]
    got, sent = (np.array([x for r in t for row in r for x in row], dtype=np.float64)
                 for t in (again["topk_logprobs"].to_pylist(), expected["topk_logprobs"]))
    finite = np.isfinite(sent)  # -inf is stored as -1023.98
    assert (got[~finite] < -1000).all() and np.abs(got - sent)[finite].max() <= corpus.QUANTIZED_MAX_ERROR


def test_a_corpus_of_both_layouts_reads_in_every_reader(tmp_path):
    """A corpus begun by a layout-1 distill and resumed by a layout-2 one: each shard decodes with
    its own footer, in `load_dataset` (one decoder per dataset) too."""
    root = make_corpus(tmp_path / "c", [record(0), record(1)])
    shutil.copy(DATA / "quantized-layout1-w2.parquet", root / "data" / "part-00001.parquet")
    expected = json.loads((DATA / "quantized-layout1.json").read_text())["w2"]
    table = corpus.read_table(root)
    assert table["topk_token_ids"].to_pylist()[2:] == expected["topk_token_ids"]
    dataset = corpus.load_dataset(root)
    assert [[list(row) for row in rows] for rows in dataset["topk_token_ids"]] == table["topk_token_ids"].to_pylist()
    assert [[list(row) for row in rows] for rows in dataset["topk_logprobs"]] == table["topk_logprobs"].to_pylist()


def repeating_rows(rng, n: int, k: int, vocab: int) -> np.ndarray:
    """Top-k id rows whose ids recur as a teacher's do: from the row before (in other slots), from
    rows further up, or new."""
    rows = np.zeros((n, k), dtype=np.int64)
    for t in range(n):
        pool = rows[max(0, t - 20):t].reshape(-1)
        row = list(dict.fromkeys(rng.choice(pool, size=min(len(pool), k)).tolist())) if t and rng.random() < 0.8 else []
        while len(row) < k:
            new = int(rng.integers(vocab))
            if new not in row:
                row.append(new)
        rows[t] = rng.permutation(row[:k])
    return rows


@pytest.mark.parametrize("k, vocab, referenced", [(20, 49_152, True), (20, 70_000, True), (4, 6, None), (1, 3, None),
                                                (13, 500, True), (300, 1_000, False)])
def test_layouts_store_the_same_values(k, vocab, referenced):
    """Layout 2 (references to earlier rows, byte codes) decodes to exactly what layout 1 does:
    ids identical to the input, logprobs the same grid values; with ids recurring across rows and
    far up (beyond 255 // k rows), ids past 65,535, rows of k = 1 and k > 255, empty responses,
    differences of 255 and more (escaped) and -inf. `referenced`: whether the writer uses
    references (None: either; k > 255 leaves no reference byte)."""
    rng = np.random.default_rng(k + vocab)
    recs = []
    for i, n in enumerate([0, 1, 2, 40, 0, 7, 200]):
        ids = repeating_rows(rng, n, k, vocab) if vocab >= k else rng.permuted(np.tile(np.arange(k), (n, 1)), axis=1)
        lps = np.sort(np.log(rng.dirichlet(np.full(k + 1, 0.2), size=n))[:, :k], axis=1)[:, ::-1] * rng.uniform(0.5, 40)
        if n:
            lps[-1, -1] = -np.inf
        recs.append(record(i, k=k, topk_ids=ids, topk_logprobs=lps.astype(np.float32)))
    logical = corpus.records_to_table(recs, k, "float32")
    stored = corpus.encode(logical, k, "quantized", layout=2)
    references = [blob[:len(r["topk_token_ids"]) * k] for blob, r in zip(stored[corpus.PACKED_IDS].to_pylist(), recs)]
    assert referenced is None or any(any(b) for b in references) == referenced
    old, new = corpus.decode(corpus.encode(logical, k, "quantized", layout=1)), corpus.decode(stored)
    assert new["topk_token_ids"].to_pylist() == [r["topk_token_ids"].tolist() for r in recs]
    assert new["topk_token_ids"].to_pylist() == old["topk_token_ids"].to_pylist()
    assert new["topk_logprobs"].to_pylist() == old["topk_logprobs"].to_pylist()
    got = np.array(corpus.leaves(new["topk_logprobs"]), dtype=np.float64)
    sent = np.concatenate([r["topk_logprobs"].reshape(-1) for r in recs]).astype(np.float64)
    held = sent > -1000  # below -1023.98 (and -inf) is stored as -1023.98
    assert np.all(np.abs(got - sent)[held] <= corpus.logprob_tolerance("quantized", sent[held]) + 1e-6)


def test_layout2_stores_plain_ids_where_references_do_not_pay():
    """Over a few hundred ids (the demo teacher's 402, Zipf-drawn) a 2-byte id compresses better
    than a reference to it: the writer stores every id as a literal (reference bytes all 0)."""
    rng = np.random.default_rng(0)
    p = 1 / np.arange(1, 403) ** 1.1
    recs = [record(i, k=20, topk_ids=np.stack([rng.choice(402, size=20, replace=False, p=p / p.sum()) for _ in range(60)]))
            for i in range(5)]
    table = corpus.encode(corpus.records_to_table(recs, 20, "float32"), 20, "quantized", layout=2)
    assert not any(any(blob[:60 * 20]) for blob in table[corpus.PACKED_IDS].to_pylist())
    assert corpus.decode(table)["topk_token_ids"].to_pylist() == [r["topk_token_ids"].tolist() for r in recs]

def test_layout2_names_the_record_of_corrupted_bytes():
    recs = [record(0, n_tokens=3), record(1, n_tokens=3)]
    table = corpus.encode(corpus.records_to_table(recs, K, "float32"), K, "quantized", layout=2)
    ids, codes = table[corpus.PACKED_IDS].to_pylist(), table[corpus.LOGPROB_CODES].to_pylist()

    def broken(column: str, values: list) -> pa.Table:
        return table.set_column(table.column_names.index(column), column, pa.array(values, pa.large_binary()))

    cases = [
        (corpus.LOGPROB_CODES, [codes[0], codes[1][:-1]], r"record 'r1': top-k byte strings .* corrupted"),
        (corpus.LOGPROB_CODES, [codes[0], codes[1] + b"\0"], r"record 'r1': .* do not hold 7 bytes per row"),
        (corpus.LOGPROB_CODES, [codes[0], codes[1][:2]], r"record 'r1': .* too short to hold a length"),
        (corpus.PACKED_IDS, [ids[0], ids[1][:-1]], r"record 'r1': .* literal id bytes"),
        # row 0's first id, a literal, made a reference ("slot 0, one row up"): there is no row above
        (corpus.PACKED_IDS, [ids[0], bytes([1]) + ids[1][1:3 * K] + ids[1][3 * K + 2:]],
         r"record 'r1': .* a reference to no earlier row of the record"),
    ]
    for column, values, message in cases:
        with pytest.raises(corpus.CorpusError, match=message):
            corpus.decode(broken(column, values))
    newer = table.replace_schema_metadata({corpus.ENCODING_KEY: json.dumps(
        {**corpus.shard_encoding(table.schema), "layout": max(corpus.TOPK_LAYOUTS) + 1}).encode()})
    with pytest.raises(corpus.CorpusError, match=r"top-k layout 5 is unknown .* newer distill"):
        corpus.decode(newer)


@pytest.mark.parametrize("layout", [3, 4])
def test_range_coded_layouts_name_the_record_of_corrupted_bytes(layout):
    """A record's range-coded strings decode to exactly their bytes: cut short, grown or changed,
    the decoder names the record; and it needs the response tokens the ids were coded with."""
    recs = [record(0, n_tokens=3), record(1, n_tokens=3)]
    table = corpus.encode(corpus.records_to_table(recs, K, "float32"), K, "quantized", layout)
    assert corpus.shard_encoding(table.schema)["layout"] == layout
    ids, codes = table[corpus.PACKED_IDS].to_pylist(), table[corpus.LOGPROB_CODES].to_pylist()

    def broken(column: str, values: list) -> pa.Table:
        return table.set_column(table.column_names.index(column), column, pa.array(values, pa.large_binary()))

    cases = [
        (corpus.LOGPROB_CODES, [codes[0], codes[1][:-1]]),
        (corpus.LOGPROB_CODES, [codes[0], codes[1] + b"\0"]),
        (corpus.PACKED_IDS, [ids[0], ids[1][:-1]]),
        (corpus.PACKED_IDS, [ids[0], ids[1] + b"\0"]),
    ]
    for column, values in cases:
        with pytest.raises(corpus.CorpusError, match=r"record 'r1': top-k byte strings .* do not decode .* corrupted"):
            corpus.decode(broken(column, values))
    with pytest.raises(corpus.CorpusError, match=r"record 'r1': .* too short to hold a length"):
        corpus.decode(broken(corpus.LOGPROB_CODES, [codes[0], codes[1][:2]]))
    with pytest.raises(corpus.CorpusError, match=r"layouts 3 and 4 decode with `response_token_ids`"):
        corpus.decode(table.drop_columns(["response_token_ids"]))
    assert corpus.decode(table)["topk_token_ids"].to_pylist() == [r["topk_token_ids"].tolist() for r in recs]


def test_layout4_codes_later_shards_with_the_first_shards_dictionary_and_names_a_damaged_one(tmp_path):
    """Layout 4's dictionary, learnt from one shard, codes others: ids it never saw escape to
    layout 3's literal code, and the values are the ones layout 3 stores. A footer whose
    dictionary is damaged or missing is named with the shard."""
    first = corpus.records_to_table([record(i, n_tokens=6) for i in range(30)], K)
    dictionary = corpus.shard_encoding(first.schema)["dictionary"]
    learnt = topk_coder.dictionary_of(dictionary)
    assert learnt.classes >= 1 and len(learnt.ids) > 0 and learnt.init.any()
    later = [record(100 + i, n_tokens=5) for i in range(4)]
    later[0]["topk_token_ids"][0] = np.arange(20_000, 20_000 + K)  # ids no record of the first shard holds
    logical = corpus.records_to_table(later, K, "float32")
    stored = corpus.encode(logical, K, "quantized", 4, dictionary)
    assert corpus.shard_encoding(stored.schema)["dictionary"] == dictionary
    by_layout3 = corpus.decode(corpus.encode(logical, K, "quantized", 3))
    assert corpus.decode(stored).to_pylist() == by_layout3.to_pylist()

    path = corpus.write_shard(tmp_path / "c", 0, stored)
    params = corpus.shard_encoding(stored.schema)
    for damaged, message in [({**params, "dictionary": "bm90IGEgZGljdGlvbmFyeQ=="}, "the top-k dictionary is damaged"),
                             ({k: v for k, v in params.items() if k != "dictionary"}, "its top-k dictionary .* is missing")]:
        pq.write_table(stored.replace_schema_metadata({corpus.ENCODING_KEY: json.dumps(damaged).encode()}), path)
        with pytest.raises(corpus.CorpusError, match=rf"part-00000.parquet`: {message}"):
            corpus.read_shard(path)


def test_layout4_keeps_literal_classes_only_where_they_code_the_literals_in_fewer_bytes():
    """Ids drawn from a skewed distribution over a large vocabulary, numbered at random (so an id's
    size says nothing): the dictionary's classes take the literals below layout 3's bytes. A
    few hundred ids numbered by frequency and drawn with replacement (as benchmarks/corpus_scale.py
    draws its synthetic rows: a row may repeat an id, and each repeat is a literal), the frequent
    ones in every record: layout 3's literal code (an id's bit length first) is cheaper, and the
    dictionary keeps no classes, so layout 4 stores no more than layout 3."""
    rng = np.random.default_rng(0)
    popular = rng.permutation(40_000)

    def records(vocabulary: np.ndarray, p: np.ndarray, rows_per_record: int, repeats: bool) -> pa.Table:
        recs = []
        for i in range(60):
            rows = np.array([rng.choice(vocabulary, size=K, replace=repeats, p=p) for _ in range(rows_per_record)])
            recs.append(record(i, topk_ids=rows.tolist(), response_ids=rows[:, 0].tolist()))
        return corpus.records_to_table(recs, K, "float32")

    zipf = 1 / np.arange(1, 40_001) ** 1.1
    few = 1 / np.arange(1, 401)
    for table, classes in ((records(popular, zipf / zipf.sum(), 12, False), True),
                           (records(np.arange(400), few / few.sum(), 120, True), False)):
        layout3, layout4 = (corpus.encode(table, K, "quantized", layout) for layout in (3, 4))
        id_bytes = [pa.compute.sum(pa.compute.binary_length(t[corpus.PACKED_IDS])).as_py() for t in (layout3, layout4)]
        learnt = topk_coder.dictionary_of(corpus.shard_encoding(layout4.schema)["dictionary"])
        assert (learnt.classes > 0) == classes
        assert id_bytes[1] < 0.95 * id_bytes[0] if classes else id_bytes[1] <= id_bytes[0]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_a_layout4_dictionary_of_any_bytes_is_refused_or_decodes_without_crashing(data):
    """Any deflated bytes as a footer's dictionary: refused as damaged, or a dictionary the C
    decoder reads within its bounds (naming the record whose bytes it cannot decode)."""
    import base64
    import zlib

    table = corpus.records_to_table([record(0, n_tokens=3), record(1, n_tokens=3)], 4)
    params = corpus.shard_encoding(table.schema)
    garbage = base64.b64encode(zlib.compress(data)).decode()
    for text in (garbage, base64.b64encode(zlib.compress(bytes([1]) + data)).decode()):  # version 1 headers too
        damaged = table.replace_schema_metadata({corpus.ENCODING_KEY: json.dumps({**params, "dictionary": text}).encode()})
        try:
            decoded = corpus.decode(damaged)
        except corpus.CorpusError as e:
            assert "dictionary is damaged" in str(e) or "record 'r" in str(e)
            continue
        ids = np.array(decoded["topk_token_ids"].to_pylist()[0])
        assert ids.shape == (3, 4) and ((ids >= 0) & (ids < 2**24)).all()


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


def test_a_damaged_encoding_footer_is_refused_and_its_parquet_copy_is_never_read(tmp_path):
    """A footer holds `distill.encoding` twice: in the Arrow schema, and as a Parquet key-value pair
    (which pyarrow gives each batch it reads). Validate and every reader take the Arrow schema's, so
    damage to the other copy is harmless, and damage to the one read is refused, naming the shard."""
    root = make_corpus(tmp_path / "c", [record(0), record(1)])
    before = list(corpus.iter_records(root))
    path = corpus.shard_paths(root)[0]
    raw = path.read_bytes()
    assert raw.count(b'{"encoding": "quantized"') == 1  # the key-value copy; the Arrow schema's is base64
    path.write_bytes(raw.replace(b'{"encoding": "quantized"', b'{"encoding": "quantizeX"'))
    corpus.validate(root)
    assert list(corpus.iter_records(root)) == before and corpus.read_shard(path).num_rows == 2

    table = pq.read_table(path)
    for damaged in (b'{"encoding": "quantizeX"}', b'\xfb{"encoding"', b'{"encodin": "quantized"}', b'[]'):
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, corpus.ENCODING_KEY: damaged}), path)
        with pytest.raises(corpus.CorpusError, match="`distill.encoding` footer is damaged"):
            corpus.validate(root)
        for read in (lambda: list(corpus.iter_records(root)), lambda: corpus.read_shard(path)):
            with pytest.raises(corpus.CorpusError, match=f"`{path}`: its `distill.encoding` footer is damaged"):
                read()


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


# -- shards written by other tools, and types -------------------------------------------------------

def pandas_corpus(root, recs, **manifest):
    """A shard as `pandas.DataFrame.to_parquet` writes plain lists: int64 ids, float64 logprobs,
    no distill footer; a manifest without `logprob_encoding` (and without stats in the footer)."""
    import pandas as pd

    rows = [{key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in r.items()} for r in recs]
    (root / "data").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "data" / "part-00000.parquet")
    corpus.write_manifest(root, corpus.Manifest(teacher={"model": "t", **manifest}, generation={"top_k": K},
                                                stats=corpus.corpus_stats(root)))
    return root


def test_a_pandas_written_shard_reads_with_the_contract_types(tmp_path):
    recs = [record(i) for i in range(3)]
    root = pandas_corpus(tmp_path / "c", recs)
    stored = pq.read_schema(root / "data" / "part-00000.parquet")
    assert stored.field("response_token_ids").type.value_type == pa.int64()  # what the reader has to take
    assert stored.field("topk_logprobs").type.value_type.value_type == pa.float64()
    assert corpus.validate(root) == {"records": 3, "response_tokens": 9}
    table = corpus.read_table(root)
    for name in ("prompt_token_ids", "response_token_ids", "topk_token_ids", "response_logprobs", "topk_logprobs"):
        assert corpus.arrow_schema("float32").field(name).type.equals(table.schema.field(name).type), name
    for got, sent in zip(corpus.iter_records(root), recs):
        assert got["response_token_ids"] == sent["response_token_ids"]
        np.testing.assert_array_equal(np.array(got["topk_token_ids"]), sent["topk_token_ids"])
        np.testing.assert_array_equal(np.array(got["topk_logprobs"], dtype=np.float32), sent["topk_logprobs"])
    dataset = corpus.load_dataset(root)  # what train reads
    assert dataset.features["topk_token_ids"].feature.feature.dtype == "int32"
    assert [list(map(list, x)) for x in dataset["topk_token_ids"]] == [r["topk_token_ids"].tolist() for r in recs]


def test_an_id_that_does_not_fit_is_one_error_naming_record_and_position(tmp_path):
    recs = [record(0), record(1)]
    recs[1]["response_token_ids"] = [0, 2**40, 2]
    root = pandas_corpus(tmp_path / "c", recs)
    with pytest.raises(corpus.CorpusError) as err:
        corpus.validate(root)
    message = str(err.value)
    assert "data/part-00000.parquet: record 'r1', response position 1: `response_token_ids` holds 1099511627776, which " \
           "does not fit a token id (int32)" in message
    assert len(message.splitlines()) == 2 and "shards hold" not in message  # the header and one problem
    with pytest.raises(corpus.CorpusError, match=r"part-00000.parquet`: record 'r1', response position 1: `response_token_ids`"):
        list(corpus.iter_records(root))


def test_a_column_of_another_kind_is_reported_once(tmp_path):
    recs = [record(0), record(1)]
    for r in recs:
        r["response_token_ids"] = [str(t) for t in r["response_token_ids"]]
    root = pandas_corpus(tmp_path / "c", recs)
    with pytest.raises(corpus.CorpusError) as err:
        corpus.validate(root)
    assert str(err.value).splitlines()[1:] == [
        "  data/part-00000.parquet: `response_token_ids` has type list<element: string>, expected list<item: int32>"]


@pytest.mark.parametrize("encoding", ["float32", "float16"])
def test_a_manifest_without_an_encoding_takes_the_shards_own_types(tmp_path, encoding):
    recs = [record(0), record(1)]
    root = make_corpus(tmp_path / "c", recs, encoding=encoding)
    data = json.loads((root / "manifest.json").read_text())
    del data["generation"]["logprob_encoding"]
    (root / "manifest.json").write_text(json.dumps(data))
    assert corpus.read_manifest(root).generation.logprob_encoding is None
    assert corpus.validate(root)["records"] == 2
    lp = pa.float32() if encoding == "float32" else pa.float16()
    assert corpus.read_table(root).schema.field("topk_logprobs").type.value_type.value_type == lp
    if encoding == "float32":  # exact: not taken for quantized
        back = [np.array(r["topk_logprobs"], dtype=np.float32) for r in corpus.iter_records(root)]
        for got, sent in zip(back, recs):
            np.testing.assert_array_equal(got, sent["topk_logprobs"])


# -- token ids against the teacher's vocabulary ----------------------------------------------------

def set_id(column: str, position: tuple, value: int):
    def change(r):
        r[column] = np.array(r[column]).copy()
        r[column][position] = value
        r[column] = r[column] if column == "topk_token_ids" else r[column].tolist()
    return change


@pytest.mark.parametrize("encoding, change, message", [
    ("quantized", set_id("response_token_ids", 1, 99999),
     "`response_token_ids` holds 1 id outside the teacher's vocabulary [0, 512) (first: record 'r1', "
     "response position 1: 99999)"),
    ("quantized", set_id("prompt_token_ids", 2, 512),
     "`prompt_token_ids` holds 1 id outside the teacher's vocabulary [0, 512) (first: record 'r1', "
     "prompt position 2: 512)"),
    ("quantized", set_id("topk_token_ids", (2, 3), 70_000),
     "`topk_token_ids` holds 1 id outside the teacher's vocabulary [0, 512) (first: record 'r1', "
     "response position 2: 70000)"),
    ("float16", set_id("topk_token_ids", (1, 0), -5),
     "`topk_token_ids` holds 1 id outside the teacher's vocabulary [0, 512) (first: record 'r1', "
     "response position 1: -5)"),
    ("float32", set_id("response_token_ids", 0, -1),
     "`response_token_ids` holds 1 id outside the teacher's vocabulary [0, 512) (first: record 'r1', "
     "response position 0: -1)"),
])
def test_validate_refuses_token_ids_outside_the_vocabulary(tmp_path, encoding, change, message):
    recs = [record(0), record(1), record(2)]
    change(recs[1])
    root = make_corpus(tmp_path / "c", recs, encoding=encoding, vocab_size=512)
    with pytest.raises(corpus.CorpusError) as err:
        corpus.validate(root)
    assert str(err.value).splitlines()[1:] == [f"  data/part-00000.parquet: {message}"]


def test_without_a_recorded_vocabulary_negative_ids_are_still_refused(tmp_path):
    large = [record(0), record(1)]
    set_id("response_token_ids", 1, 99999)(large[1])
    assert corpus.validate(make_corpus(tmp_path / "a", large, encoding="float16"))["records"] == 2
    negative = [record(0), record(1)]
    set_id("topk_token_ids", (0, 1), -5)(negative[1])
    with pytest.raises(corpus.CorpusError, match=r"`topk_token_ids` holds 1 id below 0 \(first: record 'r1', "
                                                 r"response position 0: -5\)"):
        corpus.validate(make_corpus(tmp_path / "b", negative, encoding="float16"))


def test_checking_shards_in_worker_processes_finds_what_reading_them_in_order_finds(tmp_path):
    """`check_records` over a process pool (how curate checks a corpus before its work) against
    `checked_batches` in one process: the same problems, an id repeated across shards among them,
    and on a clean corpus the same largest top-k id."""
    from concurrent.futures import ProcessPoolExecutor

    root = make_corpus(tmp_path / "c", [record(i) for i in range(4)], vocab_size=512, stamped=True)
    table, checked = corpus.records_to_checked_table([record(i) for i in range(4, 8)], K, corpus.DEFAULT_ENCODING, 512)
    corpus.write_shard(root, 1, table, checked=checked)
    manifest = corpus.read_manifest(root)
    manifest.stats = corpus.corpus_stats(root)
    corpus.write_manifest(root, manifest)
    largest = max(b.max_topk_id for b in corpus.checked_batches(root, trust_stamps=True))
    with ProcessPoolExecutor(2) as pool:
        assert corpus.check_records(root, trust_stamps=True, map_shards=pool.map) == largest

        broken = [record(i) for i in range(4, 8)]
        broken[0]["id"] = "r1"  # in the first shard too
        broken[2]["response_logprobs"] = broken[2]["response_logprobs"][:-1]
        corpus.write_shard(root, 1, corpus.records_to_table(broken, K))
        manifest.stats.records = 9
        corpus.write_manifest(root, manifest)
        problems = []
        for check in (lambda: list(corpus.checked_batches(root, trust_stamps=True)),
                      lambda: corpus.check_records(root, trust_stamps=True, map_shards=pool.map)):
            with pytest.raises(corpus.CorpusError) as err:
                check()
            problems.append(sorted(str(err.value).splitlines()))
    assert problems[0] == problems[1] and len(problems[0]) == 4, problems
    assert any("part-00001.parquet: duplicate id 'r1'" in p for p in problems[0])
    assert any("`stats.records` is 9 but the shards hold 8" in p for p in problems[0])
    for workers in (0, 2):  # `validate` (`inspect --check`) in one process and over its own pool
        with pytest.raises(corpus.CorpusError) as err:
            corpus.validate(root, workers=workers)
        assert sorted(str(err.value).splitlines()) == problems[0], workers


@pytest.mark.parametrize("trust_stamps", [False, True])
def test_checked_batches_yield_only_clean_records_then_raise(tmp_path, trust_stamps):
    """Reading and validating in one pass (what train does before step 1): a batch with a problem
    is never handed out, and the problems are raised once the shards are read; trusting stamps or
    not, the same records and the same largest top-k id."""
    recs = [record(i) for i in range(3)]
    good = make_corpus(tmp_path / "good", recs, vocab_size=512, stamped=True)
    batches = list(corpus.checked_batches(good, batch_size=2, trust_stamps=trust_stamps))
    assert pa.Table.from_batches([b.decoded() for b in batches]).equals(corpus.read_table(good))
    largest = max(max(map(max, r["topk_token_ids"])) for r in corpus.iter_records(good))
    assert max(b.max_topk_id for b in batches) == largest
    recs[1]["response_token_ids"] = [0, 99999, 2]
    bad = make_corpus(tmp_path / "bad", recs, vocab_size=512, stamped=True)
    seen = []
    with pytest.raises(corpus.CorpusError, match=r"record 'r1', response position 1: 99999"):
        for batch in corpus.checked_batches(bad, batch_size=1, trust_stamps=trust_stamps):
            seen += batch.stored.column("id").to_pylist()
    assert seen == ["r0", "r2"]
