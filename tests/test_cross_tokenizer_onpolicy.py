"""On-policy distillation of a student with another tokenizer than the teacher's: the student
samples, the teacher scores its own tokens of the sample's text (a real vLLM server of the demo
teacher), and the spans of the two tokenisations carry its numbers to the student's tokens.

One server for the module (the demo teacher, 1.85M parameters: starts in about a minute)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import corpus
from distill.config import ServeConfig, TrainConfig
from distill.demo import skills
from distill.demo.student_tokenizer import build_student, build_student_tokenizer
from distill.demo.teacher import MAX_POSITIONS, SHIPPED
from distill.evaluation.cross_tokenizer import nll_per_byte
from distill.launcher import start_server
from distill.teacher_client import TeacherClient
from distill.train.cross_tokenizer import CrossTokenizer, Vocabularies, aligned_record, student_prompt, teacher_tokens
from distill.train.onpolicy import sample
from tests.helpers import make_corpus, record

K = 4
ANSWER_TOKENS = 12


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> CrossTokenizer:
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(SHIPPED)
    built = tmp_path_factory.mktemp("student-tokenizer")
    build_student_tokenizer(built)
    student = AutoTokenizer.from_pretrained(built)  # its `name_or_path`: the student model is built on it
    return CrossTokenizer("span", teacher, student, Vocabularies.of(teacher, student))


def test_the_teacher_reads_the_students_text_and_the_spans_cover_it(plan):
    text = "Reverse 2530 → 0352, naïve  café"
    s_ids = plan.student(text, add_special_tokens=False)["input_ids"] + [plan.student.eos_token_id]
    t_ids = teacher_tokens(s_ids, plan)
    assert t_ids[-1] == plan.teacher.eos_token_id  # the student's end of turn -> the teacher's
    assert b"".join(plan.vocabularies.teacher_bytes[i] for i in t_ids).decode() == text
    assert len(t_ids) != len(s_ids)  # the two tokenisations differ: alignment has work to do
    topk = np.array([[t] + [(t + 1 + j) % len(plan.teacher) for j in range(K - 1)] for t in t_ids])
    logprobs = np.full(len(t_ids), -0.5)
    r = aligned_record("x", [7, 8], [3, 4, 5], t_ids, s_ids, logprobs, topk, np.tile([-0.5, -1.0, -2.0, -3.0], (len(t_ids), 1)),
                       plan)
    assert r["input_ids"].tolist() == [7, 8, *s_ids] and r["teacher_prompt_ids"].tolist() == [3, 4, 5]
    # every student token is inside a span, the spans in order, the two ends of turn paired last
    assert r["span_start"][0] == 0 and r["span_end"][-1] == len(s_ids)
    assert all(e == s for e, s in zip(r["span_end"], r["span_start"][1:]))
    assert r["span_one_to_one"][-1] and r["span_topk_ids"][-K] == plan.student.eos_token_id
    assert sum(r["span_teacher_logprob"]) == pytest.approx(-0.5 * len(t_ids))


def _corpus(root, plan, n=16):
    """The demo teacher's tokens of right demo answers after its own chat prompts (the prompts
    on-policy training samples from and the teacher scores after)."""
    teacher = plan.teacher
    records = []
    for i, ex in enumerate(skills.examples("distill", n, 0, system_prompts=False)):
        ids = teacher(ex["answer"], add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
        topk = np.array([[t] + [(t + 1 + j) % len(teacher) for j in range(K - 1)] for t in ids])
        records.append(record(i, response_ids=ids, topk_ids=topk, top1=-0.3, question=ex["messages"][-1]["content"],
                              response=ex["answer"], prompt_ids=student_prompt(teacher, ex["messages"])))
    make_corpus(root, records, k=K, teacher={"model": str(SHIPPED), **corpus.tokenizer_fingerprint(teacher)})
    manifest = corpus.read_manifest(root)
    manifest.teacher.tokenizer_files = corpus.store_tokenizer(root, teacher)
    corpus.write_manifest(root, manifest)
    return root, records


@pytest.fixture(scope="module")
def server():
    settings = ServeConfig(model=str(SHIPPED), served_model_name="teacher", port=0, max_model_len=MAX_POSITIONS,
                           engine_args={"max_logprobs": 20}, vllm_args=["--no-enable-prefix-caching"])
    with start_server(settings) as srv:
        yield srv


def teacher_nll_per_byte_of_greedy_answers(student_dir, records, plan, client) -> float:
    """The teacher's NLL per byte of the student's greedy answers (its own tokens of their text)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    prompts = [student_prompt(plan.student, r["messages"]) for r in records]
    answers = sample(model, prompts, max_new_tokens=ANSWER_TOKENS, temperature=0.0,
                     pad_token_id=plan.student.pad_token_id, eos_token_id=plan.student.eos_token_id)
    theirs = [teacher_tokens(a, plan) for a in answers]
    scored = client.score_pairs([(r["prompt_token_ids"], t) for r, t in zip(records, theirs)], 1)
    texts = [b"".join(plan.vocabularies.student_bytes[i] for i in a).decode("utf-8", errors="ignore") for a in answers]
    return nll_per_byte([c.response_logprobs.tolist() for c in scored], texts).nll_per_byte


@pytest.mark.engine
def test_on_policy_across_tokenizers_brings_the_students_answers_closer_to_the_teacher(tmp_path, plan, server):
    from distill.train.trainer import train

    root, records = _corpus(tmp_path / "c", plan)
    student = build_student(tmp_path / "student", seed=0, tokenizer=Path(plan.student.name_or_path))
    client = TeacherClient(server.url)
    before = teacher_nll_per_byte_of_greedy_answers(student, records, plan, client)
    out = train(TrainConfig(corpus=root, student=str(student), out=tmp_path / "s", lora=False, on_policy=True,
                            teacher_endpoint=server.url, lmbda=1.0, max_new_tokens=ANSWER_TOKENS, teacher_top_k=20,
                            max_steps=16, batch_size=8, learning_rate=1e-2, logging_steps=4, eval_fraction=0.0,
                            lr_scheduler="constant_with_warmup", save_steps=100, max_length=MAX_POSITIONS)).path
    after = teacher_nll_per_byte_of_greedy_answers(out, records, plan, client)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print("teacher NLL per byte of the student's greedy answers:", before, "->", after, logs)
    steps = [m for m in logs if "on_policy_kl" in m]
    assert len(steps) == 4 and all(math.isfinite(m["on_policy_kl"]) and m["teacher_tokens"] > 0 for m in steps)
    assert steps[-1]["on_policy_kl"] < steps[0]["on_policy_kl"]
    assert after < before
