"""The teacher in-process: one vLLM `LLM`, fed continuously, finished requests streamed back."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from distill.config import TeacherConfig
from distill.engine import engine_kwargs
from distill.teacher import Completion, Request, Sampling


def split_flat(flat, start_position: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """vLLM's `FlatLogprobs` from `start_position` on -> (token ids [T], their logprobs [T],
    top-k ids [T, k], top-k logprobs [T, k]). Each position holds the sampled (or prompt)
    token first, then the k best in rank order; the first may repeat one of the k."""
    begin = flat.start_indices[start_position] if start_position < len(flat) else len(flat.token_ids)
    ids = np.asarray(flat.token_ids[begin:], dtype=np.int32)
    lps = np.asarray(flat.logprobs[begin:], dtype=np.float32)
    positions = len(flat) - start_position
    if ids.size != positions * (k + 1):
        raise RuntimeError(f"vLLM returned {ids.size} logprobs for {positions} positions, expected k+1={k + 1} each")
    ids, lps = ids.reshape(positions, k + 1), lps.reshape(positions, k + 1)
    return ids[:, 0], lps[:, 0], ids[:, 1:], lps[:, 1:]


# vLLM's engine process gives its workers 5 s, then SIGTERM and 4 s more: room for all of it.
SHUTDOWN_TIMEOUT_S = 30


class VLLMTeacher:
    def __init__(self, cfg: TeacherConfig, max_logprobs: int, max_model_len: int):
        from vllm import LLM

        self.llm = LLM(**engine_kwargs(cfg.teacher, cfg, max_logprobs, max_model_len))
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def close(self) -> None:
        """Stop the engine processes and wait for their clean exit, in which they unlink their
        shared memory. Left to the interpreter's exit, vLLM gives the engine process 5 s and
        then SIGKILLs it, mid-teardown on a busy machine: the `resource_tracker: ... leaked
        shared_memory` warning."""
        self.llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)

    def generate(self, requests: Iterable[Request], sampling: Sampling,
                 on_done: Callable[[Request, Completion], None], window: int) -> None:
        from vllm import SamplingParams

        def params(req: Request) -> SamplingParams:
            return SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                  top_p=sampling.top_p, seed=req.seed, logprobs=sampling.top_k,
                                  flat_logprobs=True, detokenize=False)

        def convert(req: Request, output) -> Completion:
            out = output.outputs[0]
            ids, lps, topk_ids, topk_lps = split_flat(out.logprobs, 0, sampling.top_k)
            return Completion(ids, lps, topk_ids, topk_lps, out.finish_reason or "abort")

        self._run(requests, lambda r: r.prompt_token_ids, params, convert, on_done, window)

    def score(self, requests: Iterable[Request], top_k: int,
              on_done: Callable[[Request, Completion], None], window: int) -> None:
        """Teacher forcing: top-k along `prompt + response` via `prompt_logprobs`."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, flat_logprobs=True, detokenize=False)

        def convert(req: Request, output) -> Completion:
            ids, lps, topk_ids, topk_lps = split_flat(output.prompt_logprobs, len(req.prompt_token_ids), top_k)
            return Completion(ids, lps, topk_ids, topk_lps, req.finish_reason)

        self._run(requests, lambda r: r.prompt_token_ids + r.response_token_ids, lambda r: params,
                  convert, on_done, window)

    def _run(self, requests, token_ids, params, convert, on_done, window: int) -> None:
        """Keep up to `window` requests in the engine; refill as they finish."""
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        pending = iter(requests)
        in_flight: dict[str, Request] = {}
        exhausted = False
        try:
            while True:
                while not exhausted and len(in_flight) < window:
                    req = next(pending, None)
                    if req is None:
                        exhausted = True
                        break
                    # Outputs carry the id given here; vLLM's internal id gets a suffix.
                    engine.add_request(req.id, TokensPrompt(prompt_token_ids=token_ids(req)), params(req))
                    in_flight[req.id] = req
                if not in_flight:
                    return
                for output in engine.step():
                    if output.finished:
                        req = in_flight.pop(output.request_id)
                        on_done(req, convert(req, output))
        finally:
            if in_flight:  # interrupted: leave the engine clean for its next job
                engine.abort_request(list(in_flight), internal=False)
