"""`distill demo --build-teacher`: the shipped demo teacher, trained with the project's own code.

The ground truth is written as a corpus whose "teacher" is the answer itself (top-1 = the
correct token with logprob 0, via `distill score` with `LabelTeacher`), and `train()` learns it
with pure CE (alpha 0, full fine-tuning). What ships is the merged model, its tokenizer and
`build.json`: the command, seed, settings and held-out accuracy that produced it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from distill import files
from distill.demo import skills

SHIPPED = Path(__file__).parent / "teacher"
# ~1.8M parameters (7 MB of float32 safetensors); head_dim 48 (vLLM needs >= 32).
TEACHER_SIZE = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4)
VOCAB_SIZE = 512  # BPE saturates near 410 on the skill text; digits stay single tokens
MAX_POSITIONS = 128


class LabelTeacher:
    """The "teacher" of a ground-truth corpus: each reference token is its own top-1 at logprob 0."""

    max_model_len = MAX_POSITIONS

    def score(self, requests: Iterable, top_k: int, on_done: Callable, window: int) -> None:
        from distill.generate.requests import Completion

        for req in requests:
            ids = np.asarray(req.response_token_ids, dtype=np.int32)
            zeros = np.zeros(len(ids), dtype=np.float32)
            on_done(req, Completion(ids, zeros, ids[:, None], zeros[:, None], req.finish_reason))


def build_teacher(work: Path, steps: int = 5000, examples: int = 250_000, seed: int = 0,
                  eval_prompts: int = 1000, out: Path = SHIPPED) -> dict:
    from distill import tiny
    from distill.config import ScoreConfig, TrainConfig
    from distill.evaluation.job import model_size
    from distill.generate.job import score
    from distill.train.card import CARD
    from distill.train.trainer import train

    start = time.time()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    data = skills.write_prompts(work / "teacher-train.jsonl", "teacher", examples, seed, with_answers=True)
    texts = [json.dumps(ex["messages"]) for ex in skills.examples("teacher", 20_000, seed + 1)]
    tokenizer = tiny.build_tokenizer(work / "tokenizer", vocab_size=VOCAB_SIZE, model_max_length=MAX_POSITIONS,
                                     texts=texts, split_digits=True)
    init = tiny.build_model(work / "init", work / "tokenizer", "llama", TEACHER_SIZE, seed=seed,
                            max_position_embeddings=MAX_POSITIONS, init_std=0.02, tie_word_embeddings=True)
    labels = score(ScoreConfig(teacher=str(init), data=data, out=work / "labels", top_k=1, chunk_size=16384,
                               overwrite=True), teacher=LabelTeacher()).path
    cfg = TrainConfig(corpus=labels, student=str(init), out=work / "trained", alpha=0.0, lora=False,
                      learning_rate=2e-3, lr_scheduler="cosine", warmup_ratio=0.02, weight_decay=0.01,
                      batch_size=64, max_steps=steps, max_length=MAX_POSITIONS, eval_fraction=0.005,
                      save_steps=1000, logging_steps=50, seed=seed, resume=True)
    trained = train(cfg).path
    accuracy = exact_match(trained, skills.examples("eval", eval_prompts, seed + 2))
    out.mkdir(parents=True, exist_ok=True)
    for f in trained.iterdir():
        if f.is_file() and f.name not in ("README.md", CARD, "metrics.jsonl", "loss.png"):
            shutil.copy2(f, out / f.name)
    build = {"command": "distill demo --build-teacher",  # build_teacher()'s defaults: steps, examples, seed below
             "seed": seed, "steps": steps, "examples": examples, "size": TEACHER_SIZE, "vocab_size": len(tokenizer),
             "train": json.loads(cfg.model_dump_json(exclude={"corpus", "student", "out"})),
             "params": model_size(str(trained))["parameters"], "eval_prompts": eval_prompts,
             "accuracy": accuracy, "wall_seconds": round(time.time() - start)}
    files.write_json(out / "build.json", build)
    return build


def exact_match(model_dir: Path, examples: Iterable[dict], batch_size: int = 256) -> dict:
    """Greedy answers with transformers (a quick check while building; the demo uses vLLM)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples = list(examples)
    right: dict[str, list[float]] = {}
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        texts = [tok.apply_chat_template(e["messages"], tokenize=False, add_generation_prompt=True) for e in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for e, a in zip(batch, answers):
            right.setdefault(e["skill"], []).append(float(a.strip() == e["answer"]))
    per_skill = {s: sum(v) / len(v) for s, v in right.items()}
    return {"overall": sum(sum(v) for v in right.values()) / len(examples), "per_skill": per_skill}
