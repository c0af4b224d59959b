"""Token ids outside the teacher's vocabulary (issue 31): generate records the vocabulary size,
`validate` refuses any other id (prompt, response, top-k; negatives too) naming shard, record and
position, and so do `inspect --check`, curate and train, before anything is written. No engine."""

import json

import numpy as np
import pytest

from distill import corpus
from distill.cli import main
from tests.helpers import PROMPTS, make_corpus, record, write_jsonl

VOCAB = 512  # the tiny models' (tests/conftest.py)


def broken_corpus(root, teacher="t", encoding="float16"):
    """Three records; r1 holds response id 99999 and top-k id -5 (float16 stores a negative id as it is)."""
    recs = [record(i) for i in range(3)]
    recs[1]["response_token_ids"] = [0, 99999, 2]
    recs[1]["topk_token_ids"] = recs[1]["topk_token_ids"].copy()
    recs[1]["topk_token_ids"][2, 1] = -5
    return make_corpus(root, recs, encoding=encoding, vocab_size=VOCAB, teacher=teacher)


RESPONSE_PROBLEM = ("data/part-00000.parquet: `response_token_ids` holds 1 id outside the teacher's vocabulary "
                    "[0, 512) (first: record 'r1', response position 1: 99999)")
TOPK_PROBLEM = ("data/part-00000.parquet: `topk_token_ids` holds 1 id outside the teacher's vocabulary "
                "[0, 512) (first: record 'r1', response position 2: -5)")


def test_validate_names_both_ids(tmp_path):
    with pytest.raises(corpus.CorpusError) as err:
        corpus.validate(broken_corpus(tmp_path / "c"))
    assert [line.strip() for line in str(err.value).splitlines()[1:]] == [RESPONSE_PROBLEM, TOPK_PROBLEM]


def test_inspect_check_runs_the_full_validation(tmp_path, capsys, tiny_models):
    teacher = str(tiny_models["llama-teacher"])  # the record shown is decoded with its tokenizer
    root = broken_corpus(tmp_path / "c", teacher=teacher)
    assert main(["inspect", str(root)]) == 0  # the footers match the manifest: only --check reads every record
    capsys.readouterr()
    assert main(["inspect", str(root), "--check"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "invalid:" in out and RESPONSE_PROBLEM in out and TOPK_PROBLEM in out
    good = make_corpus(tmp_path / "good", [record(0), record(1)], vocab_size=VOCAB, teacher=teacher)
    assert main(["inspect", str(good), "--check"]) == 0
    assert "valid: every record checked (2 records, 6 response tokens)" in " ".join(capsys.readouterr().out.split())


def test_curate_refuses_before_writing(tmp_path, capsys):
    assert main(["curate", "--corpus", str(broken_corpus(tmp_path / "c")), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    bar, error = err.split("distill curate: error: ")  # the check's progress bar, then the problems
    assert all(line.startswith("check:") for line in bar.splitlines() if line.strip()), err
    assert RESPONSE_PROBLEM in error and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_train_refuses_before_any_checkpoint(tmp_path, capsys, tiny_models):
    """Without the check, the id 99999 reached the embedding: an IndexError traceback, checkpoints left."""
    source = broken_corpus(tmp_path / "c", teacher=str(tiny_models["llama-teacher"]))
    out = tmp_path / "s"
    assert main(["train", "--corpus", str(source), "--student", str(tiny_models["llama-student"]), "--out", str(out),
                 "--max-steps", "3", "--save-steps", "1", "--batch-size", "1", "--eval-fraction", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("distill train: error: ") and RESPONSE_PROBLEM in err and "Traceback" not in err
    assert not list(out.glob("checkpoint-*")) and not list(out.glob("*.safetensors"))


def test_generate_records_the_teacher_vocabulary_and_resumes_a_corpus_from_before(tmp_path, tiny_models):
    from distill.config import GenerateConfig
    from distill.generate.job import CorpusJob

    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    teacher = tiny_models["llama-teacher"]
    job = CorpusJob(GenerateConfig(teacher=str(teacher), prompts=prompts, out=out), prompts,
                    scoring=False)
    job._prepare()
    assert job.identity["teacher"]["vocab_size"] == json.loads((teacher / "config.json").read_text())["vocab_size"]
    assert corpus.Manifest(**job.identity).teacher.vocab_size == VOCAB  # what the manifest then holds
    # a corpus begun before the size was recorded resumes (no "settings differ")
    before = {**job.identity, "teacher": {k: v for k, v in job.identity["teacher"].items() if k != "vocab_size"}}
    corpus.write_manifest(out, corpus.Manifest(**before, stats=corpus.CorpusStats(complete=False)))
    job._check_resume()
    corpus.write_manifest(out, corpus.Manifest(**{**before, "teacher": {**before["teacher"], "vocab_size": 100}}))
    with pytest.raises(FileExistsError, match=r"teacher.vocab_size differ"):
        job._check_resume()


def test_a_vocabulary_size_in_the_manifest_round_trips(tmp_path):
    root = make_corpus(tmp_path / "c", [record(0)], vocab_size=VOCAB)
    assert json.loads((root / "manifest.json").read_text())["teacher"]["vocab_size"] == VOCAB
    assert corpus.read_manifest(root).teacher.vocab_size == VOCAB
    assert np.array_equal(next(corpus.iter_records(root))["response_token_ids"], [0, 1, 2])
