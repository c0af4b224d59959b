"""Run by tests/test_losses.py under torchrun (2 ranks, gloo): a student under FSDP2
(`fully_shard` per decoder layer, then the root, as examples/accelerate/fsdp.yaml) gives the
single-process KD loss and LM-head gradient, with the head as FSDP2 leaves it after forward
(whole) or resharded (`reshard`: a DTensor shard, which `lm_head()` gathers).
Usage: torchrun --nproc_per_node 2 tests/fsdp2_loss_check.py MODEL_DIR [reshard]"""
import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from distill.train.head import lm_head
from distill.train.losses import chunked_distill_loss

dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
reference = copy.deepcopy(model)
B, T, k = 2, 10, 5
V = model.get_output_embeddings().weight.shape[0]
ids = torch.randint(0, V, (B, T))
topk = torch.randint(0, V, (B, T, k))
lps = torch.log_softmax(torch.randn(B, T, k + 1), -1)[..., :k].sort(-1, descending=True).values
mask = torch.ones(B, T, dtype=torch.bool)

def loss_of(m):
    out = m(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    if m is not reference and len(sys.argv) > 2:
        m.reshard()  # as if the root unit were resharded after forward: the head becomes a DTensor shard
    head = m.get_output_embeddings()
    if m is not reference:
        print(f"rank {rank}: head weight type {type(head.weight).__name__}", flush=True)
    with lm_head(m) as (weight, bias):
        loss, _ = chunked_distill_loss(out.hidden_states[-1], weight, ids, topk, lps, mask, bias=bias,
                                       alpha=0.5, chunk_size=4)
    return loss

for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
loss = loss_of(model)
loss.backward()
ref = loss_of(reference)
ref.backward()
g = model.get_output_embeddings().weight.grad
g = g.full_tensor() if hasattr(g, "full_tensor") else g
gr = reference.get_output_embeddings().weight.grad
print(f"rank {rank}: loss fsdp2 {loss.item():.6f} single {ref.item():.6f}; head grad max |diff| "
      f"{(g - gr).abs().max().item():.2e} of max |g| {gr.abs().max().item():.2e}", flush=True)
assert torch.allclose(loss, ref, rtol=1e-5) and torch.allclose(g, gr, rtol=1e-4, atol=1e-6)
# Both ranks reach teardown together: a rank destroying the group while its peer still has gloo
# traffic in flight aborted the peer ("terminate called without an active exception") 4 runs in 40.
dist.barrier()
dist.destroy_process_group()
