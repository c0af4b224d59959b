"""The teacher behind running vLLM OpenAI-compatible servers (`--endpoint`, repeatable).

Prompts go out as token ids on `/v1/completions` (the chat template was applied once, here),
answers come back as token ids (`return_token_ids`, `return_tokens_as_token_ids`), so records
are token-exact like the in-process engine's. Requests go to the endpoint with the fewest
outstanding ones; the `openai` client retries connection errors, 429 and 5xx with backoff.
Start the servers with `--logprobs-mode raw_logprobs --max-logprobs K` so the stored
distributions are the model's own (before temperature / top-p), as in-process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import numpy as np

from distill.generate.requests import Completion, Request, Sampling
from distill.launcher import EndpointError, check_served_tokenizer, served_model

__all__ = ["EndpointError", "EndpointTeacher", "parse_choice"]

log = logging.getLogger(__name__)
TOKEN_PREFIX = "token_id:"


def _token_id(key: str) -> int:
    if not key.startswith(TOKEN_PREFIX):
        raise EndpointError(f"server returned token {key!r}; it ignored `return_tokens_as_token_ids` (is it vLLM?)")
    return int(key[len(TOKEN_PREFIX):])


def parse_choice(choice: dict, k: int) -> Completion:
    """One `/v1/completions` choice -> the same arrays the in-process engine produces."""
    lp = choice.get("logprobs") or {}
    tokens, token_lps, tops = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")
    if tokens is None or tops is None:
        raise EndpointError("server response has no logprobs")
    ids = np.array([_token_id(t) for t in tokens], dtype=np.int32)
    if choice.get("token_ids") is not None and list(choice["token_ids"]) != ids.tolist():
        raise EndpointError("server's `token_ids` and logprob tokens disagree")
    topk_ids = np.empty((len(ids), k), dtype=np.int32)
    topk_lps = np.empty((len(ids), k), dtype=np.float32)
    for i, top in enumerate(tops):
        # The k best plus, when it is not among them, the sampled token.
        best = sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:k]
        if len(best) < k:
            raise EndpointError(f"server returned {len(best)} top logprobs, expected {k}: raise its `--max-logprobs`")
        topk_ids[i] = [_token_id(t) for t, _ in best]
        topk_lps[i] = [v for _, v in best]
    return Completion(ids, np.asarray(token_lps, dtype=np.float32), topk_ids, topk_lps,
                      choice.get("finish_reason") or "abort")


class EndpointTeacher:
    def __init__(self, urls: list[str], model: str, api_key: str | None, concurrency: int):
        from openai import AsyncOpenAI

        self.urls = [u.rstrip("/") for u in urls]
        base = [u if u.endswith("/v1") else f"{u}/v1" for u in self.urls]
        self.concurrency = concurrency
        self._client_args = [dict(base_url=b, api_key=api_key or "EMPTY", max_retries=6, timeout=3600) for b in base]
        self._async_client = AsyncOpenAI
        self.model, self.max_model_len = self._discover(model)

    def _discover(self, wanted: str) -> tuple[str, int]:
        """The served model name and context length, agreed by every endpoint."""
        found = [served_model(url, wanted, args["api_key"]) for url, args in zip(self.urls, self._client_args)]
        if len(set(found)) > 1:
            raise EndpointError(f"endpoints serve different models: {dict(zip(self.urls, found))}")
        return found[0]

    def check_tokenizer(self, text: str, ids: list[int]) -> None:
        """Refuse a server whose tokenizer differs from the local one: prompt ids are made locally."""
        for url, args in zip(self.urls, self._client_args):
            check_served_tokenizer(url, self.model, args["api_key"], text, ids, "`teacher`")

    def generate(self, requests: Iterable[Request], sampling: Sampling,
                 on_done: Callable[[Request, Completion], None], window: int) -> None:
        asyncio.run(self._generate(requests, sampling, on_done))

    async def _generate(self, requests, sampling: Sampling, on_done) -> None:
        clients = [self._async_client(**args) for args in self._client_args]
        outstanding = [0] * len(clients)
        slots = asyncio.Semaphore(self.concurrency * len(clients))

        errors: list[BaseException] = []

        async def one(req: Request) -> None:
            i = min(range(len(clients)), key=outstanding.__getitem__)  # least outstanding
            outstanding[i] += 1
            try:
                response = await clients[i].completions.create(
                    model=self.model, prompt=req.prompt_token_ids, max_tokens=sampling.max_tokens,
                    temperature=sampling.temperature, top_p=sampling.top_p, seed=req.seed,
                    logprobs=sampling.top_k,
                    extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
                on_done(req, parse_choice(response.choices[0].model_dump(), sampling.top_k))
            except Exception as e:
                errors.append(EndpointError(f"endpoint {self.urls[i]}, request {req.id}: {type(e).__name__}: {e}"))
            finally:
                outstanding[i] -= 1
                slots.release()

        tasks: set[asyncio.Task] = set()
        try:
            for req in requests:
                await slots.acquire()
                if errors:
                    break
                task = asyncio.create_task(one(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
            if errors:
                raise errors[0]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in clients:
                await c.close()
