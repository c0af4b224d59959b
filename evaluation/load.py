"""Latency and throughput of an OpenAI-compatible chat endpoint under fixed concurrency.

Each request streams; time to first token (TTFT) is taken at the first content chunk, time
per output token (TPOT) over the rest, and output tokens come from the server's usage count.
`ignore_eos` (a vLLM sampling extension) makes every reply exactly `max_tokens` long, so two
models are compared on the same amount of work rather than on how early each stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np


async def _one(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens,
            "latency": end - start}


async def _level(url: str, api_key: str | None, model: str, conversations: Sequence[list[dict]], concurrency: int,
                 requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key=api_key or "EMPTY", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def gated(i: int) -> dict | None:
        nonlocal failures
        async with gate:
            try:
                return await _one(client, model, conversations[i % len(conversations)], max_tokens)
            except openai.OpenAIError:
                failures += 1
                return None

    start = time.perf_counter()
    results = [r for r in await asyncio.gather(*(gated(i) for i in range(requests))) if r]
    wall = time.perf_counter() - start
    await client.close()
    if not results:
        raise ConnectionError(f"all {requests} requests to {url} failed")
    ttft = np.array([r["ttft"] for r in results]) * 1000
    tpot = np.array([r["tpot"] for r in results]) * 1000
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": requests, "failures": failures, "output_tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p95": float(np.percentile(ttft, 95)),
            "tpot_ms_p50": float(np.percentile(tpot, 50)), "tpot_ms_p95": float(np.percentile(tpot, 95))}


def measure(url: str, model: str, conversations: Sequence[list[dict]], concurrency: Sequence[int] = (1, 8, 32),
            requests: int = 64, max_tokens: int = 64, api_key: str | None = None) -> list[dict]:
    """One row per concurrency level; each level sends `max(requests, concurrency)` requests,
    after one unmeasured wave of `concurrency` requests (first-batch-size costs stay out)."""
    rows = []
    for c in concurrency:
        asyncio.run(_level(url, api_key, model, conversations, c, c, max_tokens))
        rows.append(asyncio.run(_level(url, api_key, model, conversations, c, max(requests, c), max_tokens)))
    return rows
