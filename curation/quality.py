"""Shape of the answer: finished, sized sensibly, not a degenerate loop, in the required format."""

from __future__ import annotations

import itertools
import json
import operator
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill.curation.base import WORD, Filter, response_text


class FinishReasonFilter(Filter):
    """Drop generations that did not end on their own (`length` = cut at max_tokens, `abort`)."""
    name = "finish_reason"
    columns = ("finish_reason",)
    allowed: list[str] = ["stop"]

    def check(self, record):
        reason = record["finish_reason"]
        return None if reason in self.allowed else f"finish_reason is {reason!r}"


class LengthFilter(Filter):
    """Bounds on response tokens and characters; blank responses always fail."""
    name = "length"
    columns = ("response", "response_token_ids")
    min_tokens: int | None = 1
    max_tokens: int | None = None
    min_chars: int | None = 1
    max_chars: int | None = None

    def check(self, record):
        return self._verdict(record["response"] or "", len(record["response_token_ids"]))

    def check_batch(self, batch: pa.RecordBatch, rows: list[int]) -> dict[int, str]:
        # token counts from the list offsets: the token ids never become Python objects
        tokens = pc.list_value_length(batch.column("response_token_ids")).to_numpy(zero_copy_only=False)
        text = batch.column("response").to_pylist()
        failed = {i: self._verdict(text[i] or "", int(tokens[i])) for i in rows}
        return {i: v for i, v in failed.items() if v is not None}

    def _verdict(self, text: str, tokens: int) -> str | None:
        stripped = text.strip()
        if not stripped:
            return "empty or whitespace-only response"
        if self.min_tokens is not None and tokens < self.min_tokens:
            return f"{tokens} tokens < min_tokens {self.min_tokens}"
        if self.max_tokens is not None and tokens > self.max_tokens:
            return f"{tokens} tokens > max_tokens {self.max_tokens}"
        if self.min_chars is not None and len(stripped) < self.min_chars:
            return f"{len(stripped)} chars < min_chars {self.min_chars}"
        if self.max_chars is not None and len(stripped) > self.max_chars:
            return f"{len(stripped)} chars > max_chars {self.max_chars}"
        return None


class RepetitionFilter(Filter):
    """Gopher repetition checks (Rae et al. 2021, thresholds as in datatrove), adapted to chat
    answers: a top n-gram only counts when it actually repeats, so a short answer without any
    repetition can never trip it (README, "`distill curate`", the `repetition` row); loops still do."""
    name = "repetition"
    dup_line_frac: float | None = 0.30
    dup_para_frac: float | None = 0.30
    dup_line_char_frac: float | None = 0.20
    dup_para_char_frac: float | None = 0.20
    top_ngram_frac: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    dup_ngram_frac: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

    def check(self, record):
        text = response_text(record)
        for unit, parts in (("line", [p.strip() for p in text.split("\n") if p.strip()]),
                            ("para", [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()])):
            frac, char_frac = _duplicates(parts)
            limit, char_limit = getattr(self, f"dup_{unit}_frac"), getattr(self, f"dup_{unit}_char_frac")
            if limit is not None and frac > limit:
                return f"duplicate {unit} fraction {frac:.2f} > {limit}"
            if char_limit is not None and char_frac > char_limit:
                return f"duplicate {unit} char fraction {char_frac:.2f} > {char_limit}"
        words = WORD.findall(text.lower())
        lengths = list(map(len, words))
        total = sum(lengths)
        pairs = Counter(zip(words, words[1:]))
        if not total or len(pairs) == len(words) - 1:
            return None  # no word pair repeats, so no n-gram (n >= 2) does: the common case, fast
        # Bounds that skip work without changing a verdict: an n-gram (n >= 2) occurs at most as
        # often as the most frequent pair, and covers at most the most characters n words in a row do.
        most_pairs = max(pairs.values())
        ends = [0, *itertools.accumulate(lengths)]
        for n, limit in self.top_ngram_frac.items():
            if n >= 2 and most_pairs * max(map(operator.sub, ends[n:], ends[:-n]), default=0) <= limit * total:
                continue  # its top n-gram cannot cover more than `limit`
            grams = pairs if n == 2 else Counter(zip(*(words[i:] for i in range(n))))
            if grams:
                gram, count = grams.most_common(1)[0]
                frac = sum(len(w) for w in gram) * count / total
                if count > 1 and frac > limit:
                    return f"top {n}-gram {' '.join(gram)!r} covers {frac:.2f} > {limit}"
        ordered = sorted(self.dup_ngram_frac.items())
        for j, (n, limit) in enumerate(ordered):
            chars = duplicated_ngram_chars(words, n)
            if chars is None:
                break  # nothing repeats at this n, so nothing longer does
            if chars / total > limit:
                return f"duplicated {n}-grams cover {chars / total:.2f} > {limit}"
            if all(chars / total <= later for _, later in ordered[j + 1:]):
                break  # the words in repeated longer n-grams are among these: none can cover more
        return None


def _duplicates(parts: list[str]) -> tuple[float, float]:
    if not parts:
        return 0.0, 0.0
    seen, dup, dup_chars = set(), 0, 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        seen.add(p)
    return dup / len(parts), dup_chars / max(sum(len(p) for p in parts), 1)


def duplicated_ngram_chars(words: list[str], n: int) -> int | None:
    """Characters of words inside an n-gram seen earlier (each word counted once); None when
    no n-gram repeats."""
    grams = list(zip(*(words[i:] for i in range(n))))
    if len(set(grams)) == len(grams):
        return None
    seen, covered = set(), np.zeros(len(words), dtype=bool)
    for i, gram in enumerate(grams):
        if gram in seen:
            covered[i:i + n] = True
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c)


class FormatFilter(Filter):
    """Answers that must follow a format: a regex (searched, or matched whole) and/or valid JSON."""
    name = "format"
    regex: str | None = None
    fullmatch: bool = False
    valid_json: bool = False

    def check(self, record):
        text = response_text(record).strip()
        if self.regex is not None:
            pattern = re.compile(self.regex, re.DOTALL)
            if not (pattern.fullmatch(text) if self.fullmatch else pattern.search(text)):
                return f"does not match {self.regex!r}"
        if self.valid_json:
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                return f"invalid JSON ({e.msg})"
        return None
