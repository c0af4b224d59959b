"""Curation of written prompts (`distill synthesize`): curate's filters, read on the prompt text, plus
two that only prompts need. Each prompt is a record whose `response` is the text the teacher wrote
(that is what the filters read) and whose `messages` is the prompt as one user turn; a prompt
failing several filters is charged to the first, as in `curate`.

- `template_leak`: role or turn tokens of a chat template in the text (`<|im_start|>`, `[INST]`, a
  line that is only `assistant`): the teacher wrote past the user turn, or its template leaked.
- `held_out`: a prompt equal to or nearly equal to one in an evaluation file: it would leak the
  held-out set into training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from distill.curation.base import WORD, Filter, response_text
from distill.curation.contamination import eval_texts
from distill.curation.dedup import NearDedupFilter, normalise
from distill.curation.pipeline import build_filters, label

DEFAULT_PROMPT_FILTERS: list[dict[str, Any] | str] = [
    "finish_reason",
    {"name": "length", "min_chars": 10, "max_chars": 2000},
    {"name": "language", "languages": ["en"]},
    "refusal",
    "template_leak",
    "dedup_exact",
    {"name": "dedup_near", "threshold": 0.7, "shingle": 3},  # prompts are short: 3-word shingles
]
ROLE_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "<|begin_of_text|>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<|user|>", "<|assistant|>",
               "<|system|>", "<|end|>", "<start_of_turn>", "<end_of_turn>", "<|endoftext|>"]
ROLE_LINE = re.compile(r"(?im)^\s*(?:system|user|assistant)\s*:?\s*$")


class TemplateLeakFilter(Filter):
    """Role / turn tokens (`markers`, plus `extra_markers`: `synthesize` adds the teacher's own special
    tokens) or a line that is only a role name."""
    name = "template_leak"
    markers: list[str] = ROLE_TOKENS
    extra_markers: list[str] = []

    def check(self, record):
        text = response_text(record)
        hit = next((m for m in [*self.markers, *self.extra_markers] if m and m in text), None)
        if hit is not None:
            return f"contains the template token {hit!r}"
        line = ROLE_LINE.search(text)
        return None if line is None else f"contains the role line {line.group(0).strip()!r}"


class HeldOutFilter(Filter):
    """Prompts whose normalised text equals, or whose word shingles are `threshold` similar (MinHash)
    to, a text of `eval_files` (every string of their records, or their lines; texts under
    `min_words` words are ignored: a role name is not a prompt)."""
    name = "held_out"
    eval_files: list[Path]
    threshold: float = 0.7
    shingle: int = 3
    min_words: int = 3

    def model_post_init(self, _):
        self._near = NearDedupFilter(threshold=self.threshold, shingle=self.shingle)
        self._exact: dict[str, str] = {}
        for path in self.eval_files:
            for i, text in enumerate(eval_texts(path)):
                if len(WORD.findall(text)) < self.min_words:
                    continue
                where = f"{Path(path).name} text {i + 1}"
                self._exact.setdefault(normalise(text), where)
                self._near.add(self._near.signature(text), where)

    def check(self, record):
        text = response_text(record)
        if normalise(text) in self._exact:
            return f"equals held-out {self._exact[normalise(text)]}"
        sig = self._near.signature(text)
        match = self._near.nearest(sig) if sig is not None else None
        return None if match is None else f"near duplicate of held-out {match[0]} (Jaccard ~{match[1]:.2f})"


@dataclass(frozen=True)
class PromptFilterResult:
    kept: list[dict]  # {"id", "prompt"}
    rejected: list[dict]  # {"id", "prompt", "reject_reason"}
    rejected_by_filter: dict[str, int]  # filter label -> prompts it dropped, in filter order
    filters: list[dict[str, Any]]  # each filter's settings


def prompt_filters(specs: list[dict[str, Any] | str] | None, held_out: list[Path],
                   extra_markers: list[str] = ()) -> list[Filter]:
    """The filters of `specs` (default `DEFAULT_PROMPT_FILTERS`); with `held_out` files, `held_out` is
    always among them (first, unless `specs` places it): a leak is never left to a missing line."""
    specs = [dict(s) if isinstance(s, dict) else {"name": s} for s in (DEFAULT_PROMPT_FILTERS if specs is None else specs)]
    for spec in specs:
        if spec["name"] == "template_leak":
            spec["extra_markers"] = sorted({*spec.get("extra_markers", []), *extra_markers})
        if spec["name"] == "held_out":
            spec.setdefault("eval_files", [str(p) for p in held_out])
    if held_out and not any(s["name"] == "held_out" for s in specs):
        specs.insert(0, {"name": "held_out", "eval_files": [str(p) for p in held_out]})
    return build_filters(specs)


def filter_prompts(prompts: list[dict], filters: list[Filter]) -> PromptFilterResult:
    """`prompts`: {"id", "text", "token_ids", "finish_reason"} in order; the first of duplicates is kept."""
    if not prompts:
        return PromptFilterResult([], [], {"empty": 0, **{label(f): 0 for f in filters}}, [f.settings() for f in filters])
    batch = pa.RecordBatch.from_pylist([
        {"id": p["id"], "response": p["text"], "messages": [{"role": "user", "content": p["text"]}],
         "response_token_ids": p["token_ids"], "finish_reason": p["finish_reason"]} for p in prompts])
    # an empty prompt is never kept, whatever the filters: `generate` refuses one
    reasons = {i: "empty: nothing was written before the end of the turn" for i, p in enumerate(prompts)
               if not p["text"].strip()}
    counts = {"empty": len(reasons), **{label(f): 0 for f in filters}}
    alive = [i for i in range(len(prompts)) if i not in reasons]
    for f in filters:
        failed = f.check_batch(batch, alive)
        for i, detail in failed.items():
            reasons[i] = f"{label(f)}: {detail}"
        counts[label(f)] += len(failed)
        alive = [i for i in alive if i not in failed]
    kept = [{"id": prompts[i]["id"], "prompt": prompts[i]["text"]} for i in alive]
    rejected = [{"id": prompts[i]["id"], "prompt": prompts[i]["text"], "reject_reason": reasons[i]}
                for i in sorted(reasons)]
    return PromptFilterResult(kept, rejected, counts, [f.settings() for f in filters])
