"""The one HTTP client for a teacher served by vLLM's OpenAI-compatible server: generate's
`backend: endpoint` and on-policy training's teacher scoring both speak through it.

Everything travels as token ids on `/v1/completions`: prompts go out as ids (the chat template
was applied once, locally) and answers come back as ids (`return_token_ids`,
`return_tokens_as_token_ids`), so a served teacher's corpus is token-exact like the in-process
engine's. Scoring (teacher forcing) sends `prompt + response` with vLLM's `prompt_logprobs: k`
(and `max_tokens: 1`: vLLM refuses 0 without `echo`); `choices[0].prompt_logprobs[t]` is
`{token_id: {logprob, rank, decoded_token}}` for position t (the first is null): the k best plus
the given token when it ranks below them. Start the servers with `--logprobs-mode raw_logprobs
--max-logprobs K` (the model's own distributions, as in-process) and, for scoring,
`--no-enable-prefix-caching` (vLLM skips prefix-cache reads for prompt logprobs, and stale values
with prefix caching have been reported).

One retry policy: connection errors, timeouts, 408, 429 and 5xx are retried `ATTEMPTS` times in
all with exponential backoff; then, or on any other refusal, one `EndpointError` line naming the
server and the request. Requests go to the URL with the fewest outstanding ones.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from distill.launcher import EndpointError, server_root
from distill.teacher import Completion, OnDone, Request, Sampling

__all__ = ["EndpointError", "TeacherClient", "parse_choice", "parse_prompt_logprobs"]

ATTEMPTS = 5  # tries per request; waits between them: BACKOFF_S * 1, 2, 4, 8
BACKOFF_S = 0.5
TIMEOUT_S = 3600.0  # a long answer from a busy server; connecting gets CONNECT_TIMEOUT_S
CONNECT_TIMEOUT_S = 30.0
RETRIED_STATUS = {408, 429, 500, 502, 503, 504}
TOKEN_PREFIX = "token_id:"
TOKENIZER_PROBE = [{"role": "system", "content": "Tokenizer check."},
                   {"role": "user", "content": "Héllo, wörld! 12 345 + 6 = ? 😀"}]


def _token_id(key: str) -> int:
    if not key.startswith(TOKEN_PREFIX):
        raise EndpointError(f"server returned token {key!r}; it ignored `return_tokens_as_token_ids` (is it vLLM?)")
    return int(key[len(TOKEN_PREFIX):])


def parse_choice(choice: dict, k: int) -> Completion:
    """One `/v1/completions` choice of a generation -> the arrays the in-process engine produces."""
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


def parse_prompt_logprobs(rows: list, response_ids: Sequence[int], k: int, finish_reason: str = "stop") -> Completion:
    """vLLM's `prompt_logprobs` rows of `prompt + response` -> the response positions: the given
    token's logprob and the k best by rank."""
    start = len(rows) - len(response_ids)
    n = len(response_ids)
    ids = np.empty((n, k), dtype=np.int32)
    lps = np.empty((n, k), dtype=np.float32)
    given = np.empty(n, dtype=np.float32)
    for i, (row, token) in enumerate(zip(rows[start:], response_ids)):
        row = row or {}
        best = sorted(row.items(), key=lambda kv: kv[1]["rank"])[:k]
        if len(best) < k:
            raise EndpointError(f"the teacher returned {len(best)} prompt logprobs at position {start + i}, "
                                f"expected {k}: start it with `--max-logprobs {k}` or more")
        ids[i] = [int(t) for t, _ in best]
        lps[i] = [v["logprob"] for _, v in best]
        entry = row.get(str(int(token)))
        if entry is None:
            raise EndpointError(f"the teacher's prompt logprobs at position {start + i} lack the given token {token}")
        given[i] = entry["logprob"]
    return Completion(np.asarray(response_ids, dtype=np.int32), given, ids, lps, finish_reason)


def served_model(url: str, wanted: str | None, api_key: str | None) -> tuple[str, int]:
    """The name to request at `url` (with or without /v1) and its context length (0 when the server
    does not say): `wanted` if served, else the only model served."""
    import httpx

    try:
        response = httpx.get(f"{server_root(url)}/v1/models", headers=_headers(api_key), timeout=CONNECT_TIMEOUT_S)
        response.raise_for_status()
        models = response.json()["data"]
    except Exception as e:
        raise EndpointError(f"endpoint {url}: cannot list models ({type(e).__name__}: {e})") from None
    chosen = next((m for m in models if m["id"] == wanted), models[0] if len(models) == 1 else None)
    if chosen is None:
        raise EndpointError(f"endpoint {url} serves {[m['id'] for m in models]}, not `{wanted}`")
    return chosen["id"], int(chosen.get("max_model_len") or 0)


def check_served_tokenizer(url: str, model: str, api_key: str | None, text: str, ids: list[int], local: str) -> None:
    """Refuse a server whose tokenizer encodes `text` otherwise than the local one did (`ids`): token
    ids travel both ways, so a mismatch would silently feed the model garbage."""
    import httpx

    response = httpx.post(f"{server_root(url)}/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False},
                          headers=_headers(api_key), timeout=60)
    response.raise_for_status()
    if response.json()["tokens"] != ids:
        raise EndpointError(f"endpoint {url}: its tokenizer encodes text differently from the local {local} "
                            "tokenizer; point it at the served model")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key or 'EMPTY'}"}


class TeacherClient:
    """Running vLLM servers of one teacher (`urls`), verified at once: all reachable, all serving
    the same model (`model`, and its context `max_model_len`, 0 when unstated). `api_key`
    defaults to $VLLM_API_KEY. `concurrency`: requests in flight per URL."""

    def __init__(self, urls: str | Sequence[str], model: str | None = None, api_key: str | None = None,
                 concurrency: int = 64):
        self.urls = [server_root(u) for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise ValueError("a teacher client needs at least one URL")
        self.api_key = api_key or os.environ.get("VLLM_API_KEY")
        self.concurrency = concurrency
        found = [served_model(url, model, self.api_key) for url in self.urls]
        if len(set(found)) > 1:
            raise EndpointError(f"endpoints serve different models: {dict(zip(self.urls, found))}")
        self.model, self.max_model_len = found[0]

    def check_tokenizer(self, tokenizer, local: str) -> None:
        """Refuse servers whose tokenizer is not `tokenizer` (the `local` one: "teacher", "student"):
        requests and answers are token ids. The probe is a rendered chat when it has a template."""
        text = tokenizer.apply_chat_template(TOKENIZER_PROBE, tokenize=False, add_generation_prompt=True) \
            if getattr(tokenizer, "chat_template", None) else TOKENIZER_PROBE[1]["content"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for url in self.urls:
            check_served_tokenizer(url, self.model, self.api_key, text, ids, local)

    def generate(self, requests: Iterable[Request], sampling: Sampling, on_done: OnDone, window: int | None = None) -> None:
        """Answer each request (seeded), top `sampling.top_k` logprobs at each answer position;
        at most `window` requests in flight over all URLs (default: `concurrency` per URL)."""
        def body(req: Request) -> dict:
            return {"model": self.model, "prompt": req.prompt_token_ids, "max_tokens": sampling.max_tokens,
                    "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": req.seed,
                    "logprobs": sampling.top_k, "return_tokens_as_token_ids": True, "return_token_ids": True}

        self._run(requests, body, lambda req, choice: parse_choice(choice, sampling.top_k), on_done, window)

    def score(self, requests: Iterable[Request], top_k: int, on_done: OnDone, window: int | None = None) -> None:
        """Teacher forcing along each request's `response_token_ids` (see the module's docstring)."""
        def body(req: Request) -> dict:
            return {"model": self.model, "prompt": [*map(int, req.prompt_token_ids), *map(int, req.response_token_ids)],
                    "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k}

        def parse(req: Request, choice: dict) -> Completion:
            rows = choice.get("prompt_logprobs")
            if rows is None or len(rows) != len(req.prompt_token_ids) + len(req.response_token_ids):
                raise EndpointError("`prompt_logprobs` missing or of the wrong length (is it vLLM?)")
            return parse_prompt_logprobs(rows, req.response_token_ids, top_k, req.finish_reason)

        self._run(requests, body, parse, on_done, window)

    def score_pairs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], top_k: int) -> list[Completion]:
        """`score` for (prompt ids, response ids) pairs, in their order (on-policy training)."""
        done: dict[int, Completion] = {}
        requests = [Request(i, str(i), "", [], list(p), response_token_ids=list(r)) for i, (p, r) in enumerate(pairs)]
        self.score(requests, top_k, lambda req, completion: done.__setitem__(req.index, completion))
        return [done[i] for i in range(len(requests))]

    def _run(self, requests: Iterable[Request], body: Callable[[Request], dict],
             parse: Callable[[Request, dict], Completion], on_done: OnDone, window: int | None) -> None:
        in_flight = min(self.concurrency * len(self.urls), window or self.concurrency * len(self.urls))
        asyncio.run(self._run_async(requests, body, parse, on_done, in_flight))

    async def _run_async(self, requests, body, parse, on_done, in_flight: int) -> None:
        """Up to `in_flight` requests at once; the first failure stops new ones and is raised."""
        import httpx

        outstanding = [0] * len(self.urls)
        slots = asyncio.Semaphore(in_flight)
        errors: list[BaseException] = []
        limits = httpx.Limits(max_connections=self.concurrency * len(self.urls))
        timeout = httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S)

        async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=_headers(self.api_key)) as client:
            async def one(req: Request) -> None:
                i = min(range(len(self.urls)), key=outstanding.__getitem__)  # least outstanding
                outstanding[i] += 1
                try:
                    answer = await self._post(client, self.urls[i], body(req), req.id)
                    try:
                        completion = parse(req, answer["choices"][0])
                    except EndpointError as e:
                        raise EndpointError(f"teacher endpoint {self.urls[i]}, request {req.id}: {e}") from None
                except EndpointError as e:
                    errors.append(e)
                    return
                finally:
                    outstanding[i] -= 1
                    slots.release()
                on_done(req, completion)

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

    async def _post(self, client, url: str, body: dict, request_id: str) -> dict:
        """POST `/v1/completions` under the retry policy; a refusal, the last failure or an answer
        that is not JSON is an `EndpointError` naming the server and the request."""
        import httpx

        failure = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                response = await client.post(f"{url}/v1/completions", json=body)
            except httpx.TransportError as e:
                failure = f"{type(e).__name__}: {e}"
                continue
            if response.status_code in RETRIED_STATUS:
                failure = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise EndpointError(f"teacher endpoint {url} refused request {request_id} (HTTP {response.status_code}: "
                                    f"{response.text[:300]})")
            try:
                return response.json()
            except ValueError:
                raise EndpointError(f"teacher endpoint {url}, request {request_id}: the answer is not JSON") from None
        raise EndpointError(f"teacher endpoint {url} did not answer after {ATTEMPTS} attempts ({failure}), request "
                            f"{request_id}: is its server still running?")
