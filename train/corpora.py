"""Several corpora as one training set (docs/recipes/multi-teacher.md).

- Routing (several `--corpus`, no `ensemble`): corpora of different prompts, each answered by its
  own teacher (a code expert's corpus, a chat expert's). Every record keeps its own teacher's
  top-k, so its KD term is against that teacher; the records gain a `teacher` column (the index
  of their corpus) that on-policy training routes samples by (`train/routed_teachers.py`).
  Corpora of different k are padded to the largest k with `PAD_LOGPROB` slots. `mix` resamples
  each corpus to a share of the training set.
- Ensemble (`ensemble: mixture | sum`): corpora of the same records (`distill score --corpus`
  writes a second teacher's top-k along the first one's responses), combined per record by
  `train/ensemble.py`. Records must match by id and tokens, in order.

All corpora must share one tokenizer (the student reads every record's token ids as they are).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from distill import corpus
from distill.config import TrainConfig
from distill.train.chat_data import chat_manifest, chat_training_data, check_chat_datasets, is_chat_dataset
from distill.train.data import TrainingData, prepare_training_data, write_records
from distill.train.ensemble import mixture_rows, stacked_rows


def read_manifests(cfg: TrainConfig) -> list[corpus.Manifest]:
    """Every corpus's manifest, complete (or accepted incomplete), all of one tokenizer (a chat
    dataset's stands in for it: `chat_data.chat_manifest`)."""
    check_chat_datasets(cfg)
    if is_chat_dataset(cfg.corpora[0]):
        return [chat_manifest(cfg.corpora[0], cfg)]
    manifests = []
    for path in cfg.corpora:
        manifest = corpus.read_manifest(path)
        corpus.check_complete(path, manifest, cfg.allow_incomplete)
        manifests.append(manifest)
    first = manifests[0].teacher
    for path, manifest in zip(cfg.corpora[1:], manifests[1:]):
        if manifest.teacher.tokenizer_sha256 != first.tokenizer_sha256:
            raise ValueError(f"`{path}` was made by `{manifest.teacher.model}`, whose tokenizer differs from that of "
                             f"`{first.model}` (`{cfg.corpora[0]}`): corpora trained together must share one tokenizer")
    return manifests


def top_k_width(cfg: TrainConfig, manifests: list[corpus.Manifest]) -> tuple[int, int]:
    """(K, M): the collator's top-k width and teacher dimension (0: none) for these corpora (a chat
    dataset stores no top-k: K = 0)."""
    if is_chat_dataset(cfg.corpora[0]):
        return 0, 0
    ks = [m.generation.top_k for m in manifests]
    if cfg.ensemble == "mixture":
        return sum(ks), 0
    if cfg.ensemble == "sum":
        return max(ks), len(ks)
    return max(ks), 0


def prepare(cfg: TrainConfig, manifests: list[corpus.Manifest], scratch: Path) -> TrainingData:
    """The training records of all corpora (one corpus: `prepare_training_data` as it is, plus the
    `teacher` column; a chat dataset: `chat_data.chat_training_data`)."""
    if is_chat_dataset(cfg.corpora[0]):
        return chat_training_data(cfg.corpora[0], cfg, scratch / "corpus-0")
    parts = [prepare_training_data(path, cfg.max_length, scratch / f"corpus-{i}",
                                   trained_with=[p for p in cfg.corpora if p != path]) for i, path in enumerate(cfg.corpora)]
    records, skipped = sum(p.records for p in parts), sum(p.skipped for p in parts)
    max_token_id = max(p.max_token_id for p in parts)
    if cfg.ensemble:
        dataset = _ensemble(cfg, [p.dataset for p in parts], scratch)
        return TrainingData(dataset, parts[0].records, parts[0].skipped, max_token_id)
    datasets_ = [_with_teacher(p.dataset, i) for i, p in enumerate(parts)]
    if cfg.mix:
        datasets_ = _resampled(datasets_, [cfg.mix_weights()[n] for n in cfg.corpus_names()], cfg.seed)
    return TrainingData(_concatenate(datasets_), records, skipped, max_token_id)


def _with_teacher(dataset, index: int):
    # a numpy column: a Python list of 1M ints took ~6 s of a 1M-record start-up
    return dataset.add_column("teacher", np.full(len(dataset), index, dtype=np.int64))


def _concatenate(parts: list):
    import datasets

    if len(parts) == 1:
        return parts[0]
    # curated corpora carry `loss_mask`, others not: there every position learns, as without one
    if any("loss_mask" in p.column_names for p in parts):
        parts = [p if "loss_mask" in p.column_names else p.add_column(
            "loss_mask", [[True] * len(r) for r in p["response_token_ids"]]) for p in parts]
    features = parts[0].features
    return datasets.concatenate_datasets([p.cast(features) if p.features != features else p for p in parts])


def _resampled(parts: list, weights: list[float], seed: int) -> list:
    """Each corpus drawn to its share of a training set as large as all corpora together: whole
    passes over a corpus, then a seeded sample without replacement for the rest."""
    total, rng = sum(len(p) for p in parts), np.random.default_rng(seed)
    out = []
    for part, weight in zip(parts, weights):
        want = round(total * weight / sum(weights))
        passes, rest = divmod(want, len(part))
        indices = np.concatenate([np.arange(len(part))] * passes + [rng.choice(len(part), rest, replace=False)])
        if len(indices):
            out.append(part.select(indices.astype(np.int64)))
    return out


def _ensemble(cfg: TrainConfig, parts: list, scratch: Path):
    """One record per response with the teachers' rows combined (`ensemble.mixture_rows` or
    `stacked_rows`). Raises ValueError naming the first record the corpora disagree on."""
    import datasets

    names, weights = cfg.corpora, cfg.normalised_teacher_weights()
    first = parts[0]
    for path, part in zip(names[1:], parts[1:]):
        if len(part) != len(first):
            raise ValueError(f"`{path}` holds {len(part):,} trainable records and `{names[0]}` {len(first):,}: an "
                             "ensemble needs the same records in each corpus (make them with `distill score --corpus`)")

    def records() -> Iterator[dict]:
        columns = ("prompt_token_ids", "response_token_ids")
        for i in range(len(first)):
            rows = [part[i] for part in parts]
            for path, row in zip(names[1:], rows[1:]):
                if row["id"] != rows[0]["id"] or any(row[c] != rows[0][c] for c in columns):
                    raise ValueError(f"`{path}` record {i} ({row['id']!r}) is not `{names[0]}`'s record {rows[0]['id']!r} "
                                     "with the same tokens: an ensemble needs aligned corpora (`distill score --corpus`)")
            ids = [np.asarray(r["topk_token_ids"], dtype=np.int64).reshape(len(r["response_token_ids"]), -1) for r in rows]
            lps = [np.asarray(r["topk_logprobs"], dtype=np.float64).reshape(ids[m].shape) for m, r in enumerate(rows)]
            top_ids, top_lps = mixture_rows(ids, lps, weights) if cfg.ensemble == "mixture" else stacked_rows(ids, lps)
            yield {**{k: v for k, v in rows[0].items() if k not in ("topk_token_ids", "topk_logprobs")},
                   "topk_token_ids": top_ids.tolist(), "topk_logprobs": top_lps.astype(np.float32).tolist(), "teacher": 0}

    path = scratch / "ensemble.arrow"
    write_records(records(), path)
    return datasets.Dataset.from_file(str(path))
