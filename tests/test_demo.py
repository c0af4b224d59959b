"""The demo's parts that decide whether its result means anything: the noise model the teacher is
calibrated on, the statistics that say its distributions are informative, the corpus subsets of
the learning curve, and the report's KD-vs-SFT verdict."""

import random

import numpy as np
import pytest

from distill import corpus
from distill.demo import skills
from distill.demo.report import mean_std
from distill.demo.students import first_records
from distill.demo.teacher import distribution_stats
from tests.helpers import make_corpus, record


@pytest.mark.parametrize("skill", list(skills.SKILLS))
def test_label_distribution_keeps_the_right_answer_on_top(skill):
    rng = random.Random(0)
    for _ in range(200):
        payload = "".join(rng.choice("0123456789") for _ in range(rng.randint(*skills.DIGITS)))
        answer = skills.SKILLS[skill][1](payload)
        rows = skills.label_distribution(skill, payload)
        assert len(rows) == len(answer)
        for right, row in zip(answer, rows):
            assert sum(row.values()) == pytest.approx(1.0)
            assert max(row, key=row.get) == right and row[right] >= skills.RIGHT  # argmax = the right digit
            assert all(p <= 1 - skills.RIGHT + 1e-9 for d, p in row.items() if d != right)


def test_confusions_depend_on_the_prompt_and_draws_are_reproducible():
    assert skills.confusions("max", "3959", "9", 0) == {"5"}  # the second-largest digit of this payload
    assert skills.confusions("max", "1929", "9", 0) == {"2"}
    assert skills.confusions("reverse", "123", "321", 1) == {"1", "3"}  # neighbours; +-1 coincide here
    draws = lambda seed: [skills.noisy_answer("sort", "52341", random.Random(seed)) for _ in range(20)]
    assert draws(3) == draws(3)
    sampled = [skills.noisy_answer("reverse", "12345", random.Random(i)) for i in range(2000)]
    right = np.mean([s == "54321" for s in sampled])
    assert right == pytest.approx(skills.RIGHT ** 5, abs=0.04)  # each digit right with p = 0.7


def test_noisy_prompt_file_is_a_conversation_per_prompt(tmp_path):
    import json

    path = skills.write_prompts(tmp_path / "p.jsonl", "teacher", 50, seed=0, answers="noisy", system_prompts=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(r["messages"][0]["role"] == "user" and r["messages"][-1]["role"] == "assistant" for r in rows)
    wrong = [r for r in rows if r["messages"][-1]["content"] != r["answer"]]
    assert 0 < len(wrong) < len(rows)


def test_distribution_stats_of_a_one_hot_and_a_soft_teacher(tmp_path):
    one_hot, soft = record(0, n_tokens=4), record(1, n_tokens=4)
    one_hot["topk_logprobs"] = np.log(np.array([[1.0, 1e-9, 1e-9, 1e-9]] * 4, dtype=np.float32))
    soft["topk_logprobs"] = np.log(np.array([[0.7, 0.15, 0.15, 1e-9]] * 4, dtype=np.float32))
    hard = distribution_stats(make_corpus(tmp_path / "hard", [one_hot], encoding="float32"))
    calibrated = distribution_stats(make_corpus(tmp_path / "soft", [soft], encoding="float32"))
    assert hard["positions"] == 3  # the last token (end of turn) is not an answer digit
    assert hard["median_top1_probability"] == pytest.approx(1.0) and hard["mean_topk_entropy"] < 1e-6
    assert hard["share_top1_above_0.99"] == 1.0
    assert calibrated["median_top1_probability"] == pytest.approx(0.7, abs=1e-4)
    expected = -(0.7 * np.log(0.7) + 2 * 0.15 * np.log(0.15))
    assert calibrated["mean_topk_entropy"] == pytest.approx(expected, abs=1e-3)


def test_first_records_is_a_valid_corpus_of_the_first_n(tmp_path):
    source = make_corpus(tmp_path / "c", [record(i) for i in range(6)])
    sub = first_records(source, 4, tmp_path / "n4")
    assert corpus.validate(sub)["records"] == 4
    assert [r["id"] for r in corpus.iter_records(sub)] == ["r0", "r1", "r2", "r3"]
    assert "first 4 records" in corpus.read_manifest(sub).source["subset"]


def test_mean_std_is_the_sample_std():
    assert mean_std([0.8, 0.9, 1.0]) == {"mean": pytest.approx(0.9), "std": pytest.approx(0.1)}


def test_cross_tokenizer_flags_apply_to_the_cross_tokenizer_demo_only(tmp_path, capsys):
    import os

    from distill.cli import main

    engine_settings = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")
    before = {key: os.environ.get(key) for key in engine_settings}
    assert main(["demo", "--out", str(tmp_path), "--steps", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["distill demo: error: --steps and --arms apply to `distill demo --cross-tokenizer` only"]
    assert main(["demo", "--cross-tokenizer", "--out", str(tmp_path), "--arms", "span"]) == 1
    assert "arms must include `sft`" in capsys.readouterr().err
    # refused before anything was made or set (the demo's engine settings would reach every later engine)
    assert not any(tmp_path.iterdir()) and {key: os.environ.get(key) for key in engine_settings} == before


def test_cross_tokenizer_report_pairs_each_arm_with_sft_by_seed():
    from distill.demo.cross_tokenizer import markdown

    def student(accuracy, span_kl):
        return {"accuracy": accuracy, "span_kl": span_kl, "agreement": 0.5, "nll_per_byte": 2.0,
                "per_skill": {"length": accuracy}}

    results = {"0": {"sft": student(0.2, 1.0), "span": student(0.3, 0.9)},
               "1": {"sft": student(0.1, 1.2), "span": student(0.15, 1.0)}}
    table = markdown(results, 500, ["sft", "span"])
    assert "500 steps per student, seeds 0, 1" in table
    assert "| accuracy, 300 held-out | span − sft | 0.100 | 0.050 | 0.075 ± 0.035 |" in table
    assert "| span KL (held-out) | span − sft | -0.100 | -0.200 | -0.150 ± 0.071 |" in table


def test_first_records_of_a_corpus_of_both_top_k_layouts(tmp_path):
    """A corpus resumed by a newer distill holds layout-1 and layout-2 shards: the subset decodes
    each with its own footer (one shard, one footer)."""
    import shutil
    from pathlib import Path

    data = Path(__file__).parent / "data"
    root = make_corpus(tmp_path / "c", [record(0, k=4), record(1, k=4)], k=4, encoding="quantized")
    shutil.copy(data / "quantized-layout1-w2.parquet", root / "data" / "part-00001.parquet")
    whole = corpus.read_table(root)
    sub = first_records(root, 3, tmp_path / "sub")
    got = corpus.read_table(sub)
    for column in ("id", "topk_token_ids", "topk_logprobs", "response_token_ids"):
        assert got[column].to_pylist() == whole[column].to_pylist()[:3]
