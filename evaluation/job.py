"""`evaluate()`: teacher and student answer the same held-out prompts; the student is read
along the teacher's answers (fidelity); both are served the same way and timed (cost)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distill import corpus, files
from distill.config import EvalConfig, GenerateConfig, ScoreConfig, ServeConfig
from distill.engine import check_model
from distill.evaluation.report import (
    Answers,
    AnswerStats,
    EvalReport,
    Fidelity,
    Headline,
    LoadLevel,
    ModelInfo,
    PromptSet,
    write_report,
)
from distill.plugins import load_callable
from distill.train.card import CARD, StudentCard

if TYPE_CHECKING:
    from distill.train.scoring import TeacherForced


def evaluate(cfg: EvalConfig, teacher_engine=None, student_engine=None) -> EvalReport:
    """`teacher_engine` / `student_engine`: already-running in-process engines to reuse (tests)."""
    with files.exclusive(cfg.out):
        return _evaluate(cfg, teacher_engine, student_engine)


def _evaluate(cfg: EvalConfig, teacher_engine, student_engine) -> EvalReport:
    from distill.evaluation.fidelity import fidelity
    from distill.generate.job import generate
    from distill.generate.prompts import BadRecord, iter_prompts

    start = time.time()
    out = Path(cfg.out)
    prompts = list(iter_prompts(cfg.prompts, cfg.format))
    bad = [p for p in prompts if isinstance(p, BadRecord)]
    if bad:
        raise ValueError(f"{bad[0]}" + (f" (and {len(bad) - 1} more bad records)" if len(bad) > 1 else ""))
    ids = {p.prompt_id for p in prompts}
    check_model(cfg.student, "student")
    check_model(cfg.teacher, "teacher")
    check_overlap(cfg, ids)
    scorer = load_callable(cfg.scorer, "scorer") if cfg.scorer else None  # fail before any model loads
    out.mkdir(parents=True, exist_ok=True)

    def answers(model: str, where: str, top_k: int, engine) -> Path:
        return generate(GenerateConfig(
            teacher=model, prompts=cfg.prompts, out=out / where, format=cfg.format, top_k=top_k,
            max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed, overwrite=cfg.overwrite,
            **cfg.engine_settings()), teacher=engine).path

    teacher_corpus = cfg.corpus or answers(cfg.teacher, "teacher-answers", cfg.top_k, teacher_engine)
    student_corpus = answers(cfg.student, "student-answers", 1, student_engine)
    scored = fidelity(cfg.student, teacher_corpus, cfg, ids, batch_size=cfg.batch_size)
    on_policy = fidelity(cfg.student, teacher_on_student_answers(cfg, student_corpus, teacher_engine), cfg, ids,
                         batch_size=cfg.batch_size) if cfg.on_policy_kl else None
    teacher, student = ModelInfo(model=cfg.teacher, **model_size(cfg.teacher)), \
        ModelInfo(model=cfg.student, **model_size(cfg.student))
    answer_stats = compare_answers(teacher_corpus, student_corpus, ids, scorer)
    cost = measure_cost(cfg, prompts) if cfg.latency else None
    report = EvalReport(
        teacher=teacher, student=student, prompts=PromptSet(file=str(cfg.prompts), count=len(ids)),
        fidelity=_fidelity(scored), on_policy=_fidelity(on_policy) if on_policy else None,
        answers=answer_stats, cost=cost, config=json.loads(cfg.model_dump_json()),
        headline=headline(answer_stats, scored.top1_agreement, cost, teacher, student),
        wall_seconds=time.time() - start)
    write_report(out, report, scored.per_record_kl)
    return report


def _fidelity(scored: TeacherForced) -> Fidelity:
    """The report's summary of a teacher-forced scoring (its per-record KLs go to a plot instead)."""
    return Fidelity(**{k: v for k, v in vars(scored).items() if k != "per_record_kl"}, perplexity=scored.perplexity)


def teacher_on_student_answers(cfg: EvalConfig, student_corpus: Path, teacher_engine) -> Path:
    """The teacher's top-k along the student's own answers (`distill score`: the answer text is
    tokenised again with the shared tokenizer), so that any student, offline- or on-policy-trained,
    is compared on the divergence on-policy training minimises."""
    from distill.generate.job import score

    data = Path(cfg.out) / "student-conversations.jsonl"
    files.atomic_write(data, "".join(json.dumps({"id": r["prompt_id"], "messages": [
        *r["messages"], {"role": "assistant", "content": r["response"]}]}) + "\n"
        for r in corpus.iter_records(student_corpus)))
    return score(ScoreConfig(teacher=cfg.teacher, data=data, out=Path(cfg.out) / "teacher-on-student-answers",
                             top_k=cfg.top_k, overwrite=cfg.overwrite, **cfg.engine_settings()),
                 teacher=teacher_engine).path


def check_overlap(cfg: EvalConfig, ids: set[str]) -> None:
    """Refuse prompts the student was trained on (its distill.json names the training corpus)."""
    if cfg.allow_overlap or not (Path(cfg.student) / CARD).is_file():
        return
    trained_on = Path(StudentCard.load(Path(cfg.student)).corpus)
    if not (trained_on / corpus.MANIFEST).is_file():
        return
    seen = set(corpus.read_table(trained_on, columns=["prompt_id"]).column("prompt_id").to_pylist())
    overlap = ids & seen
    if overlap:
        raise ValueError(f"{len(overlap)} of {len(ids)} prompts in `{cfg.prompts}` are in the student's training corpus "
                         f"`{trained_on}` (e.g. prompt_id {sorted(overlap)[0]!r}): evaluate on held-out prompts, "
                         "or pass `--allow-overlap`")


def _answers(corpus_dir: Path, ids: set[str]) -> dict[str, dict]:
    columns = ["prompt_id", "messages", "response", "response_token_ids", "finish_reason"]
    return {r["prompt_id"]: r for r in corpus.iter_records(corpus_dir, columns=columns) if r["prompt_id"] in ids}


def compare_answers(teacher_corpus: Path, student_corpus: Path, ids: set[str], scorer) -> Answers:
    teacher, student = _answers(teacher_corpus, ids), _answers(student_corpus, ids)
    both = sorted(set(teacher) & set(student))
    exact = float(np.mean([teacher[i]["response"].strip() == student[i]["response"].strip() for i in both])) \
        if both else None

    def stats(answers: dict[str, dict]) -> AnswerStats:
        lengths = np.array([len(answers[i]["response_token_ids"]) for i in both])
        score = float(np.mean([float(scorer(answers[i]["messages"][-1]["content"], answers[i]["response"]))
                               for i in both])) if scorer else None
        return AnswerStats(mean_tokens=float(lengths.mean()), p50_tokens=float(np.median(lengths)),
                           max_tokens=int(lengths.max()), score=score,
                           truncated=float(np.mean([answers[i]["finish_reason"] == "length" for i in both])))

    return Answers(compared=len(both), exact_match=exact, teacher=stats(teacher), student=stats(student))


def measure_cost(cfg: EvalConfig, prompts) -> dict[str, list[LoadLevel]]:
    from distill.evaluation.load import measure
    from distill.launcher import start_server

    conversations = [p.messages for p in prompts]
    cost = {}
    for role, model in (("teacher", cfg.teacher), ("student", cfg.student)):
        with start_server(ServeConfig(model=model, served_model_name=role, port=0, **cfg.engine_settings()),
                          log_path=Path(cfg.out) / f"server-{role}.log") as server:
            cost[role] = [LoadLevel(**row) for row in measure(server.url, server.model, conversations,
                                                              cfg.concurrency, cfg.latency_requests, cfg.latency_tokens)]
    return cost


def model_size(model: str) -> dict:
    """Parameters and bytes on disk of a local safetensors checkpoint (None for a hub id)."""
    from safetensors import safe_open

    files = sorted(Path(model).glob("*.safetensors")) if Path(model).is_dir() else []
    if not files:
        return {"parameters": None, "bytes": None}
    params = 0
    for f in files:
        with safe_open(str(f), "np") as st:
            params += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())
    return {"parameters": params, "bytes": sum(f.stat().st_size for f in files)}


def headline(answers: Answers, top1_agreement: float, cost: dict[str, list[LoadLevel]] | None, teacher: ModelInfo,
             student: ModelInfo) -> Headline:
    """Quality retained (the student's task score over the teacher's, else its top-1 agreement)
    and speedup (output tokens/s at the highest concurrency, student over teacher)."""
    if answers.student.score is not None and answers.teacher.score:
        quality = dict(quality_retained=answers.student.score / answers.teacher.score,
                       quality_measure="task score, student / teacher")
    else:
        quality = dict(quality_retained=top1_agreement, quality_measure="top-1 agreement with the teacher")
    speed = {}
    if cost:
        t, s = cost["teacher"][-1], cost["student"][-1]
        speed = dict(speedup=s.tokens_per_s / t.tokens_per_s, speedup_concurrency=s.concurrency,
                     ttft_p50_ratio=s.ttft_ms_p50 / t.ttft_ms_p50)
    size = student.parameters / teacher.parameters if teacher.parameters and student.parameters else None
    return Headline(**quality, **speed, size_ratio=size)
