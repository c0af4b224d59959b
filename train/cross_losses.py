"""Distillation losses between a teacher and a student of different tokenizers, on the spans of
`train/cross_tokenizer.py` (docs/recipes/cross-tokenizer.md). One kind per `CrossLossKind`:

- `span`: at a 1:1 span (one token each side), today's KD on the teacher's top-k mapped to
  student ids (`losses.LossSpec`'s divergence, tail and temperature; teacher tokens the student
  lacks count in the tail bin, so with the same tokenizer on both sides this *is* today's loss);
  at a longer span, the divergence between the two models' probability of the span's text, as
  two outcomes (this text, anything else): teacher log P = sum of the stored log-probabilities
  of its tokens, student log Q = sum of its own; plus the divergence between their
  distributions of the span's first byte (both define one: each token's mass on the byte it
  starts with). One term per span.
- `uld`: universal logit distillation (Boizard et al. 2024): at each span's first token, the
  L1 distance between the two probability vectors sorted in decreasing order, which needs no
  mapping between vocabularies. The teacher's vector is only known to its top-k, so both are
  compared on their k largest plus one bin for the rest (a lower bound of the full distance).
  Positions are paired through the spans, not by index as in the paper.

Every student response token also carries CE on its token (weight 1 - alpha), aligned or not.
The student's `[N, V]` logits are built `chunk_size` rows at a time under activation
checkpointing, so only per-row numbers are kept for backward (never `[B, T, V]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distill.config import CrossLossKind
from distill.train.losses import (
    _TINY,
    EMPTY_LOG,
    LossSpec,
    _divergence,
    _log1mexp,
    _partition,
    _upcast,
)

CROSS_KINDS = get_args(CrossLossKind)
BYTE_BINS = 257  # the next byte, or none (a special token: the end of turn)


def _chunk_rows(h, weight, bias, labels, topk_ids, first_byte, temperature: float):
    """Per row of a chunk: the student's log-probability of its label (T = 1), its tempered
    log-probabilities at `topk_ids` (-1 ids: EMPTY_LOG), its k largest probabilities (T = 1), its
    most likely token, and (with `first_byte [V]`, each token's first byte, 256 for none) its
    log-probabilities of the next byte `[c, 257]` (T = 1)."""
    logits = _upcast(F.linear(h, weight, bias))
    logprobs = torch.log_softmax(logits, dim=-1)
    label_lp = logprobs.gather(-1, labels[:, None]).squeeze(-1)
    tempered = logprobs if temperature == 1.0 else torch.log_softmax(logits / temperature, dim=-1)
    at_topk = tempered.gather(-1, topk_ids.clamp(min=0))
    at_topk = torch.where(topk_ids >= 0, at_topk, torch.full_like(at_topk, EMPTY_LOG))
    probs = logprobs.exp()
    largest = probs.topk(min(topk_ids.shape[-1], logits.shape[-1]), dim=-1).values
    next_byte = torch.zeros(probs.shape[0], BYTE_BINS, dtype=probs.dtype, device=probs.device).index_add(
        1, first_byte, probs).clamp(min=_TINY).log() if first_byte is not None else probs.new_zeros((probs.shape[0], 0))
    return label_lp, at_topk, largest, logits.argmax(-1), next_byte


def student_rows(h, weight, bias, labels, topk_ids, first_byte=None, temperature: float = 1.0, chunk_size: int = 1024):
    """`_chunk_rows` over all rows, a chunk at a time; under grad, each chunk's logits are
    recomputed in backward instead of kept."""
    parts = []
    for start in range(0, h.shape[0], chunk_size):
        args = (h[start:start + chunk_size], weight, bias, labels[start:start + chunk_size],
                topk_ids[start:start + chunk_size], first_byte, temperature)
        parts.append(checkpoint(_chunk_rows, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _chunk_rows(*args))
    if not parts:
        k = topk_ids.shape[-1]
        empty = h.new_zeros((0,), dtype=torch.float32)
        return (empty, h.new_zeros((0, k), dtype=torch.float32), h.new_zeros((0, k), dtype=torch.float32),
                labels.new_zeros((0,)), h.new_zeros((0, BYTE_BINS if first_byte is not None else 0)))
    return tuple(torch.cat(p) for p in zip(*parts))


def mapped_topk_kl(student_at_topk: torch.Tensor, teacher_logprobs: torch.Tensor, mapped: torch.Tensor,
                   spec: LossSpec = LossSpec()) -> torch.Tensor:
    """Today's KD (`spec`) per row on the teacher's top-k where `mapped` (the student has the
    token); the rest of the teacher's mass joins its tail bin. `[N, K]` -> `[N]`."""
    teacher = torch.where(mapped, teacher_logprobs, torch.full_like(teacher_logprobs, EMPTY_LOG))
    lq, lp = _partition(student_at_topk, teacher, spec)
    return _divergence(lq, lp, spec) * spec.temperature**2


def span_text_kl(student_logprob: torch.Tensor, teacher_logprob: torch.Tensor, spec: LossSpec = LossSpec()) -> torch.Tensor:
    """`spec`'s divergence between (P, 1 - P) and (Q, 1 - Q), P and Q the two models' probability
    of a span's text, from their log-probabilities `[S]` -> `[S]`."""
    lq = torch.stack([student_logprob.clamp(max=0.0), _log1mexp(student_logprob)], dim=-1)
    lp = torch.stack([teacher_logprob.clamp(max=0.0), _log1mexp(teacher_logprob)], dim=-1)
    return _divergence(lq, lp.to(lq.dtype), spec)


def next_byte_kl(student_next_byte: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_first_byte: torch.Tensor,
                 spec: LossSpec = LossSpec()) -> torch.Tensor:
    """`spec`'s divergence (at T = 1) between the two models' distributions of the next byte, which
    both define whatever their tokens: the teacher's from its top-k (each token's mass on its
    first byte; the mass outside the top-k in the tail bin), the student's `[S, 257]` from its whole
    vocabulary, on the bytes the teacher's top-k starts with plus the tail bin. `[S]`."""
    teacher = torch.zeros_like(student_next_byte).scatter_add(1, teacher_first_byte, teacher_logprobs.exp())
    present = teacher > 0
    lp = torch.where(present, teacher.clamp(min=_TINY).log(), torch.full_like(teacher, EMPTY_LOG))
    lq = torch.where(present, student_next_byte, torch.full_like(student_next_byte, EMPTY_LOG))
    lq, lp = _partition(lq, lp, LossSpec(kind=spec.kind, tail="bucket", beta=spec.beta))
    return _divergence(lq, lp, spec)


def uld(student_largest: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Universal logit distillation per row: sum_i |p_(i) - q_(i)| over both distributions' k
    largest probabilities in decreasing order, plus |P(rest) - Q(rest)|. `[N, K]` -> `[N]`."""
    p = teacher_logprobs.exp().sort(dim=-1, descending=True).values
    q = student_largest.sort(dim=-1, descending=True).values
    rest = ((1 - p.sum(-1)).clamp(min=0) - (1 - q.sum(-1)).clamp(min=0)).abs()
    return (p - q).abs().sum(-1) + rest


@dataclass(frozen=True)
class SpanRows:
    """The student's numbers on a `CrossCollator` batch: per trained token its log-probability
    (`label_lp [N]`, T = 1), and per span, read at the span's first student token (spans in order):
    its tempered log-probabilities at the teacher's mapped top-k (`at_topk [S, K]`), its k largest
    probabilities (`largest [S, K]`), its most likely token (`argmax [S]`), its log-probabilities of
    the next byte (`next_byte [S, 257]`), and the sum of its log-probabilities of the span's tokens
    (`span_lp [S]`)."""

    label_lp: torch.Tensor
    at_topk: torch.Tensor
    largest: torch.Tensor
    argmax: torch.Tensor
    next_byte: torch.Tensor
    span_lp: torch.Tensor


def span_rows(hidden: torch.Tensor, weight: torch.Tensor, batch: dict[str, torch.Tensor], spec: LossSpec = LossSpec(),
              bias: torch.Tensor | None = None, chunk_size: int = 1024) -> SpanRows:
    m = batch["target_mask"].bool()
    span_index, span_of = batch["span_index"][m], batch["span_of"][m]
    first = span_index >= 0
    # each row's teacher top-k: its span's if it is the span's first token, else none (-1)
    topk_ids = torch.full((span_index.shape[0], batch["span_topk_ids"].shape[-1]), -1, dtype=torch.long,
                          device=hidden.device)
    topk_ids[first] = batch["span_topk_ids"][span_index[first]]
    # embedding rows past the tokenizer's (padding) spell nothing
    first_byte = F.pad(batch["student_first_byte"], (0, weight.shape[0] - batch["student_first_byte"].shape[0]),
                       value=BYTE_BINS - 1)
    label_lp, at_topk, largest, argmax, next_byte = student_rows(
        hidden[m], weight, bias, batch["labels"][m], topk_ids, first_byte, spec.temperature, chunk_size)
    order = torch.empty_like(span_index[first])  # row of each span's first token, in span order
    order[span_index[first]] = torch.arange(int(first.sum()), device=order.device)
    inside = span_of >= 0
    span_lp = torch.zeros(batch["span_teacher_logprob"].shape[0], dtype=label_lp.dtype, device=label_lp.device
                          ).index_add(0, span_of[inside], label_lp[inside])
    return SpanRows(label_lp, *(t[first][order] for t in (at_topk, largest, argmax, next_byte)), span_lp)


def span_kd(rows: SpanRows, batch: dict[str, torch.Tensor], kind: CrossLossKind, spec: LossSpec = LossSpec()) -> torch.Tensor:
    """The KD term of each span `[S]` (module docstring)."""
    if kind not in CROSS_KINDS:
        raise ValueError(f"cross-tokenizer loss must be one of {CROSS_KINDS}, got {kind!r}")
    teacher_topk = batch["span_topk_logprobs"].to(rows.at_topk.dtype)
    if kind == "uld":
        return uld(rows.largest, teacher_topk)
    one_to_one = batch["span_one_to_one"]
    token = mapped_topk_kl(rows.at_topk, teacher_topk, batch["span_topk_ids"] >= 0, spec)
    text = span_text_kl(rows.span_lp, batch["span_teacher_logprob"].to(rows.span_lp.dtype), spec)
    byte = next_byte_kl(rows.next_byte, teacher_topk, batch["span_topk_first_byte"], spec)
    return torch.where(one_to_one, token, text + byte)


def cross_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, batch: dict[str, torch.Tensor],
                       kind: CrossLossKind, spec: LossSpec = LossSpec(), *, alpha: float = 0.5,
                       bias: torch.Tensor | None = None, chunk_size: int = 1024,
                       num_items: int | torch.Tensor | None = None):
    """alpha * KD (`kind`, one term per span) + (1 - alpha) * CE (every trained student token), from
    the student's last hidden states `[B, T, H]`, its LM head and a `CrossCollator` batch; divided by
    `num_items` (the accumulated batch's trained tokens) or this batch's. Returns
    `(loss, {"kd": ..., "ce": ...})`, both terms detached and per trained token."""
    rows = span_rows(hidden, weight, batch, spec, bias, chunk_size)
    kd_sum, ce_sum = span_kd(rows, batch, kind, spec).sum(), -rows.label_lp.sum()
    denominator = num_items if num_items is not None else batch["target_mask"].sum().clamp(min=1)
    loss = (alpha * kd_sum + (1 - alpha) * ce_sum) / denominator
    return loss, {"kd": (kd_sum / denominator).detach(), "ce": (ce_sum / denominator).detach()}
