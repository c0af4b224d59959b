"""`CrossTokenizerTrainer`: `DistillTrainer` for a student of another tokenizer
(docs/recipes/cross-tokenizer.md). Two methods overridden: a batch's loss is
`cross_losses.cross_distill_loss` on `cross_tokenizer.CrossCollator` batches, and on-policy the
teacher scores its own tokens of the student's answer texts, aligned with the student's sampled
tokens. Everything else (mixing, logging, checkpoints, resume) is the same trainer."""

from __future__ import annotations

import torch

from distill.train.cross_losses import cross_distill_loss, span_kd, span_rows
from distill.train.cross_tokenizer import CrossCollator, CrossTokenizer, aligned_record, teacher_tokens
from distill.train.head import lm_head
from distill.train.losses import LossSpec
from distill.train.trainer import DistillTrainer


class CrossTokenizerTrainer(DistillTrainer):
    def __init__(self, *args, plan: CrossTokenizer, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan

    def _batch_loss(self, model, batch: dict, alpha: float, spec: LossSpec, num_items, measure_on_policy: bool):
        """`on_policy_kl` here is the forward KL per aligned span (what `distill eval` reports as
        span KL), not per token."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, logits_to_keep=1, use_cache=False)
        with lm_head(self.accelerator.unwrap_model(model)) as (weight, bias):
            hidden = out.hidden_states[-1]
            loss, terms = cross_distill_loss(hidden, weight, batch, self.plan.kind, spec, alpha=alpha, bias=bias,
                                             chunk_size=self.distill.chunk_size, num_items=num_items)
            if measure_on_policy:
                with torch.no_grad():
                    rows = span_rows(hidden, weight, batch, spec.as_metric(), bias, self.distill.chunk_size)
                    kl = span_kd(rows, batch, "span", spec.as_metric())
                self._metrics["train"]["on_policy_kl"].append(float(kl.mean()) if kl.numel() else 0.0)
        return out, loss, terms

    def _scored_samples(self, inputs: dict, prompts: list[list[int]], responses: list[list[int]],
                        routes: list[int] | None) -> dict:
        """The teacher scores the text of each sample in its own tokens, after its own tokens of the
        prompt; the spans of the two tokenisations carry its numbers to the student's tokens."""
        cfg, n = self.distill, len(prompts)
        teacher_prompts = [row[:length].tolist() for row, length in
                           zip(inputs["teacher_prompt_ids"][:n], inputs["teacher_prompt_lengths"][:n].tolist())]
        theirs = [teacher_tokens(r, self.plan) for r in responses]
        scored = self.teacher.score_pairs(list(zip(teacher_prompts, theirs)), cfg.teacher_top_k, routes)
        self._metrics["train"]["teacher_tokens"].append(sum(len(t) for t in theirs))
        records = [aligned_record(f"on-policy-{i}", p, tp, t, r, c.response_logprobs, c.topk_token_ids,
                                  c.topk_logprobs, self.plan)
                   for i, (p, tp, t, r, c) in enumerate(zip(prompts, teacher_prompts, theirs, responses, scored))]
        return CrossCollator(self.data_collator.pad_token_id, cfg.max_length, cfg.teacher_top_k,
                             self.plan.vocabularies.student_first_byte)(records)
