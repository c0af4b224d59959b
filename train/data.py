"""Corpus records -> training tensors, aligned for next-token prediction.

The student trains on `prompt_token_ids + response_token_ids` exactly as stored (never
re-tokenised). Position t of the sequence predicts token t + 1, so response token j (at
index P + j) is predicted at position P + j - 1, and that position carries the teacher's top-k
row j. Truncation to `max_length` cuts tokens and top-k rows together, and `loss_mask` from
curation removes positions from every loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def trainable(record: dict, max_length: int) -> bool:
    """A record keeps at least one target after truncation iff its prompt leaves room."""
    return len(record["prompt_token_ids"]) < max_length


@dataclass
class DistillCollator:
    """Batch of corpus records -> `input_ids`, `attention_mask [B, L]`, `labels [B, L]` (the
    token each position predicts, -100 where nothing is learned), `target_mask [B, L]`,
    `topk_ids [B, L, K]`, `topk_logprobs [B, L, K]` (zeros where `target_mask` is False), and
    `prompt_lengths [B]` (on-policy training samples continuations of `input_ids[i, :prompt_lengths[i]]`)."""

    pad_token_id: int
    max_length: int
    top_k: int

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        seqs = [list(r["prompt_token_ids"]) + list(r["response_token_ids"]) for r in records]
        for r, s in zip(records, seqs):
            if not trainable(r, self.max_length):
                raise ValueError(f"record {r['id']!r}: prompt of {len(r['prompt_token_ids'])} tokens leaves no room "
                                 f"for the response within max_length {self.max_length}; filter with `trainable`")
        length = min(self.max_length, max(len(s) for s in seqs))
        b, k = len(records), self.top_k
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), -100, dtype=torch.long)
        target = torch.zeros((b, length), dtype=torch.bool)
        topk_ids = torch.zeros((b, length, k), dtype=torch.long)
        topk_lps = torch.zeros((b, length, k), dtype=torch.float32)
        for i, (r, seq) in enumerate(zip(records, seqs)):
            seq = seq[:length]
            p = len(r["prompt_token_ids"])
            n = len(seq) - p  # response tokens kept after truncation
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
            rows = slice(p - 1, p - 1 + n)  # positions predicting response tokens 0..n-1
            labels[i, rows] = torch.tensor(seq[p:])
            keep = torch.tensor(r["loss_mask"][:n], dtype=torch.bool) if r.get("loss_mask") is not None \
                else torch.ones(n, dtype=torch.bool)
            target[i, rows] = keep
            topk_ids[i, rows] = torch.tensor(r["topk_token_ids"][:n], dtype=torch.long).reshape(n, k)
            topk_lps[i, rows] = torch.tensor(r["topk_logprobs"][:n], dtype=torch.float32).reshape(n, k)
        labels[~target] = -100
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "target_mask": target,
                "topk_ids": topk_ids, "topk_logprobs": topk_lps,
                "prompt_lengths": torch.tensor([len(r["prompt_token_ids"]) for r in records], dtype=torch.long)}
