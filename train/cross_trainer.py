"""`CrossTokenizerTrainer`: `DistillTrainer` for a student of another tokenizer, one method
overridden: the loss is `cross_losses.cross_distill_loss` on `cross_tokenizer.CrossCollator`
batches (docs/recipes/cross-tokenizer.md). Everything else is the same trainer."""

from __future__ import annotations

import torch

from distill.config import CrossLossKind
from distill.train.cross_losses import cross_distill_loss
from distill.train.head import lm_head
from distill.train.trainer import DistillTrainer


class CrossTokenizerTrainer(DistillTrainer):
    def __init__(self, *args, kind: CrossLossKind, **kwargs):
        super().__init__(*args, **kwargs)
        self.kind = kind

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.distill
        scale = self.accelerator.num_processes if num_items_in_batch is not None and \
            self.args.average_tokens_across_devices else 1
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    output_hidden_states=True, logits_to_keep=1, use_cache=False)
        with lm_head(self.accelerator.unwrap_model(model)) as (weight, bias):
            loss, terms = cross_distill_loss(out.hidden_states[-1], weight, inputs, self.kind, self.offline_loss,
                                             alpha=cfg.alpha, bias=bias, chunk_size=cfg.chunk_size,
                                             num_items=num_items_in_batch)
        loss = loss * scale
        if model.training:
            kd, ce = self.accelerator.gather(torch.stack([terms["kd"], terms["ce"]]) * scale).view(-1, 2).mean(0).tolist()
            self._metrics["train"]["kd"].append(kd)
            self._metrics["train"]["ce"].append(ce)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training stopped at step {self.state.global_step + 1}: the loss is "
                                         f"{loss.item()}; no model was saved (lower `learning_rate`, or check the corpus)")
        return (loss, out) if return_outputs else loss
