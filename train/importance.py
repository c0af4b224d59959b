"""Layer importance for depth pruning: Block Influence (ShortGPT, Men et al. 2024).

A decoder layer's Block Influence on calibration text is 1 - cos(h_in, h_out), the cosine
between the hidden state entering the layer and the one leaving it, averaged over every token
of every calibration sequence. A layer that barely turns the residual stream (BI near 0) is one
the network can lose; `distill init-student --select importance` keeps the layers with the
highest BI, the first and the last always (they map embeddings in and out of the stream).
The calibration text is a corpus from `generate` (prompt + the teacher's answer, in the
teacher's chat template): the text the student will be trained on.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch

from distill import corpus


def calibration_ids(root: Path, samples: int, max_tokens: int = 512) -> list[list[int]]:
    """Prompt + response token ids of the first `samples` records of the corpus at `root` (what
    `generate` stored: the teacher's chat template, its own answers), cut to `max_tokens`."""
    ids = [(list(r["prompt_token_ids"]) + list(r["response_token_ids"]))[:max_tokens]
           for r in itertools.islice(corpus.iter_records(root), samples)]
    if not ids:
        raise ValueError(f"`calibration` {root}: the corpus holds no record to measure layer importance on")
    return ids


@torch.no_grad()
def block_influence(model, layers: torch.nn.ModuleList, prompts: Sequence[Sequence[int]]) -> list[float]:
    """BI of each of `layers` (the model's decoder layers), averaged over all tokens of `prompts`,
    each run alone (no padding to mask out)."""
    sums = torch.zeros(len(layers), dtype=torch.float64)
    seen = {}

    def hook(index):
        def record(module, args, kwargs, output):
            h_in = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0])[0]  # [T, H]
            h_out = (output[0] if isinstance(output, tuple) else output)[0]
            seen[index] = (1 - torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)).sum()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    tokens = 0
    try:
        model.eval()
        device = next(model.parameters()).device
        for ids in prompts:
            seen.clear()
            model(torch.tensor([list(ids)], device=device), use_cache=False)
            sums += torch.stack([seen[i] for i in range(len(layers))]).cpu()
            tokens += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    return (sums / tokens).tolist()


def most_important(scores: Sequence[float], keep: int) -> list[int]:
    """The `keep` layers to keep: the first and the last, then the highest scores; in order."""
    total = len(scores)
    if not 2 <= keep <= total:
        raise ValueError(f"`num_layers`: importance selection keeps the first and last layers, so 2..{total}, got {keep}")
    middle = sorted(range(1, total - 1), key=lambda i: (-scores[i], i))[:keep - 2]
    return sorted([0, total - 1, *middle])
