"""Shape of the answer: finished, sized sensibly, not a degenerate loop, in the required format."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill.curation.base import Filter, response_text
from distill.curation.words import Words, most_repeated, ngrams, response_words, row_max, windows


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
    repetition can never trip it (README, "`distill curate`", the `repetition` row); loops still do.
    The n-gram counts run over a whole batch at once (`curation/words.py`)."""
    name = "repetition"
    dup_line_frac: float | None = 0.30
    dup_para_frac: float | None = 0.30
    dup_line_char_frac: float | None = 0.20
    dup_para_char_frac: float | None = 0.20
    top_ngram_frac: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    dup_ngram_frac: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

    def check(self, record):
        return self.check_batch(pa.RecordBatch.from_pydict({"response": [response_text(record)]}), [0]).get(0)

    def check_batch(self, batch: pa.RecordBatch, rows: list[int]) -> dict[int, str]:
        texts = batch.column("response").to_pylist()
        failed, counted = {}, []
        for i in rows:
            detail = self._repeated_parts(texts[i] or "")
            if detail is None:
                counted.append(i)
            else:
                failed[i] = detail
        if counted:
            failed.update(self._repeated_ngrams(response_words(batch), np.array(counted, dtype=np.int64)))
        return failed

    def _repeated_parts(self, text: str) -> str | None:
        for unit, parts in (("line", [p.strip() for p in text.split("\n") if p.strip()]),
                            ("para", [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()])):
            frac, char_frac = _duplicates(parts)
            limit, char_limit = getattr(self, f"dup_{unit}_frac"), getattr(self, f"dup_{unit}_char_frac")
            if limit is not None and frac > limit:
                return f"duplicate {unit} fraction {frac:.2f} > {limit}"
            if char_limit is not None and char_frac > char_limit:
                return f"duplicate {unit} char fraction {char_frac:.2f} > {char_limit}"
        return None

    def _repeated_ngrams(self, words: Words, rows: np.ndarray) -> dict[int, str]:
        """The n-gram checks of `rows` (of `words`), all rows at once; a row leaves once its verdict
        is known."""
        ends = np.r_[0, np.cumsum(words.lengths)]  # characters before each word position
        total = ends[words.offsets[rows + 1]] - ends[words.offsets[rows]]
        most_pairs = most_repeated(words, rows, 2)
        alive = (total > 0) & (most_pairs > 1)  # no word pair repeats, so no n-gram (n >= 2) does: the common case
        failed = {}
        for n, limit in self.top_ngram_frac.items():
            at = np.flatnonzero(alive)
            if n >= 2:  # a bound that skips the count without changing a verdict: an n-gram occurs at most
                # as often as the most frequent pair, and covers at most the most characters n words in a row do
                row, start = windows(words, rows[at], n)
                widest = row_max(row, ends[start + n] - ends[start], len(at))
                at = at[most_pairs[at] * widest > limit * total[at]]
            if not len(at):
                continue
            grams = ngrams(words, rows[at], n)
            most = row_max(grams.row, grams.count, len(at))
            top = np.flatnonzero(grams.count == most[grams.row])
            top = top[np.r_[True, grams.row[top][1:] != grams.row[top][:-1]]]  # each row's earliest top n-gram
            row, start, count = at[grams.row[top]], grams.start[top], grams.count[top]
            frac = (ends[start + n] - ends[start]) * count / total[row]
            for k in np.flatnonzero((count > 1) & (frac > limit)).tolist():
                failed[int(rows[row[k]])] = f"top {n}-gram {words.text(start[k], n)!r} covers {frac[k]:.2f} > {limit}"
                alive[row[k]] = False
        ordered = sorted(self.dup_ngram_frac.items())
        for j, (n, limit) in enumerate(ordered):
            at = np.flatnonzero(alive)
            at = at[most_repeated(words, rows[at], n) > 1]  # the others: nothing repeats at this n, nor longer
            alive[:] = False
            if not len(at):
                break
            grams = ngrams(words, rows[at], n)
            repeats = row_max(grams.row, grams.count, len(at)) > 1  # else nothing longer repeats either
            later = grams.start[~grams.first]  # the words of every occurrence after an n-gram's first
            size = len(words.ids) + n
            cover = np.bincount(later, minlength=size) - np.bincount(later + n, minlength=size)
            covered = np.r_[0, np.cumsum(np.where(np.cumsum(cover)[:len(words.ids)] > 0, words.lengths, 0))]
            frac = (covered[words.offsets[rows[at] + 1]] - covered[words.offsets[rows[at]]]) / total[at]
            for k in np.flatnonzero(repeats & (frac > limit)).tolist():
                failed[int(rows[at[k]])] = f"duplicated {n}-grams cover {frac[k]:.2f} > {limit}"
            # done: nothing repeats, or failed, or the words in repeated longer n-grams are among these, so
            # none can cover more than any later limit
            lowest_later = min((later for _, later in ordered[j + 1:]), default=np.inf)
            alive[at] = repeats & (frac <= limit) & (frac > lowest_later)
        return failed


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
