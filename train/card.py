"""`distill.json`: the student's provenance card (`StudentCard`), and what `train()` returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from distill.corpus import TeacherInfo
from distill.files import write_json
from distill.models import ModelSource

CARD = "distill.json"


class StudentCard(BaseModel):
    corpus: str  # the training corpus directory (eval refuses prompts found in it)
    corpus_complete: bool = True  # false: trained with `allow_incomplete` on an interrupted corpus
    teacher: TeacherInfo | None = None
    student_source: ModelSource | None = None  # the GGUF file the student base was converted from
    corpus_manifest_sha256: str | None = None
    curation: dict[str, Any] | None = None  # the corpus manifest's curation summary, if curated
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved TrainConfig
    steps: int = 0
    initial: dict[str, float | int] = Field(default_factory=dict)  # held-out metrics before training
    final: dict[str, float | int] = Field(default_factory=dict)  # and after
    first_loss: float | None = None
    last_loss: float | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)  # the corpus's history + this run

    @classmethod
    def load(cls, student: Path) -> StudentCard:
        return cls.model_validate_json((Path(student) / CARD).read_bytes())

    def write(self, student: Path) -> None:
        write_json(Path(student) / CARD, self.model_dump(mode="json"))


@dataclass(frozen=True)
class TrainResult:
    path: Path  # the student directory: merged model, tokenizer, card
    card: StudentCard
