"""What a trained student carries besides its weights: `distill.json`, its provenance card
(`StudentCard`), a short `README.md` and the loss plot `loss.png`; and what `train()` returns."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from distill.config import provenance
from distill.corpus import Manifest, TeacherInfo, history_entry
from distill.files import write_json
from distill.models import ModelSource, model_source

if TYPE_CHECKING:
    from distill.config import TrainConfig

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
    # Several corpora (multi-teacher): every corpus and the teacher that made it, in `corpus` order;
    # `corpus`, `teacher` and the fields above describe the first.
    corpora: list[str] = Field(default_factory=list)
    teachers: list[TeacherInfo] = Field(default_factory=list)
    # a student of another tokenizer: the loss kind and how much of the corpus aligned (train/cross_tokenizer.py)
    cross_tokenizer: dict[str, Any] | None = None

    @classmethod
    def load(cls, student: Path) -> StudentCard:
        return cls.model_validate_json((Path(student) / CARD).read_bytes())

    @classmethod
    def of_run(cls, cfg: TrainConfig, manifests: Manifest | list[Manifest], steps: int, log_history: list[dict],
               initial: dict, final: dict, wall: float,
               cross_tokenizer: dict | None = None) -> StudentCard:
        """The card of a finished run: `log_history` is the trainer's logged metrics, one dict per log;
        `manifests`: the corpus's, or one per corpus of `cfg.corpora`."""
        manifests = manifests if isinstance(manifests, list) else [manifests]
        manifest = manifests[0]
        logs = [log for log in log_history if "loss" in log]
        several = len(manifests) > 1
        return cls(
            corpora=[str(p) for p in cfg.corpora] if several else [],
            teachers=[m.teacher for m in manifests] if several else [],
            corpus=str(cfg.corpora[0]), corpus_complete=all(m.stats.complete is not False for m in manifests),
            teacher=manifest.teacher,
            student_source=model_source(cfg.student), corpus_manifest_sha256=manifest.sha256(),
            curation=manifest.curation, config=provenance(cfg), steps=steps,
            initial=initial, final=final, first_loss=logs[0]["loss"] if logs else None,
            last_loss=logs[-1]["loss"] if logs else None,
            history=manifest.history + [history_entry("train", cfg, wall)], cross_tokenizer=cross_tokenizer)

    def write(self, student: Path) -> None:
        write_json(Path(student) / CARD, self.model_dump(mode="json"))


@dataclass(frozen=True)
class TrainResult:
    path: Path  # the student directory: merged model, tokenizer, card
    card: StudentCard


def write_student_files(out: Path, cfg: TrainConfig, card: StudentCard) -> None:
    """`distill.json`, `README.md` and `loss.png` (from `metrics.jsonl`) into the student directory."""
    card.write(out)
    write_readme(out, cfg, card)
    plot_losses(out)


def write_readme(out: Path, cfg: TrainConfig, card: StudentCard) -> None:
    lines = ["# Distilled student", "", f"- student base: `{cfg.student}`",
             f"- teacher: `{card.teacher.model if card.teacher else None}`",
             f"- corpus: `{cfg.corpora[0]}` (manifest sha256 `{card.corpus_manifest_sha256[:16]}`)"
             + ("" if card.corpus_complete else "; incomplete: its generate job was interrupted"),
             *([teachers_line(cfg, card)] if card.teachers else []),
             f"- loss: {cfg.alpha} x {cfg.loss} (tail {cfg.tail}, T={cfg.kd_temperature}) + {1 - cfg.alpha:g} x CE; "
             f"{'LoRA r=' + str(cfg.lora_r) if cfg.lora else 'full fine-tuning'}",
             *([f"- on-policy: {cfg.lmbda:g} of each batch sampled by the student (at most {cfg.max_new_tokens} tokens, "
                f"temperature {cfg.sample_temperature:g}), scored by the teacher at `{cfg.teacher_endpoint}` "
                f"(top-{cfg.teacher_top_k}), loss {cfg.on_policy_loss}"] if cfg.on_policy else []),
             *([(f"- cross-tokenizer ({card.cross_tokenizer['kind']}): {card.cross_tokenizer['aligned_share']:.1%} of the "
                 f"student's response tokens aligned with the teacher's, "
                 f"{card.cross_tokenizer['mapped_topk_mass']:.1%} of the teacher's top-k mass at 1:1 spans mapped")]
               if card.cross_tokenizer else []),
             f"- steps: {card.steps}; loss {card.first_loss} -> {card.last_loss}",
             *(f"- {key}: {card.initial.get(key, float('nan')):.4f} before training -> {value:.4f}"
               for key, value in card.final.items() if isinstance(value, float)),
             "", "Full provenance: `distill.json`. Metrics per logging step: `metrics.jsonl`, `loss.png`."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def teachers_line(cfg: TrainConfig, card: StudentCard) -> str:
    """Several corpora: each teacher and its corpus, and how the student learnt from them."""
    how = (f"{cfg.ensemble} ensemble, weights {cfg.normalised_teacher_weights()}" if cfg.ensemble
           else "each record learns from its own corpus's teacher")
    mix = f"; mix {', '.join(cfg.mix)}" if cfg.mix else ""
    teachers = ", ".join(f"`{t.model}` (`{c}`)" for t, c in zip(card.teachers, card.corpora))
    return f"- teachers: {teachers}; {how}{mix}"


def plot_losses(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "kd", "ce", "eval_loss", "on_policy_kl"):
        points = [(m["step"], float(m[key])) for m in logs if key in m]
        if points:
            ax.plot(*zip(*points), label=key, marker="." if key == "eval_loss" else None)
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
