"""The eval report: `EvalReport` (what `evaluate` returns; report.json is its dump), report.md
(headline first) and report.html (the same, one self-contained file), kl_histogram.png,
latency.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from distill.files import write_json
from distill.html import write_html_report

REPORT = "report.json"


class ModelInfo(BaseModel):
    model: str
    parameters: int | None = None  # None for a hub id (nothing on disk to count)
    bytes: int | None = None


class PromptSet(BaseModel):
    file: str
    count: int


class Fidelity(BaseModel):
    """Teacher-forced on the teacher's answers (`distill.train.scoring`), per token."""
    records: int
    tokens: int
    kl: float
    top1_agreement: float
    nll: float
    perplexity: float


class CrossTokenizerFidelity(BaseModel):
    """Along the teacher's answers, on the spans where the two tokenisations end at the same byte
    (`distill.evaluation.cross_tokenizer`): defined for any pair, so that students of different
    tokenizers compare on it; for a student of the teacher's tokenizer every span is one token each side."""
    different_tokenizer: bool  # the student's tokenizer is not the teacher's (then there is no per-token `fidelity`)
    span_kl: float  # KL(teacher || student) per span, nats
    one_to_one_kl: float | None = None  # over the spans of one token each side (None: no such span)
    longer_span_kl: float | None = None  # over the others, on the probability of the span's text
    top1_agreement: float  # share of spans where both models' most likely next text agrees
    student_nll_per_byte: float  # the student's NLL of the teacher's answer text, nats per UTF-8 byte
    aligned_share: float  # share of the student's tokens of those answers inside a span (0..1)
    spans: int


class TeacherScoredAnswers(BaseModel):
    """The teacher's NLL of the student's own answers (their text in the teacher's tokens), per
    UTF-8 byte of that text: how likely the teacher finds what the student says, for any pair."""
    answers: int
    teacher_tokens: int
    bytes: int
    nll_per_byte: float  # nats per byte


class AnswerStats(BaseModel):
    mean_tokens: float
    p50_tokens: float
    max_tokens: int
    truncated: float  # share of answers cut at max_tokens
    score: float | None = None  # mean task score, when a scorer is set


class Answers(BaseModel):
    compared: int
    exact_match: float | None = None  # share of prompts where the student's answer is the teacher's
    teacher: AnswerStats
    student: AnswerStats


class LoadLevel(BaseModel):
    """One concurrency level of `distill.evaluation.load.measure`."""
    model_config = {"extra": "allow"}
    concurrency: int
    tokens_per_s: float
    ttft_ms_p50: float
    ttft_ms_p95: float
    tpot_ms_p50: float
    tpot_ms_p95: float
    failures: int


class Headline(BaseModel):
    quality_retained: float
    quality_measure: str
    speedup: float | None = None  # output tokens/s at the highest concurrency, student / teacher
    speedup_concurrency: int | None = None
    ttft_p50_ratio: float | None = None
    size_ratio: float | None = None  # parameters, student / teacher


class EvalReport(BaseModel):
    teacher: ModelInfo
    student: ModelInfo
    prompts: PromptSet
    fidelity: Fidelity | None = None  # None for a student of another tokenizer: per-token KL is not defined
    on_policy: Fidelity | None = None  # the same, along the student's own answers (`on_policy_kl`)
    cross_tokenizer: CrossTokenizerFidelity
    teacher_scored_student_answers: TeacherScoredAnswers | None = None  # None: no non-empty answer to score
    answers: Answers
    cost: dict[str, list[LoadLevel]] | None = None  # role -> one row per concurrency level
    config: dict[str, Any]
    headline: Headline
    wall_seconds: float

    @classmethod
    def load(cls, out: Path) -> "EvalReport":
        return cls.model_validate_json((Path(out) / REPORT).read_bytes())

    def headline_metrics(self) -> dict[str, float | None]:
        """The numbers a tracker compares runs by (None: not measured)."""
        student_cost = self.cost["student"][-1] if self.cost else None
        f, x = self.fidelity, self.cross_tokenizer
        return {"eval_report/kl": f.kl if f else None,
                "eval_report/top1_agreement": f.top1_agreement if f else x.top1_agreement,
                "eval_report/perplexity": f.perplexity if f else None,
                "eval_report/span_kl": x.span_kl, "eval_report/student_nll_per_byte": x.student_nll_per_byte,
                "eval_report/aligned_share": x.aligned_share,
                "eval_report/teacher_nll_per_byte": self.teacher_scored_student_answers.nll_per_byte
                if self.teacher_scored_student_answers else None,
                "eval_report/accuracy": self.answers.student.score,
                "eval_report/teacher_accuracy": self.answers.teacher.score,
                "eval_report/answer_agreement": self.answers.exact_match,
                "eval_report/on_policy_kl": self.on_policy.kl if self.on_policy else None,
                "eval_report/tokens_per_s": student_cost.tokens_per_s if student_cost else None,
                "eval_report/quality_retained": self.headline.quality_retained,
                "eval_report/speedup": self.headline.speedup}


def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def write_report(out: Path, report: EvalReport, per_record_kl: list[float]) -> None:
    """`per_record_kl`: for the KL histogram; empty for a student of another tokenizer."""
    plots = _plots(out, report, per_record_kl)
    h, f, a, x = report.headline, report.fidelity, report.answers, report.cross_tokenizer
    scored = report.teacher_scored_student_answers
    t, s = report.teacher, report.student
    lines = [
        "# Student vs teacher", "",
        f"student `{s.model}` vs teacher `{t.model}` on {report.prompts.count} held-out prompts "
        f"(`{report.prompts.file}`)", "",
        "| quality retained | speedup (output tok/s) | TTFT p50, student / teacher | size, student / teacher |",
        "|---|---|---|---|",
        f"| {_fmt(h.quality_retained)} ({h.quality_measure}) | "
        + (f"{h.speedup:.2f}x at concurrency {h.speedup_concurrency} | {h.ttft_p50_ratio:.2f} |"
           if h.speedup is not None else "not measured | not measured |")
        + f" {_fmt(h.size_ratio)} |", "",
        "## Fidelity (teacher-forced on the teacher's answers)", "",
        *([f"- KL(teacher || student) per token: {f.kl:.4f} nats (top-k + tail bucket)",
           f"- top-1 agreement: {f.top1_agreement:.3f}",
           f"- student perplexity on teacher text: {f.perplexity:.3f} ({f.tokens:,} tokens, {f.records} answers)"]
          if f else ["- the student's tokenizer is not the teacher's: no per-token KL (two vocabularies); "
                     "the measures across tokenizers below stand for it"]),
        *([f"- on the student's own answers (scored by the teacher): KL(teacher || student) per token "
           f"{report.on_policy.kl:.4f} nats, top-1 agreement {report.on_policy.top1_agreement:.3f} "
           f"({report.on_policy.tokens:,} tokens)"] if report.on_policy else []),
        "", "### Across tokenizers (comparable between students of any tokenizers)", "",
        f"- KL(teacher || student) per aligned span: {x.span_kl:.4f} nats ({x.spans:,} spans; one token each side "
        f"{_fmt(x.one_to_one_kl, '.4f')}, longer {_fmt(x.longer_span_kl, '.4f')})",
        f"- top-1 agreement per span: {x.top1_agreement:.3f}",
        f"- student NLL of the teacher's answers: {x.student_nll_per_byte:.4f} nats per byte",
        f"- aligned share: {x.aligned_share:.1%} of the student's tokens of the teacher's answers",
        f"- teacher NLL of the student's answers: {scored.nll_per_byte:.4f} nats per byte "
        f"({scored.bytes:,} bytes, {scored.answers} answers, {scored.teacher_tokens:,} teacher tokens)"
        if scored else "- teacher NLL of the student's answers: none scored (every answer empty or past the context)",
        "", "## Answers (same prompts, same sampling)", "",
        "| | mean tokens | p50 tokens | max tokens | truncated | task score |", "|---|---|---|---|---|---|",
        *(f"| {role} | {x.mean_tokens:.1f} | {x.p50_tokens:.0f} | {x.max_tokens} | {x.truncated:.3f} | {_fmt(x.score)} |"
          for role, x in (("teacher", a.teacher), ("student", a.student))),
        "", f"Student answer identical to the teacher's: {_fmt(a.exact_match)} of {a.compared} prompts.", "",
    ]
    if report.cost:
        lines += ["## Cost (both behind vLLM's OpenAI server, same settings)", "",
                  "| model | concurrency | output tok/s | TTFT p50 / p95 (ms) | TPOT p50 / p95 (ms) | failures |",
                  "|---|---|---|---|---|---|"]
        for role, rows in report.cost.items():
            for row in rows:
                lines.append(f"| {role} | {row.concurrency} | {row.tokens_per_s:,.0f} | {row.ttft_ms_p50:.1f} / "
                             f"{row.ttft_ms_p95:.1f} | {row.tpot_ms_p50:.2f} / {row.tpot_ms_p95:.2f} | {row.failures} |")
        lines.append("")
    lines += [f"- parameters: teacher {_fmt(t.parameters, ',')}, student {_fmt(s.parameters, ',')}; "
              f"on disk: teacher {_fmt(t.bytes, ',')} B, student {_fmt(s.bytes, ',')} B", "",
              *(f"![{p.stem}]({p.name})" for p in plots), ""]
    (out / "report.md").write_text("\n".join(lines))
    write_html_report(out, title=f"distill eval: {s.model} vs {t.model}")
    write_json(out / REPORT, report.model_dump(mode="json", exclude_none=True))  # last: `distill run`'s "done"


def _plots(out: Path, report: EvalReport, per_record_kl: list[float]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if per_record_kl:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(per_record_kl, bins=40)
        ax.set_xlabel("KL(teacher || student), mean per token of an answer (nats)")
        ax.set_ylabel("answers")
        fig.tight_layout()
        paths.append(out / "kl_histogram.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if report.cost:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        for role, rows in report.cost.items():
            c = [r.concurrency for r in rows]
            left.plot(c, [r.tokens_per_s for r in rows], marker="o", label=role)
            right.plot(c, [r.ttft_ms_p50 for r in rows], marker="o", label=f"{role} p50")
            right.plot(c, [r.ttft_ms_p95 for r in rows], marker="x", linestyle="--", label=f"{role} p95")
        left.set(xlabel="concurrency", ylabel="output tokens/s", xscale="log")
        right.set(xlabel="concurrency", ylabel="time to first token (ms)", xscale="log")
        left.legend()
        right.legend()
        fig.tight_layout()
        paths.append(out / "latency.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
