"""The GPU suite, training half: KD and SFT step time and peak memory of a student built from its
config (no weights downloaded), and the peak memory of the chunked vs the plain KD loss at that
vocabulary. On a GPU the default is a Qwen2.5-0.5B-shaped student (V = 151,936, H = 896, 24
layers) in bf16 at T = 4,096; `--quick` runs the same code on the CPU with a tiny student in
float32 in seconds (the test suite does). Not here yet: the vLLM half (`distill generate` vs raw
`LLM.generate` tokens/s, serving tok/s at concurrency 1/16/64).

A step: forward, loss, backward, AdamW step, on one sequence of T tokens with random token ids
and a random top-k teacher row (k = 20) per position. KD: `chunked_distill_loss` (alpha 0.5: KD
+ CE) on the last hidden states and the LM head, as `distill train` computes it; SFT: the model's
own cross-entropy. Peak memory: `torch.cuda.max_memory_allocated` on a GPU; on the CPU, the
growth of the process's peak RSS, each variant in a fresh process.

    python benchmarks/gpu_suite.py [--tokens 4096] [--steps 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import Headline, emit, parse_args

SHAPES = {
    # Qwen2.5-0.5B-Instruct's config.json: the student the issue names
    "qwen2.5-0.5b": dict(vocab_size=151_936, hidden_size=896, intermediate_size=4_864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(vocab_size=4_096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
}
K, ALPHA, CHUNK = 20, 0.5, 1024


def student(shape: str, device: str, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32_768, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def batch(vocab: int, tokens: int, device: str):
    """One sequence: ids, the label of each position (the next id), a top-k teacher row per position."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens + 1), generator=g)
    topk_ids = torch.randint(0, vocab, (1, tokens, K), generator=g)
    topk_ids[..., 0] = ids[:, 1:]
    topk_logprobs = torch.sort(torch.log_softmax(torch.randn(1, tokens, K, generator=g) * 2, -1) - 0.5,
                               dim=-1, descending=True).values
    return {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device), "topk_ids": topk_ids.to(device),
            "topk_logprobs": topk_logprobs.to(device), "mask": torch.ones(1, tokens, dtype=torch.bool, device=device)}


def step_loss(model, b: dict, objective: str):
    from distill.train.losses import chunked_distill_loss

    if objective == "sft":
        logits = model(input_ids=b["input_ids"]).logits
        return _cross_entropy(logits, b["labels"])
    hidden = model.model(input_ids=b["input_ids"]).last_hidden_state
    loss, _ = chunked_distill_loss(hidden, model.lm_head.weight, b["labels"], b["topk_ids"], b["topk_logprobs"],
                                   b["mask"], alpha=ALPHA, chunk_size=CHUNK)
    return loss


def _cross_entropy(logits, labels):
    import torch

    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def train_steps(shape: str, objective: str, tokens: int, steps: int, device: str) -> dict:
    """Seconds per step (median of `steps` after one warm-up step), tokens/s, peak memory."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = student(shape, device, dtype)
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    b = batch(model.config.vocab_size, tokens, device)
    times, losses = [], []
    base = _reset_peak(device)
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = step_loss(model, b, objective)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    seconds = sorted(times[1:])[len(times[1:]) // 2]
    return {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "peak_gib": _peak(device, base),
            "first_loss": losses[0], "last_loss": losses[-1], "dtype": str(dtype).replace("torch.", "")}


def loss_memory(variant: str, shape: str, tokens: int, device: str) -> dict:
    """Forward + backward of the KD loss alone on random hidden states and the LM head: peak memory."""
    import torch

    from distill.train.losses import chunked_distill_loss, topk_kd_loss

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vocab, hidden = SHAPES[shape]["vocab_size"], SHAPES[shape]["hidden_size"]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype).requires_grad_()
    b = batch(vocab, tokens, device)
    base = _reset_peak(device)
    started = time.perf_counter()
    if variant == "plain":
        logits = h @ w.T  # [1, T, V]
        loss = ALPHA * topk_kd_loss(logits, b["topk_ids"], b["topk_logprobs"], b["mask"]) + \
            (1 - ALPHA) * _cross_entropy(logits, b["labels"])
    else:
        loss, _ = chunked_distill_loss(h, w, b["labels"], b["topk_ids"], b["topk_logprobs"], b["mask"],
                                       alpha=ALPHA, chunk_size=CHUNK)
    loss.backward()
    _sync(device)
    return {"loss": loss.item(), "seconds": time.perf_counter() - started, "peak_gib": _peak(device, base)}


def _reset_peak(device: str) -> int:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak(device: str, base: int) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**30


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def in_fresh_process(what: str, args: argparse.Namespace, device: str) -> dict:
    """`what` (e.g. `train:kd`, `loss:plain`) in its own process: on the CPU its peak RSS is its own."""
    argv = [sys.executable, __file__, "--child", what, "--shape", args.shape, "--tokens", str(args.tokens),
            "--steps", str(args.steps), "--device", device, *(["--quick"] if args.quick else [])]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(what: str, args: argparse.Namespace) -> dict:
    import torch

    if args.quick:  # a check that the code runs, on a shared CPU: one thread, no oversubscription
        torch.set_num_threads(1)
    kind, variant = what.split(":")
    if kind == "train":
        return train_steps(args.shape, variant, args.tokens, args.steps, args.device)
    return loss_memory(variant, args.shape, args.tokens, args.device)


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=SHAPES, help="the student's shape [default: qwen2.5-0.5b; tiny with --quick]")
    ap.add_argument("--tokens", type=int, help="tokens per sequence [default: 4096; 128 with --quick]")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="[default: cuda when available]")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    # --quick: the CPU-sized run (what the test suite runs): tiny student, 128 tokens, 2 steps
    args = parse_args(ap, argv, quick={})
    if args.quick:
        args.shape, args.tokens, args.steps = args.shape or "tiny", args.tokens or 128, min(args.steps, 2)
    args.shape, args.tokens = args.shape or "qwen2.5-0.5b", args.tokens or 4096
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return []
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (no GPU: not a GPU number)"
    print(f"{where}; student {args.shape} {SHAPES[args.shape]}, T = {args.tokens:,}, k = {K}, median of "
          f"{args.steps} steps after a warm-up")
    results = {what: in_fresh_process(what, args, device) for what in ("train:kd", "train:sft", "loss:plain", "loss:chunked")}
    print(f"\n{'step':<10}{'dtype':>10}{'s/step':>10}{'tokens/s':>12}{'peak GiB':>10}{'loss first -> last':>24}")
    for objective in ("kd", "sft"):
        r = results[f"train:{objective}"]
        print(f"{objective:<10}{r['dtype']:>10}{r['seconds_per_step']:>10.3f}{r['tokens_per_s']:>12,.0f}"
              f"{r['peak_gib']:>10.2f}{r['first_loss']:>12.4f} -> {r['last_loss']:.4f}")
    plain, chunked = results["loss:plain"], results["loss:chunked"]
    print(f"\nKD loss alone (forward + backward, V = {SHAPES[args.shape]['vocab_size']:,}): plain {plain['peak_gib']:.3f} "
          f"GiB, chunked {chunked['peak_gib']:.3f} GiB (ratio {chunked['peak_gib'] / max(plain['peak_gib'], 1e-9):.3f}); "
          f"loss {plain['loss']:.5f} vs {chunked['loss']:.5f}")
    kd, sft = results["train:kd"], results["train:sft"]
    return [Headline(f"KD step, {args.shape}, T={args.tokens}, {device}", f"{kd['seconds_per_step']:.3f} s",
                     f"{kd['seconds_per_step'] / sft['seconds_per_step']:.2f}x the SFT step"),
            Headline("KD step peak memory", f"{kd['peak_gib']:.2f} GiB"),
            Headline("chunked KD loss peak memory", f"{chunked['peak_gib']:.3f} GiB",
                     f"{chunked['peak_gib'] / max(plain['peak_gib'], 1e-9):.3f} of plain")]


if __name__ == "__main__":
    emit(main())
