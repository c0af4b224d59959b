"""Chunked vs plain KD loss: peak memory and time of forward + backward, same value.

Plain: `[T, V]` logits from hidden @ W^T, then `topk_kd_loss` (+ CE). Chunked:
`chunked_distill_loss` on the hidden states and W, chunk by chunk under checkpointing. Each
variant runs in a fresh subprocess so its peak RSS is its own. Target: chunked peak <= 1/4 of
plain, same loss value.

    python benchmarks/kd_loss.py [--vocab 151936] [--tokens 2048] [--hidden 896] [--k 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import Headline, emit, parse_args


def run(variant: str, vocab: int, tokens: int, hidden: int, k: int, chunk: int) -> dict:
    import torch

    from distill.train.losses import chunked_distill_loss, topk_kd_loss

    torch.manual_seed(0)
    h = torch.randn(1, tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    teacher = torch.log_softmax(torch.randn(1, tokens, k) * 2, -1) - 1.0  # top-k holding ~37 % of the mass
    ids = torch.randint(0, vocab, (1, tokens, k))
    labels = ids[..., 0]
    mask = torch.ones(1, tokens, dtype=torch.bool)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "plain":
        logits = h @ w.T  # [1, T, V]
        loss = 0.5 * topk_kd_loss(logits, ids, teacher, mask) + 0.5 * torch.nn.functional.cross_entropy(
            logits[mask], labels[mask])
    else:
        loss, _ = chunked_distill_loss(h, w, labels, ids, teacher, mask, alpha=0.5, chunk_size=chunk)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {"loss": loss.item(), "seconds": seconds, "peak_mib": peak / 1024, "grad_norm": w.grad.norm().item()}


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = parse_args(ap, argv, quick={"vocab": 32_000, "tokens": 1024, "hidden": 512})
    if args.variant:
        print(json.dumps(run(args.variant, args.vocab, args.tokens, args.hidden, args.k, args.chunk)))
        return []
    results = {}
    sizes = [f"--{name}={getattr(args, name)}" for name in ("vocab", "tokens", "hidden", "k", "chunk")]
    for variant in ("plain", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, *sizes],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"V={args.vocab:,} T={args.tokens:,} H={args.hidden} K={args.k}, chunk {args.chunk}, float32, CPU, "
          "forward + backward (alpha 0.5: KD + CE)")
    print(f"{'variant':<10}{'loss':>14}{'grad norm':>14}{'seconds':>10}{'peak MiB':>12}")
    for name, r in results.items():
        print(f"{name:<10}{r['loss']:>14.6f}{r['grad_norm']:>14.6f}{r['seconds']:>10.2f}{r['peak_mib']:>12,.0f}")
    p, c = results["plain"], results["chunked"]
    memory = c["peak_mib"] / p["peak_mib"]
    print(f"chunked / plain: peak memory {memory:.3f} (target <= 0.25), "
          f"time {c['seconds'] / p['seconds']:.2f}, |loss difference| {abs(c['loss'] - p['loss']):.2e}")
    return [Headline("chunked KD loss, peak memory", f"{c['peak_mib']:,.0f} MiB",
                     f"{memory:.3f} of plain (target <= 0.25)", met=memory <= 0.25),
            Headline("chunked KD loss, forward + backward", f"{c['seconds']:.2f} s",
                     f"{c['seconds'] / p['seconds']:.2f} of plain")]


if __name__ == "__main__":
    emit(main())
