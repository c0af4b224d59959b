"""Teacher-forced fidelity: the student read along the teacher's answers to the eval prompts
(the loop itself is `distill.train.scoring`, shared with `train`'s held-out metrics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from distill import corpus
from distill.config import EngineConfig
from distill.train.data import DistillCollator, check_vocabulary, trainable
from distill.train.scoring import TeacherForced, pad_token_id, teacher_forced


def fidelity(student: str, corpus_dir: Path, engine: EngineConfig, prompt_ids: set[str] | None = None,
             batch_size: int = 16) -> TeacherForced:
    """KL(teacher || student), top-1 agreement and NLL per token of the teacher's answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gpu = torch.cuda.is_available()
    load = dict(revision=engine.revision, trust_remote_code=engine.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(student, **load)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16 if gpu else torch.float32, **load)
    model = model.to("cuda" if gpu else "cpu")
    records, collator = scoring_inputs(corpus_dir, tokenizer, model, prompt_ids)
    return teacher_forced(model, records, collator, batch_size)


def scoring_inputs(corpus_dir: Path, tokenizer, model, prompt_ids: set[str] | None = None) -> tuple[list[dict], DistillCollator]:
    """The teacher's answers `model` is scored along, and their collator: what `fidelity` reads
    (`distill sweep` scores its students in training on the same, for its pruner). Where the corpus
    holds a student view, the student reads the teacher's answer after its own view of the prompt,
    as it was trained and will be asked."""
    manifest = corpus.read_manifest(corpus_dir)
    # a batch at a time, the other prompts' rows dropped before any becomes Python objects (the
    # corpus may be a whole training corpus), the top-k as arrays
    wanted = None if prompt_ids is None else pa.array(sorted(prompt_ids), pa.string())
    records = []
    for batch in corpus.iter_batches(corpus_dir):
        if wanted is not None:
            batch = batch.filter(pc.is_in(batch["prompt_id"], value_set=wanted))
        records += corpus.records_of(corpus.as_student_view(batch), topk_as_arrays=True)
    if not records:
        raise ValueError(f"`{corpus_dir}` holds no teacher responses to the evaluation prompts")
    max_id = max(int(np.max(np.asarray(r["topk_token_ids"]))) for r in records)
    check_vocabulary(manifest, tokenizer, model.get_output_embeddings().weight.shape[0], max_id)
    max_length = getattr(model.config, "max_position_embeddings", None) or 4096
    records = [r for r in records if trainable(r, max_length)]
    collator = DistillCollator(pad_token_id=pad_token_id(tokenizer), max_length=max_length,
                               top_k=manifest.generation.top_k)
    return records, collator
