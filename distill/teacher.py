"""The teacher seam: what every teacher backend does, the types it speaks, and the one table of
backends that `backend: NAME` chooses from (generate, score and eval).

A backend is a class named in `BACKENDS` as "module:Class", imported only when chosen (the
local and Ray backends import vLLM and Ray). Its constructor takes the teacher job's config
(`distill.config.TeacherJobConfig`: the teacher model, its engine settings, the backend's own
fields), `max_logprobs` (the largest `top_k` it will be asked for) and `max_model_len` (the
context the job planned its prompts for); it starts or connects to the teacher and returns once
the teacher answers. Adding a backend is one module and one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from distill.config import TeacherJobConfig


@dataclass
class Request:
    """One prompt to answer (`generate`) or one conversation to score along its answer (`score`)."""

    index: int  # position in the whole job; chunk = index // chunk_size
    id: str
    prompt_id: str
    messages: list[dict[str, str]]
    prompt_token_ids: list[int]
    seed: int = 0
    response_token_ids: list[int] = field(default_factory=list)  # score: the answer to score
    response: str | None = None  # score: its text
    finish_reason: str = "stop"  # score: an existing answer is a finished one
    # generate --student-view: what the student will see of the prompt (stored beside the teacher's)
    student_messages: list[dict[str, str]] | None = None
    student_prompt_token_ids: list[int] | None = None


@dataclass
class Completion:
    """The teacher's answer to a request: the tokens (generated, or the given answer when scoring)
    with the teacher's logprob of each and its k best at each position."""

    response_token_ids: np.ndarray  # [T] int32
    response_logprobs: np.ndarray  # [T] float32, logprob of each response token
    topk_token_ids: np.ndarray  # [T, k] int32, best first
    topk_logprobs: np.ndarray  # [T, k] float32
    finish_reason: str


@dataclass(frozen=True)
class Sampling:
    top_k: int
    max_tokens: int
    temperature: float
    top_p: float


OnDone = Callable[[Request, Completion], None]


class Teacher(Protocol):
    """What the corpus writer (`distill.generate.job`) and `distill eval` need from a teacher.

    Logprobs are the model's own (`raw_logprobs`: before temperature and top-p), so a corpus is
    the same whichever backend made it. Requests carry token ids (the chat template was applied
    once, by the caller); a backend never re-tokenises.

    Threading: `on_done` is called on the thread that called `generate` / `score`, one call at a
    time, in any order (each request exactly once); a backend may work on up to `window`
    requests at once and must not read `requests` further ahead than that, so that memory stays
    flat in the number of prompts.

    Errors: a teacher that fails (a server that stops answering after the retries, an engine that
    dies) raises `distill.launcher.ServerError` or a subclass, as one line naming the backend and
    what failed; `on_done` is not called for the requests that did not finish, and everything
    finished before stays with the caller (finished shards are kept; a rerun resumes). On any
    exception, including KeyboardInterrupt, requests in flight are abandoned so that the
    teacher can take the next job.
    """

    max_model_len: int
    """The longest prompt + response (tokens) the teacher takes: at least the `max_model_len`
    the constructor was given, or the constructor raised."""

    def generate(self, requests: Iterable[Request], sampling: Sampling, on_done: OnDone, window: int) -> None:
        """Answer each request's `prompt_token_ids` (seeded by `request.seed`), with the top
        `sampling.top_k` logprobs at every answer position."""

    def score(self, requests: Iterable[Request], top_k: int, on_done: OnDone, window: int) -> None:
        """Teacher forcing: the teacher's top-k (and the logprob of the given token) at each position
        of `request.response_token_ids`, conditioned on the prompt and the answer so far; the
        completion's tokens are the given ones and its finish reason `request.finish_reason`."""

    def close(self) -> None:
        """Stop what the constructor started (engines, actors, clients) and wait for it to exit."""


# backend name -> "module:Class" (a `Teacher` built as `Class(cfg, max_logprobs=, max_model_len=)`).
BACKENDS: dict[str, str] = {
    "local": "distill.generate.engine:VLLMTeacher",  # one vLLM engine in this process
    "ray": "distill.generate.ray_teacher:RayTeacher",  # vLLM engines in Ray actors
    "endpoint": "distill.generate.endpoint:EndpointTeacher",  # running vLLM OpenAI servers (`urls`)
}


def check_backend(name: str) -> str:
    """A `backend` value, refused in one line unless `BACKENDS` has it."""
    if name not in BACKENDS:
        raise ValueError(f"unknown teacher backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def start_teacher(cfg: TeacherJobConfig, *, max_logprobs: int, max_model_len: int) -> Teacher:
    """The backend `cfg.backend` names, started for `cfg.teacher`."""
    module, name = BACKENDS[check_backend(cfg.backend)].split(":")
    backend = getattr(importlib.import_module(module), name)
    return backend(cfg, max_logprobs=max_logprobs, max_model_len=max_model_len)
