"""A student whose tokenizer is not the teacher's: detecting one, and aligning the two
tokenisations of the teacher's answer through the text they spell (docs/recipes/cross-tokenizer.md).

The student re-tokenises the teacher's response *text* (never its ids). Both token sequences
spell the same bytes, so each token covers a byte range; a *span* closes wherever both
sequences have a token boundary at the same byte: a group of teacher tokens and a group of
student tokens covering exactly the same text. Before the span's first token both models have
read the same text, so their predictions there are comparable:
- a 1:1 span (one token each side): the teacher's top-k is mapped to student ids by the bytes
  each token spells (mass on teacher tokens the student lacks goes to the tail bin);
- a longer span: the probability both models give the span's whole text.
Bytes, not token strings: `Ġ4` (byte-level BPE) and `▁4` (SentencePiece) both spell b" 4".

`cross_records` turns corpus records into the student's training records (its own prompt and
response ids, the spans, the teacher's numbers per span); `CrossCollator` batches them. On-policy,
the other way round: the teacher scores its own tokens of the student's answer text
(`teacher_tokens`), and `aligned_record` aligns them with the student's sampled tokens.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from distill import corpus
from distill.config import CrossLossKind, TrainConfig
from distill.train.data import TrainingData, write_records

# `auto` treats a student as the teacher's tokenizer at or above this share of the teacher's ids
# naming the same token string in both (one renamed special token is not another tokenizer).
SAME_VOCABULARY = 0.9
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, inverted (byte-level BPE's token alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id spells (special tokens: none), for byte-level BPE, SentencePiece
    (`▁`, `<0xNN>` byte fallback) and otherwise what the tokenizer decodes the token to."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and '"ByteLevel"' in backend.to_str()
    table = _byte_level_decoder() if byte_level else None
    out = []
    for i, token in enumerate(tokens):
        if i in special or token is None:
            out.append(b"")
        elif table is not None and all(c in table for c in token):
            out.append(bytes(table[c] for c in token))
        elif (m := _BYTE_TOKEN.fullmatch(token)) is not None:
            out.append(bytes([int(m.group(1), 16)]))
        elif "▁" in token:
            out.append(token.replace("▁", " ").encode())
        else:
            out.append(tokenizer.convert_tokens_to_string([token]).encode())
    return out


def same_vocabulary_share(teacher, student) -> float:
    """Share of the teacher's token ids whose token string is the same in the student."""
    ids = list(range(len(teacher)))
    theirs = teacher.convert_ids_to_tokens(ids)
    ours = student.convert_ids_to_tokens([i for i in ids if i < len(student)])
    return sum(a == b for a, b in zip(theirs, ours)) / max(len(ids), 1)


def align(teacher: Sequence[bytes], student: Sequence[bytes]) -> np.ndarray:
    """The spans of two tokenisations, given the bytes of each token, in order, as int64 [4, S]:
    teacher start and end, student start and end (indices into the two responses: tokens that
    spell exactly the same bytes). Only text both spell is aligned: past the first byte where they
    differ (a tokenizer that normalises the text, a response cut inside a character) the rest of
    both stays unaligned. Tokens of no bytes (special tokens) join the span that follows them.
    numpy: the alignment of every record before training is a pass over the corpus."""
    t_ends = np.cumsum([len(b) for b in teacher], dtype=np.int64)
    s_ends = np.cumsum([len(b) for b in student], dtype=np.int64)
    t_text, s_text = b"".join(teacher), b"".join(student)
    n = min(len(t_text), len(s_text))
    differ = np.flatnonzero(np.frombuffer(t_text, np.uint8, n) != np.frombuffer(s_text, np.uint8, n))
    common = int(differ[0]) if len(differ) else n
    # A span ends at each byte offset where a token ends on both sides, within the common text; it
    # ends with the first such token of each side, so tokens of no bytes after it join the next span.
    ends = np.intersect1d(t_ends, s_ends)
    ends = ends[(ends > 0) & (ends <= common)]
    t_stop, s_stop = np.searchsorted(t_ends, ends) + 1, np.searchsorted(s_ends, ends) + 1
    return np.stack([np.r_[0, t_stop][:-1], t_stop, np.r_[0, s_stop][:-1], s_stop]).astype(np.int64)


@dataclass(frozen=True)
class Vocabularies:
    """Everything about the two tokenizers the alignment needs, computed once per run."""

    teacher_bytes: list[bytes]
    student_bytes: list[bytes]
    to_student: np.ndarray  # [teacher vocab] student id of the token spelling the same bytes, -1 if none
    same_share: float  # `same_vocabulary_share`

    @staticmethod
    def first_bytes(spelled: list[bytes]) -> np.ndarray:
        """Each token's first byte; 256 for a token of no bytes (a special token)."""
        return np.array([b[0] if b else 256 for b in spelled], dtype=np.int64)

    @cached_property  # once per run: a Python pass over a 151,936-token vocabulary took 7.7 ms
    def teacher_first_byte(self) -> np.ndarray:
        return self.first_bytes(self.teacher_bytes)

    @cached_property
    def student_first_byte(self) -> np.ndarray:
        return self.first_bytes(self.student_bytes)

    @classmethod
    def of(cls, teacher, student) -> Vocabularies:
        teacher_bytes, student_bytes = token_bytes(teacher), token_bytes(student)
        by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(student_bytes):
            if b:
                by_bytes.setdefault(b, i)
        to_student = np.array([by_bytes.get(b, -1) if b else -1 for b in teacher_bytes], dtype=np.int64)
        # specials: the same token string, and the end of turn to the end of turn whatever its name
        student_ids = {t: i for i, t in enumerate(student.convert_ids_to_tokens(list(range(len(student)))))}
        for i in teacher.all_special_ids:
            to_student[i] = student_ids.get(teacher.convert_ids_to_tokens(i), -1)
        if teacher.eos_token_id is not None and student.eos_token_id is not None:
            to_student[teacher.eos_token_id] = student.eos_token_id
        return cls(teacher_bytes, student_bytes, to_student, same_vocabulary_share(teacher, student))


@dataclass(frozen=True)
class CrossTokenizer:
    """The plan of a cross-tokenizer run: its loss and the two tokenizers."""

    kind: CrossLossKind
    teacher: object  # transformers tokenizer
    student: object
    vocabularies: Vocabularies


def detect(cfg: TrainConfig, manifest: corpus.Manifest, student_tokenizer) -> CrossTokenizer | None:
    """The plan of `cfg.cross_tokenizer` for this student: None when `off` (then `check_vocabulary`
    refuses another tokenizer) or when `auto` finds the teacher's tokenizer (`cross_plan`). Raises
    ValueError for a plan over several corpora: the alignment reads one."""
    mode = cfg.cross_tokenizer
    if mode == "off":
        return None
    plan = cross_plan(cfg.corpora[0], manifest, student_tokenizer, "span" if mode == "auto" else mode,
                      cfg.teacher_tokenizer, force=mode != "auto")
    if plan is not None and len(cfg.corpora) > 1:
        raise ValueError(f"`{cfg.student}` has another tokenizer than the teacher's: a cross-tokenizer student trains "
                         f"on one corpus, got {len(cfg.corpora)} (`--corpus`)")
    return plan


def cross_plan(root: Path, manifest: corpus.Manifest, student_tokenizer, kind: CrossLossKind = "span",
               teacher_tokenizer: str | Path | None = None, force: bool = False) -> CrossTokenizer | None:
    """The plan for a student of another tokenizer than the one that wrote the corpus at `root`;
    None (unless `force`) when the student has the teacher's tokenizer: the same fingerprint, or at
    least SAME_VOCABULARY of the ids the same. Loads the teacher's tokenizer only if the fingerprints
    differ or `force`. `distill train` and `distill eval` both decide by it."""
    same_fingerprint = corpus.tokenizer_fingerprint(student_tokenizer)["tokenizer_sha256"] == manifest.teacher.tokenizer_sha256
    if not force and same_fingerprint:
        return None
    teacher = corpus.teacher_tokenizer(root, manifest, teacher_tokenizer)
    vocabularies = Vocabularies.of(teacher, student_tokenizer)
    if not force and vocabularies.same_share >= SAME_VOCABULARY:
        return None
    return CrossTokenizer(kind, teacher, student_tokenizer, vocabularies)


@dataclass(frozen=True)
class Coverage:
    """How much of the corpus the alignment could use (logged and written to the model card)."""

    records: int
    student_tokens: int
    aligned_share: float  # of the student's response tokens, inside a span
    one_to_one_share: float  # of the spans, one token each side
    mapped_topk_mass: float  # of the teacher's top-k mass at 1:1 spans, on tokens the student has

    def as_dict(self) -> dict[str, float | int]:
        return {"records": self.records, "student_tokens": self.student_tokens, "aligned_share": self.aligned_share,
                "one_to_one_share": self.one_to_one_share, "mapped_topk_mass": self.mapped_topk_mass}


def student_prompt(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def retokenise(ids: Sequence[int], spelled: list[bytes], tokenizer) -> list[int]:
    """`tokenizer`'s tokens of the text that `ids` spell (`spelled`: the bytes of each id of the
    other tokenizer), closed with its end of turn where `ids` closed with a special token (a stop)."""
    text = b"".join(spelled[i] for i in ids).decode("utf-8", errors="ignore")
    out = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    if ids and not spelled[ids[-1]] and tokenizer.eos_token_id is not None:
        out = [*out, tokenizer.eos_token_id]
    return out


def cross_record(record: dict, plan: CrossTokenizer) -> dict:
    """One corpus record -> the student's training record (`aligned_record`): the student
    re-tokenises the teacher's response text."""
    t_ids = [int(i) for i in record["response_token_ids"]]
    s_ids = retokenise(t_ids, plan.vocabularies.teacher_bytes, plan.student)
    return aligned_record(record["id"], student_prompt(plan.student, record["messages"]),
                          list(record["prompt_token_ids"]), t_ids, s_ids, record["response_logprobs"],
                          record["topk_token_ids"], record["topk_logprobs"], plan, record.get("loss_mask"))


def teacher_tokens(student_response: Sequence[int], plan: CrossTokenizer) -> list[int]:
    """The teacher's tokens of a student's answer (on-policy): its own tokenisation of the text."""
    return retokenise(student_response, plan.vocabularies.student_bytes, plan.teacher)


def aligned_record(record_id: str, prompt_ids: Sequence[int], teacher_prompt_ids: Sequence[int],
                   t_ids: Sequence[int], s_ids: Sequence[int], logprobs, topk_ids, topk_logprobs,
                   plan: CrossTokenizer, keep: Sequence[bool] | None = None) -> dict:
    """The student's training record of one answer both models tokenised: the teacher's tokens
    `t_ids` with its log-probability of each (`logprobs`) and its top-k at each, the student's
    `s_ids` of the same text. Holds `input_ids` (the student's prompt + `s_ids`), `teacher_prompt_ids`
    (for on-policy scoring), `ce_mask` (per student response token: trained by CE; `keep`, the
    curation's mask per teacher token, masks the student tokens of its spans), and per span its
    student token range, whether it is 1:1, the teacher's log-probability of its text, and the
    teacher's top-k at its first token (ids mapped to student ids, -1 where the student lacks
    the token; log-probabilities as given). Each list is a numpy array: Arrow writes those ~40x
    faster than Python lists (`write_records`)."""
    vocab = plan.vocabularies
    t_bytes = [vocab.teacher_bytes[i] for i in t_ids]
    s_bytes = [vocab.student_bytes[i] for i in s_ids]
    t0, t1, s0, s1 = align(t_bytes, s_bytes)
    if t_ids and s_ids and not t_bytes[-1] and not s_bytes[-1] and (not len(s1) or s1[-1] < len(s_ids)):
        # the two ends of turn, aligned with each other: both follow the whole text
        if (t1[-1] if len(t1) else 0) == len(t_ids) - 1 and (s1[-1] if len(s1) else 0) == len(s_ids) - 1:
            t0, t1, s0, s1 = (np.r_[a, b] for a, b in zip((t0, t1, s0, s1), (len(t_ids) - 1, len(t_ids),
                                                                               len(s_ids) - 1, len(s_ids))))
    ce_mask = np.ones(len(s_ids), dtype=bool)
    if keep is not None:  # a span trains only if every teacher token of it is kept; else CE skips its student tokens
        masked = np.r_[0, np.cumsum(~np.asarray(keep, dtype=bool))]
        whole = masked[t1] == masked[t0]
        edges = np.zeros(len(s_ids) + 1, dtype=np.int64)
        np.add.at(edges, s0[~whole], 1)
        np.add.at(edges, s1[~whole], -1)
        ce_mask = np.cumsum(edges[:-1]) == 0
        t0, t1, s0, s1 = t0[whole], t1[whole], s0[whole], s1[whole]
    logprobs = np.asarray(logprobs, dtype=np.float64)
    topk_ids = np.asarray(topk_ids, dtype=np.int64).reshape(len(t_ids), -1)
    topk_lps = np.asarray(topk_logprobs, dtype=np.float32).reshape(len(t_ids), -1)
    # each span's sum, left to right: [t0, t1) segments interleaved with the gaps between them (padded
    # so that an end at the last token is a valid index)
    sums = np.add.reduceat(np.r_[logprobs, 0.0], np.stack([t0, t1]).T.reshape(-1))[::2] if len(t0) \
        else np.zeros(0, dtype=np.float64)
    return {  # in CROSS_SCHEMA's types
        "id": record_id,
        "input_ids": np.concatenate([np.asarray(prompt_ids, dtype=np.int32), np.asarray(s_ids, dtype=np.int32)]),
        "teacher_prompt_ids": np.asarray(teacher_prompt_ids, dtype=np.int32),
        "response_length": len(s_ids),
        "ce_mask": ce_mask,
        "span_start": s0.astype(np.int32),
        "span_end": s1.astype(np.int32),
        "span_one_to_one": (t1 - t0 == 1) & (s1 - s0 == 1),
        "span_teacher_logprob": sums,
        "span_topk_ids": vocab.to_student[topk_ids[t0]].reshape(-1).astype(np.int32),
        "span_topk_logprobs": topk_lps[t0].reshape(-1),
        "span_teacher_top1": topk_ids[t0, 0].astype(np.int32),  # the teacher's own id (eval's agreement)
        "span_topk_first_byte": vocab.teacher_first_byte[topk_ids[t0]].reshape(-1).astype(np.int16),
    }


# What `cross_record` reads of a corpus record.
CROSS_COLUMNS = ("id", "messages", "prompt_token_ids", "response_token_ids", "response_logprobs", "topk_token_ids",
                 "topk_logprobs", "loss_mask")
# The student's training records as the training file stores them (`aligned_record`'s keys).
# Token ids and positions fit int32, a first byte (256: none) int16, and the top-k log-probabilities
# are the corpus's float32: the span top-k columns are most of a record (k per span), so their widths
# set the file's size (corpus_scale.py's records: 50.9 KB each at int64 / float64, 22.0 KB so).
_ids, _bools = pa.list_(pa.int32()), pa.list_(pa.bool_())
CROSS_SCHEMA = pa.schema([
    ("id", pa.string()), ("input_ids", _ids), ("teacher_prompt_ids", _ids), ("response_length", pa.int64()),
    ("ce_mask", _bools), ("span_start", _ids), ("span_end", _ids), ("span_one_to_one", _bools),
    ("span_teacher_logprob", pa.list_(pa.float64())), ("span_topk_ids", _ids),
    ("span_topk_logprobs", pa.list_(pa.float32())), ("span_teacher_top1", _ids),
    ("span_topk_first_byte", pa.list_(pa.int16()))])


class CoverageTally:
    """`Coverage` added up over the student's records as `cross_record` makes them; `kept`: those
    that went into training."""

    def __init__(self):
        self.records = self.tokens = self.aligned = self.spans = self.one_to_one = self.kept = 0
        self.mapped = self.topk_mass = 0.0

    def add(self, r: dict) -> dict:
        self.records += 1
        self.tokens += r["response_length"]
        self.aligned += int((r["span_end"] - r["span_start"]).sum())
        self.spans += len(r["span_start"])
        k = len(r["span_topk_ids"]) // max(len(r["span_start"]), 1)
        ids = np.asarray(r["span_topk_ids"]).reshape(-1, k) if k else np.zeros((0, 0))
        probs = np.exp(np.asarray(r["span_topk_logprobs"], dtype=np.float64)).reshape(-1, k) if k else np.zeros((0, 0))
        rows = np.asarray(r["span_one_to_one"], dtype=bool)
        self.one_to_one += int(rows.sum())
        self.mapped += float((probs[rows] * (ids[rows] >= 0)).sum())
        self.topk_mass += float(probs[rows].sum())
        return r

    def __iadd__(self, other: CoverageTally) -> CoverageTally:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self

    def coverage(self) -> Coverage:
        return Coverage(self.records, self.tokens, self.aligned / max(self.tokens, 1), self.one_to_one / max(self.spans, 1),
                        self.mapped / self.topk_mass if self.topk_mass else 0.0)


def cross_records(records: Iterable[dict], plan: CrossTokenizer) -> tuple[list[dict], Coverage]:
    tally = CoverageTally()
    out = [tally.add(cross_record(record, plan)) for record in records]
    return out, tally.coverage()


def cross_training_data(root: Path, plan: CrossTokenizer, max_length: int, scratch: Path,
                        workers: int | None = None) -> tuple[TrainingData, Coverage]:
    """The corpus, validated, as the student's training records (memory-mapped from Arrow files in
    `scratch`, each written a batch at a time: memory does not grow with the corpus), and their
    `Coverage`. It replaces `prepare_training_data` (whose file of the teacher's ids such a run
    would never read): records whose student prompt fills `max_length` are left out and counted.
    The shards are checked and aligned by `workers` processes in parallel (the alignment is a pass
    over every record, ~0.8 ms each on one core); None: `corpus.default_workers` over the CPUs of
    this training process, none on one. Raises `CorpusError` if the corpus is invalid."""
    import datasets

    columns = [c for c in CROSS_COLUMNS if c != "loss_mask" or c in _column_names(root)]
    paths = corpus.shard_paths(root)
    parts = [scratch / f"cross-{corpus.shard_index(path):05d}.arrow" for path in paths]
    scratch.mkdir(parents=True, exist_ok=True)
    records = corpus.read_manifest(root).stats.records
    if workers is None:
        cpus = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: each rank aligns
        # one worker would only add its start-up: the training process waits for the alignment
        workers = corpus.default_workers(records, cpus) if cpus > 1 else 0
    jobs = (paths, parts, itertools.repeat(plan), itertools.repeat(columns), itertools.repeat(max_length))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers \
            else contextlib.nullcontext() as pool:
        map_shards = pool.map if pool else map
        corpus.check_records(root, trust_stamps=True, map_shards=map_shards)
        tallies = []
        # minutes at a million records: a bar with the rate, a shard at a time
        with tqdm(total=records, unit="rec", desc="align", file=sys.stderr, dynamic_ncols=True) as bar:
            for shard in map_shards(_align_shard, *jobs):
                tallies.append(shard)
                bar.update(shard.records)
    tally = CoverageTally()
    for t in tallies:
        tally += t
    if not tally.kept:
        raise ValueError(f"`{root}` holds no record to train on: every student prompt fills max_length {max_length}")
    dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(str(part))
                                             for part, t in zip(parts, tallies) if t.kept])
    # no vocabulary check: the student's tokenizer wrote every id
    return TrainingData(dataset, tally.records, tally.records - tally.kept, None), tally.coverage()


def _align_shard(path: Path, out: Path, plan: CrossTokenizer, columns: list[str], max_length: int) -> CoverageTally:
    """One shard's student records into the Arrow file `out` (none if no record fits)."""
    tally = CoverageTally()

    def trainable() -> Iterator[dict]:
        for batch in corpus.shard_batches(path, columns):
            for record in corpus.records_of(batch, topk_as_arrays=True):
                r = tally.add(cross_record(record, plan))
                if len(r["input_ids"]) - r["response_length"] < max_length:
                    tally.kept += 1
                    yield r

    write_records(trainable(), out, CROSS_SCHEMA)
    return tally


def _column_names(root: Path) -> set[str]:
    import pyarrow.parquet as pq

    paths = corpus.shard_paths(root)
    return set(pq.read_schema(paths[0]).names) if paths else set()


@dataclass
class CrossCollator:
    """Student training records -> `input_ids`, `attention_mask`, `labels` (the student token each
    position predicts, -100 where none is trained), `target_mask`; per position `span_index`
    (the batch's span whose *first* student token it predicts, else -1) and `span_of` (the span
    whose any token it predicts, else -1); per span `span_one_to_one [S]`, `span_teacher_logprob [S]`,
    `span_topk_ids [S, K]` (student ids, -1: the student lacks the token), `span_topk_logprobs [S, K]`,
    `span_topk_first_byte [S, K]` (the first byte each teacher top-k token spells, 256: none) and
    `span_teacher_top1 [S]` (the teacher's id of its top-1); `student_first_byte [V]`, the same
    for each student token; and for on-policy sampling `prompt_lengths [B]` (the student's prompt:
    `input_ids[i, :prompt_lengths[i]]`) and the teacher's prompt, `teacher_prompt_ids [B, P]`
    (-1 past `teacher_prompt_lengths [B]`)."""

    pad_token_id: int
    max_length: int
    top_k: int
    student_first_byte: np.ndarray  # `Vocabularies.first_bytes` of the student's tokens

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        length = min(self.max_length, max(len(r["input_ids"]) for r in records))
        b = len(records)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), -100, dtype=torch.long)
        span_index = torch.full((b, length), -1, dtype=torch.long)
        span_of = torch.full((b, length), -1, dtype=torch.long)
        one_to_one, teacher_lp, topk_ids, topk_lps, top1, first_byte = [], [], [], [], [], []  # per record
        spans = 0  # of the batch so far
        prompt_lengths = [len(r["input_ids"]) - r["response_length"] for r in records]
        teacher_prompt_lengths = [len(r["teacher_prompt_ids"]) for r in records]
        teacher_prompts = torch.full((b, max(teacher_prompt_lengths)), -1, dtype=torch.long)
        for i, r in enumerate(records):
            teacher_prompts[i, :teacher_prompt_lengths[i]] = torch.tensor(r["teacher_prompt_ids"], dtype=torch.long)
            seq = list(r["input_ids"])[:length]
            p = prompt_lengths[i]
            n = len(seq) - p  # student response tokens kept after truncation
            input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention[i, :len(seq)] = 1
            ce = torch.tensor(list(r["ce_mask"])[:n], dtype=torch.bool)
            row = labels[i, p - 1:p - 1 + n]
            row[ce] = torch.tensor(seq[p:], dtype=torch.long)[ce]
            start, end = np.asarray(r["span_start"], dtype=np.int64), np.asarray(r["span_end"], dtype=np.int64)
            kept = int(np.searchsorted(end, n, side="right"))  # the spans in order: those after are cut by truncation
            start, end, first = start[:kept], end[:kept], spans
            spans += kept
            index = np.arange(first, spans)
            span_index[i, p - 1 + start] = torch.from_numpy(index)
            width = end - start  # each span's positions, p - 1 + start .. p - 1 + end
            span_of[i, np.repeat(p - 1 + start - np.cumsum(width) + width, width) + np.arange(width.sum())] = \
                torch.from_numpy(np.repeat(index, width))
            one_to_one.append(np.asarray(r["span_one_to_one"][:kept], dtype=bool))
            teacher_lp.append(np.asarray(r["span_teacher_logprob"][:kept], dtype=np.float32))
            topk_ids.append(np.asarray(r["span_topk_ids"], dtype=np.int64).reshape(-1, self.top_k)[:kept])
            topk_lps.append(np.asarray(r["span_topk_logprobs"], dtype=np.float32).reshape(-1, self.top_k)[:kept])
            top1.append(np.asarray(r["span_teacher_top1"][:kept], dtype=np.int64))
            first_byte.append(np.asarray(r["span_topk_first_byte"], dtype=np.int64).reshape(-1, self.top_k)[:kept])
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "target_mask": labels >= 0,
                "span_index": span_index, "span_of": span_of,
                **{name: torch.from_numpy(np.concatenate(parts)) for name, parts in (
                    ("span_one_to_one", one_to_one), ("span_teacher_logprob", teacher_lp), ("span_topk_ids", topk_ids),
                    ("span_topk_logprobs", topk_lps), ("span_teacher_top1", top1), ("span_topk_first_byte", first_byte))},
                "student_first_byte": torch.as_tensor(self.student_first_byte, dtype=torch.long),
                "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long),
                "teacher_prompt_ids": teacher_prompts,
                "teacher_prompt_lengths": torch.tensor(teacher_prompt_lengths, dtype=torch.long)}
