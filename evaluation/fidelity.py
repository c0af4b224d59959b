"""Teacher-forced fidelity: the student read along the teacher's own responses.

Per response token: forward KL(teacher || student) on the teacher's stored top-k (the
`bucket` partition of `train.losses`, exact on k+1 outcomes), whether the student's argmax is
the teacher's top-1, and the student's negative log-likelihood of the teacher's token (its
perplexity on teacher text). The head is applied to a chunk of positions at a time, so a
150k vocabulary never materialises `[B, T, V]` logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distill import corpus
from train.data import DistillCollator, trainable
from train.losses import kd_per_position


@torch.no_grad()
def teacher_forced(student: str, corpus_dir: Path, prompt_ids: set[str] | None = None, batch_size: int = 16,
                   chunk_size: int = 2048) -> dict:
    """Token-weighted `kl`, `top1_agreement`, `nll`, `perplexity`, and `per_record_kl` (list)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.trainer import check_vocabulary

    manifest = corpus.read_manifest(corpus_dir)
    k = manifest["generation"]["top_k"]
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16 if gpu else torch.float32).to(device).eval()
    head = model.get_output_embeddings()
    records = [r for r in corpus.iter_records(corpus_dir) if prompt_ids is None or r["prompt_id"] in prompt_ids]
    if not records:
        raise ValueError(f"`{corpus_dir}` holds no teacher responses to the evaluation prompts")
    max_id = max(int(np.max(np.asarray(r["topk_token_ids"]))) for r in records)
    check_vocabulary(manifest, tokenizer, head.weight.shape[0], max_id)
    max_length = getattr(model.config, "max_position_embeddings", None) or 4096
    records = [r for r in records if trainable(r, max_length)]
    collate = DistillCollator(pad_token_id=tokenizer.pad_token_id or 0, max_length=max_length, top_k=k)
    kl_sum = np.zeros(len(records))
    counts = np.zeros(len(records))
    agree = nll = 0.0
    for start in range(0, len(records), batch_size):
        batch = {key: v.to(device) for key, v in collate(records[start:start + batch_size]).items()}
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        m = batch["target_mask"]
        row_of = m.nonzero()[:, 0] + start  # record index of each target position
        h, ids, lps, labels = hidden[m], batch["topk_ids"][m], batch["topk_logprobs"][m], batch["labels"][m]
        for c in range(0, h.shape[0], chunk_size):
            s = slice(c, c + chunk_size)
            logits = torch.nn.functional.linear(h[s], head.weight, head.bias).float()
            kl = kd_per_position(logits, ids[s], lps[s], kind="forward_kl", tail="bucket")
            np.add.at(kl_sum, row_of[s].cpu().numpy(), kl.cpu().numpy())
            np.add.at(counts, row_of[s].cpu().numpy(), 1)
            agree += (logits.argmax(-1) == ids[s][:, 0]).sum().item()
            nll -= torch.log_softmax(logits, -1).gather(-1, labels[s, None]).sum().item()
    tokens = counts.sum()
    per_record = kl_sum / np.maximum(counts, 1)
    return {"records": len(records), "tokens": int(tokens), "kl": float(kl_sum.sum() / max(tokens, 1)),
            "top1_agreement": agree / max(tokens, 1), "nll": nll / max(tokens, 1),
            "perplexity": float(np.exp(nll / max(tokens, 1))), "per_record_kl": per_record.tolist()}
