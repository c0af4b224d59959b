"""The teacher behind running vLLM OpenAI-compatible servers (`backend: endpoint`, `--urls URL`,
repeatable): a `distill.teacher.Teacher` over the one HTTP client for served teachers
(`distill.teacher_client.TeacherClient`: its retry policy, its `EndpointError`).

Prompts go out as token ids and answers come back as token ids, so records are token-exact like
the in-process engine's. Start the servers with `--logprobs-mode raw_logprobs --max-logprobs K`
so the stored distributions are the model's own (before temperature / top-p), as in-process; for
`score`, also `--no-enable-prefix-caching`.
"""

from __future__ import annotations

from collections.abc import Iterable

from distill.config import TeacherJobConfig
from distill.generate.templating import load_tokenizer
from distill.launcher import EndpointError
from distill.teacher import OnDone, Request, Sampling
from distill.teacher_client import TeacherClient


class EndpointTeacher:
    def __init__(self, cfg: TeacherJobConfig, max_logprobs: int, max_model_len: int):
        self.client = TeacherClient(cfg.urls, cfg.teacher, cfg.api_key, cfg.requests_per_url)
        served = self.client.max_model_len
        if served and served < max_model_len:
            raise EndpointError(f"endpoint {self.client.urls[0]} serves `{self.client.model}` with max_model_len "
                                f"{served}, below the {max_model_len} this job planned prompts for: set "
                                f"`max_model_len: {served}`")
        self.max_model_len = served or max_model_len
        # Prompt ids are made with the local tokenizer of `teacher`: the servers' must be the same.
        self.client.check_tokenizer(load_tokenizer(cfg), "`teacher`")

    def generate(self, requests: Iterable[Request], sampling: Sampling, on_done: OnDone, window: int) -> None:
        self.client.generate(requests, sampling, on_done, window)

    def score(self, requests: Iterable[Request], top_k: int, on_done: OnDone, window: int) -> None:
        self.client.score(requests, top_k, on_done, window)

    def close(self) -> None:
        """Nothing to stop: the servers are not this job's."""
