"""Online distillation: the teacher runs frozen inside training, on the same batch as the student.

`OnlineDistillTrainer` is `DistillTrainer` with `compute_loss` overridden (as TRL's GKD trainer
holds its teacher). Each step the teacher, in eval mode under `no_grad`, runs on the batch's
tokens for its hidden states only (`logits_to_keep=1`), and `losses.chunked_online_loss` builds
both models' logits a chunk of positions at a time: KD is the full-vocabulary divergence of the
config's `loss` kind (no top-k, no tail), and no `[B, T, V]` tensor exists for either model.
The stored top-k of the corpus is not read; its tokens are the CE targets and the text both
models see.

Optional intermediate-state loss (`hidden_weight` > 0): student layer i is matched to teacher
layer `layer_map[i]` (by default the `distill_layer_map` that `distill init-student` wrote into
the student's config.json), per response position:
- `mse`: ||h_s - h_t||^2 / ||h_t||^2, the squared error relative to the teacher state's squared
  norm, so `hidden_weight` means the same for a 576-wide and a 4096-wide model and for layers
  whose states differ in scale by orders of magnitude;
- `cosine`: 1 - cos(h_s, h_t).
It is averaged over the mapped layers and divided by the same target count as KD and CE (so it
adds up across gradient accumulation and processes the same way). A state at a model's last
layer is the one after the final norm (what `output_hidden_states` returns); when only one side
of a pair is a last layer, the other side is passed through its own model's final norm too, so
like is compared with like. Hidden sizes must match: a learned projection is not built.

Memory: the teacher's weights and, for one micro-batch, its activations without gradients (the
hidden states of every layer when the hidden loss is on); for a GPU, roughly the teacher's
parameters x bytes per parameter + batch x length x hidden x layers x bytes (hidden loss on) +
2 x chunk_size x vocabulary x 4 bytes for the two chunks of logits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from distill.config import HiddenLoss, TrainConfig
from distill.train.head import lm_head
from distill.train.init_student import LAYER_MAP_KEY
from distill.train.losses import chunked_online_loss
from distill.train.trainer import DistillTrainer


@dataclass(frozen=True)
class OnlinePlan:
    """What the online teacher's checks resolved, before either model loads."""

    layer_map: list[int] | None  # None: no intermediate-state loss
    teacher_layers: int
    student_layers: int


def check_online(cfg: TrainConfig) -> OnlinePlan:
    """Refuse, from the two configs and tokenizers only, a teacher the student cannot learn from
    online; resolve the layer map. One-line errors naming the field."""
    from transformers import AutoConfig, AutoTokenizer

    from distill.corpus import tokenizer_fingerprint

    if os.environ.get("ACCELERATE_USE_FSDP") == "true" or (
            os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        raise ValueError("the online `teacher` is not supported under FSDP or DeepSpeed ZeRO-3 (it would be loaded "
                         "whole on every process, unsharded): launch with examples/accelerate/ddp.yaml")
    student, teacher = AutoConfig.from_pretrained(cfg.student), AutoConfig.from_pretrained(cfg.teacher)
    if tokenizer_fingerprint(AutoTokenizer.from_pretrained(cfg.student)) != \
            tokenizer_fingerprint(AutoTokenizer.from_pretrained(cfg.teacher)):
        raise ValueError(f"`teacher` {cfg.teacher}: its tokenizer differs from the student's; the online teacher "
                         "must share the student's tokenizer")
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(f"`teacher` {cfg.teacher}: {teacher.vocab_size} output logits, the student has "
                         f"{student.vocab_size}; full-vocabulary KD needs the same vocabulary")
    n_student, n_teacher = student.num_hidden_layers, teacher.num_hidden_layers
    if cfg.hidden_weight == 0:
        return OnlinePlan(None, n_teacher, n_student)
    layer_map = cfg.layer_map if cfg.layer_map is not None else getattr(student, LAYER_MAP_KEY, None)
    if layer_map is None:
        raise ValueError(f"`layer_map`: the student {cfg.student} records no `{LAYER_MAP_KEY}` (it was not made by "
                         f"`distill init-student`): give one teacher layer per student layer, e.g. --layer-map 0,3,6")
    if len(layer_map) != n_student:
        raise ValueError(f"`layer_map` {layer_map} has {len(layer_map)} entries but the student has {n_student} "
                         "layers: give one teacher layer per student layer")
    if any(not 0 <= j < n_teacher for j in layer_map):
        raise ValueError(f"`layer_map` {layer_map}: teacher layers are 0..{n_teacher - 1}")
    if student.hidden_size != teacher.hidden_size:
        raise ValueError(f"`hidden_weight`: the teacher's hidden size {teacher.hidden_size} differs from the "
                         f"student's {student.hidden_size} and no projection is built: set hidden_weight 0")
    return OnlinePlan(list(layer_map), n_teacher, n_student)


def load_teacher(path: str, dtype: torch.dtype):
    """The teacher, frozen and in eval mode (no dropout, no gradients, never saved)."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    teacher.requires_grad_(False)
    return teacher


def hidden_state_loss(student_states, teacher_states, pairs: list[tuple[int, int]], mask: torch.Tensor,
                      kind: HiddenLoss) -> torch.Tensor:
    """Sum over the masked positions of the per-position loss averaged over `pairs` (student
    index, teacher index into the two `hidden_states` tuples). `*_states[i] [B, T, H]`, `mask [B, T]`."""
    m = mask.bool()
    total = 0.0
    for i, j in pairs:
        s, t = student_states[i][m].float(), teacher_states[j][m].float()  # [N, H]
        if kind == "mse":
            per = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-12)
        else:
            per = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-12)
        total = total + per.sum()
    return total / len(pairs)


class OnlineDistillTrainer(DistillTrainer):
    def __init__(self, *args, teacher_model, plan: OnlinePlan, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.to(self.accelerator.device)
        self.plan = plan

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg, plan = self.distill, self.plan
        scale = self.accelerator.num_processes if num_items_in_batch is not None and \
            self.args.average_tokens_across_devices else 1
        hidden = plan.layer_map is not None
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                 "output_hidden_states": True, "logits_to_keep": 1, "use_cache": False}
        out = model(**batch)
        with torch.no_grad():
            teacher_out = self.teacher_model(**batch)
        mask = inputs["target_mask"]
        teacher_head = self.teacher_model.get_output_embeddings()
        with lm_head(self.accelerator.unwrap_model(model)) as (weight, bias):
            loss, terms = chunked_online_loss(
                out.hidden_states[-1], weight, inputs["labels"].clamp(min=0), teacher_out.hidden_states[-1],
                teacher_head.weight, mask, self.offline_loss, alpha=cfg.alpha, bias=bias,
                teacher_bias=teacher_head.bias, chunk_size=cfg.chunk_size, num_items=num_items_in_batch)
        if hidden:
            denominator = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
            states, teacher_states = self._matched_states(model, out.hidden_states, teacher_out.hidden_states)
            pairs = [(i, i) for i in range(len(states))]
            terms["hidden"] = hidden_state_loss(states, teacher_states, pairs, mask, cfg.hidden_loss) / denominator
            loss = loss + cfg.hidden_weight * terms["hidden"]
            terms["hidden"] = terms["hidden"].detach()
        loss = loss * scale
        if model.training:
            self._log_terms(terms, scale)
            self._check_finite(loss)
        return (loss, out) if return_outputs else loss

    def _matched_states(self, model, student_states, teacher_states):
        """Student layer i's output beside teacher layer layer_map[i]'s (see the module's docstring
        for the final norm)."""
        last_s, last_t = self.plan.student_layers - 1, self.plan.teacher_layers - 1
        student_norm = self.accelerator.unwrap_model(model).get_decoder().norm
        teacher_norm = self.teacher_model.get_decoder().norm
        ours, theirs = [], []
        for i, j in enumerate(self.plan.layer_map):
            s, t = student_states[i + 1], teacher_states[j + 1]  # [0] is the embeddings' output
            if (i == last_s) != (j == last_t):
                s = s if i == last_s else student_norm(s)
                with torch.no_grad():
                    t = t if j == last_t else teacher_norm(t)
            ours.append(s)
            theirs.append(t)
        return ours, theirs
