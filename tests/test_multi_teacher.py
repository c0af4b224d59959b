"""Multi-teacher distillation (docs/recipes/multi-teacher.md): routing records to their own teacher
across corpora, ensembles of teachers on the same responses (mixture, sum of KLs), sibling corpora
from `distill score --corpus`, and the one-line errors of corpora that do not go together."""

import json

import numpy as np
import pytest
import torch

from distill import corpus
from distill.cli import main
from distill.config import ScoreConfig, TrainConfig
from distill.generate.job import score
from distill.teacher import Completion
from distill.train import corpora
from distill.train.data import DistillCollator
from distill.train.ensemble import mixture_rows, stacked_rows
from distill.train.losses import KINDS, PAD_LOGPROB, TAILS, LossSpec, kd_per_position
from distill.train.resume import run_settings
from distill.train.trainer import train
from tests.helpers import make_corpus, one_line_error, record

V = 13


def _topk(logits: torch.Tensor, k: int):
    lp = torch.log_softmax(logits, -1)
    values, ids = lp.topk(k, -1)
    return ids, values


def test_mixture_loss_equals_a_float64_reference():
    """KL(mixture || student) on the union of two teachers' top-k + one tail, computed by hand in float64."""
    g = torch.Generator().manual_seed(0)
    n, ka, kb, w = 6, 3, 5, (0.7, 0.3)
    student = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    (ia, la), (ib, lb) = _topk(torch.randn(n, V, generator=g, dtype=torch.float64) * 2, ka), \
        _topk(torch.randn(n, V, generator=g, dtype=torch.float64) * 2, kb)
    ids, lps = mixture_rows([ia.numpy(), ib.numpy()], [la.numpy(), lb.numpy()], w)
    assert ids.shape == (n, ka + kb)
    got = kd_per_position(student, torch.from_numpy(ids), torch.from_numpy(lps), LossSpec())
    q = torch.softmax(student, -1)
    for t in range(n):
        p = np.zeros(V)
        np.add.at(p, ia[t].numpy(), w[0] * la[t].exp().numpy())
        np.add.at(p, ib[t].numpy(), w[1] * lb[t].exp().numpy())
        union = np.flatnonzero(p)
        tail_p, tail_q = 1 - p[union].sum(), 1 - q[t, union].sum().item()
        assert tail_p == pytest.approx(w[0] * (1 - la[t].exp().sum().item()) + w[1] * (1 - lb[t].exp().sum().item()))
        expected = (p[union] * np.log(p[union] / q[t, union].numpy())).sum() + tail_p * np.log(tail_p / tail_q)
        assert got[t].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # sorted best first: the mixture's top-1 is slot 0
    assert all(lps[t, 0] == lps[t][lps[t] > PAD_LOGPROB].max() for t in range(n))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_sum_ensemble_is_the_weighted_sum_of_each_teachers_loss(kind, tail):
    g = torch.Generator().manual_seed(1)
    n = 5
    student = torch.randn(n, V, generator=g, dtype=torch.float64)
    (ia, la), (ib, lb) = _topk(torch.randn(n, V, generator=g, dtype=torch.float64), 3), \
        _topk(torch.randn(n, V, generator=g, dtype=torch.float64), 4)
    ids, lps = stacked_rows([ia.numpy(), ib.numpy()], [la.numpy(), lb.numpy()])
    spec = LossSpec(kind=kind, tail=tail, temperature=2.0)
    both = kd_per_position(student, torch.from_numpy(ids), torch.from_numpy(lps),
                           LossSpec(kind=kind, tail=tail, temperature=2.0, teacher_weights=(0.25, 0.75)))
    alone = 0.25 * kd_per_position(student, ia, la, spec) + 0.75 * kd_per_position(student, ib, lb, spec)
    torch.testing.assert_close(both, alone, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_padded_slots_change_neither_loss_nor_gradient(kind, tail):
    g = torch.Generator().manual_seed(2)
    student = torch.randn(4, V, generator=g, dtype=torch.float64, requires_grad=True)
    ids, lps = _topk(torch.randn(4, V, generator=g, dtype=torch.float64), 3)
    padded_ids = torch.cat([ids, torch.zeros(4, 2, dtype=torch.long)], -1)
    padded_lps = torch.cat([lps, torch.full((4, 2), PAD_LOGPROB, dtype=torch.float64)], -1)
    spec = LossSpec(kind=kind, tail=tail, temperature=1.5)
    plain = kd_per_position(student, ids, lps, spec)
    (grad_plain,) = torch.autograd.grad(plain.sum(), student)
    padded = kd_per_position(student, padded_ids, padded_lps, spec)
    (grad_padded,) = torch.autograd.grad(padded.sum(), student)
    torch.testing.assert_close(padded, plain)
    torch.testing.assert_close(grad_padded, grad_plain)


def _corpus(root, name, ids, k, teacher="t-a", tokenizer="tok", prompt=(1, 2, 3), loss_mask=None):
    records = [record(i, k=k, prompt_ids=prompt, loss_mask=loss_mask) for i in ids]
    return make_corpus(root / name, records, k=k, teacher={"model": teacher, "tokenizer_sha256": tokenizer})


def test_routing_keeps_each_records_own_teacher_across_corpora_of_different_k(tmp_path):
    code = _corpus(tmp_path, "code", ["c0", "c1", "c2"], k=3, teacher="t-code", loss_mask=[True, False, True])
    chat = _corpus(tmp_path, "chat", ["h0", "h1"], k=5, teacher="t-chat")
    cfg = TrainConfig(corpus=[code, chat], student="s", out=tmp_path / "o", max_length=64)
    manifests = corpora.read_manifests(cfg)
    data = corpora.prepare(cfg, manifests, tmp_path / "scratch")
    assert corpora.top_k_width(cfg, manifests) == (5, 0) and data.records == 5
    rows = [data.dataset[i] for i in range(len(data.dataset))]
    batch = DistillCollator(pad_token_id=0, max_length=64, top_k=5)(rows)
    assert batch["teacher"].tolist() == [0, 0, 0, 1, 1]
    # a curated corpus's loss_mask is kept; the other corpus's records learn every position
    assert batch["target_mask"].sum(1).tolist() == [2, 2, 2, 3, 3]
    for i, (name, k) in enumerate([("c0", 3), ("c1", 3), ("c2", 3), ("h0", 5), ("h1", 5)]):
        own = record(name, k=k)
        positions = batch["target_mask"][i]
        kept = [0, 2] if name.startswith("c") else [0, 1, 2]
        np.testing.assert_array_equal(batch["topk_ids"][i][positions][:, :k].numpy(), own["topk_token_ids"][kept])
        np.testing.assert_allclose(batch["topk_logprobs"][i][positions][:, :k].numpy(), own["topk_logprobs"][kept],
                                   atol=2**-6)
        assert (batch["topk_logprobs"][i][positions][:, k:] == PAD_LOGPROB).all()
    # each record's loss in the batch is its loss against its own teacher's rows alone
    logits = torch.randn(*batch["input_ids"].shape, 500, dtype=torch.float64)
    m = batch["target_mask"]
    together = kd_per_position(logits[m], batch["topk_ids"][m], batch["topk_logprobs"][m].double())
    alone = torch.cat([kd_per_position(logits[i][m[i]], batch["topk_ids"][i][m[i]][:, :k],
                                       batch["topk_logprobs"][i][m[i]][:, :k].double())
                       for i, k in enumerate([3, 3, 3, 5, 5])])
    torch.testing.assert_close(together, alone)


def test_mix_resamples_each_corpus_to_its_share(tmp_path):
    a = _corpus(tmp_path, "a", [f"a{i}" for i in range(10)], k=3)
    b = _corpus(tmp_path, "b", [f"b{i}" for i in range(10)], k=3)
    cfg = TrainConfig(corpus=[a, b], student="s", out=tmp_path / "o", mix="a=0.75,b=0.25", max_length=64)
    data = corpora.prepare(cfg, corpora.read_manifests(cfg), tmp_path / "scratch")
    teachers = data.dataset["teacher"]
    assert len(teachers) == 20 and teachers.count(0) == 15 and teachers.count(1) == 5
    assert len(set(data.dataset["id"][:15])) == 10  # a whole pass over `a` before any repeat
    with pytest.raises(ValueError, match="`mix`: 'c' is not a corpus \\(the corpora are a, b\\)"):
        TrainConfig(corpus=[a, b], student="s", out=tmp_path / "o", mix="a=0.5,c=0.5")
    with pytest.raises(ValueError, match="`mix`: no value for corpus 'b'"):
        TrainConfig(corpus=[a, b], student="s", out=tmp_path / "o", mix="a=1")


def _parsed(argv: list[str]) -> TrainConfig:
    from distill import cli

    args = vars(cli.build_parser().parse_args(["train", "--student", "s", "--out", "o", *argv]))
    return TrainConfig(**{k: v for k, v in args.items() if k not in ("command", "debug", "config")})


def test_cli_takes_several_corpora_mix_and_teacher_weights():
    cfg = _parsed(["--corpus", "x/a", "--corpus", "y/b", "--ensemble", "mixture", "--teacher-weights", "3,1"])
    assert cfg.corpus_names() == ["a", "b"] and cfg.normalised_teacher_weights() == [0.75, 0.25]
    assert LossSpec.from_config(cfg).teacher_weights == ()  # the mixture is one target: no teacher dimension
    assert LossSpec.from_config(cfg.model_copy(update={"ensemble": "sum"})).teacher_weights == (0.75, 0.25)
    assert _parsed(["--corpus", "x/a", "--corpus", "y/b", "--mix", "a=0.7,b=0.3"]).mix_weights() == {"a": 0.7, "b": 0.3}


def test_corpora_of_another_tokenizer_are_refused_in_one_line(tmp_path, capsys):
    a = _corpus(tmp_path, "a", ["a0"], k=3, teacher="t-a", tokenizer="tok-1")
    b = _corpus(tmp_path, "b", ["b0"], k=3, teacher="t-b", tokenizer="tok-2")
    assert main(["train", "--corpus", str(a), "--corpus", str(b), "--student", "s", "--out", str(tmp_path / "o")]) == 1
    error = one_line_error(capsys, "train")
    assert f"`{b}` was made by `t-b`, whose tokenizer differs from that of `t-a`" in error


def test_an_ensemble_of_misaligned_corpora_names_the_record(tmp_path):
    a = _corpus(tmp_path, "a", ["r0", "r1", "r2"], k=3)
    b = _corpus(tmp_path, "b", ["r0", "x1", "r2"], k=4)
    cfg = TrainConfig(corpus=[a, b], student="s", out=tmp_path / "o", ensemble="mixture", max_length=64)
    with pytest.raises(ValueError, match=f"`{b}` record 1 \\('x1'\\) is not `{a}`'s record 'r1'"):
        corpora.prepare(cfg, corpora.read_manifests(cfg), tmp_path / "scratch")
    short = _corpus(tmp_path, "short", ["r0"], k=3)
    cfg = TrainConfig(corpus=[a, short], student="s", out=tmp_path / "o", ensemble="sum", max_length=64)
    with pytest.raises(ValueError, match="holds 1 trainable records and .* 3: an ensemble needs the same records"):
        corpora.prepare(cfg, corpora.read_manifests(cfg), tmp_path / "scratch2")


@pytest.mark.parametrize("settings, message", [
    ({"ensemble": "mixture"}, "`ensemble` needs two or more corpora"),
    ({"teacher_weights": [1, 2]}, "`teacher_weights` apply to an `ensemble` only"),
    ({"ensemble": "sum", "teacher_weights": [1, 2, 3], "two": True}, "`teacher_weights` has 3 weights for 2 corpora"),
    ({"on_policy": True, "teacher_endpoints": ["a=http://x"], "two": True},
     "`teacher_endpoints`: no value for corpus 'b'"),
    ({"on_policy": True, "ensemble": "sum", "teacher_endpoint": "http://x", "two": True}, "`on_policy` with an `ensemble`"),
])
def test_multi_teacher_settings_that_do_not_fit_are_one_line(tmp_path, settings, message):
    corpus_ = [tmp_path / "a", tmp_path / "b"] if settings.pop("two", False) else tmp_path / "a"
    with pytest.raises(ValueError, match=message):
        TrainConfig(corpus=corpus_, student="s", out=tmp_path / "o", **settings)


def test_one_corpus_resumes_with_the_settings_it_stored_before(tmp_path):
    settings = run_settings(TrainConfig(corpus=tmp_path, student="s", out=tmp_path / "o"))
    assert settings["corpus"] == str(tmp_path.resolve())
    assert not {"mix", "ensemble", "teacher_weights"} & settings.keys()


class RowTeacher:
    """An in-process teacher for `score`: at every position its top-k is `token, token + 1, ...`
    with logprobs -0.1, -2.1, ... (deterministic, checkable)."""

    max_model_len = 512

    def score(self, requests, top_k, on_done, window):
        for req in requests:
            ids = np.asarray(req.response_token_ids, dtype=np.int32)
            topk = ids[:, None] + np.arange(top_k, dtype=np.int32)
            lps = np.tile(-0.1 - 2.0 * np.arange(top_k, dtype=np.float32), (len(ids), 1))
            on_done(req, Completion(ids, lps[:, 0].copy(), topk, lps, req.finish_reason))


def test_a_sibling_corpus_scores_the_same_tokens_and_trains_as_an_ensemble(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    teacher = str(tiny_models["llama-teacher"])
    fingerprint = corpus.tokenizer_fingerprint(AutoTokenizer.from_pretrained(teacher))
    first = make_corpus(tmp_path / "first", [record(i, k=4, response_ids=[5, 6, 7, 8][: 2 + i % 3]) for i in range(6)],
                        k=4, teacher={"model": teacher, **fingerprint})
    sibling = score(ScoreConfig(teacher=teacher, corpus=first, out=tmp_path / "second", top_k=3),
                    teacher=RowTeacher()).path
    manifest = corpus.read_manifest(sibling)
    assert manifest.source["sibling_of"] == str(first) and manifest.generation.mode == "score"
    a, b = corpus.read_table(first).to_pylist(), corpus.read_table(sibling).to_pylist()
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        assert x["response_token_ids"] == y["response_token_ids"] and x["prompt_token_ids"] == y["prompt_token_ids"]
        assert [row[0] for row in y["topk_token_ids"]] == y["response_token_ids"]
    out = train(TrainConfig(corpus=[first, sibling], student=str(tiny_models["llama-student"]), out=tmp_path / "s",
                            ensemble="mixture", teacher_weights=[1, 1], max_steps=2, batch_size=3, lora=False,
                            eval_fraction=0.0, save_steps=100))
    assert out.card.corpora == [str(first), str(sibling)]
    assert [t.model for t in out.card.teachers] == [teacher, teacher]
    assert "mixture ensemble" in (out.path / "README.md").read_text()
    assert all(np.isfinite(m["loss"]) for m in map(json.loads, (out.path / "metrics.jsonl").read_text().splitlines())
               if "loss" in m)


def test_a_sibling_teacher_of_another_tokenizer_is_one_line(tmp_path, tiny_models, capsys):
    first = make_corpus(tmp_path / "first", [record(0, k=4)], k=4,
                        teacher={"model": "other", "tokenizer_sha256": "not-this-one"})
    assert main(["score", "--teacher", str(tiny_models["llama-teacher"]), "--corpus", str(first),
                 "--out", str(tmp_path / "second")]) == 1
    assert "does not share the tokenizer of `other`" in one_line_error(capsys, "score")
