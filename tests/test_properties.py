"""Property-based tests (hypothesis): any prompt file is parsed or refused in one line naming
where; any corruption of a valid corpus is caught by `corpus.validate` (or left the records
as they were). Bounded example counts keep them in the fast tier."""

import csv
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distill import corpus
from distill.generate.prompts import ROLES, BadRecord, Prompt, PromptError, iter_prompts
from tests.helpers import record

# Bounded: each corpus example writes and validates Parquet files (about 0.1 s).
PROMPT_FILES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CORRUPTIONS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- prompt files ---------------------------------------------------------------------------------

# Any character, lone surrogates and control characters included, now and then a huge field.
short_text = st.text(st.characters(exclude_categories=()), max_size=12)
text = st.one_of(short_text, short_text, short_text, st.integers(0, 200_000).map(lambda n: "y" * n))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | short_text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
                           max_leaves=8)
role = st.sampled_from([*ROLES, "human", "gpt", "robot"]) | json_values
turn = st.fixed_dictionaries({"role": role, "content": text | json_values}) | st.fixed_dictionaries(
    {"from": role, "value": text | json_values}) | json_values
records = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4) | json_values}, optional={"id": json_values}),
    st.fixed_dictionaries({"conversations": st.lists(turn, max_size=4) | json_values}),
    st.fixed_dictionaries({"instruction": text | json_values}, optional={"input": text, "output": text, "system": text}),
    st.fixed_dictionaries({"prompt": text | json_values}, optional={"response": text, "id": short_text}),
    json_values,
)
# A line of raw bytes (invalid UTF-8 included), never a line break.
raw_line = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))


@st.composite
def prompt_files(draw) -> tuple[str, bytes]:
    """(suffix, file bytes) in every container, from well-formed to garbage."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
    rows = draw(st.lists(records, max_size=5))
    ascii_only = draw(st.booleans())
    dump = lambda obj: json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    if suffix == ".jsonl":
        lines = [draw(st.one_of(st.just(dump(r)), raw_line)) for r in rows]
        return suffix, b"\n".join(lines) + draw(st.sampled_from([b"", b"\n"]))
    if suffix == ".json":
        return suffix, draw(st.one_of(st.just(dump(rows)), st.just(dump({"data": rows})), st.binary(max_size=60)))
    if suffix == ".csv":
        columns = draw(st.lists(st.sampled_from(["prompt", "messages", "instruction", "input", "id", "output"]),
                                min_size=1, max_size=3, unique=True))
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(columns)
        for r in rows:
            cells = [json.dumps(r.get(c)) if c == "messages" and isinstance(r, dict) else draw(text) for c in columns]
            writer.writerow(cells[: draw(st.integers(0, len(cells) + 1))] + ([] if draw(st.booleans()) else ["extra"]))
        return suffix, buffer.getvalue().encode("utf-8", "surrogatepass")
    # Parquet: one string column per field (Parquet holds valid UTF-8 only)
    plain = st.text(max_size=12) | st.integers(0, 200_000).map(lambda n: "z" * n)
    column = draw(st.sampled_from(["prompt", "instruction", "text"]))
    table = pa.table({column: draw(st.lists(plain, max_size=5))})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    data = sink.getvalue()
    return suffix, data if draw(st.booleans()) else data[: draw(st.integers(0, len(data)))]


@PROMPT_FILES
@given(prompt_files(), st.sampled_from(["auto", "messages", "sharegpt", "alpaca", "prompt"]), st.booleans())
def test_any_prompt_file_is_parsed_or_refused_in_one_line_naming_where(file, fmt, with_response):
    suffix, data = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"prompts{suffix}"
        path.write_bytes(data)
        try:
            items = list(iter_prompts(path, fmt, with_response=with_response))
        except PromptError as e:  # the whole file is unusable: one line naming it
            assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
            return
    for item in items:
        if isinstance(item, BadRecord):
            assert "\n" not in str(item) and str(item).startswith(f"{path} "), str(item)
            assert item.where.split()[-2] in ("line", "record") and item.where.split()[-1].isdigit()
            continue
        assert isinstance(item, Prompt)
        assert item.messages and all(m["role"] in ROLES and isinstance(m["content"], str) for m in item.messages)
        for m in item.messages:
            m["content"].encode("utf-8")  # a tokenizer and a Parquet file can hold it
        item.prompt_id.encode("utf-8")


# -- corpus corruption ------------------------------------------------------------------------------


@st.composite
def valid_corpora(draw) -> tuple[list[list[dict]], int, str]:
    """Shards of records (each a list of records), k, the logprob dtype."""
    k = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=4), min_size=1, max_size=2))
    n, shards = 0, []
    for lengths in sizes:
        shards.append([record(n + i, n_tokens=t, k=k) for i, t in enumerate(lengths)])
        n += len(lengths)
    return shards, k, draw(st.sampled_from(["float16", "float32"]))


def write_corpus(root: Path, shards: list[list[dict]], k: int, dtype: str) -> None:
    for i, recs in enumerate(shards):
        corpus.write_shard(root, i, corpus.records_to_table(recs, k, dtype))
    corpus.write_manifest(root, corpus.Manifest(teacher={"model": "t"}, generation={"top_k": k},
                                                stats=corpus.corpus_stats(root)))


def rewrite_record(root: Path, shard: int, row: int, change) -> None:
    """Apply `change(record dict)` to one record and write its shard back (atomically, as any writer)."""
    path = corpus.shard_paths(root)[shard]
    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows[row])
    corpus.write_shard(root, shard, pa.Table.from_pylist(rows, schema=table.schema))


def records_of(root: Path) -> list[dict]:
    return [{key: [None if isinstance(v, float) and math.isnan(v) else v for v in value] if isinstance(value, list)
             else value for key, value in r.items()} for r in corpus.iter_records(root)]


@CORRUPTIONS
@given(valid_corpora(), st.data())
def test_flipped_bytes_are_detected_or_harmless(built, data):
    shards, k, dtype = built
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "c"
        write_corpus(root, shards, k, dtype)
        before = records_of(root)
        path = data.draw(st.sampled_from(corpus.shard_paths(root)))
        raw = bytearray(path.read_bytes())
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(raw))
        try:
            corpus.validate(root)
        except corpus.CorpusError:
            return
        assert records_of(root) == before, "validate passed a corpus whose records changed"


@CORRUPTIONS
@given(valid_corpora(), st.data())
def test_truncated_shards_are_always_detected(built, data):
    shards, k, dtype = built
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "c"
        write_corpus(root, shards, k, dtype)
        path = data.draw(st.sampled_from(corpus.shard_paths(root)))
        raw = path.read_bytes()
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        try:
            corpus.validate(root)
        except corpus.CorpusError as e:
            assert f"{path.relative_to(root)}` is unreadable" in str(e)
        else:
            raise AssertionError("a truncated shard passed validation")


TOKEN_COLUMNS = ("response_logprobs", "topk_token_ids", "topk_logprobs")


@CORRUPTIONS
@given(valid_corpora(), st.data())
def test_wrong_lengths_non_finite_values_and_bad_counts_are_always_detected(built, data):
    shards, k, dtype = built
    kind = data.draw(st.sampled_from(["length", "width", "non_finite", "positive", "duplicate_id", "stats"]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "c"
        write_corpus(root, shards, k, dtype)
        shard = data.draw(st.integers(0, len(shards) - 1))
        row = data.draw(st.integers(0, len(shards[shard]) - 1))
        n_tokens = len(shards[shard][row]["response_token_ids"])
        if kind in ("width", "non_finite", "positive"):
            assume(n_tokens > 0)
        position = data.draw(st.integers(0, max(n_tokens - 1, 0)))
        column = data.draw(st.sampled_from(TOKEN_COLUMNS))
        if kind == "length":  # one entry too many or too few
            extra = [0.0] if column == "response_logprobs" else [[0] * k]
            change = (lambda r: r[column].pop()) if n_tokens and data.draw(st.booleans()) else \
                (lambda r: r[column].extend(extra))
        elif kind == "width":  # a top-k row of k - 1 or k + 1 entries
            column = data.draw(st.sampled_from(["topk_token_ids", "topk_logprobs"]))
            change = (lambda r: r[column][position].pop()) if k > 1 and data.draw(st.booleans()) else \
                (lambda r: r[column][position].append(r[column][position][-1]))
        elif kind == "non_finite":
            value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            column = data.draw(st.sampled_from(["response_logprobs", "topk_logprobs"]))
            slot = data.draw(st.integers(0, k - 1))

            def change(r):
                if column == "response_logprobs":
                    r[column][position] = value
                else:
                    r[column][position][slot] = value
        elif kind == "positive":
            change = lambda r: r["topk_logprobs"][position].__setitem__(0, 0.5)
        elif kind == "duplicate_id":
            other = data.draw(st.sampled_from([r["id"] for s in shards for r in s]))
            assume(other != shards[shard][row]["id"])
            change = lambda r: r.__setitem__("id", other)
        if kind == "stats":
            manifest = corpus.read_manifest(root)
            manifest.stats.records += data.draw(st.sampled_from([-1, 1, 7]))
            corpus.write_manifest(root, manifest)
        else:
            rewrite_record(root, shard, row, change)
        try:
            corpus.validate(root)
        except corpus.CorpusError:
            return
        raise AssertionError(f"validate passed a corpus with a {kind} corruption")


# -- top-k byte layouts -----------------------------------------------------------------------------


@st.composite
def topk_records(draw) -> tuple[list[dict], int]:
    """Records whose top-k ids are drawn from a few values (so they repeat within rows, across
    neighbouring rows and far up) or from the whole 3-byte range, with any sorted logprobs; each
    response token one of its row's ids (as a sampled token mostly is) or any id."""
    k = draw(st.integers(1, 8))
    pool = draw(st.lists(st.integers(0, 2**24 - 1), min_size=1, max_size=12))
    ids = st.sampled_from(pool) | st.integers(0, 2**24 - 1)
    out = []
    for i, n in enumerate(draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))):
        rows = [draw(st.lists(ids, min_size=k, max_size=k)) for _ in range(n)]
        logprobs = [sorted(draw(st.lists(st.floats(-2000, 0), min_size=k, max_size=k)), reverse=True) for _ in range(n)]
        response = [draw(st.sampled_from(row) | ids) for row in rows]
        out.append(record(i, k=k, topk_ids=rows, topk_logprobs=logprobs, response_ids=response))
    return out, k


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topk_records())
def test_every_top_k_layout_keeps_the_ids_and_its_grids_bound(built):
    recs, k = built
    logical = corpus.records_to_table(recs, k, "float32")
    first, second, third, fourth = (corpus.decode(corpus.encode(logical, k, "quantized", layout))
                                    for layout in corpus.TOPK_LAYOUTS)
    for decoded in (second, third, fourth):
        assert decoded["topk_token_ids"].to_pylist() == logical["topk_token_ids"].to_pylist()
    assert second["topk_logprobs"].to_pylist() == first["topk_logprobs"].to_pylist()
    assert fourth["topk_logprobs"].to_pylist() == third["topk_logprobs"].to_pylist()
    # layouts 3 and 4: within their coarser grid's bound
    got, sent = (np.array(corpus.leaves(t["topk_logprobs"]), dtype=np.float64) for t in (third, logical))
    held = sent > -1000  # below -1023.98 (and -inf) is stored as -1023.98
    assert np.all(np.abs(got - sent)[held] <= corpus.logprob_tolerance("quantized", sent[held]) + 1e-6)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([corpus.PACKED_IDS, corpus.LOGPROB_CODES]), st.binary(max_size=80))
def test_layout3_decodes_any_bytes_of_a_record_or_names_it(column, garbage):
    """Any bytes in place of a record's range-coded string (the codes keeping their row count):
    the C decoder never reads or writes outside its buffers; it names the record, or decodes rows
    of ids in [0, 2^24)."""
    table = corpus.records_to_table([record(0, n_tokens=3), record(1, n_tokens=3)], 4)
    values = table[column].to_pylist()
    values[1] = (values[1][:4] if column == corpus.LOGPROB_CODES else b"") + garbage
    broken = table.set_column(table.column_names.index(column), column, pa.array(values, pa.large_binary()))
    try:
        decoded = corpus.decode(broken)
    except corpus.CorpusError as e:
        assert "record 'r1'" in str(e)
        return
    ids = np.array(decoded["topk_token_ids"].to_pylist()[1])
    assert ids.shape == (3, 4) and ((ids >= 0) & (ids < 2**24)).all()


# -- the words curation counts ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(), st.text(alphabet=st.characters(max_codepoint=127))), max_size=8),
       st.integers(0, 2))
def test_a_batchs_words_are_the_lowercased_word_regexs(texts, skip):
    """`Words.split` (ASCII texts translated and split in Arrow, the others through the regex) gives
    each text what the `\\w+` regex finds in it lower-cased, on any texts and on ASCII ones (controls,
    digits, `_`, spaces at either end included), nulls and a sliced array too."""
    import pyarrow as pa

    from distill.curation.base import WORD
    from distill.curation.words import Words

    words = Words.split(pa.array([None] * skip + texts, pa.string())[skip:])
    assert [[words.vocabulary[i] for i in words.ids[a:b]] for a, b in zip(words.offsets, words.offsets[1:])] == \
        [[w.encode() for w in WORD.findall((t or "").lower())] for t in texts]
    assert len(set(words.vocabulary)) == len(words.vocabulary)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(), st.text(alphabet=st.characters(max_codepoint=127)),
                          st.text(alphabet=" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1fAb_.")), max_size=8),
       st.integers(0, 2))
def test_a_batchs_normalised_texts_are_normalise(texts, skip):
    """`dedup.normalised` (ASCII texts translated, trimmed and their space runs dropped in Arrow and
    numpy) is `normalise` of each text, for whitespace runs at either end and inside (`str.split`'s
    ASCII whitespace, `\\x1c`-`\\x1f` included), empty texts, nulls, non-ASCII texts and a slice;
    `digests` hashes what it gives as `ExactDedupFilter` always has."""
    import hashlib

    import pyarrow as pa

    from distill.curation.dedup import digests, normalise, normalised

    got = normalised(pa.array([None] * skip + texts, pa.string())[skip:])
    assert got.to_pylist() == [normalise(t or "") for t in texts]
    assert digests(got) == [hashlib.blake2b(normalise(t or "").encode(), digest_size=16).hexdigest() for t in texts]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([3, 40, 5000]).flatmap(
    lambda words: st.lists(st.lists(st.integers(0, words), max_size=40), min_size=1, max_size=12)),
    st.integers(2, 10), st.data())
def test_each_rows_most_repeated_ngram_is_counted_exactly(texts, n, data):
    """`most_repeated` (only keys that share a hash bucket are sorted; exact keys for a few words,
    hashed n-grams beyond) equals a count of each row's n-grams, for any subset of the rows."""
    from collections import Counter

    import numpy as np

    from distill.curation.words import Words, most_repeated

    words = Words.split([" ".join(f"w{i}" for i in text) for text in texts])
    rows = sorted(data.draw(st.sets(st.integers(0, len(texts) - 1))))
    expected = [max(Counter(tuple(texts[r][i:i + n]) for i in range(len(texts[r]) - n + 1)).values(), default=0)
                for r in rows]
    assert most_repeated(words, np.array(rows, dtype=np.int64), n).tolist() == expected


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 1000)), max_size=60))
def test_row_max_is_each_rows_largest_value(pairs):
    import numpy as np

    from distill.curation.words import row_max

    pairs.sort(key=lambda p: p[0])  # rows ascending, as every caller passes them
    row, values = np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64)
    assert row_max(row, values, 10).tolist() == [max((v for r, v in pairs if r == k), default=0) for k in range(10)]


# -- personal data ---------------------------------------------------------------------------------

# Digits (ASCII and Arabic-Indic), the separators of the digit kinds' patterns, and what borders
# them (letters, `_`, `@`, line breaks), with whole phone / IP / card numbers among the pieces.
PII_PIECES = st.lists(st.one_of(st.text(alphabet="0123456789 .-()+aZ_@\n\u0661\u0662", max_size=12),
                                st.sampled_from(["+1 (555) 123-4567", "8.8.8.8", "4111 1111 1111 1111",
                                                 "020 7946 0958", "sk-" + "a1" * 12, "a@b.io"])), max_size=8)


@settings(max_examples=400, deadline=None)
@given(PII_PIECES.map("".join), st.sampled_from([["credit_card", "ipv4", "phone"], ["phone"], ["ipv4"],
                                                  ["credit_card", "phone", "email", "secret"]]))
def test_pii_finds_what_one_scan_of_the_whole_text_finds(text, kinds):
    """`find_pii` skips texts that cannot match and scans only the digit stretches where only the
    digit kinds can: the same matches as the combined regex over the whole text, on any text."""
    from distill.curation.pii import combined_pattern, find_pii, valid_match

    whole = [(m.lastgroup, m.start(), m.end()) for m in combined_pattern(tuple(k for k in
             ("secret", "email", "credit_card", "ipv4", "phone") if k in kinds)).finditer(text)
             if valid_match(m.lastgroup, m.group(0))]
    assert find_pii(text, kinds) == whole
