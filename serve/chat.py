"""`distill chat`: a terminal chat with any OpenAI-compatible server, streaming, multi-turn."""

from __future__ import annotations

import os
import sys

from distill.config import ChatConfig
from distill.lifetime import Stopped

HELP = "commands: /reset (clear the history), /system TEXT (set the system prompt), /exit"


def chat(cfg: ChatConfig) -> int:
    import openai

    client = openai.OpenAI(base_url=cfg.url, api_key=cfg.api_key or os.environ.get("VLLM_API_KEY") or "EMPTY",
                           max_retries=0, timeout=cfg.timeout)
    try:
        model = cfg.model or client.models.list().data[0].id
    except openai.APIConnectionError:
        raise ConnectionError(f"cannot reach {cfg.url}: is the server running? (start one with `distill serve`)") from None
    except openai.AuthenticationError:
        raise PermissionError(f"{cfg.url} refused the API key (401): pass the server's key with `--api-key` "
                              "or $VLLM_API_KEY") from None
    system = cfg.system
    history: list[dict[str, str]] = []
    print(f"chatting with {model} at {cfg.url}; {HELP}", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt) as e:
            print()
            if isinstance(e, Stopped):  # SIGTERM / SIGHUP from outside: the CLI's 128 + signal; Ctrl-C just leaves
                raise
            return 0
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            history.clear()
            print("(history cleared)", flush=True)
            continue
        if line.startswith("/system"):
            system = line.removeprefix("/system").strip() or None
            print(f"(system prompt {'set' if system else 'removed'}; history cleared)", flush=True)
            history.clear()
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", flush=True)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            reply = _stream(client, model, messages, cfg)
        except openai.APIConnectionError:
            print(f"\n(cannot reach {cfg.url}; is the server still running?)", file=sys.stderr, flush=True)
            history.pop()
            continue
        except openai.APIStatusError as e:
            print(f"\n(the server answered {e.status_code}: {e.message})", file=sys.stderr, flush=True)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def _stream(client, model: str, messages: list[dict], cfg: ChatConfig) -> str:
    print(f"{model}> ", end="", flush=True)
    parts = []
    stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                            max_tokens=cfg.max_tokens, temperature=cfg.temperature)
    for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            parts.append(delta)
            print(delta, end="", flush=True)
    print(flush=True)
    return "".join(parts)
