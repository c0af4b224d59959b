"""`distill curate` on a hand-built corpus with planted bad records: each is rejected by the
right filter with the right reason, every clean record survives, nothing is lost."""


import json

import pyarrow.parquet as pq
import pytest
import yaml
from transformers import AutoTokenizer

from distill import corpus
from distill.cli import main
from distill.config import CurateConfig
from distill.curation.pipeline import build_filters, curate
from distill.curation.quality import RepetitionFilter
from distill.plugins import load_callable
from tests.helpers import make_corpus, record

K = 5
LONG = ("Sorting a list means putting its elements in order. A simple method compares neighbouring "
        "numbers and swaps them when they are in the wrong order, then repeats the pass until nothing "
        "changes. This is called bubble sort and it is easy to follow by hand. Faster methods such as "
        "merge sort split the list into halves, sort each half and merge the results, which takes far "
        "fewer comparisons on long lists. For the list five three one the sorted result is one three five.")
EVAL_TEXT = ("The quick brown fox jumps over the lazy dog while the farmer counts thirteen sheep near the old "
             "stone bridge at dawn")
CLEAN = {
    "c0": "The capital of Australia is Canberra.",
    "c1": LONG,
    "c2": "Paris is the capital of France, and it lies on the river Seine.",
    "c3": "An old silent pond. A frog jumps into the pond. Splash! Silence again.",  # short, no repetition
    "c4": "Photosynthesis turns light into chemical energy stored in sugar.",
    "c5": "Yes.",
    "c6": "Here is the list:\n1. apples\n2. pears\n3. plums",
}
PLANTED = {  # id -> (response, expected filter, overrides)
    "truncated": ("The answer begins with a long explanation that never", "finish_reason", {"finish_reason": "length"}),
    "blank": ("   ", "length", {}),
    "loop": ("I like trains. " * 40, "repetition", {}),
    "refusal": ("As an AI language model, I cannot help with that request.", "refusal", {}),
    "german": ("Das ist eine sehr gute Frage über die Geschichte der Stadt Berlin und ihre Menschen.", "language", {}),
    "pii": ("You can reach the author at jane.doe@example.com for details.", "pii", {}),
    "exact_dup": ("the capital of   Australia is CANBERRA.", "dedup_exact", {}),
    "near_dup": (LONG.replace("easy to follow", "simple to follow"), "dedup_near", {}),
    "unsure": ("Maybe the moon is made of green cheese and rock.", "teacher_confidence", {"top1": -4.0}),
    "contaminated": (f"Well: {EVAL_TEXT}.", "decontaminate", {}),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["tokenizer"])


def answer(rid, text, tokenizer, **parts):
    """A `record` answering `text` (its tokens and end of turn) from a confident teacher (top-1 logprob -0.3)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return record(rid, k=K, response=text, response_ids=ids, **{"top1": -0.3, **parts})


@pytest.fixture
def planted(tmp_path, tokenizer, tiny_models):
    records = [answer(rid, text, tokenizer) for rid, text in CLEAN.items()]
    records += [answer(rid, text, tokenizer, **over) for rid, (text, _, over) in PLANTED.items()]
    root = tmp_path / "corpus"
    corpus.write_shard(root, 0, corpus.records_to_table(records[:9], K))
    corpus.write_shard(root, 1, corpus.records_to_table(records[9:], K))
    corpus.write_manifest(root, corpus.Manifest(teacher={"model": str(tiny_models["llama-teacher"])},
                                                generation={"top_k": K}, stats=corpus.corpus_stats(root)))
    (tmp_path / "eval.jsonl").write_text(f'{{"question": "{EVAL_TEXT}", "answer": "no"}}\n')
    return root


def filters_with(tmp_path, **pii):
    return ["finish_reason", "length", "repetition", "refusal", {"name": "language", "languages": ["en"]},
            {"name": "pii", **pii}, "dedup_exact", "dedup_near", "teacher_confidence",
            {"name": "decontaminate", "eval_files": [str(tmp_path / "eval.jsonl")]}]


def reasons(out):
    return {r["id"]: r["reject_reason"] for r in corpus.iter_records(out, "rejected")}


def test_each_planted_record_is_rejected_by_its_filter(tmp_path, planted):
    result = curate(CurateConfig(corpus=planted, out=tmp_path / "out", filters=filters_with(tmp_path), batch_size=4))
    out = result.path
    assert (result.kept, result.rejected) == (len(CLEAN), len(PLANTED))
    assert result.rejected_by_filter["dedup_near"] == 1 and sum(result.rejected_by_filter.values()) == len(PLANTED)
    got = reasons(out)
    assert {rid: r.split(":")[0] for rid, r in got.items()} == {rid: f for rid, (_, f, _) in PLANTED.items()}
    assert got["blank"] == "length: empty or whitespace-only response"
    assert got["loop"] == "repetition: top 2-gram 'i like' covers 0.45 > 0.2"
    assert got["refusal"] == "refusal: matched 'as an ai language model'"
    assert got["german"] == "language: language 'de' (p=1.00) not in ['en']"
    assert got["exact_dup"] == "dedup_exact: duplicate of c0"
    assert got["near_dup"].startswith("dedup_near: near duplicate of c1 (Jaccard ~0.")
    assert got["truncated"] == "finish_reason: finish_reason is 'length'"
    assert got["pii"] == "pii: 1 match(es): email"
    assert got["unsure"] == "teacher_confidence: mean logprob -4.00 < -2.5"
    assert got["contaminated"] == "decontaminate: response shares a 13-gram with eval.jsonl"
    kept = [r["id"] for r in corpus.iter_records(out)]
    assert sorted(kept) == sorted(CLEAN)
    assert sorted(kept + list(got)) == sorted(list(CLEAN) + list(PLANTED))  # nothing lost, nothing twice
    assert corpus.validate(out)["records"] == len(CLEAN)
    assert corpus.validate(out, "rejected")["records"] == len(PLANTED)
    # the quantized top-k bytes are copied as stored, never encoded a second time
    stored = lambda root, sub: {r["id"]: (r[corpus.PACKED_IDS], r[corpus.LOGPROB_CODES])
                                for p in corpus.shard_paths(root, sub) for r in pq.read_table(p).to_pylist()}
    before = stored(planted, "data")
    assert all(before[rid] == codes for sub in ("data", "rejected") for rid, codes in stored(out, sub).items())
    report = (out / "report.md").read_text()
    assert "| dedup_near | 1 |" in report and (out / "response_length.png").stat().st_size > 1000
    assert corpus.read_manifest(out).history[-1]["stage"] == "curate"

    again = curate(CurateConfig(corpus=out, out=tmp_path / "again", filters=filters_with(tmp_path))).path
    assert reasons(again) == {} and corpus.validate(again)["records"] == len(CLEAN)  # idempotent


def test_default_pipeline_from_the_cli(tmp_path, planted, capsys):
    assert main(["curate", "--corpus", str(planted), "--out", str(tmp_path / "out")]) == 0
    got = reasons(tmp_path / "out")
    # language and decontaminate are off by default: those two records pass
    assert set(got) == set(PLANTED) - {"german", "contaminated"}
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "dedup_exact" in capsys.readouterr().out


def test_pii_mask_keeps_the_record_and_masks_only_its_tokens(tmp_path, planted, tokenizer):
    out = curate(CurateConfig(corpus=planted, out=tmp_path / "out", filters=filters_with(tmp_path, mode="mask"))).path
    rec = next(r for r in corpus.iter_records(out) if r["id"] == "pii")
    masked = [t for t, keep in zip(rec["response_token_ids"], rec["loss_mask"]) if not keep]
    assert masked and "jane.doe@example.com" in tokenizer.decode(masked).replace(" ", "")
    assert sum(rec["loss_mask"]) >= len(rec["loss_mask"]) - len(masked) > 5  # the rest still counts
    assert all(all(r["loss_mask"]) for r in corpus.iter_records(out) if r["id"] != "pii")
    assert corpus.validate(out)["records"] == len(CLEAN) + 1


def test_a_pii_mask_joins_the_stored_loss_mask():
    """The masked tokens are taken out of the stored mask (a null mask: every token trains);
    without a stored mask, every row gets one."""
    import pyarrow as pa

    from distill.curation.pipeline import with_loss_mask

    T, F = True, False
    ids = pa.array([[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    stored = pa.table({"response_token_ids": ids, "loss_mask": pa.array([[T, F, T], None, [T, T, T, F]])})
    joined = with_loss_mask(stored, {1: [F, T], 2: [F, T, T, T]})
    assert joined.column("loss_mask").to_pylist() == [[T, F, T], [F, T], [F, T, T, F]]
    fresh = with_loss_mask(pa.table({"response_token_ids": ids}), {0: [T, T, F]})
    assert fresh.column("loss_mask").to_pylist() == [[T, T, F], [T, T], [T, T, T, T]]
    assert fresh.schema.field("loss_mask").type == pa.list_(pa.bool_())


def test_plugin_filter_from_yaml(tmp_path, planted, monkeypatch):
    (tmp_path / "myfilters.py").write_text(
        "def no_france(record, word):\n    return f'mentions {word}' if word in record['response'] else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "curate.yaml"
    config.write_text(yaml.safe_dump({"corpus": str(planted), "out": str(tmp_path / "out"), "filters": [
        "length", {"name": "verifier", "plugin": "myfilters:no_france", "params": {"word": "France"}}]}))
    assert main(["curate", "--config", str(config)]) == 0
    got = reasons(tmp_path / "out")
    assert got == {"blank": "length: empty or whitespace-only response", "c2": "verifier: mentions France"}


def test_reasons_of_the_filters_not_planted_above():
    from distill.curation.quality import FormatFilter, LengthFilter

    short = {"response": "Yes it is.", "response_token_ids": [1, 2]}
    assert LengthFilter(min_tokens=8).check(short) == "2 tokens < min_tokens 8"
    assert LengthFilter(max_tokens=1).check(short) == "2 tokens > max_tokens 1"
    assert LengthFilter(min_chars=20).check(short) == "10 chars < min_chars 20"
    assert LengthFilter(max_chars=3).check(short) == "10 chars > max_chars 3"
    assert FormatFilter(regex=r"\d+", fullmatch=True).check({"response": "12 apples"}) == r"does not match '\\d+'"
    assert FormatFilter(valid_json=True).check({"response": "{a: 1}"}) == (
        "invalid JSON (Expecting property name enclosed in double quotes)")


def test_plugin_without_a_name_is_labelled_by_its_spec(tmp_path, planted, monkeypatch):
    (tmp_path / "wordfilters.py").write_text(
        "def no_word(record, word):\n    return f'mentions {word}' if word in record['response'] else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = curate(CurateConfig(corpus=planted, out=tmp_path / "out",
                              filters=["length", {"plugin": "wordfilters:no_word", "params": {"word": "capital"}}])).path
    got = reasons(out)
    assert got == {"blank": "length: empty or whitespace-only response",
                   **{rid: "wordfilters:no_word: mentions capital" for rid in ("c0", "c2", "exact_dup")}}
    counts = {f["name"]: f["rejected"] for f in json.loads((out / "report.json").read_text())["filters"]}
    assert counts == {"length": 1, "wordfilters:no_word": 3}
    assert "| wordfilters:no_word | 3 |" in (out / "report.md").read_text()


def test_load_callable_names_the_field():
    assert load_callable("json:JSONDecoder.decode", "scorer") is json.JSONDecoder.decode
    with pytest.raises(ValueError, match=r"^`scorer`: expected `module:callable`, got 'x'$"):
        load_callable("x", "scorer")
    with pytest.raises(ValueError, match=r"^`scorer`: cannot load 'a_missing_module:b' \(ModuleNotFoundError: "):
        load_callable("a_missing_module:b", "scorer")
    with pytest.raises(ValueError, match=r"^`scorer`: 'json:__name__' is a str, not a callable$"):
        load_callable("json:__name__", "scorer")
    with pytest.raises(ValueError, match=r"^`filters\[1\]\.plugin`: cannot load 'json:nope' \(AttributeError: "):
        build_filters(["length", {"name": "mine", "plugin": "json:nope"}])


def test_bad_configs_name_the_yaml_key(tmp_path, planted, monkeypatch):
    with pytest.raises(ValueError, match=r"`filters\[1\]\.name`: unknown filter 'nope'"):
        build_filters(["length", {"name": "nope"}])
    with pytest.raises(ValueError, match=r"`filters\[0\]\.min_tokens`: Input should be a valid integer"):
        build_filters([{"name": "length", "min_tokens": "many"}])
    with pytest.raises(ValueError, match=r"`filters\[0\]\.typo`: Extra inputs are not permitted"):
        build_filters([{"name": "refusal", "typo": 1}])
    (tmp_path / "boom.py").write_text("def check(record):\n    raise KeyError('missing field')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"plug-in `boom` \(boom:check\) failed on record 'c0': KeyError"):
        curate(CurateConfig(corpus=planted, out=tmp_path / "o", filters=[{"name": "boom", "plugin": "boom:check"}]))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corpus_that_fails_validation_is_refused_before_any_work(tmp_path, planted, workers):
    """Checked in the curating process, or shard by shard in the workers: refused, nothing written."""
    manifest = corpus.read_manifest(planted)
    manifest.stats.records += 1
    corpus.write_manifest(planted, manifest)
    with pytest.raises(corpus.CorpusError, match="`stats.records`"):
        curate(CurateConfig(corpus=planted, out=tmp_path / "out", workers=workers))
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_repetition_spares_short_answers_and_catches_loops():
    rep = RepetitionFilter()
    haiku = "An old silent pond, a frog jumps into the pond, splash! Silence again and again."
    assert rep.check({"response": haiku}) is None
    assert rep.check({"response": "The capital of Australia is Canberra."}) is None
    assert rep.check({"response": "I am done. " * 40}) is not None
    assert rep.check({"response": "\n".join(["same line here"] * 5 + ["other"])}).startswith("duplicate line fraction")


@pytest.mark.parametrize("text, kind", [
    ("mail me: a.b+c@mail.example.org", "email"),
    ("call +1 415-555-0134 today", "phone"),
    ("or (020) 7946 0958", "phone"),
    ("server at 93.184.216.34 is up", "ipv4"),
    ("card 4111 1111 1111 1111 exp 12/29", "credit_card"),
    ("key sk-abcdefghijklmnopqrstuvwxyz123456", "secret"),
    ("aws AKIAIOSFODNN7EXAMPLE here", "secret"),
    ("token ghp_" + "a1" * 18 + " leaked", "secret"),
    ("card \u0664\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 (Arabic-Indic digits)",
     "credit_card"),
])
def test_pii_kinds(text, kind):
    from distill.curation.pii import PATTERNS, find_pii

    assert [k for k, _, _ in find_pii(text, list(PATTERNS))] == [kind]


@pytest.mark.parametrize("text", ["The years 2023-2024 were good.", "Version 1.2.3 of the tool.",
                                  "Private host 192.168.1.10.", "Card-like 4111 1111 1111 1112 fails Luhn.",
                                  "Sum: 12 345 + 678 = 13 023"])
def test_pii_ignores_lookalikes(text):
    from distill.curation.pii import PATTERNS, find_pii

    assert find_pii(text, list(PATTERNS)) == []


def test_vectorised_checks_equal_per_record_checks(planted):
    from distill.curation.confidence import TeacherConfidenceFilter
    from distill.curation.quality import LengthFilter

    batch = next(corpus.iter_batches(planted))
    records = batch.to_pylist()
    for f in (TeacherConfidenceFilter(min_mean_logprob=-1.0, max_mean_entropy=1.0), LengthFilter(min_tokens=8)):
        rows = list(range(batch.num_rows))
        assert f.check_batch(batch, rows) == {i: v for i in rows if (v := f.check(records[i])) is not None}


def test_confidence_stats_with_empty_responses():
    import pyarrow as pa

    from distill.curation.confidence import per_record_stats

    batch = pa.RecordBatch.from_pydict({
        "response_logprobs": pa.array([[-1.0, -3.0], [], [-2.0], []], pa.list_(pa.float32())),
        "topk_logprobs": pa.array([[[-1.0, -2.0]] * 2, [], [[-0.5, -1.0]], []], pa.list_(pa.list_(pa.float32())))})
    s = per_record_stats(batch)
    assert s["mean_logprob"].tolist() == [-2.0, 0.0, -2.0, 0.0] and s["min_logprob"].tolist() == [-3.0, 0.0, -2.0, 0.0]


def test_curating_into_the_input_directory_is_refused(planted):
    with pytest.raises(ValueError, match="`out` must differ from `corpus`"):
        curate(CurateConfig(corpus=planted, out=planted, overwrite=True))
    assert corpus.validate(planted)["records"] == len(CLEAN) + len(PLANTED)


def test_advice_when_most_rejections_are_unfinished_answers(tmp_path, tokenizer, capsys):
    records = [answer(f"r{i}", f"An answer number {i} that", tokenizer, finish_reason="length") for i in range(6)]
    records += [answer("done", "A finished answer.", tokenizer)]
    make_corpus(tmp_path / "cut", records, k=K)
    result = curate(CurateConfig(corpus=tmp_path / "cut", out=tmp_path / "out", filters=["finish_reason"]))
    assert result.rejected_by_filter == {"finish_reason": 6}
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(summary["advice"]) == 1 and "raise generate's `max_tokens`" in summary["advice"][0]
    assert "advice: most rejections (6 of 6)" in capsys.readouterr().err
    assert "**Advice:** most rejections" in (tmp_path / "out" / "report.md").read_text()
    # No advice when unfinished answers are not the main cause.
    make_corpus(tmp_path / "fine", [answer("a", "Fine.", tokenizer), answer("b", "Also fine.", tokenizer)], k=K)
    curate(CurateConfig(corpus=tmp_path / "fine", out=tmp_path / "out2", filters=["finish_reason"]))
    assert json.loads((tmp_path / "out2" / "report.json").read_text())["advice"] == []


def test_a_failing_plugin_is_one_line_from_the_cli(tmp_path, planted, monkeypatch, capsys):
    (tmp_path / "boom.py").write_text("def check(record):\n    raise KeyError('missing field')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"filters": [{"name": "boom", "plugin": "boom:check"}]}))
    code = main(["curate", "--corpus", str(planted), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("distill curate: error: plug-in `boom` (boom:check) failed on record 'c0': KeyError")


def test_an_input_corpus_still_being_written_is_refused_naming_its_writer(tmp_path, planted):
    import os

    from distill import files
    from distill.files import OutputInUse

    with files.exclusive(planted):  # as a running `generate` holds it
        with pytest.raises(OutputInUse, match=rf"`corpus` `{planted}` is being written by pid {os.getpid()}"):
            curate(CurateConfig(corpus=planted, out=tmp_path / "out"))
    assert curate(CurateConfig(corpus=planted, out=tmp_path / "out")).kept  # once it is done


def test_an_interrupted_curate_reruns_and_a_finished_one_needs_overwrite(tmp_path, planted):
    out = tmp_path / "out"
    first = curate(CurateConfig(corpus=planted, out=out))
    for written_last in [p for p in out.iterdir() if p.name not in ("data", "rejected")]:
        written_last.unlink()  # as a kill before the manifest and report leaves it: only shards
    assert curate(CurateConfig(corpus=planted, out=out)).kept == first.kept  # the same command reruns
    with pytest.raises(FileExistsError, match="holds a finished corpus.*--overwrite"):
        curate(CurateConfig(corpus=planted, out=out))
    assert curate(CurateConfig(corpus=planted, out=out, overwrite=True)).kept == first.kept


def test_a_curate_killed_after_copying_the_tokenizer_reruns(tmp_path, planted):
    out = tmp_path / "out"
    corpus.store_tokenizer(planted, AutoTokenizer.from_pretrained(corpus.read_manifest(planted).teacher.model))
    first = curate(CurateConfig(corpus=planted, out=out))
    assert (out / corpus.TOKENIZER_DIR).is_dir()
    for written_last in [p for p in out.iterdir() if p.is_file()]:
        written_last.unlink()  # the manifest (and report) are written after the tokenizer's files
    assert curate(CurateConfig(corpus=planted, out=out)).kept == first.kept


def test_a_full_disk_says_what_the_rerun_does(tmp_path, planted, monkeypatch):
    import errno

    from distill.files import DiskFull

    def full(*_args, **_kwargs):  # labelled stand-in: a full disk cannot be made here without root
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(DiskFull, match=r"no space left on device writing shard 0 .*rerun the same command: curation starts over"):
        curate(CurateConfig(corpus=planted, out=tmp_path / "out"))


def duplicated_ngram_chars(words: list[str], n: int) -> int | None:
    """Characters of words inside an n-gram seen earlier (each word counted once); None when
    no n-gram repeats."""
    grams = list(zip(*(words[i:] for i in range(n))))
    if len(set(grams)) == len(grams):
        return None
    seen, covered = set(), [False] * len(words)
    for i, gram in enumerate(grams):
        if gram in seen:
            covered[i:i + n] = [True] * n
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c)


def repetition_by_the_rules(words: list[str], top: dict[int, float], dup: dict[int, float]) -> str | None:
    """The n-gram checks of `RepetitionFilter`, one record, with every count computed (no shortcut)."""
    from collections import Counter

    total = sum(map(len, words))
    if not total or len(set(zip(words, words[1:]))) == len(words) - 1:
        return None
    for n, limit in top.items():
        grams = Counter(zip(*(words[i:] for i in range(n))))
        if grams:
            gram, count = grams.most_common(1)[0]
            frac = sum(map(len, gram)) * count / total
            if count > 1 and frac > limit:
                return f"top {n}-gram {' '.join(gram)!r} covers {frac:.2f} > {limit}"
    for n, limit in sorted(dup.items()):
        chars = duplicated_ngram_chars(words, n)
        if chars is None:
            break
        if chars / total > limit:
            return f"duplicated {n}-grams cover {chars / total:.2f} > {limit}"
    return None


def random_repetition_cases(rng, settings: int, texts: int, words=("a", "to", "the", "frog", "splash", "silently",
                                                                   "x" * 15)):
    """(filter, texts as word lists) under random settings. With the default few distinct words of
    varied lengths: repeats, loops, near misses of every threshold. With many words, each text
    repeats one slice of itself or none (n-grams beyond pairs are then grouped by hash)."""
    def text():
        drawn = [rng.choice(words) for _ in range(rng.randint(0, 60))]
        if len(words) > 100 and drawn and rng.random() < 0.7:
            at = rng.randrange(len(drawn))
            drawn[at:at] = drawn[at:at + rng.randint(1, 15)] * rng.randint(1, 3)
        return drawn

    for _ in range(settings):
        top = {n: rng.uniform(0, 0.5) for n in rng.sample(range(1, 7), rng.randint(1, 4))}
        dup = {n: rng.uniform(0, 0.5) for n in rng.sample(range(2, 11), rng.randint(1, 6))}
        rep = RepetitionFilter(top_ngram_frac=top, dup_ngram_frac=dup, dup_line_frac=None, dup_para_frac=None,
                               dup_line_char_frac=None, dup_para_char_frac=None)
        yield rep, [text() for _ in range(texts)]


def test_repetition_over_a_batch_gives_each_record_the_verdict_of_the_rules():
    """The batch's rows are counted together (one hash grouping per n over all of them), the rows
    asked for only; each verdict is what the rules give that record alone, and the bounds that skip
    counts never skip a rejection."""
    import random

    import pyarrow as pa

    rng = random.Random(0)
    rejected = 0
    many = [f"w{i}" * (i % 4 + 1) for i in range(3000)]
    for rep, texts in [*random_repetition_cases(rng, 60, 50), *random_repetition_cases(rng, 20, 50, many)]:
        batch = pa.RecordBatch.from_pydict({"response": [" ".join(t) for t in texts]})
        rows = sorted(rng.sample(range(len(texts)), 40))
        expected = {i: v for i in rows
                    if (v := repetition_by_the_rules(texts[i], rep.top_ngram_frac, rep.dup_ngram_frac)) is not None}
        assert rep.check_batch(batch, rows) == expected, (texts, rep)
        assert rep.check({"response": " ".join(texts[rows[0]])}) == expected.get(rows[0])
        rejected += len(expected)
    assert 300 < rejected < 3000


def test_a_hash_collision_between_ngrams_is_found_and_redrawn(monkeypatch):
    """Mock: the first hash draw puts every n-gram in one group (a 64-bit collision cannot be
    produced on purpose); the grouping notices that its members differ and draws again."""
    import random

    import pyarrow as pa

    from distill.curation import words as words_module

    real, calls = words_module._mix, []

    def colliding_first(x):
        calls.append(len(x))
        return real(x) if len(calls) > 3 else x * 0  # ngrams(n=2): 3 calls per draw

    monkeypatch.setattr(words_module, "_mix", colliding_first)
    rep, texts = next(random_repetition_cases(random.Random(1), 1, 30))
    batch = pa.RecordBatch.from_pydict({"response": [" ".join(t) for t in texts]})
    expected = {i: v for i, t in enumerate(texts)
                if (v := repetition_by_the_rules(t, rep.top_ngram_frac, rep.dup_ngram_frac)) is not None}
    assert rep.check_batch(batch, list(range(len(texts)))) == expected and len(calls) > 6


def test_a_longer_ngrams_lower_limit_is_still_checked():
    """The dup n-gram loop stops early only when no later limit can be exceeded."""
    text = "an old silent pond where a frog jumps in".split() * 2 + "then silence again".split()
    six = duplicated_ngram_chars(text, 6) / sum(map(len, text))
    rep = RepetitionFilter(top_ngram_frac={}, dup_ngram_frac={5: 1.0, 6: 0.9 * six})
    assert rep.check({"response": " ".join(text)}) == f"duplicated 6-grams cover {six:.2f} > {0.9 * six}"
