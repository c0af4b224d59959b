"""On-policy distillation: the student samples, a served teacher scores the student's own tokens.

`TeacherEndpoint` sends `prompt + response` token ids to a vLLM server's `/v1/completions` with
vLLM's `prompt_logprobs: k` (and `max_tokens: 1`: vLLM refuses 0 without `echo`); the answer's
`choices[0].prompt_logprobs[t]` is `{token_id: {logprob, rank, decoded_token}}` for position t
(the first is null), the k best plus the realised token when it ranks below them. The rows of the
response positions, cut to the k best by rank, are exactly a corpus record's `topk_token_ids` /
`topk_logprobs`, so `DistillCollator` and `chunked_distill_loss` (top-k + tail partition) take
them as they take the stored corpus. Run the teacher with `--no-enable-prefix-caching`: vLLM skips
prefix-cache reads for prompt logprobs, and stale values with prefix caching have been reported.

Why not TRL's on-policy trainers (trl 1.16: `DistillationTrainer`, experimental `GKDTrainer`,
`ServerDistillationTrainer`, `AsyncDistillationTrainer`)? They take a prompt dataset and a teacher
of their own (a local model, or a server whose reverse KL / JSD is restricted to the top-1
token), with their own loss. Ours mixes, in one batch, records of the curated offline corpus with
on-policy samples, both on the same top-k + tail partition of `train/losses.py` for any k and any
divergence, inside the `SFTTrainer` subclass that already holds checkpoints, resume, PEFT and DDP.
What this adds is small: sampling with `transformers.generate` (CPU-sized students; a student
behind vLLM is not done) and the scoring client below.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from distill.launcher import (
    EndpointError,
    check_served_tokenizer,
    served_model,
    server_root,
)
from distill.train.data import DistillCollator
from distill.train.scoring import TeacherForced, teacher_forced

TOKENIZER_PROBE = "Tokenizer check: Héllo, wörld! 12 345 + 6 = ? 😀"
RETRIED_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass
class Scored:
    """The teacher's top-k along one response: `topk_ids [n, k]` int64, `topk_logprobs [n, k]` float32."""

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


def parse_prompt_logprobs(rows: list, start: int, k: int) -> Scored:
    """vLLM's `prompt_logprobs` rows from position `start` on -> the k best of each by rank."""
    ids = np.empty((len(rows) - start, k), dtype=np.int64)
    lps = np.empty((len(rows) - start, k), dtype=np.float32)
    for i, row in enumerate(rows[start:]):
        best = sorted((row or {}).items(), key=lambda kv: kv[1]["rank"])[:k]
        if len(best) < k:
            raise EndpointError(f"the teacher returned {len(best)} prompt logprobs at position {start + i}, "
                                f"expected {k}: start it with `--max-logprobs {k}` or more")
        ids[i] = [int(token) for token, _ in best]
        lps[i] = [v["logprob"] for _, v in best]
    return Scored(ids, lps)


class TeacherEndpoint:
    """A running vLLM server of the teacher, verified once (model, tokenizer), scoring token ids."""

    def __init__(self, url: str, top_k: int, *, model: str | None = None, api_key: str | None = None,
                 attempts: int = 5, backoff: float = 1.0, timeout: float = 600.0, concurrency: int = 8):
        self.url, self.top_k, self.api_key = server_root(url), top_k, api_key
        self.attempts, self.backoff, self.timeout, self.concurrency = attempts, backoff, timeout, concurrency
        self.model, self.max_model_len = served_model(self.url, model, api_key)

    def check_tokenizer(self, tokenizer) -> None:
        """The student's tokenizer must be the teacher's: requests and answers are token ids."""
        check_served_tokenizer(self.url, self.model, self.api_key, TOKENIZER_PROBE,
                               tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"], "student")

    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Scored:
        """The teacher's top-k at each response position, conditioned on the prompt and the response so far."""
        sequence = [*map(int, prompt_ids), *map(int, response_ids)]
        body = {"model": self.model, "prompt": sequence, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.top_k}
        rows = self._post("/v1/completions", body)["choices"][0]["prompt_logprobs"]
        if rows is None or len(rows) != len(sequence):
            raise EndpointError(f"endpoint {self.url}: `prompt_logprobs` missing or of the wrong length (is it vLLM?)")
        return parse_prompt_logprobs(rows, len(prompt_ids), self.top_k)

    def score_many(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scored]:
        with ThreadPoolExecutor(min(self.concurrency, max(len(pairs), 1))) as pool:
            return list(pool.map(lambda pair: self.score(*pair), pairs))

    def _post(self, path: str, body: dict) -> dict:
        """POST with retries and exponential backoff on connection errors, timeouts, 429 and 5xx; then
        one line naming the server and the last failure."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key or 'EMPTY'}"}
        failure = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = httpx.post(self.url + path, json=body, headers=headers, timeout=self.timeout)
            except httpx.TransportError as e:
                failure = f"{type(e).__name__}: {e}"
                continue
            if response.status_code in RETRIED_STATUS:
                failure = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise EndpointError(f"teacher endpoint {self.url} refused the request (HTTP {response.status_code}: "
                                    f"{response.text[:300]})")
            return response.json()
        raise EndpointError(f"teacher endpoint {self.url} did not answer after {self.attempts} attempts ({failure}): "
                            "is its server still running?")


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
           pad_token_id: int, eos_token_id: int | list[int] | None) -> list[list[int]]:
    """The student's continuation of each prompt (transformers `generate`, left-padded, the model in
    eval mode for the call), cut after its first EOS (kept: the teacher scores it like any token)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(list(p), device=device)
        attention[i, width - len(p):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id, use_cache=True, **sampling)
    model.train(was_training)
    stops = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]) - {None}
    responses = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        responses.append(row[:end])
    return responses


def on_policy_records(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      scored: Sequence[Scored]) -> list[dict]:
    """Student samples + teacher scores as corpus-shaped records, for `DistillCollator`."""
    return [{"id": f"on-policy-{i}", "prompt_token_ids": list(p), "response_token_ids": list(r),
             "topk_token_ids": s.topk_ids, "topk_logprobs": s.topk_logprobs}
            for i, (p, r, s) in enumerate(zip(prompts, responses, scored))]


def teacher_scored_kl(model, prompts: Sequence[Sequence[int]], teacher: TeacherEndpoint, *, max_new_tokens: int,
                      temperature: float, pad_token_id: int, eos_token_id, batch_size: int = 8) -> TeacherForced:
    """The on-policy divergence of a student: it answers `prompts` itself (greedy at temperature 0),
    the teacher scores those answers, and `kl` is KL(teacher || student) per answer token on the
    teacher's top-k + tail partition: the forward KL that `eval` and held-out metrics measure on the
    teacher's own text, here on the student's. (Reverse KL there is unbounded: where the teacher's
    top-k holds all but 1e-6 of its mass, any student mass outside them costs ~1e4 nats per unit.)"""
    responses = [r for start in range(0, len(prompts), batch_size)
                 for r in sample(model, prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                                 temperature=temperature, pad_token_id=pad_token_id, eos_token_id=eos_token_id)]
    records = on_policy_records(prompts, responses, teacher.score_many(list(zip(prompts, responses))))
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    return teacher_forced(model, records, DistillCollator(pad_token_id, length, teacher.top_k), batch_size)
