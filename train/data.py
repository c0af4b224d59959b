"""The corpus as training data: read once before step 1, checked against the student, and
turned into tensors aligned for next-token prediction.

`prepare_training_data` is the one pass over the shards before training: each record batch is
validated, its largest token id taken and its records that cannot train dropped (and counted),
all on Arrow columns, and the kept records are written once to an Arrow file that the training
dataset memory-maps. The top-k is never decoded there where it can be helped: a shard whose
validation stamp vouches for its top-k is read without decoding it (`corpus.checked_batches`),
the file keeps the top-k as the shards store it, and the dataset decodes the rows each training
batch reads (`DecodedTopk`). Decoding a 1M-record corpus's top-k before step 1 took minutes;
the records a batch reads take milliseconds. `check_vocabulary` refuses a student that does not
share the teacher's vocabulary on the ids the corpus uses.

The student trains on `prompt_token_ids + response_token_ids` exactly as stored (never
re-tokenised); where the corpus holds a student view (`student_prompt_token_ids`, context
distillation) that is the prompt instead: the teacher's answer and top-k, conditioned on the full
prompt, become the targets of the shorter one. Position t of the sequence predicts token t + 1, so response token j (at
index P + j) is predicted at position P + j - 1, and that position carries the teacher's top-k
row j. Truncation to `max_length` cuts tokens and top-k rows together, and `loss_mask` from
curation removes positions from every loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from distill import corpus
from distill.read_ahead import read_ahead
from distill.train.losses import PAD_LOGPROB

# What the collator reads of a record (`loss_mask` only in curated corpora), the top-k decoded or
# as quantized shards store it: the rest of the corpus (messages, texts, sampled logprobs) never
# enters the training dataset.
TRAINING_COLUMNS = ("id", "prompt_token_ids", "response_token_ids", "topk_token_ids", "topk_logprobs",
                    corpus.PACKED_IDS, corpus.LOGPROB_CODES, "loss_mask")
# Added to the training records when several corpora train together (train/corpora.py): the
# index of the corpus a record came from, which on-policy routing sends its prompt's samples by.
TEACHER_COLUMN = "teacher"


def trainable(record: dict, max_length: int) -> bool:
    """A record keeps at least one target after truncation iff its prompt leaves room."""
    return len(record["prompt_token_ids"]) < max_length


@dataclass(frozen=True)
class TrainingData:
    dataset: Any  # `datasets.Dataset` of the kept records' TRAINING_COLUMNS (top-k decoded as rows are read), memory-mapped
    records: int  # in the corpus
    skipped: int  # records whose prompt fills `max_length` (not in `dataset`)
    # the largest token id in the corpus (prompts, responses, top-k), or an upper bound, for
    # `check_vocabulary`; None: the student's own tokenizer wrote every id (a cross-tokenizer run)
    max_token_id: int | None


@dataclass(frozen=True)
class DecodedTopk:
    """The training dataset's transform where its file keeps the top-k as the shards store it:
    each batch of rows read gets its logical `topk_token_ids` / `topk_logprobs` (`corpus.decode`
    of their stored bytes, `encoding` the shards'), so the collators see decoded records. Equal
    for equal encodings: `datasets` keeps it on datasets concatenated from several corpora."""

    encoding: dict

    def __call__(self, rows: dict[str, list]) -> dict[str, list]:
        table = self.stored(rows)
        if table is None:  # a query of other columns
            return rows
        # each record's rows as one [T, k] array: nested Python lists were a float object per
        # entry, most of a batch's cost (benchmarks/train_batches.py)
        return {**rows, **corpus.topk_arrays(corpus.decode(table, self.encoding))}

    def stored(self, rows: dict[str, list]) -> pa.Table | None:
        """The batch's stored top-k (taken out of `rows`) with the columns its decoding reads (layouts
        3 and 4: the response tokens), as a table for `corpus.decode`; None where `rows` lack them."""
        inputs = corpus.decode_inputs(self.encoding)
        if not all(c in rows for c in inputs):
            return None
        stored = corpus.stored_topk_columns(self.encoding)
        return pa.table({"id": rows["id"], **{c: pa.array(rows.pop(c), pa.large_binary()) for c in stored},
                         **{c: rows[c] for c in inputs if c not in stored}})


def kept_topk_encoding(roots: Sequence[Path]) -> dict | None:
    """The quantized encoding every shard of these corpora (trained together) shares, whose stored
    top-k the training file keeps (`DecodedTopk` decodes it as rows are read); None where they do
    not share one (another encoding, or quantized shards of several layouts or k): the pre-pass then
    decodes the top-k, and the file holds it decoded. Reads each shard's footer; an unreadable one
    gives None (the validator then names it)."""
    encodings = []
    try:
        for root in roots:
            encodings += [corpus.shard_encoding(pq.read_schema(path)) for path in corpus.shard_paths(root)]
    except (*corpus.READ_ERRORS, corpus.CorpusError):
        return None
    if not encodings or encodings[0]["encoding"] != "quantized" or any(e != encodings[0] for e in encodings):
        return None
    return encodings[0]


def prepare_training_data(root: Path, max_length: int, scratch: Path,
                          trained_with: Sequence[Path] = ()) -> TrainingData:
    """Read the corpus once (see the module's docstring); the Arrow file goes into `scratch`,
    which the caller removes after training. `trained_with`: the other corpora trained together
    (their datasets are concatenated: all keep their top-k stored, or none). Raises `CorpusError`
    if the corpus is invalid."""
    encoding = kept_topk_encoding([root, *trained_with])

    def batches() -> Iterator[tuple[pa.RecordBatch, int]]:
        for checked in corpus.checked_batches(root, trust_stamps=True):
            batch = checked.stored if encoding is not None else checked.decoded()
            yield corpus.as_student_view(batch), checked.max_topk_id

    # the next batches are read and checked while this one is written (read_ahead's thread)
    data = write_training_data(read_ahead(batches()), root, max_length, scratch)
    if encoding is None:
        return data
    return TrainingData(data.dataset.with_transform(DecodedTopk(encoding)), data.records, data.skipped,
                        data.max_token_id)


def write_training_data(batches: Iterable[tuple[pa.RecordBatch | pa.Table, int]], source: Path, max_length: int,
                        scratch: Path) -> TrainingData:
    """Record batches, each with the largest top-k id it holds (0: none; or an upper bound of it)
    -> `TrainingData`: each batch's largest token id taken, its records that cannot train dropped
    and counted (`trainable`'s rule, on columns), the kept ones written to one Arrow file in
    `scratch` that the dataset memory-maps, with their top-k as the batches hold it. `source`
    names the data in the error when no record is left."""
    import datasets

    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "records.arrow"
    writer, schema, records, kept, max_token_id = None, None, 0, 0, 0
    try:
        for batch, max_topk_id in batches:
            max_token_id = max(max_token_id, max_topk_id)
            for column in ("prompt_token_ids", "response_token_ids"):
                if column in batch.schema.names:
                    max_token_id = max(max_token_id, pc.max(corpus.leaves(batch.column(column))).as_py() or 0)
            # `trainable`'s rule on the whole batch: the prompt leaves room for a target
            room = pc.less(pc.list_value_length(batch.column("prompt_token_ids")), max_length)
            rows = batch.select([c for c in TRAINING_COLUMNS if c in batch.schema.names]).filter(room)
            if writer is None:
                schema = rows.schema
                writer = pa.ipc.new_stream(path, schema)
            writer.write(rows if rows.schema.equals(schema) else rows.cast(schema))  # e.g. `element` vs `item`
            records, kept = records + batch.num_rows, kept + rows.num_rows
    finally:
        if writer is not None:
            writer.close()
    if not kept:
        raise ValueError(f"`{source}` holds no record to train on: " + (
            f"the prompts of all {records:,} fill max_length {max_length}" if records else "it is empty"))
    return TrainingData(datasets.Dataset.from_file(str(path)), records, records - kept, max_token_id)


def write_records(records: Iterable[dict], path: Path, schema: pa.Schema | None = None, batch: int = 512) -> int:
    """Training records (dicts) -> the Arrow file `path` (for `datasets.Dataset.from_file`, which
    memory-maps it), written `batch` records at a time: memory stays at one batch, whatever the
    corpus's size. `schema`: the file's (else the first batch's). Returns the records written; no
    file when there is none."""
    writer, records, written = None, iter(records), 0
    try:
        while rows := list(itertools.islice(records, batch)):
            table = pa.Table.from_pylist(rows, schema=schema)
            if writer is None:
                schema = table.schema
                writer = pa.ipc.new_stream(path, schema)
            writer.write_table(table)
            written += len(rows)
    finally:
        if writer is not None:
            writer.close()
    return written


def check_vocabulary(manifest: corpus.Manifest, student_tokenizer, embedding_rows: int, max_teacher_id: int) -> None:
    """Refuse a student whose vocabulary differs from the teacher's on the ids the corpus uses
    (`max_teacher_id`: the largest; where it comes from the stamps of curated shards, an upper
    bound of it, the largest of the shards they were taken from)."""
    if max_teacher_id >= embedding_rows:
        raise ValueError(f"the corpus uses token id {max_teacher_id} but the student has {embedding_rows} embeddings")
    if corpus.tokenizer_fingerprint(student_tokenizer)["tokenizer_sha256"] == manifest.teacher.tokenizer_sha256:
        return
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(manifest.teacher.model)
    ids = range(min(max_teacher_id + 1, len(teacher)))
    theirs, ours = teacher.convert_ids_to_tokens(list(ids)), student_tokenizer.convert_ids_to_tokens(list(ids))
    diff = [(i, a, b) for i, a, b in zip(ids, theirs, ours) if a != b]
    if diff:
        shown = ", ".join(f"id {i}: teacher {a!r} vs student {b!r}" for i, a, b in diff[:3])
        raise ValueError(f"student and teacher vocabularies differ on {len(diff)} of the corpus's ids ({shown}); "
                         "pass `--cross-tokenizer span` to distil across tokenizers, or use a student of the teacher's tokenizer")


@dataclass
class DistillCollator:
    """Batch of corpus records -> `input_ids`, `attention_mask [B, L]`, `labels [B, L]` (the
    token each position predicts, -100 where nothing is learned), `target_mask [B, L]`,
    `topk_ids [B, L, K]`, `topk_logprobs [B, L, K]` (zeros where `target_mask` is False), and
    `prompt_lengths [B]` (on-policy training samples continuations of `input_ids[i, :prompt_lengths[i]]`).
    A record of fewer than `top_k` ids per row (corpora of different k) fills the rest with
    `PAD_LOGPROB` slots, which the losses count as probability 0. `teachers` > 0: the records' rows
    carry a teacher dimension (`ensemble: sum`), `topk_* [B, L, teachers, K]`. Records of several
    corpora also give `teacher [B]`, the index of each one's corpus."""

    pad_token_id: int
    max_length: int
    top_k: int
    teachers: int = 0

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        seqs = [list(r["prompt_token_ids"]) + list(r["response_token_ids"]) for r in records]
        for r, s in zip(records, seqs):
            if not trainable(r, self.max_length):
                raise ValueError(f"record {r['id']!r}: prompt of {len(r['prompt_token_ids'])} tokens leaves no room "
                                 f"for the response within max_length {self.max_length}; filter with `trainable`")
        length = min(self.max_length, max(len(s) for s in seqs))
        b, k = len(records), self.top_k
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), -100, dtype=torch.long)
        target = torch.zeros((b, length), dtype=torch.bool)
        per_row = (self.teachers, k) if self.teachers else (k,)
        topk_ids = torch.zeros((b, length, *per_row), dtype=torch.long)
        topk_lps = torch.zeros((b, length, *per_row), dtype=torch.float32)
        for i, (r, seq) in enumerate(zip(records, seqs)):
            seq = seq[:length]
            p = len(r["prompt_token_ids"])
            n = len(seq) - p  # response tokens kept after truncation
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
            rows = slice(p - 1, p - 1 + n)  # positions predicting response tokens 0..n-1
            labels[i, rows] = torch.tensor(seq[p:])
            keep = torch.tensor(r["loss_mask"][:n], dtype=torch.bool) if r.get("loss_mask") is not None \
                else torch.ones(n, dtype=torch.bool)
            target[i, rows] = keep
            if n == 0 or k == 0:  # k 0: no stored top-k (a chat dataset: the online teacher gives the targets)
                continue
            ids = torch.as_tensor(np.asarray(r["topk_token_ids"][:n], dtype=np.int64)).reshape(n, *per_row[:-1], -1)
            width = ids.shape[-1]
            if width > k:
                raise ValueError(f"record {r['id']!r}: {width} top-k ids per position, more than the {k} of the corpora")
            topk_lps[i, rows] = PAD_LOGPROB  # the slots beyond this record's k
            topk_ids[i, rows, ..., :width] = ids
            topk_lps[i, rows, ..., :width] = torch.as_tensor(np.asarray(r["topk_logprobs"][:n], dtype=np.float32)).reshape(ids.shape)
        labels[~target] = -100
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "target_mask": target,
                 "topk_ids": topk_ids, "topk_logprobs": topk_lps,
                 "prompt_lengths": torch.tensor([len(r["prompt_token_ids"]) for r in records], dtype=torch.long)}
        if all(TEACHER_COLUMN in r for r in records):
            batch[TEACHER_COLUMN] = torch.tensor([r[TEACHER_COLUMN] for r in records], dtype=torch.long)
        return batch
