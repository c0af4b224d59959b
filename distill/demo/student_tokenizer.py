"""A demo student with *another* tokenizer than the demo teacher's, built locally (nothing shipped):
byte-level BPE trained on the demo prompts and answers with a smaller vocabulary and without
splitting digits, so "253" may be one token for the student and three for the teacher, and
alignment has real work to do. Used by tests/test_cross_tokenizer.py and
`distill demo --cross-tokenizer` (distill/demo/cross_tokenizer.py; docs/results/cross-tokenizer.md)."""

from __future__ import annotations

import json
from pathlib import Path

from distill.demo import skills

STUDENT_VOCAB_SIZE = 640  # the teacher's is 512 with one token per digit; here ~30% of answer digits merge


def build_student_tokenizer(out: Path, seed: int = 0):
    """The tokenizer, trained on demo examples of the teacher's split (never the eval split)."""
    from distill import tiny
    from distill.demo.teacher import MAX_POSITIONS

    texts = [json.dumps(ex["messages"]) + " " + ex["answer"] for ex in skills.examples("teacher", 5_000, seed + 7)]
    return tiny.build_tokenizer(Path(out), vocab_size=STUDENT_VOCAB_SIZE, model_max_length=MAX_POSITIONS,
                                texts=texts, split_digits=False)


def build_student(out: Path, seed: int = 0, tokenizer: Path | None = None) -> Path:
    """A random-init student of the demo's size (`run.STUDENT_SIZE`) on that tokenizer; kept if built."""
    from distill import tiny
    from distill.demo.run import STUDENT_SIZE
    from distill.demo.teacher import MAX_POSITIONS

    out = Path(out)
    if (out / "config.json").exists():
        return out
    if tokenizer is None:
        tokenizer = out.parent / "student-tokenizer"
        if not (tokenizer / "tokenizer.json").exists():
            build_student_tokenizer(tokenizer)
    return tiny.build_model(out, tokenizer, "llama", STUDENT_SIZE, seed=seed, max_position_embeddings=MAX_POSITIONS,
                            init_std=0.02, tie_word_embeddings=True)
