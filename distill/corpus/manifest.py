"""`manifest.json`: what made a corpus (teacher, generation settings, source, stats, history),
read and written through one pydantic model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill.config import provenance
from distill.corpus.codec import CorpusError
from distill.files import write_json
from distill.models import ModelSource

SCHEMA = "distill.corpus/v1"
MANIFEST = "manifest.json"


def tokenizer_fingerprint(tokenizer) -> dict[str, str]:
    """Hashes that identify a vocabulary (vocab + merges + added tokens) and a chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        vocab = json.dumps([spec.get("model"), spec.get("added_tokens")], sort_keys=True)
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    template = tokenizer.chat_template or ""
    return {
        "tokenizer_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
    }


def history_entry(stage: str, config: Any, wall_time: float, complete: bool = True) -> dict[str, Any]:
    """One `manifest.history` item: what ran, with which resolved config and package versions;
    `complete: false` while it runs or after it was interrupted (`finished_at`: when written)."""
    import time

    from distill import versions

    return {"stage": stage, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_time_s": round(wall_time, 2),
            "complete": complete, "config": provenance(config), "versions": versions()}


class _Section(BaseModel):
    # Unknown keys are kept: a manifest written by a newer distill still reads and round-trips.
    model_config = ConfigDict(extra="allow")


class TeacherInfo(_Section):
    model: str
    revision: str | None = None
    source: ModelSource | None = None  # the GGUF file `model` was converted from
    tokenizer_sha256: str | None = None
    chat_template_sha256: str | None = None
    # How many token ids the teacher has (ids 0 .. vocab_size - 1): `validate` refuses any other
    # id in the corpus. Corpora written before distill recorded it are checked for negatives only.
    vocab_size: int | None = Field(None, ge=1)
    # The tokenizer's files stored under the corpus's `tokenizer/`: name -> SHA-256 (corpus/tokenizer_files.py).
    tokenizer_files: dict[str, str] | None = None


class GenerationInfo(_Section):
    mode: Literal["sample", "score"] = "sample"
    top_k: int = Field(ge=1)
    logprobs: str = "raw_logprobs"
    logprob_encoding: str | None = None  # None (manifests not written by distill): the shards' own types

    @model_validator(mode="before")
    @classmethod
    def _named_dtype(cls, data: Any) -> Any:
        """Manifests written before `logprob_encoding` named it `logprob_dtype`."""
        if isinstance(data, dict) and "logprob_dtype" in data and "logprob_encoding" not in data:
            data = {("logprob_encoding" if key == "logprob_dtype" else key): value for key, value in data.items()}
        return data
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    samples_per_prompt: int | None = None
    seed: int | None = None
    student_view: str | None = None  # `--student-view`: a view's name, or `file:SHA256` of its file


class CorpusStats(_Section):
    records: int = 0
    response_tokens: int = 0
    shards: int = 0
    bytes: int = 0
    complete: bool | None = None  # False while a generate job runs or after it was interrupted


class Manifest(_Section):
    """`manifest.json`: what made a corpus (docs/corpus-format.md); every reader and writer goes through it."""

    schema_: str = Field(SCHEMA, alias="schema")
    teacher: TeacherInfo
    generation: GenerationInfo
    source: dict[str, Any] = Field(default_factory=dict)
    stats: CorpusStats = Field(default_factory=CorpusStats)
    history: list[dict[str, Any]] = Field(default_factory=list)
    curation: dict[str, Any] | None = None  # curated corpora: filters and source corpus
    rejected_stats: CorpusStats | None = None
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.dump(), sort_keys=True).encode()).hexdigest()


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise CorpusError(f"`{path}` does not exist: not a distill corpus")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as e:
        problems = "; ".join(f"`{'.'.join(map(str, err['loc']))}`: {err['msg']}" for err in e.errors())
        raise CorpusError(f"`{path}` is not a valid manifest: {problems}") from None


def write_manifest(root: Path, manifest: Manifest) -> None:
    write_json(Path(root) / MANIFEST, manifest.dump())


def check_complete(root: Path, manifest: Manifest, allow_incomplete: bool) -> None:
    """Refuse a corpus whose generate job did not finish (`stats.complete: false`), or one
    curated from such a corpus, unless the user accepts it."""
    if manifest.stats.complete is False and not allow_incomplete:
        raise CorpusError(f"`{root}` is incomplete (its manifest says `complete: false`: the job that wrote it was "
                          f"interrupted after {manifest.stats.records:,} records): rerun that job to finish it, or "
                          "pass `--allow-incomplete` to use it as it is")



@dataclass(frozen=True)
class Corpus:
    """A corpus directory and its manifest: what the corpus-writing stages return."""

    path: Path
    manifest: Manifest

    def __fspath__(self) -> str:
        return str(self.path)

