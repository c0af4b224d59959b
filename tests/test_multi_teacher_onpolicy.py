"""On-policy training with two teachers (`--teacher-endpoints NAME=URL`) against two real vLLM
servers of different tiny teachers that share one tokenizer: each sample goes to its corpus's teacher."""

import json

import numpy as np
import pytest

from distill import corpus
from distill.cli import main
from distill.config import ServeConfig, TrainConfig
from distill.launcher import start_server
from distill.teacher_client import TeacherClient
from distill.train.routed_teachers import routed_teachers
from tests.helpers import MAX_MODEL_LEN, make_corpus, record

pytestmark = pytest.mark.engine

QUESTIONS = {"code": [f"Sort {i} {i * 3 % 7} {i % 4}" for i in range(4)],
             "chat": [f"Hello number {i}, how are you?" for i in range(4)]}


@pytest.fixture(scope="module")
def servers(tiny_models):
    """name -> a running server: `code` is the tiny Llama teacher, `chat` the tiny Llama student (another
    model of the same tokenizer; the tiny Qwen2 encodes text differently)."""
    settings = {name: ServeConfig(model=str(tiny_models[model]), served_model_name=name, port=0,
                                  max_model_len=MAX_MODEL_LEN, engine_args={"max_logprobs": 20},
                                  vllm_args=["--no-enable-prefix-caching"])
                for name, model in (("code", "llama-teacher"), ("chat", "llama-student"))}
    with start_server(settings["code"]) as code, start_server(settings["chat"]) as chat:
        yield {"code": code, "chat": chat}


def prompt_corpus(root, name, tokenizer, teacher_dir):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for q in QUESTIONS[name]]
    records = [record(f"{name}{i}", k=4, question=q, prompt_ids=ids, response="x", response_ids=[40, 41, 42])
               for i, (q, ids) in enumerate(zip(QUESTIONS[name], prompts))]
    return make_corpus(root / name, records, k=4,
                       teacher={"model": str(teacher_dir), **corpus.tokenizer_fingerprint(tokenizer)}), prompts


def test_each_sample_is_scored_by_its_own_teacher(tmp_path, tiny_models, servers):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama-student"])
    (code, code_prompts), (chat, chat_prompts) = (prompt_corpus(tmp_path, n, tokenizer, tiny_models["llama-teacher"])
                                                  for n in ("code", "chat"))
    cfg = TrainConfig(corpus=[code, chat], student=str(tiny_models["llama-student"]), out=tmp_path / "s",
                      on_policy=True, teacher_endpoints=[f"{n}={s.url}" for n, s in servers.items()])
    teachers = routed_teachers(cfg, tokenizer)
    response = [50, 51, 52, 53]
    pairs = [(code_prompts[0], response), (chat_prompts[0], response), (code_prompts[1], response)]
    routed = teachers.score_pairs(pairs, 5, teachers=[0, 1, 0])
    alone = {n: TeacherClient(s.url).score_pairs(pairs, 5) for n, s in servers.items()}
    for got, own in zip(routed, [alone["code"][0], alone["chat"][1], alone["code"][2]]):
        np.testing.assert_array_equal(got.topk_token_ids, own.topk_token_ids)
        np.testing.assert_allclose(got.topk_logprobs, own.topk_logprobs, atol=1e-5)
    # the two teachers differ, so routing to the wrong one would have shown
    assert not np.allclose(alone["code"][1].topk_logprobs, alone["chat"][1].topk_logprobs, atol=1e-3)


def test_train_on_policy_with_two_teachers(tmp_path, tiny_models, servers):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama-student"])
    code, _ = prompt_corpus(tmp_path, "code", tokenizer, tiny_models["llama-teacher"])
    chat, _ = prompt_corpus(tmp_path, "chat", tokenizer, tiny_models["llama-teacher"])
    out = tmp_path / "s"
    assert main(["train", "--corpus", str(code), "--corpus", str(chat), "--student", str(tiny_models["llama-student"]),
                 "--out", str(out), "--full", "--on-policy", "--teacher-endpoints", f"code={servers['code'].url}",
                 "--teacher-endpoints", f"chat={servers['chat'].url}", "--lmbda", "1", "--max-new-tokens", "6",
                 "--max-steps", "2", "--batch-size", "4", "--logging-steps", "1", "--eval-fraction", "0"]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logs if "on_policy_kl" in m]
    assert len(steps) == 2 and all(np.isfinite(m["on_policy_kl"]) and m["teacher_tokens"] > 0 for m in steps)
    card = json.loads((out / "distill.json").read_text())
    assert card["corpora"] == [str(code), str(chat)]
