"""`distill demo-real`'s own pieces, fast: the real prompts it picks and the report it writes.
(The whole demo is `make demo-real`, about 25 minutes on 2 CPU cores; the real model itself: tests/test_real_model.py.)"""

import json

from distill.demo import real


def test_real_prompts_are_short_english_distinct_and_disjoint(tmp_path, tiny_models, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(real, "N_TRAIN", 30)
    monkeypatch.setattr(real, "N_EVAL", 10)
    train, held_out = real.write_prompts(tmp_path, str(tiny_models["tokenizer"]))
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in
            (("train", train), ("eval", held_out))}
    assert len(rows["train"]) == 30 and len(rows["eval"]) == 10
    texts = [r["messages"][0]["content"] for rs in rows.values() for r in rs]
    assert len(set(texts)) == 40  # distinct, so train and eval are disjoint
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    low, high = real.PROMPT_TOKENS
    assert all(low <= len(tokenizer(t)["input_ids"]) <= high for t in texts)
    assert all(sum(c.isascii() for c in t) >= real.MIN_ASCII_SHARE * len(t) for t in texts)
    assert all(r["messages"][0]["role"] == "user" and r["id"] for rs in rows.values() for r in rs)
    assert real.write_prompts(tmp_path, "unused") == (train, held_out)  # kept on a rerun


def test_report_table_shows_seeds_and_paired_differences():
    seed = lambda name, kl, top1, ppl: {"name": name, "kl": kl, "top1_agreement": top1, "perplexity": ppl}
    fidelity = {
        "pruned (untrained)": {"kl": 9.0, "top1_agreement": 0.01, "perplexity": 900.0, "kl_std": 0.0,
                               "top1_agreement_std": 0.0, "perplexity_std": 0.0, "seeds": [seed("p", 9.0, 0.01, 900.0)]},
        "KD (alpha 0.9)": {"kl": 2.0, "top1_agreement": 0.4, "perplexity": 20.0, "kl_std": 0.1,
                           "top1_agreement_std": 0.02, "perplexity_std": 1.5,
                           "seeds": [seed("kd-seed0", 1.9, 0.41, 19.0), seed("kd-seed1", 2.1, 0.39, 21.0)]},
    }
    report = {"teacher": {"parameters": 134.5e6, "distributions": {"median_top1_probability": 0.6,
                                                                     "mean_topk_entropy": 1.2}},
              "corpus": {"records": 194, "response_tokens": 22158}, "eval_prompts": 48, "fidelity": fidelity,
              "kd_minus_sft": {"kl": [-0.5, -0.25], "top1_agreement": [0.02, 0.01], "perplexity": [-1.0, 2.0]},
              "side_by_side": [{"prompt": "Hi?", "teacher": "Hello!\nHow can I help?", "KD student": "Hello"}],
              "wall_seconds": 120}
    text = real.render(report)
    assert "| pruned (untrained) | 9.000 | 0.010 | 900.00 | 1 |" in text
    assert "| KD (alpha 0.9) | 2.000 ± 0.100 | 0.400 ± 0.020 | 20.00 ± 1.50 | 2 |" in text
    assert "KL -0.500, -0.250" in text and "perplexity -1.00, +2.00" in text
    assert "- **teacher:** Hello! How can I help?" in text  # one line per answer
    assert "Wall time: 2.0 min." in text
