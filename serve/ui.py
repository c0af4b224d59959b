"""`distill serve --ui`: a browser chat page for a served student, optionally beside its teacher.

Built with Gradio `Blocks`: it is what this ecosystem's model pages use, streams generator
output to the browser, has login built in, and (unlike `ChatInterface`) lets two chat panes
answer one message box. The page talks to the OpenAI-compatible endpoints only, so a teacher
may be any such server.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local tool

import gradio as gr
import openai

from distill.launcher import free_port


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server (`url` ends in /v1) and the model name to request there."""

    url: str
    model: str
    api_key: str | None = None

    @classmethod
    def at(cls, url: str, api_key: str | None = None) -> Endpoint:
        """The endpoint's first listed model (a server given by URL names its own model)."""
        try:
            return cls(url, _client(url, api_key).models.list().data[0].id, api_key)
        except openai.APIConnectionError:
            raise ConnectionError(f"cannot reach `{url}`: is that server running?") from None
        except openai.AuthenticationError:
            raise PermissionError(f"`{url}` refused the API key (401): set the key it expects") from None


def _client(url: str, api_key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=api_key or "EMPTY", max_retries=0, timeout=300)


def _text(content) -> str:
    # Gradio 6 hands chat history back as content parts ([{"type": "text", "text": ...}]).
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def stream_answer(endpoint: Endpoint, messages: list[dict], temperature: float, max_tokens: int
                  ) -> Iterator[tuple[str, str]]:
    """Yield (answer so far, stats line) as tokens arrive; the stats line is final at the end."""
    client = _client(endpoint.url, endpoint.api_key)
    start, first = time.perf_counter(), None
    text, tokens = "", 0
    stream = client.chat.completions.create(
        model=endpoint.model, messages=messages, temperature=temperature, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True})  # the last chunk carries the exact token count
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            first = first or time.perf_counter()
            text += delta
            yield text, "…"
    end = time.perf_counter()
    # tok/s is the decode speed after the first token (prefill is what TTFT shows); a one-token
    # answer has no decode to time.
    rate = f"{(tokens - 1) / (end - first):.1f}" if first and tokens > 1 and end > first else "–"
    yield text, f"{tokens} token{'s' * (tokens != 1)} · {rate} tok/s · TTFT {((first or end) - start) * 1000:.0f} ms"


def build_ui(student: Endpoint, teacher: Endpoint | None = None, title: str = "distill chat",
             models: Sequence[str] = ()) -> gr.Blocks:
    """The chat page: one message box; one pane per model (teacher left, student right).
    `models`: the names the student's server answers to (its LoRA adapters and their base): with
    more than one, a dropdown picks which one the student pane asks."""
    names = (["teacher"] if teacher else []) + ["student"]
    endpoints = ([teacher] if teacher else []) + [student]
    choices = list(models) or [student.model]
    with gr.Blocks(title=title) as page:
        gr.Markdown(f"## {title}\n" + " · ".join(f"**{n}**: `{e.model}` at {e.url}" for n, e in zip(names, endpoints)))
        adapter = gr.Dropdown(choices, value=student.model, label="Student model (LoRA adapter)", elem_id="student-model",
                              visible=len(choices) > 1)
        panes, stats = [], []
        with gr.Row(equal_height=True):
            for name, endpoint in zip(names, endpoints):
                with gr.Column():
                    panes.append(gr.Chatbot(label=f"{name}: {endpoint.model}", elem_id=f"{name}-pane", height=420))
                    stats.append(gr.Markdown("", elem_id=f"{name}-stats"))
        message = gr.Textbox(placeholder="Type a message...", show_label=False, autofocus=True)
        with gr.Row():
            send = gr.Button("Send", variant="primary")
            reset = gr.Button("Reset")
        with gr.Row():
            system = gr.Textbox(label="System prompt", placeholder="(none)", scale=2)
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", scale=1)
            max_tokens = gr.Slider(1, 4096, value=512, step=1, label="Max tokens", scale=1)

        def respond(text: str, system_prompt: str, temp: float, limit: float, chosen: str | None, *histories):
            # An untouched textbox arrives as None, not "".
            text, system_prompt = (text or "").strip(), (system_prompt or "").strip()
            asked = [*endpoints[:-1], replace(student, model=chosen or student.model)]
            histories = [list(h or []) for h in histories]
            lines = [""] * len(endpoints)
            if not text:
                yield "", *histories, *lines
                return
            for history in histories:
                history.append({"role": "user", "content": text})
            yield "", *histories, *lines  # the message shows at once; the last answer's stats go
            # One model after the other, not both at once: teacher and student often share a
            # machine, and answering in turn keeps each one's tokens/s and TTFT its own.
            for i, endpoint in enumerate(asked):
                prior = [{"role": m["role"], "content": _text(m["content"])} for m in histories[i]]
                messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + prior
                histories[i].append({"role": "assistant", "content": ""})
                try:
                    for answer, line in stream_answer(endpoint, messages, temp, int(limit)):
                        histories[i][-1]["content"], lines[i] = answer, line
                        yield "", *histories, *lines
                except openai.APIError as e:  # a dead or refusing server: say so in its pane
                    lines[i] = f"error from {endpoint.url}: {e}"
                    yield "", *histories, *lines

        inputs = [message, system, temperature, max_tokens, adapter, *panes]
        outputs = [message, *panes, *stats]
        message.submit(respond, inputs, outputs)
        send.click(respond, inputs, outputs)
        reset.click(lambda: ([[]] * len(panes)) + [""] * len(stats), None, [*panes, *stats], queue=False)
    return page


def launch_ui(student: Endpoint, teacher: Endpoint | None = None, *, api_key: str | None = None,
              host: str = "127.0.0.1", port: int = 7860, models: Sequence[str] = ()) -> gr.Blocks:
    """Serve the page in a background thread; `page.local_url` is its address, `page.close()`
    stops it. With `api_key`, the login form asks for it as the password (any user name)."""
    page = build_ui(student, teacher, models=models)
    # Constant-time comparison: the page must not leak the key through response timing.
    auth = (lambda _user, password: hmac.compare_digest(password.encode(), api_key.encode())) if api_key else None
    page.launch(server_name=host, server_port=port or free_port(), auth=auth, prevent_thread_lock=True,
                auth_message="Enter the server's API key as the password (any user name).",
                quiet=True, show_error=True, footer_links=[])
    return page
