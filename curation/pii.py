"""Personal data and secrets: e-mails, phone numbers, IPs, card numbers (Luhn), API keys.

`mode: drop` rejects the record; `mode: mask` keeps it and sets `loss_mask` false on the
response tokens that overlap the match, so training never learns them while the rest counts.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Literal

import numpy as np

from distill.curation.base import Filter, response_text

PATTERNS = {
    "secret": r"\b(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|xox[baprs]-[A-Za-z0-9-]{10,}"
              r"|AIza[0-9A-Za-z_-]{35})\b",
    "email": r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[a-zA-Z]{2,}\b",
    "credit_card": r"\b(?:\d[ -]?){12,18}\d\b",
    "ipv4": r"\b(?:\d{1,3}\.){3}\d{1,3}\b",
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}\b",
}


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def valid_match(kind: str, text: str) -> bool:
    if kind == "credit_card":
        digits = re.sub(r"\D", "", text)
        return 13 <= len(digits) <= 19 and luhn_ok(digits)
    if kind == "ipv4":
        try:
            return not ipaddress.ip_address(text).is_private and text.count(".") == 3 and text != "0.0.0.0"
        except ValueError:
            return False
    return True


@functools.lru_cache(maxsize=16)
def combined_pattern(kinds: tuple[str, ...]) -> re.Pattern:
    """One pass over the text for all kinds (order matters: secrets and cards before phones)."""
    order = [k for k in PATTERNS if k in kinds]
    return re.compile("|".join(f"(?P<{k}>{PATTERNS[k]})" for k in order))


_DIGITS = re.compile(r"\d[ .()+-]?\d")
# What each kind cannot match without: most answers have none of these and are not scanned.
_NEEDS = {"secret": lambda t: "sk-" in t or "AKIA" in t or "xox" in t or "AIza" in t or ("gh" in t and "_" in t),
          "email": lambda t: "@" in t}
_NEEDS_DIGITS = ("credit_card", "ipv4", "phone")


def _has_digit_pair(text: str) -> bool:
    # An ASCII text without any of 0-9 cannot match: ten substring searches cost a fifth of one
    # regex scan (`\d` matches other scripts' digits too, so other texts are scanned).
    if text.isascii() and not any(d in text for d in "0123456789"):
        return False
    return _DIGITS.search(text) is not None


# A match of the digit kinds is made of these characters only (`\d` and the separators of their
# patterns) and holds two digits at least: it lies inside one stretch of them.
_STRETCH = re.compile(r"[\d .()+-]+")
_ASCII_DIGIT = np.zeros(256, dtype=bool)
_ASCII_DIGIT[list(b"0123456789")] = True
_ASCII_STRETCH = _ASCII_DIGIT.copy()
_ASCII_STRETCH[list(b" .()+-")] = True


def _digit_stretches(text: str) -> list[tuple[int, int]]:
    """(start, end) of each maximal stretch of `_STRETCH` characters holding two digits or more."""
    if not text.isascii():
        return [m.span() for m in _STRETCH.finditer(text) if sum(c.isdigit() for c in m.group()) >= 2]
    codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    inside = np.zeros(len(codes) + 2, dtype=np.int8)
    inside[1:-1] = _ASCII_STRETCH[codes]
    edges = np.flatnonzero(inside[1:] != inside[:-1])
    starts, ends = edges[::2], edges[1::2]
    digits = np.concatenate(([0], np.cumsum(_ASCII_DIGIT[codes])))
    keep = digits[ends] - digits[starts] >= 2
    return list(zip(starts[keep].tolist(), ends[keep].tolist()))


def find_pii(text: str, kinds: list[str]) -> list[tuple[str, int, int]]:
    """(kind, start, end) of each match in `text`."""
    has_digits = _has_digit_pair(text)
    possible = tuple(k for k in kinds if (has_digits if k in _NEEDS_DIGITS else _NEEDS[k](text)))
    if not possible:
        return []
    pattern = combined_pattern(possible)
    if all(k in _NEEDS_DIGITS for k in possible):
        # Only the digit kinds: the scan visits their stretches alone (2x faster on ShareGPT answers
        # with digits). The same matches as over the whole text: a match never leaves its stretch,
        # a scan from a stretch's start sees the characters before it (`\b`, the phone's
        # look-behind), and its end reaches one character past the stretch for the `\b` there.
        spans = [(start, min(end + 1, len(text))) for start, end in _digit_stretches(text)]
    else:
        spans = [(0, len(text))]
    return [(m.lastgroup, m.start(), m.end()) for start, end in spans for m in pattern.finditer(text, start, end)
            if valid_match(m.lastgroup, m.group(0))]


class PIIFilter(Filter):
    name = "pii"
    mode: Literal["drop", "mask"] = "drop"
    kinds: list[Literal["email", "phone", "ipv4", "credit_card", "secret"]] = list(PATTERNS)

    def check(self, record):
        found = find_pii(response_text(record), list(self.kinds))
        if not found:
            return None
        kinds = sorted({k for k, _, _ in found})
        return f"{len(found)} match(es): {', '.join(kinds)}"


def token_mask(token_ids: list[int], spans: list[tuple[int, int]], decode) -> list[bool]:
    """`loss_mask` for a response: False on every token whose decoded characters overlap a span.
    Token i covers `[len(decode(ids[:i])), len(decode(ids[:i+1])))` of the decoded response."""
    mask, start = [], 0
    for i in range(len(token_ids)):
        end = len(decode(token_ids[: i + 1]))
        mask.append(not any(s < max(end, start + 1) and e > start for s, e in spans))
        start = end
    return mask
