"""Training step time: KD (alpha 0.5, chunked top-k KL + CE) vs SFT-only (transformers' own CE
loss) on the same model and batch, forward + backward + optimizer step. Target ratio <= 1.15.

    python benchmarks/train_step.py [--vocab 32000] [--hidden 256] [--layers 4] [--tokens 512] [--batch 4] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import Headline, emit, parse_args


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=1024)
    args = parse_args(ap, argv, quick={"vocab": 8_000, "hidden": 128, "layers": 2, "tokens": 256, "batch": 2,
                                       "steps": 3})
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.train.losses import chunked_distill_loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=args.tokens)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens))
    labels = ids.clone()
    labels[:, : args.tokens // 4] = -100  # the prompt quarter carries no target
    shifted = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # position t predicts token t + 1
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, args.tokens // 4 - 1: -1] = True
    topk_ids = torch.randint(0, args.vocab, (args.batch, args.tokens, args.k))
    topk_lps = torch.log_softmax(torch.randn(args.batch, args.tokens, args.k), -1) - 0.5

    def sft():
        return model(input_ids=ids, labels=labels).loss

    def kd():
        hidden = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        return chunked_distill_loss(hidden, model.lm_head.weight, shifted, topk_ids, topk_lps, mask, alpha=0.5,
                                    chunk_size=args.chunk)[0]

    def step_time(loss_fn) -> float:
        start = time.perf_counter()
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        return time.perf_counter() - start

    times = {"sft": [], "kd": []}
    step_time(sft), step_time(kd)  # warm-up
    for _ in range(args.steps):  # interleaved so machine noise hits both
        times["sft"].append(step_time(sft))
        times["kd"].append(step_time(kd))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"Llama {params:.1f}M params (V={args.vocab:,}, H={args.hidden}, L={args.layers}), batch {args.batch} x "
          f"{args.tokens} tokens, K={args.k}, float32, CPU, median of {args.steps} steps")
    print(f"{'loss':<32}{'s/step':>10}")
    for name, label in (("sft", "SFT only (transformers CE)"), ("kd", "KD alpha 0.5 (chunked KL + CE)")):
        print(f"{label:<32}{statistics.median(times[name]):>10.3f}")
    ratio = statistics.median(times["kd"]) / statistics.median(times["sft"])
    print(f"ratio KD / SFT: {ratio:.3f}   (target <= 1.15)")
    return [Headline("KD step (alpha 0.5), s/step", f"{statistics.median(times['kd']):.3f} s",
                     f"{ratio:.3f} of SFT (target <= 1.15)", met=ratio <= 1.15)]


if __name__ == "__main__":
    emit(main())
