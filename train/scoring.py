"""Teacher-forced scoring: a student read along the teacher's own responses.

Per response token: the divergence a `LossSpec` names on the teacher's stored top-k (by default
forward KL(teacher || student) at T=1 on the bucket partition of `losses`, exact on k+1
outcomes), whether the student's argmax is the teacher's top-1, and the student's negative
log-likelihood of the teacher's token. The head is applied to
a chunk of positions at a time, so a 150k vocabulary never materialises `[B, T, V]` logits.
One loop for `train`'s held-out metrics and `eval`'s fidelity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distill.train.data import DistillCollator
from distill.train.head import lm_head
from distill.train.losses import LossSpec, kd_per_position


@dataclass
class TeacherForced:
    records: int
    tokens: int
    kl: float  # the scoring LossSpec's divergence (forward KL unless told), nats per token
    top1_agreement: float
    nll: float  # of the teacher's token, nats per token
    per_record_kl: list[float]  # mean KL per token of each record

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll))


def pad_token_id(tokenizer) -> int:
    """Padding is masked out everywhere; models without a pad token pad with EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def teacher_forced(model, records: Sequence[dict], collator: DistillCollator, batch_size: int,
                   spec: LossSpec = LossSpec(), chunk_size: int = 2048) -> TeacherForced:
    """`records`: anything indexable by position (a list of corpus records, a `datasets.Dataset`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kl_sum, counts = np.zeros(len(records)), np.zeros(len(records))
    agree = nll = 0.0
    for start in range(0, len(records), batch_size):
        rows = [records[i] for i in range(start, min(len(records), start + batch_size))]
        batch = {key: v.to(device) for key, v in collator(rows).items()}
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True, logits_to_keep=1).hidden_states[-1]  # (B, L, H)
        m = batch["target_mask"]
        row_of = (m.nonzero()[:, 0] + start).cpu().numpy()  # record index of each target position
        h, ids, lps, labels = hidden[m], batch["topk_ids"][m], batch["topk_logprobs"][m], batch["labels"][m]
        with lm_head(model) as (weight, bias):
            for c in range(0, h.shape[0], chunk_size):
                s = slice(c, c + chunk_size)
                logits = torch.nn.functional.linear(h[s], weight, bias).float()  # (chunk, V)
                kl = kd_per_position(logits, ids[s], lps[s], spec)
                np.add.at(kl_sum, row_of[s], kl.cpu().numpy())
                np.add.at(counts, row_of[s], 1)
                # the teacher's top-1 (with a teacher dimension, `ensemble: sum`: the first teacher's)
                top1 = ids[s].reshape(ids[s].shape[0], -1)[:, 0]
                agree += (logits.argmax(-1) == top1).sum().item()
                nll -= torch.log_softmax(logits, -1).gather(-1, labels[s, None]).sum().item()
    model.train(was_training)
    tokens = max(counts.sum(), 1)
    return TeacherForced(records=len(records), tokens=int(counts.sum()), kl=float(kl_sum.sum() / tokens),
                         top1_agreement=agree / tokens, nll=nll / tokens,
                         per_record_kl=(kl_sum / np.maximum(counts, 1)).tolist())
