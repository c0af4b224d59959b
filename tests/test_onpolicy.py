"""On-policy distillation (`distill train --on-policy`) against a real vLLM server of the tiny teacher.

One server for the module; the last test stops it mid-run, so it stays last.
"""

import json
import threading
import time

import numpy as np
import pytest
import torch

from distill import corpus
from distill.cli import main
from distill.config import ServeConfig, TrainConfig
from distill.launcher import EndpointError, free_port, start_server
from distill.teacher_client import TeacherClient, parse_prompt_logprobs
from distill.train.onpolicy import teacher_scored_kl
from distill.train.trainer import CHECKPOINT_DONE, train
from tests.helpers import MAX_MODEL_LEN, make_corpus, record

QUESTIONS = [f"Sort the numbers {i} {i * 3 % 7} {i % 4}, then add {i}" for i in range(8)]


def chat_prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"] for q in QUESTIONS]


def prompt_corpus(root, teacher_dir, tokenizer, k: int = 4):
    """A corpus whose prompts are real chat prompts (on-policy training samples its own answers to them)."""
    records = [record(i, k=k, question=question, prompt_ids=ids, response="x", response_ids=[40, 41, 42])
               for i, (question, ids) in enumerate(zip(QUESTIONS, chat_prompts(tokenizer)))]
    return make_corpus(root, records, k=k, teacher={"model": str(teacher_dir), **corpus.tokenizer_fingerprint(tokenizer)})


def test_prompt_logprobs_keep_the_k_best_by_rank():
    rows = [None, {"7": {"logprob": -0.1, "rank": 1}, "3": {"logprob": -9.0, "rank": 40},  # realised, outside top-2
                   "5": {"logprob": -2.5, "rank": 2}},
            {"9": {"logprob": -1.0, "rank": 2}, "2": {"logprob": -0.5, "rank": 1}}]
    scored = parse_prompt_logprobs(rows, [3, 9], 2)  # the response: rows 1 and 2
    assert scored.topk_token_ids.tolist() == [[7, 5], [2, 9]]
    np.testing.assert_allclose(scored.topk_logprobs, [[-0.1, -2.5], [-0.5, -1.0]], rtol=1e-6)
    np.testing.assert_allclose(scored.response_logprobs, [-9.0, -1.0], rtol=1e-6)  # the given tokens' own
    with pytest.raises(EndpointError, match=r"returned 2 prompt logprobs at position 2, expected 3: .*--max-logprobs"):
        parse_prompt_logprobs(rows, [3, 9], 3)


def test_on_policy_needs_a_teacher_endpoint(tmp_path):
    with pytest.raises(ValueError, match="`on_policy` needs `teacher_endpoint`"):
        TrainConfig(corpus=tmp_path, student="s", out=tmp_path / "o", on_policy=True)


def test_unreachable_teacher_endpoint_is_one_line(tmp_path, tiny_models, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama-teacher"])
    data = prompt_corpus(tmp_path / "corpus", tiny_models["llama-teacher"], tokenizer)
    url = f"http://127.0.0.1:{free_port()}"
    code = main(["train", "--corpus", str(data), "--student", str(tiny_models["llama-student"]), "--out",
                 str(tmp_path / "s"), "--on-policy", "--teacher-endpoint", url, "--max-steps", "1"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("distill train: error:")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith(f"distill train: error: endpoint {url}: cannot list models")


@pytest.fixture(scope="module")
def server(tiny_models):
    settings = ServeConfig(model=str(tiny_models["llama-teacher"]), served_model_name="teacher", port=0,
                           max_model_len=MAX_MODEL_LEN, engine_args={"max_logprobs": 20},
                           vllm_args=["--no-enable-prefix-caching"])
    with start_server(settings) as srv:
        yield srv


@pytest.mark.engine
def test_scores_equal_a_transformers_recomputation(tiny_models, server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama-teacher"])
    endpoint = TeacherClient(server.url)
    endpoint.check_tokenizer(tokenizer, "student")
    assert endpoint.model == "teacher"
    prompt = chat_prompts(tokenizer)[0]
    response = np.random.default_rng(1).integers(10, len(tokenizer), size=12).tolist()  # any tokens, not the teacher's
    scored, = endpoint.score_pairs([(prompt, response)], 5)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama-teacher"], dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    reference = torch.log_softmax(logits, -1)
    assert scored.topk_token_ids.shape == (len(response), 5)
    # the values at the ids vLLM chose, and the k best values: equal within float32 noise (robust to near-ties)
    np.testing.assert_allclose(reference.gather(-1, torch.from_numpy(scored.topk_token_ids).long()).numpy(),
                               scored.topk_logprobs, atol=2e-4)
    np.testing.assert_allclose(reference.gather(-1, torch.tensor(response)[:, None]).numpy()[:, 0],
                               scored.response_logprobs, atol=2e-4)
    np.testing.assert_allclose(reference.topk(5).values.numpy(), scored.topk_logprobs, atol=2e-4)


@pytest.mark.engine
def test_on_policy_steps_reduce_the_teacher_scored_kl(tmp_path, tiny_models, server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama-student"])
    data = prompt_corpus(tmp_path / "corpus", tiny_models["llama-teacher"], tokenizer)
    endpoint = TeacherClient(server.url)
    prompts = chat_prompts(tokenizer)

    def divergence(model_dir) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return teacher_scored_kl(model, prompts, endpoint, 20, max_new_tokens=16, temperature=0.0,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id).kl

    before = divergence(tiny_models["llama-student"])
    out = train(TrainConfig(corpus=data, student=str(tiny_models["llama-student"]), out=tmp_path / "s", lora=False,
                            on_policy=True, teacher_endpoint=server.url, lmbda=1.0, max_new_tokens=16,
                            teacher_top_k=20, max_steps=12, batch_size=4, learning_rate=2e-2, logging_steps=4,
                            lr_scheduler="constant_with_warmup", eval_fraction=0.0, save_steps=100)).path
    after = divergence(out)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print("teacher-scored KL of the student's greedy answers:", before, "->", after, logs)
    assert after < 0.8 * before
    steps = [m for m in logs if "on_policy_kl" in m]
    assert len(steps) == 3 and steps[-1]["on_policy_kl"] < steps[0]["on_policy_kl"]
    shares = [steps[0][f"{key}_share"] for key in ("sample", "score", "optimise")]
    assert all(0 < s < 1 for s in shares) and sum(shares) == pytest.approx(1.0)
    assert steps[0]["teacher_tokens"] > 0 and steps[0]["teacher_tokens_per_s"] > 0


@pytest.mark.engine
def test_a_teacher_that_goes_away_mid_run_is_one_line_and_resumable(tmp_path, tiny_models, server, capsys):
    """Runs last: it stops the module's server once the first checkpoint is complete."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama-student"])
    data = prompt_corpus(tmp_path / "corpus", tiny_models["llama-teacher"], tokenizer)
    out = tmp_path / "s"
    done = out / "checkpoints" / "checkpoint-1" / CHECKPOINT_DONE

    def stop_after_first_checkpoint():
        deadline = time.time() + 300
        while not done.exists() and time.time() < deadline:
            time.sleep(0.05)
        server.stop(grace=5)

    stopper = threading.Thread(target=stop_after_first_checkpoint)
    stopper.start()
    code = main(["train", "--corpus", str(data), "--student", str(tiny_models["llama-student"]), "--out", str(out),
                 "--on-policy", "--teacher-endpoint", server.url, "--lmbda", "0.5", "--max-new-tokens", "8",
                 "--max-steps", "200", "--batch-size", "2", "--save-steps", "1", "--eval-fraction", "0", "--full"])
    stopper.join()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("distill train: error:")]  # not the progress bars
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith(f"distill train: error: teacher endpoint {server.url.removesuffix('/v1')} did not "
                                "answer after 5 attempts") and "rerun the same command to continue" in errors[0], err
    assert done.exists() and not (out / "model.safetensors").exists()
