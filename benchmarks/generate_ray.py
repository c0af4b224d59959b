"""What does the Ray backend cost over the in-process engine, and is the driver's memory flat?

1. Throughput: `distill generate` end to end on the same prompts and teacher, in-process
   (`backend: local`) against one Ray actor (`backend: ray`, one replica), interleaved, best of
   two each: tokens/s and their ratio (target Ray / in-process >= 0.90).
2. Driver memory: peak resident memory of this (driver) process above its level before the run,
   sampled every 20 ms, while the Ray backend answers N1 and then N2 prompts (one token each:
   requests, not tokens, are what the driver holds). Flat means the two peaks are close.

    python benchmarks/generate_ray.py [--model DIR] [--prompts N] [--max-tokens N] [--memory 1000 20000] [--quick]

Default model: the tiny test teacher (built once, cached), so the numbers measure overhead, not a GPU.
Needs the `scale` extra (Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

from common import Headline, emit, parse_args, tiny_models


class PeakRSS:
    """Peak resident memory of this process above its level at `__enter__`, in MiB."""

    def __enter__(self) -> Self:
        import psutil

        self._process = psutil.Process()
        self.base = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def write_prompts(path: Path, n: int) -> Path:
    from distill.tiny import synthetic_text

    lines = synthetic_text(n)
    path.write_text("".join(json.dumps({"id": f"s{i}", "prompt": line}) + "\n" for i, line in enumerate(lines)))
    return path


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="teacher model dir (default: the tiny test teacher)")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--memory", type=int, nargs=2, default=[1000, 20000], metavar=("N1", "N2"))
    args = parse_args(ap, argv, quick={"prompts": 64, "max_tokens": 16, "memory": [200, 2000]})
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import ray

    from distill import corpus
    from distill.config import GenerateConfig
    from distill.generate import generate
    from distill.generate.engine import VLLMTeacher
    from distill.generate.ray_teacher import RayTeacher
    from distill.generate.templating import model_max_len

    work = Path(tempfile.mkdtemp(prefix="distill-bench-ray-"))
    model = args.model or tiny_models()["llama-teacher"]
    cfg = GenerateConfig(teacher=str(model), prompts=write_prompts(work / "prompts.jsonl", args.prompts),
                         out=work / "unused", max_tokens=args.max_tokens, top_k=args.top_k, chunk_size=256)
    max_len = model_max_len(cfg)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    local = VLLMTeacher(cfg, max_logprobs=args.top_k, max_model_len=max_len)
    remote = RayTeacher(cfg.model_copy(update={"backend": "ray"}), max_logprobs=args.top_k, max_model_len=max_len)

    def run(name: str, teacher, c: GenerateConfig = cfg) -> tuple[float, int]:
        c = c.model_copy(update={"out": work / name})
        t = time.perf_counter()
        generate(c, teacher=teacher)
        return time.perf_counter() - t, corpus.corpus_stats(c.out).response_tokens

    run("warmup-local", local)
    run("warmup-ray", remote)
    runs: dict[str, list[tuple[float, int]]] = {"in-process": [], "ray, 1 actor": []}
    for i in range(2):  # interleaved, so drift on a noisy machine hits both
        runs["in-process"].append(run(f"local{i}", local))
        runs["ray, 1 actor"].append(run(f"ray{i}", remote))
    local.close()

    memory = {}
    for n in args.memory:
        c = cfg.model_copy(update={"prompts": write_prompts(work / f"prompts-{n}.jsonl", n), "max_tokens": 1})
        with PeakRSS() as rss:
            seconds, _ = run(f"memory-{n}", remote, c)
        memory[n] = (rss.mib, seconds)
    remote.close()
    ray.shutdown()

    print(f"\nmodel {model}, {args.prompts} synthetic prompts, max_tokens {args.max_tokens}, k={args.top_k}, "
          f"temperature 1.0, {os.cpu_count()} CPUs")
    print(f"{'backend (best of 2)':<24}{'tokens':>10}{'seconds':>10}{'tok/s':>12}")
    best = {}
    for name, rs in runs.items():
        seconds, tokens = max(rs, key=lambda r: r[1] / r[0])
        best[name] = tokens / seconds
        print(f"{name:<24}{tokens:>10,}{seconds:>10.2f}{best[name]:>12,.0f}")
    ratio = best["ray, 1 actor"] / best["in-process"]
    print(f"ratio Ray / in-process: {ratio:.3f}   (target >= 0.90)")
    print("\ndriver peak memory above its start, Ray backend, 1 token per prompt")
    for n, (mib, seconds) in memory.items():
        print(f"{n:>8,} prompts: {mib:8.1f} MiB   ({seconds:.1f} s)")
    (n1, (mib1, _)), (n2, (mib2, _)) = memory.items()
    return [Headline("Ray backend (1 actor), tokens/s", f"{best['ray, 1 actor']:,.0f}",
                     f"{ratio:.3f} of in-process (target >= 0.90)", met=ratio >= 0.90),
            Headline(f"driver peak memory, {n2:,} prompts", f"{mib2:.1f} MiB", f"{n1:,} prompts: {mib1:.1f} MiB")]


if __name__ == "__main__":
    emit(main())
