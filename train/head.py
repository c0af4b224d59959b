"""The LM head, whole, for losses that apply it outside the model's forward.

The chunked KD loss and teacher-forced scoring run the student for its last hidden states only
and multiply them by the head a chunk of positions at a time, so the head's parameters are read
where the sharding engines do not expect it. `lm_head` hands them over whole under each:
- single process, DDP: they are whole already;
- FSDP2: a parameter is a DTensor holding this process's shard whenever its unit is resharded:
  gathered with autograd (the gradient comes back reduce-scattered onto the shard);
- DeepSpeed ZeRO-3: a parameter is empty outside its module's forward: gathered for the loss's
  forward, which also computes the gradient (`losses._FusedChunkedLoss`), so backward needs only
  that gradient, which reaches the parameter's AccumulateGrad node where ZeRO-3 reduce-scatters
  it as for any other parameter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def lm_head(model) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """`with lm_head(model) as (weight, bias):` the output embedding's parameters, whole."""
    from torch.distributed.tensor import DTensor

    head = model.get_output_embeddings()
    params = [p for p in (head.weight, head.bias) if p is not None]
    if any(hasattr(p, "ds_id") for p in params):  # partitioned by DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield head.weight, head.bias
        return
    yield tuple(p.full_tensor() if isinstance(p, DTensor) else p for p in (head.weight, head.bias))
