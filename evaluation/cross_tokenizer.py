"""Fidelity across tokenizers: how close a student of another tokenizer reads the teacher's
answers, where KL over two different vocabularies is not defined (docs/recipes/cross-tokenizer.md).

The student reads each stored teacher answer (re-tokenised from its text, as in training) and is
compared with the teacher on the spans of `train/cross_tokenizer.py`: the `span` loss's forward
KL per span (on the mapped top-k at 1:1 spans, on the probability of the span's text elsewhere),
top-1 agreement at each span's start, and the student's NLL per byte of the teacher's text
(a number comparable between students of any tokenizers). For a student of the teacher's own
tokenizer every span is 1:1 and `token_kl` is the KL `distill eval` reports.

The other way round, `teacher_nll_per_byte`: the teacher reads the student's own answers (their
text, in the teacher's tokens) and its NLL per byte says how likely the teacher finds them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distill import corpus
from distill.teacher import Request, Teacher
from distill.train.cross_losses import span_kd, span_rows
from distill.train.cross_tokenizer import (
    CROSS_COLUMNS,
    CrossCollator,
    CrossTokenizer,
    Vocabularies,
    cross_records,
)
from distill.train.head import lm_head
from distill.train.scoring import pad_token_id


@dataclass(frozen=True)
class CrossFidelity:
    span_kl: float  # mean forward KL per span (teacher || student)
    token_kl: float  # mean over the 1:1 spans (top-k mapped to the student's ids)
    text_kl: float  # mean over the longer spans (probability of the span's text)
    agreement: float  # share of spans where the student's most likely token and the teacher's top-1 agree on the text
    nll_per_byte: float  # the student's negative log-likelihood of the teacher's answer text, nats per byte
    aligned_share: float  # of the student's tokens of those answers, inside a span
    spans: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def agrees(vocabularies: Vocabularies, teacher_id: int, student_id: int) -> bool:
    """The two models' top choices agree: the same token by the alignment's map, or texts of which
    one starts the other (`2` and `25` both begin the answer `253`)."""
    if vocabularies.to_student[teacher_id] == student_id:
        return True
    a, b = vocabularies.teacher_bytes[teacher_id], vocabularies.student_bytes[student_id]
    return bool(a and b and (a.startswith(b) or b.startswith(a)))


def cross_fidelity(student: str | Path, corpus_dir: Path, teacher_tokenizer: str | Path | None = None,
                   prompt_ids: set[str] | None = None, batch_size: int = 32) -> CrossFidelity:
    """The student at `student` along the teacher's answers in `corpus_dir` (those of `prompt_ids`
    if given). `teacher_tokenizer`: for a corpus that does not store the teacher's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = corpus.read_manifest(corpus_dir)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16 if gpu else torch.float32)
    model = model.to(device).eval()
    teacher = corpus.teacher_tokenizer(corpus_dir, manifest, teacher_tokenizer)
    vocabularies = Vocabularies.of(teacher, tokenizer)
    columns = [c for c in CROSS_COLUMNS if c != "loss_mask"] + ["prompt_id"]
    records = [r for r in corpus.iter_records(corpus_dir, columns=columns) if prompt_ids is None or r["prompt_id"] in prompt_ids]
    if not records:
        raise ValueError(f"`{corpus_dir}` holds no teacher answers to score the student along")
    cross, coverage = cross_records(records, CrossTokenizer("span", teacher, tokenizer, vocabularies))
    text_bytes = sum(len(b"".join(vocabularies.teacher_bytes[i] for i in r["response_token_ids"])) for r in records)
    max_length = getattr(model.config, "max_position_embeddings", None) or 4096
    collate = CrossCollator(pad_token_id(tokenizer), max_length, manifest.generation.top_k,
                            vocabularies.student_first_byte)
    kl, one_to_one, agreed, nll = [], [], 0, 0.0
    with torch.no_grad():
        for start in range(0, len(cross), batch_size):
            batch = {k: v.to(device) for k, v in collate(cross[start:start + batch_size]).items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True, logits_to_keep=1, use_cache=False)
            with lm_head(model) as (weight, bias):
                rows = span_rows(out.hidden_states[-1], weight, batch, bias=bias)
            kl.append(span_kd(rows, batch, "span"))
            one_to_one.append(batch["span_one_to_one"])
            agreed += sum(agrees(vocabularies, t, s) for t, s in zip(batch["span_teacher_top1"].tolist(),
                                                                     rows.argmax.tolist()))
            nll -= float(rows.label_lp.sum())
    kl_all, single = torch.cat(kl), torch.cat(one_to_one)
    spans = int(kl_all.numel())

    def mean(values: torch.Tensor) -> float:
        return float(values.mean()) if values.numel() else float("nan")

    return CrossFidelity(span_kl=mean(kl_all), token_kl=mean(kl_all[single]), text_kl=mean(kl_all[~single]),
                         agreement=agreed / max(spans, 1), nll_per_byte=nll / max(text_bytes, 1),
                         aligned_share=coverage.aligned_share, spans=spans)


@dataclass(frozen=True)
class TeacherScored:
    """The teacher's negative log-likelihood of the student's answer texts."""
    answers: int
    teacher_tokens: int
    bytes: int  # UTF-8 bytes of those answers
    nll_per_byte: float  # nats per byte: comparable across tokenizers, where nats per token are not


def nll_per_byte(logprobs: list[list[float]], texts: list[str]) -> TeacherScored:
    """`logprobs[i]`: the teacher's logprob of each of its tokens of `texts[i]`."""
    size = sum(len(t.encode("utf-8")) for t in texts)
    nll = -sum(float(sum(lp)) for lp in logprobs)
    return TeacherScored(answers=len(texts), teacher_tokens=sum(len(lp) for lp in logprobs), bytes=size,
                         nll_per_byte=nll / size)


def teacher_nll_per_byte(student_corpus: Path, teacher_corpus: Path, prompt_ids: set[str], teacher: Teacher,
                         teacher_tokenizer, max_model_len: int) -> TeacherScored | None:
    """The teacher (an engine that can `score`) reads each of the student's answers in
    `student_corpus` after its own tokens of the same prompt (from its answers in `teacher_corpus`),
    the answer's text re-tokenised with `teacher_tokenizer`: never the student's ids, which name
    other strings when the tokenizers differ. Empty answers spell no bytes and answers that do not
    fit `max_model_len` after the prompt are left out (`answers` counts the rest); None when no
    answer is left (every one empty or past the context: nothing to score, not an error of the eval)."""
    prompts = {r["prompt_id"]: list(r["prompt_token_ids"])
               for r in corpus.iter_records(teacher_corpus, columns=["prompt_id", "prompt_token_ids"])}
    requests = []
    for r in corpus.iter_records(student_corpus, columns=["id", "prompt_id", "messages", "response"]):
        if r["prompt_id"] not in prompt_ids or r["prompt_id"] not in prompts or not r["response"]:
            continue
        ids = teacher_tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        # one position left for the token the engine still samples after scoring
        if len(prompts[r["prompt_id"]]) + len(ids) < max_model_len:
            requests.append(Request(len(requests), r["id"], r["prompt_id"], r["messages"], prompts[r["prompt_id"]],
                                    response_token_ids=ids, response=r["response"]))
    if not requests:
        return None
    logprobs: dict[str, list[float]] = {}
    teacher.score(requests, 1, lambda req, c: logprobs.__setitem__(req.id, c.response_logprobs.tolist()),
                  window=len(requests))
    return nll_per_byte([logprobs[r.id] for r in requests], [r.response for r in requests])
