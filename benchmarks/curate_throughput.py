"""How fast is `distill curate`? Records/s of the default pipeline (without and with the dedup
filters) and of `dedup_near` alone, on a synthetic corpus (default 100k records, k=20), versus
a plain-Python loop that turns each record into a dict and calls the same filters' per-record
`check` (the way an ad-hoc script would). Targets: >= 5,000 records/s for the non-dedup
filters; near-dedup of 100k records in under 2 minutes.

    python benchmarks/curate_throughput.py [--records 100000] [--baseline-records 5000] [--quick]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Headline, emit, parse_args

from distill import corpus
from distill.curation.pipeline import build_filters, columns_read, judge_shard
from distill.curation.report import Report
from distill.tiny import WORDS

K = 20
NON_DEDUP = ["finish_reason", "length", "repetition", "refusal", "pii", "teacher_confidence"]
DEFAULT = NON_DEDUP[:5] + ["dedup_exact", "dedup_near", "teacher_confidence"]


def synthetic_corpus(root: Path, n: int, shard: int = 2000, seed: int = 0) -> Path:
    """Answers of 10-80 words; ~5 % exact and ~5 % near duplicates, a few loops and refusals."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    texts: list[str] = []
    for i in range(n):
        roll = rng.random()
        if texts and roll < 0.05:
            text = rng.choice(texts)
        elif texts and roll < 0.10:
            words = rng.choice(texts).split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            text = " ".join(words)
        elif roll < 0.11:
            text = "I cannot help with that. " * rng.randint(2, 20)
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 80))) + "."
        texts.append(text)
    for start in range(0, n, shard):
        records = []
        for i in range(start, min(n, start + shard)):
            t = len(texts[i].split()) + 1
            top = np.sort(np_rng.uniform(-12, 0, size=(t, K)).astype(np.float32), axis=1)[:, ::-1]
            records.append({
                "id": f"r{i}", "prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"question {i}"}],
                "response": texts[i], "prompt_token_ids": [1, 2, 3], "response_token_ids": np.arange(t) % 500,
                "response_logprobs": top[:, 0].copy(), "topk_token_ids": np_rng.integers(0, 50000, size=(t, K)),
                "topk_logprobs": top, "finish_reason": "stop" if rng.random() > 0.02 else "length"})
        corpus.write_shard(root, start // shard, corpus.records_to_table(records, K))
    corpus.write_manifest(root, corpus.Manifest(teacher={"model": "synthetic"}, generation={"top_k": K},
                                                stats=corpus.corpus_stats(root)))
    return root


def run_pipeline(root: Path, names: list[str]) -> tuple[float, int]:
    filters = build_filters(names)
    report = Report([f.name for f in filters])
    t = time.perf_counter()
    kept = 0
    for path in corpus.shard_paths(root):  # as `curate` filters a shard, less the writing
        kept += int(judge_shard(path, filters, None, None, report, columns_read(filters), batch_size=1024).keep.sum())
    return time.perf_counter() - t, kept


def run_plain_loop(root: Path, names: list[str], limit: int) -> tuple[float, int, int]:
    filters = build_filters(names)
    t, seen, kept = time.perf_counter(), 0, 0
    for path in corpus.shard_paths(root):
        for record in corpus.read_shard(path).to_pylist():
            kept += all(f.check(record) is None for f in filters)
            seen += 1
            if seen == limit:
                return time.perf_counter() - t, seen, kept
    return time.perf_counter() - t, seen, kept


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--baseline-records", type=int, default=5_000, help="the plain loop is slow: run it on a prefix")
    args = parse_args(ap, argv, quick={"records": 5_000, "baseline_records": 1_000})
    root = Path(tempfile.mkdtemp(prefix="distill-curate-bench-")) / "corpus"
    t = time.perf_counter()
    synthetic_corpus(root, args.records)
    print(f"synthetic corpus: {args.records:,} records, k={K}, built in {time.perf_counter() - t:.1f} s")

    print(f"\n{'pipeline':<34}{'records':>10}{'seconds':>10}{'records/s':>12}{'kept':>10}")
    rates, speedups = {}, {}
    for label, names in (("non-dedup filters", NON_DEDUP), ("default pipeline", DEFAULT), ("dedup_near alone", ["dedup_near"])):
        sec, kept = run_pipeline(root, names)
        rates[label] = args.records / sec
        print(f"{label:<34}{args.records:>10,}{sec:>10.1f}{rates[label]:>12,.0f}{kept:>10,}")
    for label, names in (("non-dedup filters", NON_DEDUP), ("default pipeline", DEFAULT)):
        sec, seen, _ = run_plain_loop(root, names, args.baseline_records)
        rate = seen / sec
        speedups[label] = rates[label] / rate
        print(f"{'plain loop: ' + label:<34}{seen:>10,}{sec:>10.1f}{rate:>12,.0f}{'':>10}"
              f"   distill is {speedups[label]:.1f}x faster")
    near_seconds = args.records / rates["dedup_near alone"]
    print(f"\ntargets: non-dedup >= 5,000 records/s (got {rates['non-dedup filters']:,.0f}); "
          f"dedup_near of {args.records:,} records < 120 s (got {near_seconds:.1f} s)")
    return [
        *(Headline(f"{label}, records/s", f"{rates[label]:,.0f}", f"{speedups[label]:.1f}x the plain loop",
                   met=rates[label] >= 5_000 if label == "non-dedup filters" else None) for label in speedups),
        Headline(f"dedup_near, {args.records:,} records", f"{near_seconds:.1f} s",
                 met=near_seconds < 120 * args.records / 100_000),
    ]


if __name__ == "__main__":
    emit(main())
