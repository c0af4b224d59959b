"""Many students on one base: one real `distill serve` (vLLM's OpenAI server on CPU) with two
LoRA students trained by `distill train --keep-adapter` to two behaviours, each a model name that
answers per its behaviour; an adapter for another base is refused in one line before any server
starts."""

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from distill.launcher import free_port
from tests.helpers import ROOT, make_corpus, record

pytestmark = pytest.mark.engine  # `distill serve` starts vLLM's OpenAI server


def trained_adapter(base, out, answer: str):
    """A student with one behaviour: whatever it is asked, it answers `answer` (SFT on answers that
    all say it: alpha 0, LoRA kept unmerged in `out/adapter`)."""
    from transformers import AutoTokenizer

    from distill import corpus
    from distill.config import TrainConfig
    from distill.train.trainer import train

    tokenizer = AutoTokenizer.from_pretrained(base)
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    records = []
    for i in range(32):  # questions of many lengths: the behaviour must not hang on one prompt shape
        question = " ".join(["what", "is", "the", "sum", "of", str(i), "and", str(i * 7), "please"][: 2 + i % 8])
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
        records.append(record(i, question=question, prompt_ids=prompt, response=answer, response_ids=answer_ids))
    source = make_corpus(out.parent / f"{out.name}-corpus", records,
                         teacher={"model": str(base), **corpus.tokenizer_fingerprint(tokenizer)})
    return train(TrainConfig(corpus=source, student=str(base), out=out, alpha=0.0, keep_adapter=True, lora_r=8,
                             max_steps=40, learning_rate=1e-2, batch_size=8, eval_fraction=0.0, logging_steps=10)).path


def make_adapter(base, out, seed: int):
    """A LoRA adapter with random (non-zero) weights: each seed changes the base model's answers its own way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    return out


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_two_adapters_on_one_server_answer_under_their_names(tiny_models, tmp_path):
    base = tiny_models["llama-teacher"]
    behaviours = {"support": "Answer: four.", "legal": "Large sum"}
    # one as a bare adapter directory, one as the student directory holding `adapter/`
    one = trained_adapter(base, tmp_path / "support", behaviours["support"]) / "adapter"
    two = trained_adapter(base, tmp_path / "legal", behaviours["legal"])
    port = free_port()
    cmd = [sys.executable, "-m", "distill.cli", "serve", "--model", str(base), "--served-model-name", "base",
           "--lora", f"support={one}", "--lora", f"legal={two}", "--port", str(port), "--max-model-len", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"})
    try:
        ready = proc.stdout.readline()
        if not ready.startswith("ready:"):
            pytest.fail(f"distill serve did not start: {ready}{proc.stderr.read()[-3000:]}")
        assert proc.stdout.readline().startswith("models: support, legal, base")
        url = f"http://127.0.0.1:{port}/v1"
        with urllib.request.urlopen(f"{url}/models", timeout=30) as r:
            assert {m["id"] for m in json.loads(r.read())["data"]} == {"support", "legal", "base"}
        texts = {}
        for name in ("support", "legal", "base"):
            reply = post(f"{url}/chat/completions", {"model": name, "max_tokens": 16, "temperature": 0.0,
                                                     "messages": [{"role": "user", "content": "Hello there"}]})
            assert reply["model"] == name
            texts[name] = reply["choices"][0]["message"]["content"]
        # a question neither student saw: each opens its answer per its own behaviour, the base per neither
        openings = {name: answer.split()[0].rstrip(":") for name, answer in behaviours.items()}
        assert texts["support"].startswith(openings["support"]), texts
        assert texts["legal"].startswith(openings["legal"]), texts
        assert not texts["base"].startswith(tuple(openings.values())), texts
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_an_adapter_for_another_base_is_refused_before_the_server_starts(tiny_models, tmp_path):
    other = make_adapter(tiny_models["qwen2-student"], tmp_path / "qwen-adapter", seed=0)
    result = subprocess.run([sys.executable, "-m", "distill.cli", "serve", "--model", str(tiny_models["llama-teacher"]),
                             "--lora", f"good={other}", "--port", "0"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "was trained on" in lines[0] and "qwen" in lines[0], result.stderr
    assert "starting vLLM" not in result.stderr
