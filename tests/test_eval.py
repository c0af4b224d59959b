"""`distill eval`: a student that is an exact copy of its teacher must come out as the teacher
(KL ~0, agreement ~1, identical answers), measured with the real vLLM engine and servers."""

import json
import math
import shutil

import pytest

from distill import corpus
from distill.config import EvalConfig
from distill.evaluation.job import evaluate
from distill.evaluation.report import EvalReport
from distill.train.card import StudentCard
from tests.helpers import MAX_MODEL_LEN, write_jsonl

HELD_OUT = [{"id": f"held-{i}", "messages": [{"role": "user", "content": f"Sort {i} {i + 3} {i + 1} please"}]}
            for i in range(12)]


@pytest.fixture(scope="module")
def copy_of_teacher(tiny_models, tmp_path_factory):
    return shutil.copytree(tiny_models["llama-teacher"], tmp_path_factory.mktemp("student") / "copy")


def eval_config(tmp_path, student, teacher, **overrides) -> EvalConfig:
    return EvalConfig(student=str(student), teacher=str(teacher), prompts=write_jsonl(tmp_path / "held.jsonl", HELD_OUT),
                      out=tmp_path / "eval", max_tokens=16, max_model_len=MAX_MODEL_LEN,
                      engine_args={"max_logprobs": 20}, **overrides)


@pytest.mark.engine
def test_copy_of_teacher_matches_teacher(tmp_path, tiny_models, teacher, copy_of_teacher, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "eval-key")  # the servers launched for the cost measurement require it
    cfg = eval_config(tmp_path, copy_of_teacher, tiny_models["llama-teacher"], concurrency=[1, 4],
                      latency_requests=4, latency_tokens=8, scorer="tests.test_eval:answer_length")
    returned = evaluate(cfg, teacher_engine=teacher, student_engine=teacher)
    out = cfg.out
    report = json.loads((out / "report.json").read_text())
    assert EvalReport.load(out) == returned  # report.json is the returned model
    fidelity, answers = report["fidelity"], report["answers"]
    assert fidelity["records"] == len(HELD_OUT) and fidelity["tokens"] > len(HELD_OUT)
    assert abs(fidelity["kl"]) < 1e-3
    assert fidelity["top1_agreement"] > 0.99
    assert answers["compared"] == len(HELD_OUT) and answers["exact_match"] == 1.0
    assert answers["student"]["score"] == answers["teacher"]["score"] > 0
    assert report["headline"]["quality_retained"] == pytest.approx(1.0)
    assert report["headline"]["size_ratio"] == pytest.approx(1.0)
    for role in ("teacher", "student"):
        assert (out / f"server-{role}.log").stat().st_size > 0  # the cost measurement's server log stays with the report
        rows = report["cost"][role]
        assert [r["concurrency"] for r in rows] == [1, 4]
        assert all(r["failures"] == 0 and r["tokens_per_s"] > 0 and r["ttft_ms_p95"] >= r["ttft_ms_p50"] > 0
                   for r in rows)
    markdown = (out / "report.md").read_text()
    assert markdown.index("quality retained") < markdown.index("## Fidelity")  # headline first
    for plot in ("kl_histogram.png", "latency.png"):
        assert (out / plot).stat().st_size > 1000


@pytest.mark.engine
def test_a_student_of_another_tokenizer_is_evaluated_across_tokenizers(tmp_path, tiny_models, teacher, copy_of_teacher):
    """No per-token KL across two vocabularies: the span measures and the teacher's NLL per byte
    of the student's answers instead; a student of the teacher's tokenizer gets both."""
    from distill import tiny
    from distill.demo.student_tokenizer import build_student_tokenizer

    build_student_tokenizer(tmp_path / "student-tokenizer")
    other = tiny.build_model(tmp_path / "other", tmp_path / "student-tokenizer", "llama", "student")
    cfg = eval_config(tmp_path, other, tiny_models["llama-teacher"], latency=False).model_copy(
        update={"max_tokens": 8, "prompts": write_jsonl(tmp_path / "four.jsonl", HELD_OUT[:4])})
    report = evaluate(cfg, teacher_engine=teacher)  # the student answers in its own engine
    x, scored = report.cross_tokenizer, report.teacher_scored_student_answers
    assert report.fidelity is None and x.different_tokenizer
    assert report.headline.quality_retained == x.top1_agreement and "per aligned span" in report.headline.quality_measure
    assert 0 < x.aligned_share <= 1 and x.spans > 0 and 0 <= x.top1_agreement <= 1
    assert all(math.isfinite(v) and v >= 0 for v in (x.span_kl, x.student_nll_per_byte))
    assert scored.answers > 0 and scored.bytes > 0 and math.isfinite(scored.nll_per_byte) and scored.nll_per_byte > 0
    markdown = (cfg.out / "report.md").read_text()
    assert "no per-token KL" in markdown and "teacher NLL of the student's answers" in markdown
    assert not (cfg.out / "kl_histogram.png").exists()
    with pytest.raises(ValueError, match="`on_policy_kl` needs a student of the teacher's tokenizer"):
        evaluate(cfg.model_copy(update={"on_policy_kl": True}), teacher_engine=teacher)

    same = evaluate(cfg.model_copy(update={"student": str(copy_of_teacher), "out": tmp_path / "same"}),
                    teacher_engine=teacher, student_engine=teacher)
    assert abs(same.fidelity.kl) < 1e-3 and not same.cross_tokenizer.different_tokenizer
    # its spans are one token each side, where the student reads what the teacher read: no divergence
    assert 0 < same.cross_tokenizer.aligned_share <= 1 and abs(same.cross_tokenizer.one_to_one_kl) < 1e-3
    # the teacher read every byte of the student's answer texts
    texts = [r["response"] for r in corpus.iter_records(tmp_path / "same" / "student-answers", columns=["response"])]
    assert same.teacher_scored_student_answers.bytes == sum(len(t.encode()) for t in texts)
    assert 0 < same.teacher_scored_student_answers.nll_per_byte < math.inf


def answer_length(prompt: str, answer: str) -> float:
    """A stand-in task scorer: only the plug-in mechanism is under test."""
    return float(len(answer))


@pytest.mark.engine
def test_student_trained_on_the_prompts_is_refused(tmp_path, tiny_models, teacher, copy_of_teacher):
    from distill.config import GenerateConfig
    from distill.generate.job import generate

    cfg = eval_config(tmp_path, copy_of_teacher, tiny_models["llama-teacher"], latency=False)
    trained_on = generate(GenerateConfig(teacher=str(tiny_models["llama-teacher"]), prompts=cfg.prompts,
                                         out=tmp_path / "train-corpus", max_tokens=4), teacher=teacher)
    student = shutil.copytree(copy_of_teacher, tmp_path / "trained")
    StudentCard(corpus=str(trained_on.path)).write(student)

    with pytest.raises(ValueError, match=r"12 of 12 prompts .* training corpus"):
        evaluate(cfg.model_copy(update={"student": str(student)}), teacher_engine=teacher, student_engine=teacher)
    assert not (tmp_path / "eval").exists()
    report = evaluate(cfg.model_copy(update={"student": str(student), "allow_overlap": True}),
                      teacher_engine=teacher, student_engine=teacher)
    assert report.cost is None and "cost" not in json.loads((cfg.out / "report.json").read_text())


def test_bad_scorer_fails_before_any_model_loads(tmp_path, tiny_models, copy_of_teacher):
    cfg = eval_config(tmp_path, copy_of_teacher, tiny_models["llama-teacher"], scorer="tests.test_eval:missing")
    with pytest.raises(ValueError, match="cannot load 'tests.test_eval:missing'"):
        evaluate(cfg)


@pytest.mark.engine
def test_on_policy_kl_of_a_copy_of_the_teacher_is_zero(tmp_path, tiny_models, teacher, copy_of_teacher):
    """The teacher scores the student's own answers; a copy of the teacher diverges from it nowhere
    (an off-by-one between the scores and the student's positions would show here)."""
    cfg = eval_config(tmp_path, copy_of_teacher, tiny_models["llama-teacher"], latency=False, on_policy_kl=True,
                      temperature=1.0)
    report = evaluate(cfg, teacher_engine=teacher, student_engine=teacher)
    assert report.on_policy.records == len(HELD_OUT) and report.on_policy.tokens > len(HELD_OUT)
    assert abs(report.on_policy.kl) < 1e-3 and report.on_policy.top1_agreement > 0.99
    assert "on the student's own answers (scored by the teacher)" in (cfg.out / "report.md").read_text()


@pytest.mark.engine
def test_served_teacher_is_evaluated_like_the_in_process_one(tmp_path, tiny_models, teacher, copy_of_teacher):
    """`backend: endpoint`: the teacher's answers, its scores of the student's answers and its cost
    all come from a running server (the student answers in-process)."""
    from distill.config import ServeConfig
    from distill.launcher import start_server

    settings = ServeConfig(model=str(tiny_models["llama-teacher"]), served_model_name="teacher", port=0,
                           max_model_len=MAX_MODEL_LEN, engine_args={"max_logprobs": 20},
                           vllm_args=["--no-enable-prefix-caching"])  # prompt logprobs (distill.teacher_client)
    with start_server(settings) as server:
        cfg = eval_config(tmp_path, copy_of_teacher, tiny_models["llama-teacher"], backend="endpoint",
                          urls=[server.url], on_policy_kl=True, concurrency=[2], latency_requests=2, latency_tokens=4)
        report = evaluate(cfg, student_engine=teacher)
    assert report.answers.compared == len(HELD_OUT) and report.answers.exact_match == 1.0
    assert abs(report.fidelity.kl) < 1e-3 and report.fidelity.top1_agreement > 0.99
    assert abs(report.on_policy.kl) < 1e-3 and report.on_policy.records == len(HELD_OUT)
    assert report.cost["teacher"][0].failures == 0 and report.cost["teacher"][0].tokens_per_s > 0
    assert not (cfg.out / "server-teacher.log").exists()  # measured at the URL, not launched
