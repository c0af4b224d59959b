"""`evaluate()`: teacher and student answer the same held-out prompts; the student is read
along the teacher's answers (fidelity); both are served the same way and timed (cost)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distill import corpus, files, tracking
from distill.config import EvalConfig, GenerateConfig, ServeConfig
from distill.engine import check_model
from distill.evaluation.report import (
    Answers,
    AnswerStats,
    CrossTokenizerFidelity,
    EvalReport,
    Fidelity,
    Headline,
    LoadLevel,
    ModelInfo,
    PromptSet,
    TeacherScoredAnswers,
    write_report,
)
from distill.plugins import load_callable
from distill.teacher import (
    Completion,
    OnDone,
    Request,
    Sampling,
    Teacher,
    start_teacher,
)
from distill.teacher_client import TeacherClient
from distill.train.card import CARD, StudentCard

if TYPE_CHECKING:
    from distill.evaluation.cross_tokenizer import CrossFidelity
    from distill.train.scoring import TeacherForced


def evaluate(cfg: EvalConfig, teacher_engine: Teacher | None = None, student_engine: Teacher | None = None) -> EvalReport:
    """`teacher_engine` / `student_engine`: already started teachers (`distill.teacher.Teacher`) to reuse (tests)."""
    with files.exclusive(cfg.out):
        return _evaluate(cfg, teacher_engine, student_engine)


def _evaluate(cfg: EvalConfig, teacher_engine: Teacher | None, student_engine: Teacher | None) -> EvalReport:
    from distill.evaluation.cross_tokenizer import cross_fidelity, teacher_nll_per_byte
    from distill.evaluation.fidelity import fidelity
    from distill.generate.job import generate
    from distill.generate.prompts import BadRecord, iter_prompts
    from distill.generate.templating import model_max_len

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

    def answers(model: str, where: str, top_k: int, engine: Teacher | None, backend: dict) -> Path:
        return generate(GenerateConfig(
            teacher=model, prompts=cfg.prompts, out=out / where, format=cfg.format, top_k=top_k,
            max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed, overwrite=cfg.overwrite,
            **cfg.engine_settings(), **backend), teacher=engine).path

    # The student first, in its own engine (started and stopped by `generate`): on one GPU two
    # engines would not fit beside each other. Then ONE teacher for its answers and its scoring.
    student_corpus = answers(cfg.student, "student-answers", 1, student_engine, {})
    teacher_engine = teacher_engine or OnDemandTeacher(cfg, max_logprobs=cfg.top_k, max_model_len=model_max_len(cfg))
    try:
        teacher_corpus = cfg.corpus or answers(cfg.teacher, "teacher-answers", cfg.top_k, teacher_engine,
                                               cfg.backend_settings())
        different = another_tokenizer(cfg, teacher_corpus)
        if different and cfg.on_policy_kl:
            raise ValueError("`on_policy_kl` needs a student of the teacher's tokenizer (the teacher scores the "
                             "student's token ids); the teacher's NLL per byte of the student's answers is reported "
                             "for any pair")
        on_policy_corpus = teacher_on_student_answers(cfg, student_corpus, teacher_corpus, teacher_engine) \
            if cfg.on_policy_kl else None
        teacher_tokenizer = corpus.teacher_tokenizer(teacher_corpus, corpus.read_manifest(teacher_corpus))
        teacher_scored = teacher_nll_per_byte(student_corpus, teacher_corpus, ids, teacher_engine, teacher_tokenizer,
                                              model_max_len(cfg))
    finally:
        if isinstance(teacher_engine, OnDemandTeacher):
            teacher_engine.close()
    # per-token KL only where the two vocabularies are one; the span measures for any pair, beside it
    scored = fidelity(cfg.student, teacher_corpus, cfg, ids, batch_size=cfg.batch_size) if not different else None
    on_policy = fidelity(cfg.student, on_policy_corpus, cfg, ids, batch_size=cfg.batch_size) if cfg.on_policy_kl else None
    across = cross_fidelity(cfg.student, teacher_corpus, prompt_ids=ids, batch_size=cfg.batch_size)
    teacher, student = ModelInfo(model=cfg.teacher, **model_size(cfg.teacher)), \
        ModelInfo(model=cfg.student, **model_size(cfg.student))
    answer_stats = compare_answers(teacher_corpus, student_corpus, ids, scorer)
    cost = measure_cost(cfg, prompts) if cfg.latency else None
    report = EvalReport(
        teacher=teacher, student=student, prompts=PromptSet(file=str(cfg.prompts), count=len(ids)),
        fidelity=_fidelity(scored) if scored else None, on_policy=_fidelity(on_policy) if on_policy else None,
        cross_tokenizer=_cross_fidelity(across, different_tokenizer=different),
        teacher_scored_student_answers=None if teacher_scored is None else
        TeacherScoredAnswers.model_validate(teacher_scored, from_attributes=True),
        answers=answer_stats, cost=cost, config=json.loads(cfg.model_dump_json()),
        headline=headline(answer_stats, (scored.top1_agreement, "top-1 agreement with the teacher") if scored else
                          (across.agreement, "top-1 agreement with the teacher per aligned span"), cost, teacher, student),
        wall_seconds=time.time() - start)
    write_report(out, report, scored.per_record_kl if scored else [])
    log_to_student_run(Path(cfg.student), out, report)
    return report


def log_to_student_run(student: Path, out: Path, report: EvalReport) -> None:
    """A student trained with `report_to`: its headline numbers (at its last training step, so they
    sit at the end of its curves) and the report, in the run that logged its training."""
    run = tracking.load_run(student) if student.is_dir() else None
    if run is None:
        return
    step = StudentCard.load(student).steps if (student / CARD).exists() else 0
    run.log_metrics(report.headline_metrics(), step)
    for name in ("report.html", "report.json"):
        run.log_artifact(out / name, "eval")
    run.log_artifact(out / "report.md", "eval", text=True)
    print(f"eval: logged to the run {run.run_name!r} ({', '.join(run.trackers)})", file=sys.stderr)


class OnDemandTeacher:
    """Eval's teacher (`cfg.backend`), started at its first request and shared by every use after
    it: a rerun whose teacher answers exist and that scores nothing starts none."""

    def __init__(self, cfg: EvalConfig, max_logprobs: int, max_model_len: int):
        self.cfg, self.max_logprobs, self.max_model_len = cfg, max_logprobs, max_model_len
        self.teacher: Teacher | None = None

    def _started(self) -> Teacher:
        if self.teacher is None:
            self.teacher = start_teacher(self.cfg, max_logprobs=self.max_logprobs, max_model_len=self.max_model_len)
        return self.teacher

    def generate(self, requests: Iterable[Request], sampling: Sampling, on_done: OnDone, window: int) -> None:
        self._started().generate(requests, sampling, on_done, window)

    def score(self, requests: Iterable[Request], top_k: int, on_done: OnDone, window: int) -> None:
        self._started().score(requests, top_k, on_done, window)

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()
            self.teacher = None


def _fidelity(scored: TeacherForced) -> Fidelity:
    """The report's summary of a teacher-forced scoring (its per-record KLs go to a plot instead)."""
    return Fidelity(**{k: v for k, v in vars(scored).items() if k != "per_record_kl"}, perplexity=scored.perplexity)


def _cross_fidelity(across: CrossFidelity, different_tokenizer: bool) -> CrossTokenizerFidelity:
    """The report's names for `cross_fidelity`'s numbers; a kind of span that never occurred is None."""
    finite = lambda v: v if math.isfinite(v) else None
    return CrossTokenizerFidelity(different_tokenizer=different_tokenizer, span_kl=across.span_kl,
                                  one_to_one_kl=finite(across.token_kl), longer_span_kl=finite(across.text_kl),
                                  top1_agreement=across.agreement, student_nll_per_byte=across.nll_per_byte,
                                  aligned_share=across.aligned_share, spans=across.spans)


def another_tokenizer(cfg: EvalConfig, teacher_corpus: Path) -> bool:
    """The student's tokenizer is not the one that wrote the teacher's answers, decided as
    `distill train` decides (`cross_plan`)."""
    from transformers import AutoTokenizer

    from distill.train.cross_tokenizer import cross_plan

    tokenizer = AutoTokenizer.from_pretrained(cfg.student, revision=cfg.revision,
                                              trust_remote_code=cfg.trust_remote_code)
    return cross_plan(teacher_corpus, corpus.read_manifest(teacher_corpus), tokenizer) is not None


STUDENT_ANSWER_COLUMNS = ["id", "prompt_id", "messages", "response", "prompt_token_ids", "response_token_ids",
                          "finish_reason"]


def teacher_on_student_answers(cfg: EvalConfig, student_corpus: Path, teacher_corpus: Path, teacher: Teacher) -> Path:
    """The teacher's top-k along the student's own answers, scored by the token ids the student
    read and wrote (nothing is re-tokenised), into the corpus `out/teacher-on-student-answers`;
    so that any student, offline- or on-policy-trained, is compared on the divergence on-policy
    training minimises."""
    path = Path(cfg.out) / "teacher-on-student-answers"
    requests = [Request(i, r["id"], r["prompt_id"], r["messages"], list(r["prompt_token_ids"]),
                        response_token_ids=list(r["response_token_ids"]), response=r["response"],
                        finish_reason=r["finish_reason"])
                for i, r in enumerate(corpus.iter_records(student_corpus, columns=STUDENT_ANSWER_COLUMNS))]
    records: list[dict] = []

    def on_done(req: Request, c: Completion) -> None:
        records.append({"id": req.id, "prompt_id": req.prompt_id, "messages": req.messages, "response": req.response,
                        "prompt_token_ids": req.prompt_token_ids, "response_token_ids": c.response_token_ids,
                        "response_logprobs": c.response_logprobs, "topk_token_ids": c.topk_token_ids,
                        "topk_logprobs": c.topk_logprobs, "finish_reason": c.finish_reason})

    teacher.score(requests, cfg.top_k, on_done, window=len(requests))
    records.sort(key=lambda r: r["id"])
    if path.exists():
        files.clear_dir(path)
    teacher_info = corpus.read_manifest(teacher_corpus).teacher
    table, checked = corpus.records_to_checked_table(records, cfg.top_k, corpus.DEFAULT_ENCODING, teacher_info.vocab_size)
    corpus.write_shard(path, 0, table, checked=checked)
    corpus.write_manifest(path, corpus.Manifest(
        teacher=teacher_info,
        generation={"mode": "score", "top_k": cfg.top_k, "logprob_encoding": corpus.DEFAULT_ENCODING},
        source={"corpus": str(student_corpus)}, stats=corpus.corpus_stats(path)))
    return path


def check_overlap(cfg: EvalConfig, ids: set[str]) -> None:
    """Refuse prompts the student was trained on (its distill.json names the training corpus)."""
    if cfg.allow_overlap or not (Path(cfg.student) / CARD).is_file():
        return
    card = StudentCard.load(Path(cfg.student))
    for trained_on in map(Path, card.corpora or [card.corpus]):  # several: a multi-teacher student's corpora
        _check_overlap(cfg, ids, trained_on)


def _check_overlap(cfg: EvalConfig, ids: set[str], trained_on: Path) -> None:
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
    """Both models behind vLLM's OpenAI server under the same load: each launched here with the
    same engine settings, except a teacher already served (`backend: endpoint`), measured at its
    first URL (on its own hardware, so the speedup compares those machines too)."""
    from distill.evaluation.load import measure
    from distill.launcher import start_server

    conversations = [p.messages for p in prompts]

    def levels(url: str, model: str, api_key: str | None = None) -> list[LoadLevel]:
        return [LoadLevel(**row) for row in measure(url, model, conversations, cfg.concurrency, cfg.latency_requests,
                                                    cfg.latency_tokens, api_key=api_key)]

    cost = {}
    for role, model in (("teacher", cfg.teacher), ("student", cfg.student)):
        if role == "teacher" and cfg.backend == "endpoint":
            served = TeacherClient(cfg.urls[0], cfg.teacher, cfg.api_key)
            cost[role] = levels(f"{served.urls[0]}/v1", served.model, served.api_key)
            continue
        with start_server(ServeConfig(model=model, served_model_name=role, port=0, **cfg.engine_settings()),
                          log_path=Path(cfg.out) / f"server-{role}.log") as server:
            cost[role] = levels(server.url, server.model, server.api_key)  # $VLLM_API_KEY guards it too
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


def headline(answers: Answers, agreement: tuple[float, str], cost: dict[str, list[LoadLevel]] | None,
             teacher: ModelInfo, student: ModelInfo) -> Headline:
    """Quality retained (the student's task score over the teacher's, else its top-1 agreement:
    `agreement`, value and name, per token or, across tokenizers, per span) and speedup (output
    tokens/s at the highest concurrency, student over teacher)."""
    if answers.student.score is not None and answers.teacher.score:
        quality = dict(quality_retained=answers.student.score / answers.teacher.score,
                       quality_measure="task score, student / teacher")
    else:
        quality = dict(quality_retained=agreement[0], quality_measure=agreement[1])
    speed = {}
    if cost:
        t, s = cost["teacher"][-1], cost["student"][-1]
        speed = dict(speedup=s.tokens_per_s / t.tokens_per_s, speedup_concurrency=s.concurrency,
                     ttft_p50_ratio=s.ttft_ms_p50 / t.ttft_ms_p50)
    size = student.parameters / teacher.parameters if teacher.parameters and student.parameters else None
    return Headline(**quality, **speed, size_ratio=size)
