"""`distill serve` and `distill chat` against a real vLLM OpenAI server (loopback only): a
tiny base model plus a LoRA adapter, an API key, bursts, bad requests, a pseudo-terminal chat
session and SIGTERM leaving no process behind."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from distill.launcher import free_port
from tests.helpers import ROOT

pytestmark = pytest.mark.engine  # `distill serve` starts vLLM's OpenAI server

KEY = "sk-distill-test"


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights: it changes the base model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama-teacher"])
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    out = tmp_path_factory.mktemp("student") / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served(tiny_models, adapter):
    """`distill serve` as a user starts it; yields (process, base url, adapter name, base name)."""
    port = free_port()
    cmd = [sys.executable, "-m", "distill.cli", "serve", "--model", str(tiny_models["llama-teacher"]),
           "--lora", str(adapter), "--served-model-name", "student", "--port", str(port),
           "--max-model-len", "512", "--", "--max-num-seqs", "32"]
    # the key as the docs advise: in the environment, where `ps` does not show it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "VLLM_API_KEY": KEY})
    ready = proc.stdout.readline()  # blocks until the server answers /health (or the command fails)
    if not ready.startswith("ready:"):
        proc.kill()
        pytest.fail(f"distill serve did not start: {ready}{proc.stderr.read()[-3000:]}")
    yield proc, f"http://127.0.0.1:{port}/v1", "student", "student-base"
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def request(url: str, body: bytes | dict | None = None, key: str | None = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def chat_body(model: str, text: str = "Hello there", max_tokens: int = 8) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0.0}


def test_serves_base_and_adapter_which_answer_differently(served):
    _, url, adapter_name, base_name = served
    status, models = request(f"{url}/models")
    assert status == 200 and {m["id"] for m in models["data"]} == {adapter_name, base_name}
    answers = {name: request(f"{url}/chat/completions", chat_body(name, max_tokens=16))[1]
               for name in (adapter_name, base_name)}
    texts = {name: a["choices"][0]["message"]["content"] for name, a in answers.items()}
    assert all(texts.values()) and texts[adapter_name] != texts[base_name]


def test_requests_without_or_with_a_wrong_key_get_401(served):
    _, url, name, _ = served
    assert request(f"{url}/chat/completions", chat_body(name), key=None)[0] == 401
    assert request(f"{url}/chat/completions", chat_body(name), key="sk-wrong")[0] == 401
    assert request(f"{url}/chat/completions", chat_body(name))[0] == 200


def test_routes_outside_v1_need_the_key_too_and_it_is_on_no_command_line(served):
    proc, url, name, _ = served
    root = url.removesuffix("/v1")
    assert request(f"{root}/invocations", chat_body(name), key=None)[0] == 401  # a chat, answered without a key before
    assert request(f"{root}/tokenize", {"model": name, "prompt": "hi"}, key=None)[0] == 401
    assert request(f"{root}/tokenize", {"model": name, "prompt": "hi"})[0] == 200
    with urllib.request.urlopen(f"{root}/health", timeout=30) as r:
        assert r.status == 200
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) > 1 and not [p.pid for p in tree if any(KEY in part for part in p.cmdline())]


def test_burst_of_64_concurrent_chats_all_succeed(served):
    import openai

    _, url, name, _ = served

    async def burst():
        client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=300)
        results = await asyncio.gather(*(client.chat.completions.create(**chat_body(name, f"Question {i}?"))
                                         for i in range(64)), return_exceptions=True)
        await client.close()
        return results

    results = asyncio.run(burst())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert all(r.choices[0].message.content is not None and r.usage.completion_tokens > 0 for r in results)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served):
    _, url, name, _ = served
    assert request(f"{url}/chat/completions", b'{"model": "student", "messages": [')[0] == 400  # malformed JSON
    assert request(f"{url}/chat/completions", chat_body("no-such-model"))[0] == 404
    too_long = " ".join(["seven"] * 600)  # > max_model_len 512 tokens
    assert request(f"{url}/chat/completions", chat_body(name, too_long))[0] == 400
    assert request(f"{url}/chat/completions", {"model": name, "messages": "not a list"})[0] == 400
    status, reply = request(f"{url}/chat/completions", chat_body(name))
    assert status == 200 and reply["choices"][0]["message"]["content"]


def test_binds_loopback_only_by_default(served):
    proc, url, _, _ = served
    port = int(url.split(":")[-1].split("/")[0])
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    listening = [c.laddr for p in tree for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening if addr.port == port)
    assert any(addr.port == port for addr in listening)


def test_chat_in_a_pseudo_terminal_streams_and_reset_clears_history(served):
    import pexpect

    _, url, name, _ = served
    child = pexpect.spawn(sys.executable, ["-m", "distill.cli", "chat", "--url", url, "--model", name,
                                           "--max-tokens", "12", "--temperature", "0"],
                          env={**os.environ, "VLLM_API_KEY": KEY}, cwd=str(ROOT), encoding="utf-8", timeout=120)

    def say(text: str) -> str:
        child.sendline(text)
        child.expect_exact(f"{name}> ")
        child.expect_exact("you> ")
        return child.before.strip()

    child.expect_exact("you> ")
    first = say("Hello")
    second = say("Hello")  # the same words, after one exchange of history
    child.sendline("/reset")
    child.expect_exact("(history cleared)")
    child.expect_exact("you> ")
    after_reset = say("Hello")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert first and second != first  # the history reached the model
    assert after_reset == first  # greedy, same single message: history really was cleared


def test_chat_reports_a_server_that_is_down_or_a_wrong_key(served):
    _, url, _, _ = served
    down = subprocess.run([sys.executable, "-m", "distill.cli", "chat", "--url", f"http://127.0.0.1:{free_port()}/v1"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert down.returncode == 1 and "cannot reach" in down.stderr and "Traceback" not in down.stderr
    wrong = subprocess.run([sys.executable, "-m", "distill.cli", "chat", "--url", url, "--api-key", "sk-wrong"],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert wrong.returncode == 1 and "401" in wrong.stderr


def test_startup_failure_exits_nonzero_with_the_servers_last_lines(tmp_path, tiny_models):
    # Passes serve's pre-checks (config.json and a tokenizer) and fails inside vLLM.
    broken = shutil.copytree(tiny_models["tokenizer"], tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": -1}')
    result = subprocess.run([sys.executable, "-m", "distill.cli", "serve", "--model", str(broken),
                             "--port", str(free_port())], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1
    assert "exited with code" in result.stderr and "last lines" in result.stderr


def test_sigterm_stops_the_engine_process_too(served):
    """Last in this module: it stops the shared server."""
    proc, _, _, _ = served
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert tree  # the vLLM server and its engine core
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM  # like every command (issue 31: it was 0)
    assert "distill serve: stopped (SIGTERM)." in proc.stderr.read()
    deadline = time.time() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree) and time.time() < deadline:
        time.sleep(0.5)
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
