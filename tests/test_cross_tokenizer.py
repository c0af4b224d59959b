"""Cross-tokenizer distillation: alignment, the span and ULD losses, detection, the tokenizer
files in the corpus, and a student of another tokenizer trained end to end (no vLLM: the corpus
is built from the demo teacher's tokenizer with planted top-k)."""

import itertools
import json
import math
import re
import shutil
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill import corpus
from distill.config import TrainConfig
from distill.demo.student_tokenizer import build_student, build_student_tokenizer
from distill.demo.teacher import SHIPPED
from distill.train.cross_losses import (
    cross_distill_loss,
    mapped_topk_kl,
    next_byte_kl,
    span_text_kl,
    uld,
)
from distill.train.cross_tokenizer import (
    SAME_VOCABULARY,
    CrossCollator,
    CrossTokenizer,
    Vocabularies,
    align,
    aligned_record,
    cross_record,
    detect,
    same_vocabulary_share,
    token_bytes,
)
from distill.train.losses import LossSpec, chunked_distill_loss
from tests.helpers import make_corpus, record

K = 4


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    student = build_student_tokenizer(tmp_path_factory.mktemp("student-tokenizer"))
    return AutoTokenizer.from_pretrained(SHIPPED), student


@dataclass(frozen=True)
class Span:
    """One of `align`'s spans: teacher tokens `teacher[0]:teacher[1]`, student tokens
    `student[0]:student[1]`."""

    teacher: tuple[int, int]
    student: tuple[int, int]

    @property
    def one_to_one(self) -> bool:
        return self.teacher[1] - self.teacher[0] == 1 and self.student[1] - self.student[0] == 1


def spans_of(teacher: list[bytes], student: list[bytes]) -> list[Span]:
    return [Span((t0, t1), (s0, s1)) for t0, t1, s0, s1 in align(teacher, student).T.tolist()]


def spelled(spans, teacher, student):
    return [(b"".join(teacher[slice(*s.teacher)]), b"".join(student[slice(*s.student)])) for s in spans]


def test_align_groups_tokens_until_both_tokenisations_end_together():
    teacher = [b"2", b"5", b"3", b" ", b"o", b"k"]
    student = [b"25", b"3 ", b"ok"]
    spans = spans_of(teacher, student)
    assert spans == [Span((0, 2), (0, 1)), Span((2, 4), (1, 2)), Span((4, 6), (2, 3))]
    assert all(a == b for a, b in spelled(spans, teacher, student))


def test_align_multibyte_unicode_and_whitespace_merging():
    # "é" is two bytes: the teacher splits it, the student does not; " 4" merges the space for the student
    teacher = [b"\xc3", b"\xa9", b" ", b"4", b"!"]
    student = [b"\xc3\xa9", b" 4", b"!"]
    assert spans_of(teacher, student) == [Span((0, 2), (0, 1)), Span((2, 4), (1, 2)), Span((4, 5), (2, 3))]
    assert [s.one_to_one for s in spans_of(teacher, student)] == [False, False, True]


def test_align_stops_where_the_texts_differ():
    assert spans_of([b"ab", b"c", b"d"], [b"ab", b"x", b"d"]) == [Span((0, 1), (0, 1))]
    assert spans_of([b"a", b"b"], []) == []


def walked_spans(teacher: list[bytes], student: list[bytes]) -> list[Span]:
    """`align`'s rule, walked token by token (its first implementation): the oracle of the numpy one."""
    t_text, s_text = b"".join(teacher), b"".join(student)
    common = next((i for i, (a, b) in enumerate(zip(t_text, s_text)) if a != b), min(len(t_text), len(s_text)))
    t_ends, s_ends = list(itertools.accumulate(map(len, teacher))), list(itertools.accumulate(map(len, student)))
    spans, i, j, t0, s0, done = [], 0, 0, 0, 0, 0
    while i < len(teacher) and j < len(student):
        if t_ends[i] == s_ends[j]:
            if t_ends[i] > common:
                break
            if t_ends[i] > done:  # a span spells at least one byte
                spans.append(Span((t0, i + 1), (s0, j + 1)))
                t0, s0, done = i + 1, j + 1, t_ends[i]
            i, j = i + 1, j + 1
        elif t_ends[i] < s_ends[j]:
            i += 1
        else:
            j += 1
    return spans


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_align_equals_the_token_by_token_walk(data):
    """Two tokenisations of one text (tokens of no bytes anywhere, as special tokens), the second
    sometimes changed from some byte on: the spans are those of the walk."""
    text = data.draw(st.binary(max_size=40))

    def tokens() -> list[bytes]:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        return [p for piece in pieces for p in data.draw(st.sampled_from([[piece], [b"", piece], [piece, b""]]))]

    teacher, student = tokens(), tokens()
    if student and data.draw(st.booleans()):  # the texts differ from some token on
        at = data.draw(st.integers(0, len(student) - 1))
        student = student[:at] + [data.draw(st.binary(max_size=4))] + student[at + 1:]
    assert spans_of(teacher, student) == walked_spans(teacher, student)


def toy_record(keep=None) -> tuple[dict, CrossTokenizer]:
    """"25" "3 " "ok" against "2" "5" "3" " " "o" "k", each closed by its end of turn, after a
    one-token prompt: the student record, with curation's `keep` per teacher token."""
    vocabularies = Vocabularies(teacher_bytes=[b"2", b"5", b"3", b" ", b"o", b"k", b""],
                                student_bytes=[b"25", b"3 ", b"ok", b""], to_student=np.array([-1] * 6 + [3]),
                                same_share=0.0)
    plan = CrossTokenizer("span", None, None, vocabularies)
    logprobs = -np.arange(1.0, 8.0)
    return aligned_record("x", [9], [9], list(range(7)), list(range(4)), logprobs, np.arange(7).reshape(-1, 1),
                          logprobs.reshape(-1, 1), plan, keep), plan


def test_a_span_with_a_masked_teacher_token_is_left_out_and_its_student_tokens_get_no_ce():
    r, _ = toy_record(keep=[True, True, True, False, True, True, True])  # the teacher's " " masked
    assert r["ce_mask"].tolist() == [True, False, True, True]  # "3 " holds the masked " "
    assert (r["span_start"].tolist(), r["span_end"].tolist()) == ([0, 2, 3], [1, 3, 4])
    assert r["span_one_to_one"].tolist() == [False, False, True]  # "25", "ok", the ends of turn
    assert r["span_teacher_logprob"].tolist() == [-3.0, -11.0, -7.0]
    assert r["span_topk_ids"].tolist() == [-1, -1, 3] and r["span_teacher_top1"].tolist() == [0, 4, 6]
    unmasked, _ = toy_record()
    assert unmasked["ce_mask"].all() and unmasked["span_start"].tolist() == [0, 1, 2, 3]


def test_the_collator_keeps_the_spans_that_truncation_leaves_whole():
    r, plan = toy_record()
    cut = CrossCollator(pad_token_id=0, max_length=3, top_k=1, student_first_byte=np.zeros(4, dtype=np.int64))([r])
    # the prompt and "25" "3 ": the first two spans, at the positions predicting their first token
    assert cut["input_ids"].tolist() == [[9, 0, 1]] and cut["labels"].tolist() == [[0, 1, -100]]
    assert cut["span_index"].tolist() == cut["span_of"].tolist() == [[0, 1, -1]]
    assert cut["span_teacher_logprob"].tolist() == [-3.0, -7.0] and cut["span_topk_ids"].tolist() == [[-1], [-1]]
    whole = CrossCollator(pad_token_id=0, max_length=8, top_k=1, student_first_byte=np.zeros(4, dtype=np.int64))([r, r])
    assert whole["span_index"].tolist() == [[0, 1, 2, 3, -1], [4, 5, 6, 7, -1]]
    assert whole["span_one_to_one"].tolist() == [False, False, False, True] * 2


@pytest.mark.parametrize("text", ["Reverse 2530 → 0352, naïve café 😀", "  two  spaces\tand\nlines 12345"])
def test_spans_cover_the_text_exactly_with_real_tokenizers(tokenizers, text):
    teacher, student = tokenizers
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    t = [t_bytes[i] for i in teacher(text, add_special_tokens=False)["input_ids"]]
    s = [s_bytes[i] for i in student(text, add_special_tokens=False)["input_ids"]]
    assert b"".join(t) == b"".join(s) == text.encode()
    spans = spans_of(t, s)
    assert all(a == b for a, b in spelled(spans, t, s))
    # contiguous and covering: every token of both sides in exactly one span
    assert spans[0].teacher[0] == spans[0].student[0] == 0
    assert all(a.teacher[1] == b.teacher[0] and a.student[1] == b.student[0] for a, b in itertools.pairwise(spans))
    assert (spans[-1].teacher[1], spans[-1].student[1]) == (len(t), len(s))
    assert len(spans) < len(t)  # the two tokenisations really differ (digits, multi-byte characters)


def _batch_of(records, plan, max_length=64):
    return CrossCollator(plan.student.pad_token_id, max_length, K, plan.vocabularies.student_first_byte)(
        [cross_record(r, plan) for r in records])


def test_span_loss_is_todays_kl_when_both_tokenizers_are_the_same(tokenizers):
    from distill.train.cross_tokenizer import student_prompt
    from distill.train.data import DistillCollator

    teacher, _ = tokenizers
    plan = CrossTokenizer("span", teacher, teacher, Vocabularies.of(teacher, teacher))
    records = []
    for i, text in enumerate(["2530", "Reverse 91 ok"]):
        ids = teacher(text, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
        topk = np.array([[t] + [(t + 1 + 37 * j) % len(teacher) for j in range(K - 1)] for t in ids])
        messages = [{"role": "user", "content": f"Sort {i}"}]
        records.append(record(i, response_ids=ids, topk_ids=topk, question=messages[0]["content"],
                              prompt_ids=student_prompt(teacher, messages)))
        records[-1]["topk_logprobs"] = records[-1]["topk_logprobs"].copy()  # as stored: not a reversed view
    batch = _batch_of(records, plan)
    assert batch["span_one_to_one"].all() and (batch["span_topk_ids"] >= 0).all()
    old = DistillCollator(teacher.pad_token_id, 64, K)(records)  # today's: the stored ids, no re-tokenisation
    assert torch.equal(old["labels"], batch["labels"]) and torch.equal(old["input_ids"], batch["input_ids"])
    torch.manual_seed(0)
    hidden, weight = torch.randn(*batch["input_ids"].shape, 16), torch.randn(len(teacher), 16)
    for spec in (LossSpec(), LossSpec(kind="jsd", temperature=2.0)):
        _, cross = cross_distill_loss(hidden, weight, batch, "span", spec, alpha=1.0)
        _, today = chunked_distill_loss(hidden, weight, old["labels"].clamp(min=0), old["topk_ids"],
                                        old["topk_logprobs"], old["target_mask"], spec, alpha=1.0)
        assert torch.allclose(cross["kd"], today["kd"], rtol=1e-5) and torch.allclose(cross["ce"], today["ce"], rtol=1e-5)


def test_span_terms_are_zero_when_the_distributions_match():
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05]]))
    assert mapped_topk_kl(lp, lp, torch.ones(1, 4, dtype=torch.bool)).abs().max() < 1e-6
    # unmapped teacher tokens go to the tail: a student with the same mass there still matches
    mapped = torch.tensor([[True, True, False, False]])
    student = torch.where(mapped, lp, torch.full_like(lp, -1e4))
    assert mapped_topk_kl(student, lp, mapped).abs().max() < 1e-6
    assert mapped_topk_kl(lp - 0.1, lp, torch.ones(1, 4, dtype=torch.bool)).item() > 0
    # the next byte: teacher tokens "2" 0.5, "25" 0.2, "3" 0.2 (tail 0.1) -> byte "2" 0.7, "3" 0.2
    teacher_lp, first = torch.log(torch.tensor([[0.5, 0.2, 0.2]])), torch.tensor([[ord("2"), ord("2"), ord("3")]])
    student = torch.full((1, 257), 1e-30)
    student[0, ord("2")], student[0, ord("3")], student[0, ord("x")] = 0.7, 0.2, 0.1
    assert next_byte_kl(student.log(), teacher_lp, first).abs().max() < 1e-6
    student[0, ord("2")], student[0, ord("3")] = 0.2, 0.7
    hand = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.7)  # the tail bins match (0.1)
    assert next_byte_kl(student.log(), teacher_lp, first).item() == pytest.approx(hand, rel=1e-5)
    text = torch.tensor([-0.2, -3.0, -1e-8])
    assert span_text_kl(text, text).abs().max() < 1e-6
    assert (span_text_kl(text - 0.5, text) > 0).all()


def test_uld_against_a_hand_computation_and_its_invariances():
    teacher = torch.log(torch.tensor([[0.6, 0.2, 0.1]]))  # tail 0.1
    student = torch.tensor([[0.1, 0.7, 0.05]])  # sorted: 0.7, 0.1, 0.05; tail 0.15
    hand = abs(0.6 - 0.7) + abs(0.2 - 0.1) + abs(0.1 - 0.05) + abs(0.1 - 0.15)
    assert uld(student, teacher).item() == pytest.approx(hand, abs=1e-6)
    assert uld(student[:, [2, 0, 1]], teacher).item() == pytest.approx(hand, abs=1e-6)  # order-free: no vocabulary map
    assert uld(teacher.exp(), teacher).item() == pytest.approx(0.0, abs=1e-6)


class _Vocab:
    """A tokenizer as `same_vocabulary_share` sees it."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]


def test_auto_treats_a_student_as_the_teachers_tokenizer_only_above_the_threshold(tmp_path, tokenizers):
    base = [f"t{i}" for i in range(100)]
    renamed = lambda n: base[:100 - n] + [f"x{i}" for i in range(n)]
    assert same_vocabulary_share(_Vocab(base), _Vocab(renamed(10))) == pytest.approx(SAME_VOCABULARY)
    assert same_vocabulary_share(_Vocab(base), _Vocab(renamed(11))) < SAME_VOCABULARY
    teacher, student = tokenizers
    root = _corpus(tmp_path / "c", teacher)
    cfg = TrainConfig(corpus=root, student=str(SHIPPED), out=tmp_path / "o")
    manifest = corpus.read_manifest(root)
    assert detect(cfg, manifest, teacher) is None
    plan = detect(cfg, manifest, student)
    assert plan.kind == "span" and plan.vocabularies.same_share < SAME_VOCABULARY
    assert detect(cfg.model_copy(update={"cross_tokenizer": "off"}), manifest, student) is None
    assert detect(cfg.model_copy(update={"cross_tokenizer": "uld"}), manifest, teacher).kind == "uld"


def _corpus(root, teacher, n=8):
    """A corpus of the demo teacher's tokens of right demo answers, its top-1 the answer's token
    (logprob -0.3), the rest other digits; the tokenizer files stored as `generate` stores them."""
    from distill.demo import skills

    digits = [teacher.convert_tokens_to_ids(str(d)) for d in range(10)]
    records = []
    for i, ex in enumerate(skills.examples("distill", n, 0, system_prompts=False)):
        ids = teacher(ex["answer"], add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
        topk = np.array([[t] + [d for d in digits if d != t][:K - 1] for t in ids])
        lps = np.tile(np.array([-0.3, -1.8, -2.5, -3.5], dtype=np.float32), (len(ids), 1))
        records.append(record(i, response_ids=ids, topk_ids=topk, topk_logprobs=lps, question=ex["messages"][-1]["content"],
                              response=ex["answer"]))
    make_corpus(root, records, k=K, teacher={"model": str(SHIPPED), **corpus.tokenizer_fingerprint(teacher)})
    manifest = corpus.read_manifest(root)
    manifest.teacher.tokenizer_files = corpus.store_tokenizer(root, teacher)
    corpus.write_manifest(root, manifest)
    return root


def as_lists(record: dict) -> dict:
    """A student record with its arrays as lists, as the training file gives them back."""
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in record.items()}


def test_the_training_file_holds_the_records_of_the_in_memory_alignment(tmp_path, tokenizers, monkeypatch, capsys):
    """`cross_training_data` streams the corpus into its file a few records at a time (top-k as
    arrays): the same records and coverage as `cross_records` over the whole corpus as lists, less
    those whose prompt fills max_length."""
    from distill.train import data
    from distill.train.cross_tokenizer import CROSS_COLUMNS, cross_records, cross_training_data

    teacher, student = tokenizers
    root = _corpus(tmp_path / "c", teacher, n=9)
    plan = CrossTokenizer("span", teacher, student, Vocabularies.of(teacher, student))
    whole, coverage = cross_records(corpus.iter_records(root, columns=[c for c in CROSS_COLUMNS if c != "loss_mask"]), plan)
    prompts = sorted(len(r["input_ids"]) - r["response_length"] for r in whole)
    max_length = prompts[len(prompts) // 2] + 1  # about half the prompts fit
    write = data.write_records
    monkeypatch.setattr("distill.train.cross_tokenizer.write_records", lambda *a, **kw: write(*a, **kw, batch=2))
    data, streamed = cross_training_data(root, plan, max_length, tmp_path / "scratch")
    fits = [r for r in whole if len(r["input_ids"]) - r["response_length"] < max_length]
    assert 0 < len(fits) < len(whole) and streamed == coverage
    assert data.dataset.to_list() == [as_lists(r) for r in fits]
    assert re.search(r"align: 100%.* 9/9 ", capsys.readouterr().err)  # the pass's progress, in records
    assert (data.records, data.skipped) == (len(whole), len(whole) - len(fits))


def test_worker_processes_align_the_shards_into_the_same_training_records(tmp_path, tokenizers):
    from distill.train.cross_tokenizer import cross_training_data

    teacher, student = tokenizers
    root = _corpus(tmp_path / "c", teacher, n=9)
    table = corpus.read_stored(corpus.shard_paths(root)[0])
    for shard, start in enumerate(range(0, 9, 4)):  # three shards: 4, 4 and 1 records
        corpus.write_shard(root, shard, table.slice(start, 4))
    manifest = corpus.read_manifest(root)
    manifest.stats = corpus.corpus_stats(root)
    corpus.write_manifest(root, manifest)
    plan = CrossTokenizer("span", teacher, student, Vocabularies.of(teacher, student))
    alone, coverage = cross_training_data(root, plan, 128, tmp_path / "alone", workers=0)
    parallel, covered = cross_training_data(root, plan, 128, tmp_path / "parallel", workers=2)
    assert len(alone.dataset) == 9 and parallel.dataset.to_list() == alone.dataset.to_list()
    assert covered.as_dict() == pytest.approx(coverage.as_dict())
    assert sorted(p.name for p in (tmp_path / "parallel").iterdir()) == [f"cross-{i:05d}.arrow" for i in range(3)]


def test_the_alignment_validates_the_corpus_and_refuses_several_corpora(tmp_path, tokenizers):
    """A cross-tokenizer run reads the corpus only through `cross_training_data` (no pre-pass of
    the teacher's ids): it refuses an invalid corpus as that pre-pass does, and a second corpus,
    which its one alignment would leave out."""
    from distill.train.cross_tokenizer import cross_training_data

    teacher, student = tokenizers
    root = _corpus(tmp_path / "c", teacher)
    plan = CrossTokenizer("span", teacher, student, Vocabularies.of(teacher, student))
    table = corpus.read_stored(corpus.shard_paths(root)[0])
    corpus.write_shard(root, 0, pa.concat_tables([table, table.slice(0, 1)]))  # the first record twice
    manifest = corpus.read_manifest(root)
    manifest.stats = corpus.corpus_stats(root)
    corpus.write_manifest(root, manifest)
    with pytest.raises(corpus.CorpusError, match="duplicate id"):
        cross_training_data(root, plan, 128, tmp_path / "scratch", workers=0)
    first, second = _corpus(tmp_path / "a", teacher), _corpus(tmp_path / "b", teacher)
    cfg = TrainConfig(corpus=[first, second], student=str(tmp_path / "student"), out=tmp_path / "s")
    with pytest.raises(ValueError, match="trains on one corpus, got 2"):
        detect(cfg, corpus.read_manifest(first), student)


def test_nll_per_byte_is_nats_over_the_utf8_bytes_of_the_texts():
    from distill.evaluation.cross_tokenizer import TeacherScored, nll_per_byte

    # 1 + 0.5 + 2 nats over "ab" (2 bytes) and "é" (2 bytes, one character)
    assert nll_per_byte([[-1.0, -0.5], [-2.0]], ["ab", "é"]) == TeacherScored(answers=2, teacher_tokens=3, bytes=4,
                                                                              nll_per_byte=0.875)


def test_an_old_corpus_or_a_changed_tokenizer_file_is_one_line(tmp_path, tokenizers):
    teacher, _ = tokenizers
    root = _corpus(tmp_path / "c", teacher)
    manifest = corpus.read_manifest(root)
    assert corpus.teacher_tokenizer(root, manifest).get_vocab() == teacher.get_vocab()
    (root / corpus.TOKENIZER_DIR / "tokenizer.json").write_text(
        (root / corpus.TOKENIZER_DIR / "tokenizer.json").read_text().replace('"2"', '"two"'))
    with pytest.raises(corpus.CorpusError, match=r"tokenizer\.json` does not match the SHA-256 in .*manifest\.json"):
        corpus.teacher_tokenizer(root, manifest)
    # an old corpus: no files, a teacher path that does not load -> what to pass
    shutil.rmtree(root / corpus.TOKENIZER_DIR)
    old = manifest.model_copy(update={"teacher": manifest.teacher.model_copy(
        update={"tokenizer_files": None, "model": str(tmp_path / "gone")})})
    with pytest.raises(corpus.CorpusError) as e:
        corpus.teacher_tokenizer(root, old)
    assert "\n" not in str(e.value) and "pass --teacher-tokenizer" in str(e.value)
    # the manifest's teacher still loads: an old corpus works without the flag
    assert corpus.teacher_tokenizer(root, manifest.model_copy(update={"teacher": manifest.teacher.model_copy(
        update={"tokenizer_files": None})})).get_vocab() == teacher.get_vocab()
    # a given tokenizer that is not the one that wrote the corpus
    other = tmp_path / "other"
    build_student_tokenizer(other)
    with pytest.raises(corpus.CorpusError, match=r"is not the tokenizer that wrote"):
        corpus.teacher_tokenizer(root, old, given=other)


@pytest.mark.parametrize("kind", ["span", "uld"])
def test_a_student_of_another_tokenizer_trains_end_to_end(tmp_path, tokenizers, kind, monkeypatch):
    from distill.evaluation.cross_tokenizer import cross_fidelity
    from distill.train import corpora
    from distill.train.card import StudentCard
    from distill.train.trainer import train

    def teacher_ids_prepared(*args):  # a file of the teacher's ids that such a run never reads
        raise AssertionError("a cross-tokenizer run prepared the standard training data")

    monkeypatch.setattr(corpora, "prepare", teacher_ids_prepared)

    teacher, _ = tokenizers
    root = _corpus(tmp_path / "c", teacher, n=16)
    student = build_student(tmp_path / "student", seed=0)
    before = cross_fidelity(student, root)
    cfg = TrainConfig(corpus=root, student=str(student), out=tmp_path / "s", lora=False, max_steps=12, batch_size=8,
                      learning_rate=1e-2, logging_steps=1, save_steps=100, eval_fraction=0.0, alpha=0.9,
                      max_length=128, cross_tokenizer="auto" if kind == "span" else kind)
    out = train(cfg).path
    card = StudentCard.load(out)
    assert card.cross_tokenizer["kind"] == kind and card.cross_tokenizer["aligned_share"] > 0.9
    assert 0 < card.cross_tokenizer["mapped_topk_mass"] <= 1
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["kd"]) for m in logs if "kd" in m) and card.last_loss < card.first_loss
    after = cross_fidelity(out, root)
    assert after.nll_per_byte < before.nll_per_byte and after.aligned_share == before.aligned_share
    assert "cross-tokenizer" in (out / "README.md").read_text()
