"""Refusals, AI self-identification and knowledge-cutoff boilerplate the student should not copy."""

from __future__ import annotations

import re

from distill.curation.base import Filter, response_text

DEFAULT_PHRASES = [
    r"as an ai(?: language)? model",
    r"as a large language model",
    r"i(?: a|')m (?:just )?an ai",
    r"i(?: am|'m) sorry,? but i (?:can(?:no|')t|am unable to|won't)",
    r"i (?:cannot|can't|can not|won't|am unable to|am not able to) (?:help|assist|comply|provide|fulfill)",
    r"i(?:'m| am) not able to (?:help|assist)",
    r"my (?:knowledge|training data) (?:cutoff|cut-off|only goes up to|is limited to)",
    r"as of my (?:last )?(?:knowledge |training )?(?:update|cutoff|cut-off)",
    r"i was (?:created|developed|trained) by (?:openai|anthropic|google|meta)",
]


def _lower_literals(pattern: str) -> str:
    """Lower-case a regex except escapes (`\\S` must stay `\\S`)."""
    return re.sub(r"\\.|[^\\]+", lambda m: m.group(0) if m.group(0).startswith("\\") else m.group(0).lower(), pattern)


class RefusalFilter(Filter):
    """Regexes searched case-insensitively, with any run of whitespace matching any other."""
    name = "refusal"
    phrases: list[str] = DEFAULT_PHRASES
    extra_phrases: list[str] = []

    def model_post_init(self, _):
        patterns = [re.sub(r"(?:\\ | )+", r"\\s+", _lower_literals(p)) for p in self.phrases + self.extra_phrases]
        # matched against the lower-cased text: much faster than re.IGNORECASE
        self._pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def check(self, record):
        if self._pattern is None:
            return None
        match = self._pattern.search(response_text(record).lower())
        return None if match is None else f"matched {match.group(0)!r}"
