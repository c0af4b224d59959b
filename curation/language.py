"""Keep answers in the listed languages. Language ID: `langid` (its model ships inside the
package; nothing is downloaded at run time)."""

from __future__ import annotations

from distill.curation.base import Filter, response_text


class LanguageFilter(Filter):
    name = "language"
    languages: list[str]  # ISO 639-1 codes, e.g. ["en"]
    min_chars: int = 20  # shorter answers carry too little signal to judge

    def model_post_init(self, _):
        from langid.langid import LanguageIdentifier, model

        self._identify = LanguageIdentifier.from_modelstring(model, norm_probs=True)

    def check(self, record):
        text = response_text(record)
        if len(text.strip()) < self.min_chars:
            return None
        lang, prob = self._identify.classify(text)
        return None if lang in self.languages else f"language {lang!r} (p={prob:.2f}) not in {self.languages}"
