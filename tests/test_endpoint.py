"""`backend: endpoint`: the same corpus from a real vLLM OpenAI server started here (loopback only),
generated and scored, through `distill.teacher_client.TeacherClient`."""

import numpy as np
import pytest

from distill import corpus
from distill.config import GenerateConfig, ScoreConfig, ServeConfig
from distill.generate import generate, score
from distill.launcher import EndpointError, free_port, start_server
from distill.teacher_client import TeacherClient
from tests.helpers import (
    MAX_MODEL_LEN,
    PROMPTS,
    assert_matches_transformers,
    write_jsonl,
)


@pytest.fixture(scope="module")
def server(tiny_models):
    """The teacher behind vLLM's OpenAI server, launched the way `distill serve` does."""
    settings = ServeConfig(model=str(tiny_models["llama-teacher"]), served_model_name="teacher", port=0,
                           max_model_len=MAX_MODEL_LEN, engine_args={"max_logprobs": 20},
                           vllm_args=["--no-enable-prefix-caching"])  # `score`: prompt logprobs (teacher_client)
    with start_server(settings) as srv:
        yield srv.url.removesuffix("/v1")
    assert not srv.log_path.exists(), "a temporary server log outlived a clean stop"


@pytest.mark.engine
def test_endpoint_corpus_equals_in_process_corpus(tmp_path, tiny_models, teacher, server, prompts_file):
    common = dict(teacher=str(tiny_models["llama-teacher"]), prompts=prompts_file, max_tokens=16, temperature=0.0,
                  chunk_size=4)
    # The same server twice: requests spread over both "endpoints" (least outstanding first).
    remote = generate(GenerateConfig(out=tmp_path / "remote", backend="endpoint", urls=[server, server],
                                     requests_per_url=3, **common))
    local = generate(GenerateConfig(out=tmp_path / "local", **common), teacher=teacher)
    assert corpus.validate(remote)["records"] == len(PROMPTS)
    assert corpus.read_table(remote).schema == corpus.read_table(local).schema
    for r, l in zip(corpus.iter_records(remote), corpus.iter_records(local)):
        assert (r["id"], r["prompt_token_ids"], r["response_token_ids"], r["response"], r["finish_reason"]) == \
               (l["id"], l["prompt_token_ids"], l["response_token_ids"], l["response"], l["finish_reason"])
        assert r["topk_token_ids"] == l["topk_token_ids"]
        # both stored from float32 values ~1e-5 apart: each within the encoding's bound of them
        bound = corpus.logprob_tolerance(corpus.read_manifest(local).generation.logprob_encoding, l["topk_logprobs"])
        np.testing.assert_allclose(r["topk_logprobs"], l["topk_logprobs"], rtol=0, atol=2 * bound.max() + 1e-3)
        np.testing.assert_allclose(r["response_logprobs"], l["response_logprobs"], rtol=2**-10, atol=1e-3)


@pytest.mark.engine
def test_endpoint_sampled_with_seeds_is_reproducible(tmp_path, tiny_models, server, prompts_file):
    cfg = GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts=prompts_file, max_tokens=12,
                         backend="endpoint", urls=[server], samples=2, out=tmp_path / "a")
    a = generate(cfg)
    b = generate(cfg.model_copy(update={"out": tmp_path / "b"}))
    tokens = lambda d: [r["response_token_ids"] for r in corpus.iter_records(d)]
    assert tokens(a) == tokens(b) and corpus.validate(a)["records"] == 2 * len(PROMPTS)


@pytest.mark.engine
def test_endpoint_scores_existing_answers_like_the_in_process_engine(tmp_path, tiny_models, teacher, server):
    data = write_jsonl(tmp_path / "answers.jsonl", [
        {"prompt": "What is 2+3?", "response": "The sum is 5."},
        {"prompt": "Sort 5 3 1", "response": "1 3 5, and reversed 5 3 1."},
    ])
    common = dict(teacher=str(tiny_models["llama-teacher"]), data=data, top_k=5, logprob_encoding="float32")
    remote = score(ScoreConfig(out=tmp_path / "remote", backend="endpoint", urls=[server], **common))
    local = score(ScoreConfig(out=tmp_path / "local", **common), teacher=teacher)
    assert corpus.validate(remote)["records"] == 2
    for r, l in zip(corpus.iter_records(remote), corpus.iter_records(local)):
        assert (r["prompt_token_ids"], r["response_token_ids"], r["response"], r["topk_token_ids"]) == \
               (l["prompt_token_ids"], l["response_token_ids"], l["response"], l["topk_token_ids"])
        np.testing.assert_allclose(r["topk_logprobs"], l["topk_logprobs"], rtol=0, atol=1e-3)
        np.testing.assert_allclose(r["response_logprobs"], l["response_logprobs"], rtol=0, atol=1e-3)
    assert assert_matches_transformers(remote, tiny_models["llama-teacher"]) > 0


def test_unreachable_endpoint_is_a_clear_error(tiny_models):
    with pytest.raises(EndpointError, match=r"endpoint http://127.0.0.1:\d+: cannot list models"):
        TeacherClient([f"http://127.0.0.1:{free_port()}"], "teacher")


@pytest.mark.engine
def test_endpoint_with_another_tokenizer_is_refused(tmp_path, server):
    from distill.tiny import build_tokenizer

    other = build_tokenizer(tmp_path / "other", vocab_size=300)
    teacher = TeacherClient([server], "teacher")
    assert teacher.model == "teacher" and teacher.max_model_len == MAX_MODEL_LEN
    with pytest.raises(EndpointError, match="tokenizer encodes text differently"):
        teacher.check_tokenizer(other, "teacher")
