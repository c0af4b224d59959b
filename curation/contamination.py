"""Decontamination: drop records sharing a long word n-gram (default 13, as in GPT-3) with any
evaluation text, in the prompt or in the response."""

from __future__ import annotations

import json
from pathlib import Path

from distill.curation.base import WORD, Filter, prompt_text, response_text


def ngrams(text: str, n: int) -> set[int]:
    words = WORD.findall(text.lower())
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def eval_texts(path: Path):
    """Every string value of JSONL / JSON / Parquet records, or the lines of a text file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`decontaminate.eval_files`: `{path}` not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        text = path.read_text()
        records = json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
    else:
        yield from path.read_text().splitlines()
        return
    stack = list(records)
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class DecontaminateFilter(Filter):
    name = "decontaminate"
    columns = ("messages", "response")
    eval_files: list[Path]
    n: int = 13

    def model_post_init(self, _):
        self._grams: dict[int, str] = {}
        for path in self.eval_files:
            for text in eval_texts(path):
                for g in ngrams(text, self.n):
                    self._grams.setdefault(g, Path(path).name)

    def check(self, record):
        for where, text in (("prompt", prompt_text(record)), ("response", response_text(record))):
            hit = next((g for g in ngrams(text, self.n) if g in self._grams), None)
            if hit is not None:
                return f"{where} shares a {self.n}-gram with {self._grams[hit]}"
        return None
