"""KD losses against independent dense references (float64), chunked == plain in value and
gradient, and invariance to how a batch is split for gradient accumulation."""

import pytest
import torch
import torch.nn.functional as F

from distill.train.losses import (
    KINDS,
    TAILS,
    LossSpec,
    chunked_distill_loss,
    kd_per_position,
    topk_kd_loss,
)

torch.manual_seed(0)
B, T, V, H = 2, 5, 11, 8


def dense_reference(student_logits, teacher_logits, kind, temperature, beta=0.5):
    """Full-vocabulary divergence per position via F.kl_div (independent of train.losses)."""
    lq = torch.log_softmax(student_logits / temperature, -1)
    lp = torch.log_softmax(teacher_logits / temperature, -1)
    kl = lambda target, inp: F.kl_div(inp, target, log_target=True, reduction="none").sum(-1)  # KL(target||inp)
    if kind == "forward_kl":
        out = kl(lp, lq)
    elif kind == "reverse_kl":
        out = kl(lq, lp)
    else:
        lm = torch.log(beta * lp.exp() + (1 - beta) * lq.exp())
        out = beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    return out * temperature**2


def teacher_topk(teacher_logits, k):
    lp = torch.log_softmax(teacher_logits, -1)  # stored: raw, temperature 1
    values, ids = lp.topk(k, dim=-1)
    return ids, values


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocab_topk_equals_dense_kl(kind, tail, temperature):
    student, teacher = torch.randn(B, T, V, dtype=torch.float64) * 3, torch.randn(B, T, V, dtype=torch.float64) * 3
    ids, lps = teacher_topk(teacher, V)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    got = topk_kd_loss(student, ids, lps, mask, LossSpec(kind=kind, temperature=temperature, tail=tail))
    want = dense_reference(student, teacher, kind, temperature)[mask].mean()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_bucket_is_the_exact_kl_on_k_plus_one_bins(kind):
    k = 4
    student, teacher = torch.randn(7, V, dtype=torch.float64) * 2, torch.randn(7, V, dtype=torch.float64) * 2
    ids, lps = teacher_topk(teacher, k)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    coarse = lambda d: torch.cat([d.gather(-1, ids), 1 - d.gather(-1, ids).sum(-1, keepdim=True)], -1).log()
    want = dense_reference(coarse(q), coarse(p), kind, 1.0)  # log-probs are valid logits
    got = kd_per_position(student, ids, lps, LossSpec(kind=kind, tail="bucket"))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_renormalize_is_the_kl_of_the_restricted_distributions(kind, temperature):
    k = 4
    student, teacher = torch.randn(7, V, dtype=torch.float64), torch.randn(7, V, dtype=torch.float64)
    ids, lps = teacher_topk(teacher, k)
    want = dense_reference(student.gather(-1, ids), teacher.gather(-1, ids), kind, temperature)
    got = kd_per_position(student, ids, lps, LossSpec(kind=kind, tail="renormalize", temperature=temperature))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_student_equal_to_teacher_has_zero_loss_and_a_different_one_does_not(kind, tail):
    logits = torch.randn(6, V, dtype=torch.float64) * 2
    ids, lps = teacher_topk(logits, 5)
    spec = LossSpec(kind=kind, tail=tail)
    assert kd_per_position(logits, ids, lps, spec).abs().max() < 1e-10
    assert kd_per_position(torch.randn(6, V, dtype=torch.float64), ids, lps, spec).min() > 1e-3


def test_masked_positions_do_not_count():
    student, teacher = torch.randn(B, T, V), torch.randn(B, T, V)
    ids, lps = teacher_topk(teacher, 4)
    mask = torch.rand(B, T) > 0.4
    changed = student.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    assert topk_kd_loss(student, ids, lps, mask) == topk_kd_loss(changed, ids, lps, mask)


def plain_distill_loss(hidden, weight, labels, ids, lps, mask, alpha, spec):
    logits = hidden @ weight.T
    kd = topk_kd_loss(logits, ids, lps, mask, spec)
    ce = F.cross_entropy(logits[mask], labels[mask])
    return alpha * kd + (1 - alpha) * ce


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_chunked_equals_plain_in_value_and_gradient(kind, tail):
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    ids, lps = teacher_topk(torch.randn(B, T, V, dtype=torch.float64), 4)
    labels = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    spec = LossSpec(kind=kind, tail=tail, temperature=2.0)
    plain = plain_distill_loss(hidden, weight, labels, ids, lps, mask, 0.3, spec)
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    chunked, parts = chunked_distill_loss(hidden, weight, labels, ids, lps, mask, spec, alpha=0.3, chunk_size=3)
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert set(parts) == {"kd", "ce"} and not parts["kd"].requires_grad


def test_one_batch_of_4_equals_accumulation_2x2():
    torch.manual_seed(1)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(4, T, H, dtype=torch.float64)
    ids, lps = teacher_topk(torch.randn(4, T, V, dtype=torch.float64), 4)
    labels = torch.randint(0, V, (4, T))
    mask = torch.rand(4, T) > 0.3
    mask[0, :] = True  # uneven target counts per micro-batch: a per-micro-batch mean would differ
    mask[3, 1:] = False
    whole, _ = chunked_distill_loss(hidden, weight, labels, ids, lps, mask)
    (g_whole,) = torch.autograd.grad(whole, weight)
    total = int(mask.sum())
    g_acc = torch.zeros_like(weight)
    for half in (slice(0, 2), slice(2, 4)):
        part, _ = chunked_distill_loss(hidden[half], weight, labels[half], ids[half], lps[half], mask[half],
                                       num_items=total)
        g_acc += torch.autograd.grad(part, weight)[0]
    torch.testing.assert_close(g_acc, g_whole, rtol=1e-10, atol=1e-12)


def test_bad_arguments_are_named():
    logits, ids, lps = torch.randn(2, V), torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), -2.0)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        kd_per_position(logits, ids, lps, LossSpec(kind="kl"))
    with pytest.raises(ValueError, match="`tail` must be one of"):
        kd_per_position(logits, ids, lps, LossSpec(tail="drop"))
    with pytest.raises(ValueError, match="`beta` must be in"):
        kd_per_position(logits, ids, lps, LossSpec(kind="jsd", beta=1.0))


def test_gradients_stay_finite_when_the_student_is_certain():
    """A student with probability 1.0 (in float32) on the teacher's only top-k token used to
    send NaN back through the tail bucket's unused branch, and 0 * NaN poisons even alpha 0."""
    logits = torch.zeros(3, 16)
    logits[:, 5] = 200.0  # log_softmax = 0 exactly at token 5
    logits.requires_grad_(True)
    ids, lps = torch.full((3, 1), 5), torch.zeros(3, 1)  # a label "teacher": its token at logprob 0
    for alpha in (0.0, 0.5, 1.0):
        logits.grad = None
        kd = kd_per_position(logits, ids, lps, LossSpec(tail="bucket")).sum()
        ce = torch.nn.functional.cross_entropy(logits, ids[:, 0], reduction="sum")
        (alpha * kd + (1 - alpha) * ce).backward()
        assert torch.isfinite(logits.grad).all(), alpha


@pytest.mark.slow
@pytest.mark.parametrize("head", ["whole", "reshard"])
def test_kd_loss_under_fsdp2_matches_single_process(tiny_models, head):
    """FSDP2 on CPU (gloo), 2 ranks, via plain torchrun (accelerate's FSDP launch wants GPUs):
    the loss and the LM head's gradient equal the unsharded model's."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "fsdp2_loss_check.py"), str(tiny_models["llama-student"]),
                           *(["reshard"] if head == "reshard" else [])],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    kind = "DTensor" if head == "reshard" else "Parameter"
    assert done.stdout.count(f"head weight type {kind}") == 2, done.stdout


def test_a_loss_spec_is_built_once_from_the_config_and_frozen():
    """The kinds come from one declaration (`distill.config.LossKind`); the config's loss fields
    become one `LossSpec` for the corpus and one for the student's own samples."""
    import dataclasses
    import typing

    from distill.config import LossKind, TrainConfig
    from tests.helpers import ROOT

    assert KINDS == typing.get_args(LossKind)
    for field in ("loss", "on_policy_loss"):
        assert typing.get_args(TrainConfig.model_fields[field].annotation) == KINDS
    cfg = TrainConfig(corpus="c", student=str(ROOT / "distill" / "demo" / "student-init"), out="o", loss="jsd",
                      beta=0.3, kd_temperature=2.0, tail="renormalize", on_policy_loss="reverse_kl")
    assert LossSpec.from_config(cfg) == LossSpec(kind="jsd", temperature=2.0, tail="renormalize", beta=0.3)
    assert LossSpec.on_policy(cfg) == LossSpec(kind="reverse_kl", temperature=2.0, tail="renormalize", beta=0.3)
    assert LossSpec.from_config(cfg).as_metric() == LossSpec(kind="forward_kl", temperature=1.0, tail="renormalize")
    with pytest.raises(dataclasses.FrozenInstanceError):
        LossSpec().kind = "jsd"
