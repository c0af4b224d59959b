"""The teacher seam (`distill.teacher`): a backend is one class and one `BACKENDS` line. A toy
backend, registered here, runs `generate`, `score` and `eval` end to end without vLLM; and the
backend fields are checked per backend, old `endpoint:` configs still read."""

import json

import numpy as np
import pytest

from distill import corpus, teacher
from distill.config import EvalConfig, GenerateConfig, GenerateSection, ScoreConfig
from distill.generate import generate, score
from distill.teacher import Completion
from tests.helpers import PROMPTS, write_jsonl


class ToyTeacher:
    """A deterministic stand-in for a model: the answer is the prompt's last tokens reversed; at
    each position the answer token is the best of k, then ids 0, 1, ... (valid in any
    vocabulary), with fixed falling logprobs."""

    started = 0
    closed = 0

    def __init__(self, cfg, max_logprobs: int, max_model_len: int):
        type(self).started += 1
        self.max_model_len = max_model_len

    @staticmethod
    def completion(tokens: list[int], k: int, finish_reason: str) -> Completion:
        ids = np.asarray(tokens, dtype=np.int32)
        topk = np.array([[t, *[i for i in range(k) if i != t][:k - 1]] for t in tokens], dtype=np.int32).reshape(-1, k)
        lps = np.tile(-0.5 * np.arange(1, k + 1, dtype=np.float32), (len(tokens), 1))
        return Completion(ids, lps[:, 0].copy(), topk, lps, finish_reason)

    def generate(self, requests, sampling, on_done, window):
        for req in requests:
            tokens = req.prompt_token_ids[::-1][:sampling.max_tokens]
            on_done(req, self.completion(tokens, sampling.top_k,
                                         "length" if len(tokens) == sampling.max_tokens else "stop"))

    def score(self, requests, top_k, on_done, window):
        for req in requests:
            on_done(req, self.completion(list(req.response_token_ids), top_k, req.finish_reason))

    def close(self):
        type(self).closed += 1


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(teacher.BACKENDS, "toy", f"{__name__}:ToyTeacher")
    monkeypatch.setattr(ToyTeacher, "started", 0)
    monkeypatch.setattr(ToyTeacher, "closed", 0)
    return ToyTeacher


def test_generate_and_score_run_through_a_toy_backend(tmp_path, tiny_models, toy, prompts_file):
    common = dict(teacher=str(tiny_models["llama-teacher"]), top_k=4, chunk_size=4, logprob_encoding="float32")
    out = generate(GenerateConfig(prompts=prompts_file, out=tmp_path / "generated", backend="toy", max_tokens=5,
                                  **common)).path
    assert (toy.started, toy.closed) == (1, 1)
    assert corpus.validate(out)["records"] == len(PROMPTS)
    for record in corpus.iter_records(out):
        assert record["response_token_ids"] == record["prompt_token_ids"][::-1][:5]
        assert record["topk_token_ids"][0][0] == record["response_token_ids"][0]
        assert record["finish_reason"] == "length"
    assert corpus.read_manifest(out).history[-1]["config"]["backend"] == "toy"
    # each shard stamped over the top-k it holds: readers may skip decoding it again
    assert all(corpus.verified_stamp(path) for path in corpus.shard_paths(out))

    data = write_jsonl(tmp_path / "answers.jsonl", [{"prompt": "What is 2+3?", "response": "The sum is 5."}])
    scored = score(ScoreConfig(data=data, out=tmp_path / "scored", backend="toy", **common)).path
    (record,) = corpus.iter_records(scored)
    assert record["response"] == "The sum is 5." and len(record["response_token_ids"]) > 3
    assert [row[0] for row in record["topk_token_ids"]] == record["response_token_ids"]
    assert corpus.verified_stamp(corpus.shard_paths(scored)[0])
    assert (toy.started, toy.closed) == (2, 2)


def test_eval_starts_one_teacher_for_answers_and_on_policy_scoring(tmp_path, tiny_models, toy):
    """The toy answers for the student too (its own instance, passed in): what is counted is the
    teacher that `eval` starts from `backend`."""
    from distill.evaluation.job import evaluate

    prompts = write_jsonl(tmp_path / "held.jsonl", [{"id": f"held-{i}", "messages": [
        {"role": "user", "content": f"Sort {i} {i + 3} {i + 1} please"}]} for i in range(4)])
    cfg = EvalConfig(student=str(tiny_models["llama-teacher"]), teacher=str(tiny_models["llama-teacher"]),
                     prompts=prompts, out=tmp_path / "eval", backend="toy", max_tokens=6, top_k=4, latency=False,
                     on_policy_kl=True, allow_overlap=True)
    report = evaluate(cfg, student_engine=ToyTeacher(None, 4, 512))
    assert (toy.started, toy.closed) == (2, 1)  # the student's instance above, and ONE teacher, closed
    assert report.fidelity.records == 4 and report.on_policy.records == 4
    scored = {r["prompt_id"]: r for r in corpus.iter_records(cfg.out / "teacher-on-student-answers")}
    for answer in corpus.iter_records(cfg.out / "student-answers"):  # scored along the student's own ids
        assert scored[answer["prompt_id"]]["prompt_token_ids"] == answer["prompt_token_ids"]
        assert scored[answer["prompt_id"]]["response_token_ids"] == answer["response_token_ids"]
    assert not (cfg.out / "student-conversations.jsonl").exists()


def test_old_endpoint_key_still_works_with_one_deprecation_line(tmp_path, capsys):
    config = tmp_path / "generate.yaml"
    config.write_text("teacher: t\nprompts: p.jsonl\nout: o\nendpoint:\n  - http://box-1:8000\n  - http://box-2:8000\n")
    cfg = GenerateConfig.from_yaml(config)
    assert (cfg.backend, cfg.urls) == ("endpoint", ["http://box-1:8000", "http://box-2:8000"])
    err = capsys.readouterr().err.splitlines()
    assert err == ["distill: warning: `endpoint` is deprecated; use `backend: endpoint` and `urls` (`--urls URL`)"]
    section = GenerateSection(endpoint=["http://box:8000"], concurrency=8)  # a `distill run` generate section
    assert (section.backend, section.urls, section.requests_per_url) == ("endpoint", ["http://box:8000"], 8)
    assert len(capsys.readouterr().err.splitlines()) == 2


def test_old_endpoint_flag_still_works(tmp_path, capsys):
    from distill.cli import build_parser

    args = vars(build_parser().parse_args(["generate", "--teacher", "t", "--prompts", "p", "--out", "o",
                                           "--endpoint", "http://box:8000", "--concurrency", "3"]))
    cfg = GenerateConfig(**{k: v for k, v in args.items() if k not in ("command", "debug", "config", "verbose")})
    assert (cfg.backend, cfg.urls, cfg.requests_per_url) == ("endpoint", ["http://box:8000"], 3)
    assert "`endpoint` is deprecated" in capsys.readouterr().err


@pytest.mark.parametrize("fields, error", [
    (dict(urls=["http://box:8000"]), "`urls` applies to `backend: endpoint` only"),
    (dict(backend="ray", urls=["http://box:8000"]), "`urls` applies to `backend: endpoint` only"),
    (dict(backend="endpoint", urls=["http://box:8000"], replicas=2), "`replicas` applies to `backend: ray` only"),
    (dict(backend="endpoint"), "`backend: endpoint` needs `urls`"),
    (dict(backend="gpu-farm"), "unknown teacher backend 'gpu-farm': choose one of local, ray, endpoint"),
])
def test_backend_fields_are_checked_per_backend(fields, error):
    with pytest.raises(ValueError, match=error):
        GenerateConfig(teacher="t", prompts="p.jsonl", out="o", **fields)
    with pytest.raises(ValueError, match=error):  # eval reads the same fields the same way
        EvalConfig(student="s", teacher="t", prompts="p.jsonl", out="o", **fields)


def test_eval_keeps_its_own_concurrency_levels():
    cfg = EvalConfig(student="s", teacher="t", prompts="p.jsonl", out="o", concurrency=[1, 4], backend="endpoint",
                     urls=["http://box:8000"])
    assert cfg.concurrency == [1, 4] and cfg.requests_per_url == 64
    assert json.loads(cfg.model_dump_json())["backend"] == "endpoint"
