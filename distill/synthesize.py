"""`distill synthesize`: the teacher writes prompts (`distill.generate.synthesize`), curate's filters
judge them (`distill.curation.prompts`), and the kept ones become a prompt file `distill generate`
reads. Writing resumes by shard; the filtering is cheap and deterministic, so it runs again over
every shard each time, and its counts go into the manifest beside the teacher and the settings."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from distill import files
from distill.config import SynthesizeConfig

PROMPTS, REJECTED = "prompts.jsonl", "rejected.jsonl"


@dataclass(frozen=True)
class SynthesisResult:
    prompts: Path  # the prompt file: one {"id", "prompt"} per line
    written: int
    kept: int
    rejected_by_filter: dict[str, int]

    @property
    def kept_percent(self) -> float:
        return round(100.0 * self.kept / max(self.written, 1), 2)


def synthesize(cfg: SynthesizeConfig, teacher=None) -> SynthesisResult:
    """Write `cfg.n` prompts with the teacher (or an already started `teacher`), filter them, and
    write `out/prompts.jsonl`, `out/rejected.jsonl` and `out/manifest.json`."""
    from distill.curation.prompts import filter_prompts, prompt_filters
    from distill.generate.synthesize import MANIFEST, write_raw

    out = Path(cfg.out)
    with files.exclusive(out):
        filters = []

        def build(job) -> None:  # bad filter settings fail before the teacher starts
            special = [t for t in job.tokenizer.all_special_tokens if t != job.tokenizer.eos_token]
            filters.extend(prompt_filters(cfg.filters, cfg.held_out, special))

        job, raw = write_raw(cfg, teacher, prepared=build)
        result = filter_prompts([vars(p) for p in raw], filters)
        files.atomic_write(out / PROMPTS, "".join(json.dumps(r) + "\n" for r in result.kept))
        files.atomic_write(out / REJECTED, "".join(json.dumps(r) + "\n" for r in result.rejected))
        job.manifest["counts"] = {"written": len(raw), "kept": len(result.kept), "rejected": len(result.rejected),
                                  "rejected_by_filter": result.rejected_by_filter,
                                  "finish_reasons": dict(Counter(p.finish_reason for p in raw))}
        job.manifest["filters"] = result.filters
        job.manifest["complete"] = True
        files.write_json(out / MANIFEST, job.manifest)
    summary = SynthesisResult(out / PROMPTS, len(raw), len(result.kept), result.rejected_by_filter)
    dropped = ", ".join(f"{name} {count}" for name, count in result.rejected_by_filter.items() if count)
    print(f"prompts     {summary.prompts}: kept {summary.kept:,} of {summary.written:,} ({summary.kept_percent}%)"
          + (f"; rejected: {dropped} (reasons in {out / REJECTED})" if dropped else ""), file=sys.stderr)
    return summary
