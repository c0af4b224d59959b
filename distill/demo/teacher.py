"""`distill demo --build-teacher`: the shipped demo teacher, trained with the project's own code.

Two stages, each a corpus whose "teacher" is the label itself (top-1 = the label's token with
logprob 0, via `distill score` with `LabelTeacher`) learned by `train()` with pure CE (alpha 0,
full fine-tuning):
1. `ground_truth`: from random weights on right answers until it solves the skills (~99.9 %);
2. `noisy`: on answers whose digits are right with probability 0.7 and otherwise a plausible,
   prompt-dependent confusion (`skills.label_distribution`). The teacher ends up calibrated on
   that distribution: its top choice is still the right digit, its other probabilities are the
   plausible mistakes. What ships is the merged model, its tokenizer and `build.json`: command,
   seeds, settings, held-out accuracy and how informative its distributions are.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from distill import corpus, files
from distill.demo import skills

SHIPPED = Path(__file__).parent / "teacher"
# ~1.8M parameters (7 MB of float32 safetensors); head_dim 48 (vLLM needs >= 32).
TEACHER_SIZE = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4)
VOCAB_SIZE = 512  # BPE saturates near 410 on the skill text; digits stay single tokens
MAX_POSITIONS = 128
# name -> labels, examples, train() settings
STAGES = {
    "ground_truth": dict(answers="right", examples=250_000, max_steps=5000, learning_rate=2e-3, eval_fraction=0.005),
    "noisy": dict(answers="noisy", examples=40_000, max_steps=600, learning_rate=1e-3, eval_fraction=0.0),
}


class LabelTeacher:
    """The "teacher" of a ground-truth corpus: each reference token is its own top-1 at logprob 0."""

    max_model_len = MAX_POSITIONS

    def score(self, requests: Iterable, top_k: int, on_done: Callable, window: int) -> None:
        from distill.teacher import Completion

        for req in requests:
            ids = np.asarray(req.response_token_ids, dtype=np.int32)
            zeros = np.zeros(len(ids), dtype=np.float32)
            on_done(req, Completion(ids, zeros, ids[:, None], zeros[:, None], req.finish_reason))


def train_stage(work: Path, name: str, init: Path, seed: int) -> tuple[Path, dict]:
    """One stage of `STAGES`: labels -> corpus -> `train()` from `init`; returns the model dir
    and the stage's record for build.json."""
    from distill.config import ScoreConfig, TrainConfig
    from distill.generate.job import score
    from distill.train.trainer import train

    stage = dict(STAGES[name])
    answers, n = stage.pop("answers"), stage.pop("examples")
    start = time.time()
    data = skills.write_prompts(work / f"{name}.jsonl", "teacher", n, seed, answers=answers)
    labels = score(ScoreConfig(teacher=str(init), data=data, out=work / f"{name}-labels", top_k=1, chunk_size=16384,
                               overwrite=True), teacher=LabelTeacher()).path
    cfg = TrainConfig(corpus=labels, student=str(init), out=work / name, alpha=0.0, lora=False, lr_scheduler="cosine",
                      warmup_ratio=0.02, weight_decay=0.01, batch_size=64, max_length=MAX_POSITIONS, save_steps=1000,
                      logging_steps=50, seed=seed, resume=True, **stage)
    trained = train(cfg).path
    return trained, {"answers": answers, "examples": n, "wall_seconds": round(time.time() - start),
                     "train": json.loads(cfg.model_dump_json(exclude={"corpus", "student", "out"}))}


def build_teacher(work: Path, seed: int = 0, eval_prompts: int = 1000, out: Path = SHIPPED,
                  ground_truth: Path | None = None) -> dict:
    """Both stages into `out`. `ground_truth`: a finished stage-1 model (with the build.json that
    made it) to start stage 2 from, instead of the ~50-minute stage 1."""
    from distill import tiny
    from distill.config import ScoreConfig
    from distill.evaluation.job import model_size
    from distill.generate.job import score
    from distill.train.card import CARD

    start = time.time()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    stages = {}
    if ground_truth is None:
        texts = [json.dumps(ex["messages"]) for ex in skills.examples("teacher", 20_000, seed + 1)]
        tiny.build_tokenizer(work / "tokenizer", vocab_size=VOCAB_SIZE, model_max_length=MAX_POSITIONS, texts=texts,
                             split_digits=True)
        init = tiny.build_model(work / "init", work / "tokenizer", "llama", TEACHER_SIZE, seed=seed,
                                max_position_embeddings=MAX_POSITIONS, init_std=0.02, tie_word_embeddings=True)
        ground_truth, stages["ground_truth"] = train_stage(work, "ground_truth", init, seed)
    else:
        earlier = json.loads((Path(ground_truth) / "build.json").read_text())
        stages["ground_truth"] = {**earlier.get("stages", {}).get("ground_truth", earlier), "from": str(ground_truth)}
        ground_truth = Path(shutil.copytree(ground_truth, work / "ground_truth-given", dirs_exist_ok=True))
    trained, stages["noisy"] = train_stage(work, "noisy", ground_truth, seed)
    accuracy = exact_match(trained, skills.examples("eval", eval_prompts, seed + 2))
    # The same held-out examples with their right answers, read by the teacher in vLLM.
    answered = skills.write_prompts(work / "held-out.jsonl", "eval", eval_prompts, seed + 2, answers="right")
    scored = score(ScoreConfig(teacher=str(trained), data=answered, out=work / "held-out-scored", top_k=20,
                               overwrite=True)).path
    informative = distribution_stats(scored)
    out.mkdir(parents=True, exist_ok=True)
    for f in trained.iterdir():
        if f.is_file() and f.name not in ("README.md", CARD, "metrics.jsonl", "loss.png"):
            shutil.copy2(f, out / f.name)
    build = {"command": "distill demo --build-teacher",  # build_teacher()'s defaults
             "seed": seed, "size": TEACHER_SIZE, "vocab_size": VOCAB_SIZE, "stages": stages,
             "params": model_size(str(trained))["parameters"], "eval_prompts": eval_prompts, "accuracy": accuracy,
             "distributions": informative, "wall_seconds": round(time.time() - start)}
    files.write_json(out / "build.json", build)
    return build


def distribution_stats(corpus_dir: Path) -> dict:
    """How much a teacher's stored top-k says beyond its top choice, over answer digits (every
    response token but the last, the end of turn): median top-1 probability, mean entropy of the
    top-k renormalised (nats), and the share of positions whose top-1 is above 0.99."""
    top1, entropy = [], []
    for r in corpus.iter_records(corpus_dir, columns=["topk_logprobs"]):
        rows = np.exp(np.asarray(r["topk_logprobs"], dtype=np.float64))[:-1]  # (T - 1, k)
        if len(rows):
            q = rows / rows.sum(-1, keepdims=True)
            top1.append(rows[:, 0])
            entropy.append(-(q * np.log(np.clip(q, 1e-30, None))).sum(-1))
    top1, entropy = np.concatenate(top1), np.concatenate(entropy)
    return {"positions": int(len(top1)), "median_top1_probability": float(np.median(top1)),
            "mean_topk_entropy": float(np.mean(entropy)), "share_top1_above_0.99": float(np.mean(top1 > 0.99))}


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
