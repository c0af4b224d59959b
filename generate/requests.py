"""What the corpus writer hands a teacher backend, and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Request:
    index: int  # position in the whole job; chunk = index // chunk_size
    id: str
    prompt_id: str
    messages: list[dict[str, str]]
    prompt_token_ids: list[int]
    seed: int = 0
    response_token_ids: list[int] = field(default_factory=list)  # score: the answer to score
    response: str | None = None  # score: its text
    finish_reason: str = "stop"  # score: an existing answer is a finished one


@dataclass
class Completion:
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
