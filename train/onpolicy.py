"""On-policy distillation: the student samples, a served teacher scores the student's own tokens.

The teacher is reached through `distill.teacher_client.TeacherClient` (the one client for served
teachers: its retry policy, its `EndpointError`): `score_pairs` sends `prompt + response` token
ids and returns the teacher's top-k at each response position. Those rows are exactly a corpus
record's `topk_token_ids` / `topk_logprobs`, so `DistillCollator` and `chunked_distill_loss`
(top-k + tail partition) take them as they take the stored corpus. Run the teacher with
`--no-enable-prefix-caching` (see `distill.teacher_client`).

Why not TRL's on-policy trainers (trl 1.16: `DistillationTrainer`, experimental `GKDTrainer`,
`ServerDistillationTrainer`, `AsyncDistillationTrainer`)? They take a prompt dataset and a teacher
of their own (a local model, or a server whose reverse KL / JSD is restricted to the top-1
token), with their own loss. Ours mixes, in one batch, records of the curated offline corpus with
on-policy samples, both on the same top-k + tail partition of `train/losses.py` for any k and any
divergence, inside the `SFTTrainer` subclass that already holds checkpoints, resume, PEFT and DDP.
What this adds is small: sampling with `transformers.generate` (CPU-sized students; a student
behind vLLM is not done) and the records below.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distill.teacher import Completion
from distill.teacher_client import TeacherClient
from distill.train.data import DistillCollator
from distill.train.scoring import TeacherForced, teacher_forced


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
           pad_token_id: int, eos_token_id: int | list[int] | None) -> list[list[int]]:
    """The student's continuation of each prompt (transformers `generate`, left-padded, the model in
    eval mode for the call), cut after its first EOS (kept: the teacher scores it like any token)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(list(p), device=device)
        attention[i, width - len(p):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id, use_cache=True, **sampling)
    model.train(was_training)
    stops = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]) - {None}
    responses = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        responses.append(row[:end])
    return responses


def on_policy_records(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      scored: Sequence[Completion]) -> list[dict]:
    """Student samples + teacher scores as corpus-shaped records, for `DistillCollator`."""
    return [{"id": f"on-policy-{i}", "prompt_token_ids": list(p), "response_token_ids": list(r),
             "topk_token_ids": s.topk_token_ids, "topk_logprobs": s.topk_logprobs}
            for i, (p, r, s) in enumerate(zip(prompts, responses, scored))]


def teacher_scored_kl(model, prompts: Sequence[Sequence[int]], teacher: TeacherClient, top_k: int, *,
                      max_new_tokens: int, temperature: float, pad_token_id: int, eos_token_id,
                      batch_size: int = 8) -> TeacherForced:
    """The on-policy divergence of a student: it answers `prompts` itself (greedy at temperature 0),
    the teacher scores those answers, and `kl` is KL(teacher || student) per answer token on the
    teacher's top-k + tail partition: the forward KL that `eval` and held-out metrics measure on the
    teacher's own text, here on the student's. (Reverse KL there is unbounded: where the teacher's
    top-k holds all but 1e-6 of its mass, any student mass outside them costs ~1e4 nats per unit.)"""
    responses = [r for start in range(0, len(prompts), batch_size)
                 for r in sample(model, prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                                 temperature=temperature, pad_token_id=pad_token_id, eos_token_id=eos_token_id)]
    records = on_policy_records(prompts, responses, teacher.score_pairs(list(zip(prompts, responses)), top_k))
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    return teacher_forced(model, records, DistillCollator(pad_token_id, length, top_k), batch_size)
