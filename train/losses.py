"""Token-level distillation losses against a teacher's stored top-k distribution.

At each response position the teacher left k token ids with their log-probabilities (raw,
temperature 1). The student's full-vocabulary distribution is compared with it on a partition
the teacher fully describes:

- `tail="bucket"`: the k tokens plus one extra bin holding everything else (teacher: the
  missing mass 1 - sum p_k; student: its mass outside those k). This is the exact KL between
  the two distributions coarsened to k+1 outcomes; with k = V it is the full KL.
- `tail="renormalize"`: both distributions restricted to the k tokens and renormalised.

Temperature T (Hinton et al.): the student's logits are divided by T; the teacher is
re-tempered over what is stored (p_i^(1/T), renormalised over the k tokens, or over the k+1
bins with the tail bin treated as one token: exact for `renormalize`, an approximation for
`bucket` since the tail's own shape is unknown); the loss is multiplied by T^2 so gradient
magnitudes stay comparable across temperatures.

Kinds, with P the teacher and Q the student on the partition:
`forward_kl` KL(P||Q) (mean-seeking), `reverse_kl` KL(Q||P) (mode-seeking), and `jsd`:
beta KL(P||M) + (1-beta) KL(Q||M) with M = beta P + (1-beta) Q (beta = 0.5: symmetric JSD).
`LossSpec` holds the kind, T, the tail and beta: built once from the config (`LossSpec.from_config`,
`LossSpec.on_policy`), checked once, and handed whole to every loss function.

Several teachers (docs/recipes/multi-teacher.md): a top-k row may be padded to a common width
with `PAD_LOGPROB` slots (corpora of different k, a mixture's union of ids), which count as
outcomes of probability 0 for both teacher and student. With a teacher dimension (`topk_* [N, M,
K]`, `ensemble: sum`), the KD term is the weighted sum of the per-teacher divergences, each on its
own teacher's partition, with `LossSpec.teacher_weights` (normalised to sum 1).

`topk_kd_loss` works on `[B, T, V]` logits and is the reference. `chunked_distill_loss` is what
training uses: it takes the last hidden states and the LM head weight and, a chunk of positions
at a time, builds that chunk's logits and takes their gradients at once (fused), so `[B*T, V]`
logits are never held and never recomputed; it also returns the CE term on the same logits.
`chunked_online_loss` is the same against a teacher run in the training process
(`train/online.py`): the teacher's logits are built from its last hidden states chunk by chunk
too, and the divergence is taken over the whole vocabulary (`full_vocab_kd_per_position`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, get_args

import torch
import torch.nn.functional as F

from distill.config import LossKind, LossTail

if TYPE_CHECKING:
    from distill.config import TrainConfig

KINDS, TAILS = get_args(LossKind), get_args(LossTail)
_TINY = 1e-30
TAIL_FLOOR = 1e-6
EMPTY_LOG = -1e4  # log of an empty bin: exp() is exactly 0, and 0 * finite stays 0
# A padded top-k slot's teacher logprob: no stored logprob is this low (vLLM writes -inf as -9999).
PAD_LOGPROB = EMPTY_LOG


@dataclass(frozen=True)
class LossSpec:
    """Which divergence, on which partition, at which temperature: everything a KD loss needs
    besides the tensors, checked once when built."""

    kind: LossKind = "forward_kl"
    temperature: float = 1.0
    tail: LossTail = "bucket"
    beta: float = 0.5  # the JSD's interpolation weight (`kind="jsd"` only)
    # `ensemble: sum`: one weight per teacher of a `[N, M, K]` top-k, summing to 1; () = one teacher
    teacher_weights: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {self.kind!r}")
        if self.tail not in TAILS:
            raise ValueError(f"`tail` must be one of {TAILS}, got {self.tail!r}")
        if self.kind == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"`beta` must be in (0, 1) for jsd, got {self.beta}")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}")
        if self.teacher_weights and (min(self.teacher_weights) < 0 or abs(sum(self.teacher_weights) - 1) > 1e-6):
            raise ValueError(f"`teacher_weights` must be >= 0 and sum to 1, got {self.teacher_weights}")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LossSpec:
        """The loss on the stored corpus."""
        weights = tuple(cfg.normalised_teacher_weights()) if cfg.ensemble == "sum" else ()
        return cls(kind=cfg.loss, temperature=cfg.kd_temperature, tail=cfg.tail, beta=cfg.beta, teacher_weights=weights)

    @classmethod
    def on_policy(cls, cfg: TrainConfig) -> LossSpec:
        """The loss on the student's own samples: the corpus loss with `on_policy_loss`'s divergence
        (one teacher scores each sample: no teacher dimension)."""
        return replace(cls.from_config(cfg), kind=cfg.on_policy_loss, teacher_weights=())

    def as_metric(self) -> LossSpec:
        """What held-out metrics and the on-policy KL report whatever the loss: forward KL at
        temperature 1 on this partition (with several teachers: their weighted sum)."""
        return LossSpec(tail=self.tail, teacher_weights=self.teacher_weights)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _log1mexp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_x)) for log_x <= 0, stable near 0, floored so that log(0) stays finite.
    Each branch only ever sees inputs where it is finite: `torch.where` alone would still send
    0 * inf = NaN back through the branch it did not pick (a student certain of a token, x = 0)."""
    x = log_x.clamp(max=0.0)
    small = x > -0.6931
    near_zero = torch.log((-torch.expm1(torch.where(small, x, -1.0))).clamp(min=_TINY))
    far = torch.log1p(-torch.exp(torch.where(small, -1.0, x)))
    return torch.where(small, near_zero, far).clamp(min=math.log(_TINY))


def _partition(student_logprobs_k: torch.Tensor, teacher_logprobs_k: torch.Tensor, spec: LossSpec):
    """Both distributions on the same outcomes, as log-probabilities `[N, K(+1)]`.
    `student_logprobs_k`: the student's tempered log-softmax gathered at the teacher's ids."""
    temperature = spec.temperature
    if spec.tail == "renormalize":
        return (torch.log_softmax(student_logprobs_k, dim=-1),
                torch.log_softmax(teacher_logprobs_k / temperature, dim=-1))
    s_tail = _log1mexp(torch.logsumexp(student_logprobs_k, dim=-1, keepdim=True))
    t_tail = _log1mexp(torch.logsumexp(teacher_logprobs_k, dim=-1, keepdim=True))
    # A teacher tail below 1e-6 is rounding noise of the stored values (float16 alone is ~1e-3):
    # count it as empty, or re-tempering would inflate it (1e-16 ** (1/2) = 1e-8).
    t_tail = torch.where(t_tail < math.log(TAIL_FLOOR), torch.full_like(t_tail, EMPTY_LOG), t_tail)
    teacher = torch.cat([teacher_logprobs_k, t_tail], dim=-1)
    if temperature != 1.0:
        teacher = torch.log_softmax(teacher / temperature, dim=-1)
    return torch.cat([student_logprobs_k, s_tail], dim=-1), teacher


def _divergence(lq: torch.Tensor, lp: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Per row: divergence between teacher P = exp(lp) and student Q = exp(lq) `[N, K'] -> [N]`."""
    if spec.kind == "forward_kl":
        return (lp.exp() * (lp - lq)).sum(-1)
    if spec.kind == "reverse_kl":
        return (lq.exp() * (lq - lp)).sum(-1)
    beta = spec.beta  # jsd
    lm = torch.logsumexp(torch.stack([lp + torch.log(torch.tensor(beta, dtype=lp.dtype)),
                                      lq + torch.log(torch.tensor(1 - beta, dtype=lq.dtype))]), dim=0)
    return beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)


def kd_per_position(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                    spec: LossSpec = LossSpec()) -> torch.Tensor:
    """`logits [N, V]`, `topk_ids [N, K]`, `topk_logprobs [N, K]` -> KD loss per position `[N]`
    (already multiplied by T^2). With a teacher dimension (`topk_* [N, M, K]`): the sum over
    teachers of `spec.teacher_weights[m]` times teacher m's divergence."""
    student = torch.log_softmax(_upcast(logits) / spec.temperature, dim=-1)  # over ~150k entries: >= float32
    n, k = topk_ids.shape[0], topk_ids.shape[-1]
    teachers = topk_ids.shape[1] if topk_ids.dim() == 3 else 0
    if teachers and len(spec.teacher_weights) != teachers:
        raise ValueError(f"top-k rows of {teachers} teachers need as many `teacher_weights`, got {spec.teacher_weights}")
    gathered = student.gather(-1, topk_ids.reshape(n, -1).long()).reshape(-1, k)  # [N(*M), K]
    teacher = topk_logprobs.reshape(-1, k).to(student.dtype)
    pad = teacher <= PAD_LOGPROB  # padded slots: probability 0 on both sides, no gradient
    lq, lp = _partition(torch.where(pad, EMPTY_LOG, gathered), teacher, spec)
    per = _divergence(lq, lp, spec) * spec.temperature**2
    if not teachers:
        return per
    return per.view(n, teachers) @ torch.tensor(spec.teacher_weights, dtype=per.dtype, device=per.device)


def topk_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 mask: torch.Tensor, spec: LossSpec = LossSpec()) -> torch.Tensor:
    """Mean KD loss over the masked positions. `student_logits [B, T, V]` (position t already
    predicts the token whose teacher top-k is row t), `topk_* [B, T, K]`, `mask [B, T]` bool."""
    m = mask.bool()
    per = kd_per_position(student_logits[m], topk_ids[m], topk_logprobs[m], spec)
    return per.sum() / m.sum().clamp(min=1)


def _chunk_sums(hidden, weight, bias, labels, topk_ids, topk_logprobs, spec: LossSpec):
    logits = F.linear(hidden, weight, bias)  # [c, V]: only this chunk's
    kd = kd_per_position(logits, topk_ids, topk_logprobs, spec)
    ce = F.cross_entropy(_upcast(logits), labels, reduction="sum")
    return kd.sum(), ce


def full_vocab_kd_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                               spec: LossSpec = LossSpec()) -> torch.Tensor:
    """`student_logits`, `teacher_logits [N, V]` -> the divergence of `spec.kind` over the whole
    vocabulary per position `[N]`, both tempered by T, times T^2 (`spec.tail` plays no part: nothing
    is cut off)."""
    lq = torch.log_softmax(_upcast(student_logits) / spec.temperature, dim=-1)
    lp = torch.log_softmax(_upcast(teacher_logits).to(lq.dtype) / spec.temperature, dim=-1)
    return _divergence(lq, lp, spec) * spec.temperature**2


def _online_chunk_sums(hidden, weight, bias, labels, teacher_hidden, spec: LossSpec, teacher_head):
    logits = F.linear(hidden, weight, bias)  # [c, V]
    with torch.no_grad():
        teacher_logits = F.linear(teacher_hidden, *teacher_head)  # [c, V]: the teacher's, this chunk only
    kd = full_vocab_kd_per_position(logits, teacher_logits, spec)
    ce = F.cross_entropy(_upcast(logits), labels, reduction="sum")
    return kd.sum(), ce


class _FusedChunkedLoss(torch.autograd.Function):
    """Forward and backward of each chunk happen together in `forward` (like a fused linear
    cross-entropy): the chunk's logits are built once, their gradients taken at once, and only
    gradients of the size of the inputs are kept for `backward`. No logits are recomputed.
    `rows`: per-position tensors cut into the same chunks and handed to `chunk_sums(h, weight,
    bias, *rows) -> (kd sum, ce sum)` (the stored top-k, or the teacher's hidden states)."""

    @staticmethod
    def forward(ctx, h, weight, bias, rows, coefficients, chunk_sums, chunk_size):
        alpha, denominator = coefficients
        needs = (h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        grads = [torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)
                 if need else None for t, need in zip((h, weight, bias), needs)]
        kd_sum = ce_sum = torch.zeros((), dtype=grads[0].dtype if grads[0] is not None else torch.float32,
                                      device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(need) if t is not None else None
                          for t, need in zip((h[sl], weight, bias), needs)]
                kd, ce = chunk_sums(*leaves, *(r[sl] for r in rows))
                wanted = [(i, t) for i, (t, need) in enumerate(zip(leaves, needs)) if need]
                if wanted:
                    loss = (alpha * kd + (1 - alpha) * ce) / denominator
                    for (i, _), g in zip(wanted, torch.autograd.grad(loss, [t for _, t in wanted])):
                        if i == 0:
                            grads[0][sl] += g
                        else:
                            grads[i] += g
            kd_sum, ce_sum = kd_sum + kd.detach(), ce_sum + ce.detach()
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.needs, ctx.dtypes = needs, [t.dtype if t is not None else None for t in (h, weight, bias)]
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return (alpha * kd_sum + (1 - alpha) * ce_sum) / denominator, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        out = [(g * grad_loss).to(dtype) if need else None
               for g, need, dtype in zip(ctx.saved_tensors, ctx.needs, ctx.dtypes)]
        return (*out, None, None, None, None)


def _chunked(h, weight, bias, rows, chunk_sums, alpha, denominator, chunk_size):
    """(loss, kd sum, ce sum) over the rows of `h [N, H]`, a chunk of positions at a time."""
    if torch.is_grad_enabled():
        return _FusedChunkedLoss.apply(h, weight, bias, rows, (alpha, denominator), chunk_sums, chunk_size)
    kd_sum = ce_sum = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        kd, ce = chunk_sums(h[sl], weight, bias, *(r[sl] for r in rows))
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
    return (alpha * kd_sum + (1 - alpha) * ce_sum) / denominator, kd_sum, ce_sum


def chunked_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, mask: torch.Tensor,
                         spec: LossSpec = LossSpec(), *, alpha: float = 0.5, bias: torch.Tensor | None = None,
                         chunk_size: int = 1024, num_items: int | torch.Tensor | None = None):
    """alpha * KD + (1 - alpha) * CE over the masked positions, from `hidden [B, T, H]` and the
    LM head `weight [V, H]` (+ `bias`). `labels [B, T]`: the token each position must predict.
    Sums are divided by `num_items` (the target count of the whole accumulated batch, as TRL /
    transformers pass it) or else by this batch's masked count, so gradients do not depend on
    how a batch is split. Returns `(loss, {"kd": mean KD, "ce": mean CE})`, both detached."""
    m = mask.bool()
    denominator = num_items if num_items is not None else m.sum().clamp(min=1)
    rows = (labels[m], topk_ids[m], topk_logprobs[m])  # [N, ...]: masked rows only
    loss, kd_sum, ce_sum = _chunked(hidden[m], weight, bias, rows, partial(_chunk_sums, spec=spec), alpha,
                                    denominator, chunk_size)
    return loss, {"kd": (kd_sum / denominator).detach(), "ce": (ce_sum / denominator).detach()}


def chunked_online_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher_hidden: torch.Tensor,
                        teacher_weight: torch.Tensor, mask: torch.Tensor, spec: LossSpec = LossSpec(), *,
                        alpha: float = 0.5, bias: torch.Tensor | None = None,
                        teacher_bias: torch.Tensor | None = None, chunk_size: int = 1024,
                        num_items: int | torch.Tensor | None = None):
    """`chunked_distill_loss` against a teacher run in the same process: alpha * full-vocabulary KD
    + (1 - alpha) * CE, from the student's `hidden [B, T, H]` and head `weight [V, H]` and the
    teacher's last hidden states `teacher_hidden [B, T, H_t]` and head `teacher_weight [V, H_t]`.
    Both models' logits are built a chunk of `chunk_size` positions at a time: no `[B, T, V]`
    tensor exists for either. Same denominators and return value as `chunked_distill_loss`."""
    m = mask.bool()
    denominator = num_items if num_items is not None else m.sum().clamp(min=1)
    chunk_sums = partial(_online_chunk_sums, spec=spec, teacher_head=(teacher_weight.detach(),
                         None if teacher_bias is None else teacher_bias.detach()))
    loss, kd_sum, ce_sum = _chunked(hidden[m], weight, bias, (labels[m], teacher_hidden[m].detach()), chunk_sums,
                                    alpha, denominator, chunk_size)
    return loss, {"kd": (kd_sum / denominator).detach(), "ce": (ce_sum / denominator).detach()}
