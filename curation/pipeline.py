"""`curate()`: a corpus in, a corpus of kept records out, plus every rejected record with its
reason. Streams shard by shard, batch by batch, reading only the columns the filters read (each
declares them: `Filter.reads`); kept and rejected rows are then taken from the stored shard with
Arrow and written by the worker processes (or a writer thread) while the next shard is filtered.
Each filter sees only the records that every filter before it kept, so a record failing several
filters is charged to the first."""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError
from tqdm import tqdm

from distill import corpus, files
from distill.config import CurateConfig
from distill.curation import (  # noqa: F401 (registry)
    confidence,
    contamination,
    dedup,
    language,
    pii,
    quality,
    refusal,
    workers,
)
from distill.curation.base import Filter
from distill.curation.report import Report
from distill.plugins import PluginError, load_callable

DEFAULT_PIPELINE = ["finish_reason", "length", "repetition", "refusal", "pii", "dedup_exact", "dedup_near",
                    "teacher_confidence"]


class PluginFilter(Filter):
    """A user filter `module:callable(record, **params)`: falsy or None keeps the record, a
    string (the reason) or False rejects it. It sees the whole record as a dict."""
    remembers = True  # a plug-in may keep state: it sees the records in corpus order
    label: str
    plugin: str
    params: dict[str, Any] = {}

    def model_post_init(self, _):
        self._fn = load_callable(self.plugin, "plugin")

    def settings(self) -> dict[str, Any]:
        return {"name": self.label, "plugin": self.plugin, "params": self.params}

    def reads(self) -> None:
        return None  # the whole record

    def check_batch(self, batch, rows):
        records = batch.to_pylist()
        failed = {}
        for i in rows:
            try:
                verdict = self._fn(records[i], **self.params)
            except Exception as e:
                raise PluginError(f"plug-in `{self.label}` ({self.plugin}) failed on record "
                                   f"{records[i]['id']!r}: {type(e).__name__}: {e}") from e
            if verdict is False or isinstance(verdict, str):
                failed[i] = verdict or "rejected"
        return failed


def label(f: Filter) -> str:
    """What `reject_reason` and the report call a filter: its `name`; a plug-in's YAML `name`,
    else its `module:callable`."""
    return f.label if isinstance(f, PluginFilter) else f.name


def build_filters(specs: list[dict[str, Any] | str] | None) -> list[Filter]:
    """Filters from the `filters` list of the config; errors name the YAML key."""
    filters = []
    for i, spec in enumerate(DEFAULT_PIPELINE if specs is None else specs):
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        where = f"filters[{i}]"
        try:
            if "plugin" in spec:
                load_callable(spec["plugin"], f"{where}.plugin")  # its error names the YAML key
                filters.append(PluginFilter(label=spec.pop("name", spec["plugin"]), **spec))
                continue
            name = spec.pop("name", None)
            if name not in Filter.registry:
                known = ", ".join(sorted(n for n in Filter.registry if n))
                raise ValueError(f"`{where}.name`: unknown filter {name!r} (known: {known}; or `plugin: module:callable`)")
            filters.append(Filter.registry[name](**spec))
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"`{where}.{'.'.join(map(str, err['loc']))}`: {err['msg']}") from None
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith("`filters[") else f"`{where}`: {e}") from None
    names = [label(f) for f in filters]
    if len(set(names)) != len(names):
        raise ValueError(f"`filters`: each filter may appear once, got {names}")
    return filters


@dataclass(frozen=True)
class CurateResult:
    path: Path  # the curated corpus: kept records in data/, rejected ones with their reason in rejected/
    kept: int
    rejected: int
    rejected_by_filter: dict[str, int]  # filter label -> records it dropped (each charged to the first)

    @property
    def kept_percent(self) -> float:
        return round(100.0 * self.kept / max(self.kept + self.rejected, 1), 2)


def curate(cfg: CurateConfig) -> CurateResult:
    out = Path(cfg.out)
    if out.resolve() == Path(cfg.corpus).resolve():
        raise ValueError(f"`out` must differ from `corpus` (`{out}`): curation writes a new corpus")
    with files.exclusive(out):
        return _curate(cfg, out)


def _curate(cfg: CurateConfig, out: Path) -> CurateResult:
    filters = build_filters(cfg.filters)
    manifest = corpus.read_manifest(cfg.corpus)
    files.check_not_being_written(cfg.corpus, "corpus")  # else it would look like an interrupted corpus
    corpus.check_complete(cfg.corpus, manifest, cfg.allow_incomplete)
    for f in filters:
        f.reserve(manifest.stats.records)
    masker = next((f for f in filters if isinstance(f, pii.PIIFilter) and f.mode == "mask"), None)
    # one per CPU: the curating process's share (matching, the report) is the lighter one; on 2 CPUs,
    # 2 workers curated 1M records in 189 s, 1 worker in 252 s
    n_workers = corpus.default_workers(manifest.stats.records, os.cpu_count()) if cfg.workers is None else cfg.workers
    ahead = workers.Ahead(filters, masker, cfg.corpus, cfg.batch_size, n_workers) \
        if n_workers and workers.offloaded(filters) else None
    try:
        return _curate_checked(cfg, out, filters, manifest, masker, ahead)
    finally:
        if ahead:
            ahead.close()


def _curate_checked(cfg: CurateConfig, out: Path, filters: list[Filter], manifest: corpus.Manifest, masker,
                    ahead: workers.Ahead | None) -> CurateResult:
    start = time.time()
    # refuse a broken corpus with the reason, before any work (the workers check shards in
    # parallel); a shard whose stamp vouches for its top-k is checked without decoding it
    # (docs/corpus-format.md, the validation stamp)
    max_topk_id = corpus.check_records(cfg.corpus, trust_stamps=True, map_shards=ahead.map if ahead else map)
    if not (cfg.overwrite or files.is_empty(out) or _interrupted_curation(out)):
        raise FileExistsError(f"`{out}` holds a finished corpus or other files: choose another `out` or pass `--overwrite`")
    files.clear_dir(out)  # curation has nothing to resume: an interrupted one starts over
    decode = decoder(manifest) if masker else None
    report = Report([label(f) for f in filters])
    columns = columns_read(filters)
    paths = corpus.shard_paths(cfg.corpus)
    # closed on an error too: the error then starts on its own line. The shards are written
    # (`write_curated`) in the workers, else on one thread, while the next shards are filtered.
    with tqdm(total=manifest.stats.records, unit="rec", desc="curate", file=sys.stderr, dynamic_ncols=True) as bar, \
            workers.Writes(ahead) as writes:
        judged = ahead.shards(paths) if ahead else itertools.repeat(None)
        for path, verdicts in zip(paths, judged):
            verdict = judge_shard(path, filters, masker, decode, report, columns, cfg.batch_size, bar.update, verdicts)
            writes.submit(write_curated, path, out, verdict, masker is not None, manifest.generation.top_k,
                          max_topk_id)
    summary = report.summary()
    result = CurateResult(out, kept=summary["kept"]["records"], rejected=summary["rejected"]["records"],
                          rejected_by_filter={f["name"]: f["rejected"] for f in summary["filters"]})
    source_complete = manifest.stats.complete is not False
    manifest.stats = corpus.corpus_stats(out)
    manifest.stats.complete = source_complete  # curating an interrupted corpus does not finish it
    manifest.rejected_stats = corpus.corpus_stats(out, "rejected")
    manifest.curation = {"filters": [f.settings() for f in filters], "source": str(cfg.corpus),
                         "kept": summary["kept"], "rejected": summary["rejected"],
                         "rejected_by_filter": result.rejected_by_filter}
    manifest.history.append(corpus.history_entry("curate", cfg, time.time() - start))
    corpus.copy_tokenizer(cfg.corpus, out)
    corpus.write_manifest(out, manifest)
    print(report.write(out), file=sys.stderr)
    return result


def columns_read(filters: list[Filter]) -> list[str] | None:
    """The logical columns that the filters and the report read (None: all of them). The rest,
    the top-k above all, are never decoded: kept rows are copied as stored."""
    wanted = set(Report.READS)
    for f in filters:
        reads = f.reads()
        if reads is None:
            return None
        wanted.update(reads)
    return [c for c in (*corpus.COLUMNS, "loss_mask") if c in wanted]


@dataclass(frozen=True)
class ShardVerdict:
    """The filters' decisions on one shard's rows."""
    keep: np.ndarray  # bool per row
    reasons: list[str]  # the `reject_reason` of each rejected row, in row order
    masks: dict[int, list[bool]]  # shard row -> loss mask, for the records the PII masker masked


def judge_shard(path: Path, filters: list[Filter], masker, decode, report: Report, columns: list[str] | None,
                batch_size: int, progress=lambda n: None,
                judged: list[workers.BatchVerdicts] | None = None) -> ShardVerdict:
    """One shard through the filters batch by batch, reading and decoding only `columns`.
    `judged`: the verdicts of the filters that judge records alone, per batch, from the workers."""
    keep: list[np.ndarray] = []
    reasons: list[str] = []
    masks: dict[int, list[bool]] = {}
    offset = 0
    for n, batch in enumerate(corpus.stored_batches(path, corpus.read_stored(path, columns), columns, batch_size)):
        verdict = filter_batch(batch, filters, masker, decode, report, judged[n] if judged is not None else None)
        keep.append(verdict.keep)
        reasons += [r for r in verdict.reasons if r is not None]
        masks.update({offset + i: m for i, m in verdict.masks.items()})
        offset += batch.num_rows
        progress(batch.num_rows)
    return ShardVerdict(np.concatenate(keep) if keep else np.zeros(0, dtype=bool), reasons, masks)


def write_curated(path: Path, out: Path, verdict: ShardVerdict, masking: bool, k: int, max_topk_id: int) -> None:
    """A judged shard's kept rows and its rejected ones (with `reject_reason`), taken from the
    stored shard with Arrow, so a quantized corpus stays quantized without being decoded or encoded
    again; each part stamped: its rows come from validated shards, so its top-k passed the checks,
    and the largest top-k id of the whole source is its stamp's bound. `masking`: the PII masker
    runs (every shard then gets a `loss_mask`, for one schema)."""
    table = corpus.read_stored(path)
    if masking or "loss_mask" in table.column_names:
        table = with_loss_mask(table, verdict.masks)
    rejected = table.take(np.flatnonzero(~verdict.keep))
    parts = {"data": table.take(np.flatnonzero(verdict.keep)),
             "rejected": rejected.append_column("reject_reason", pa.array(verdict.reasons, pa.string()))}
    index = corpus.shard_index(path)
    for subdir, part in parts.items():
        if part.num_rows:
            _write_shard(out, index, part, subdir, corpus.TopkChecked(k, max_topk_id))


@dataclass(frozen=True)
class BatchVerdict:
    keep: np.ndarray  # bool per row
    reasons: list[str | None]  # per row: its `reject_reason` (None = kept)
    masks: dict[int, list[bool]]  # row -> loss mask, for the records the PII masker masked


def filter_batch(batch: pa.RecordBatch, filters: list[Filter], masker, decode, report: Report,
                 judged: workers.BatchVerdicts | None = None) -> BatchVerdict:
    """The filters over one batch of logical columns; each sees only the rows that every filter
    before it kept, so a record failing several is charged to the first. `judged`: verdicts
    already reached in a worker, over every row, for the filters that judge records alone."""
    if judged is not None and judged.rows != batch.num_rows:
        raise RuntimeError(f"a curate worker read a batch of {judged.rows} rows where curate read {batch.num_rows}")
    reasons: list[str | None] = [None] * batch.num_rows
    rejected_by: list[int | None] = [None] * batch.num_rows  # per row: index of the filter that dropped it
    alive = list(range(batch.num_rows))
    masks: dict[int, list[bool]] = {}
    for n, f in enumerate(filters):
        if not alive:
            break
        if judged is not None and n in judged.failed:
            verdicts = judged.failed[n]
            failed = {i: verdicts[i] for i in alive if i in verdicts} if verdicts else {}
        elif judged is not None and n in judged.prepared:
            failed = f.check_batch(batch, alive, judged.prepared[n])
        else:
            failed = f.check_batch(batch, alive)
        if f is masker:  # keep the record, exclude the PII tokens from every loss
            masks.update({i: judged.masks[i] for i in failed} if judged is not None
                         else pii_masks(batch, list(failed), masker, decode))
            report.masked += len(failed)
            continue
        for i, detail in failed.items():
            rejected_by[i] = n
            reasons[i] = f"{label(f)}: {detail}"
        if failed:
            alive = [i for i in alive if i not in failed]
    report.add(batch, rejected_by, reasons)
    return BatchVerdict(np.array([n is None for n in rejected_by], dtype=bool), reasons, masks)


def _interrupted_curation(out: Path) -> bool:
    """`out` as a killed curate leaves it: shards but no manifest (written last)."""
    return not (out / corpus.MANIFEST).exists() and all(
        p.name in ("data", "rejected", corpus.TOKENIZER_DIR, files.LOCK_NAME) or p.match(files.PARTIAL_GLOB) for p in out.iterdir())


def _write_shard(out: Path, index: int, table: pa.Table, subdir: str, checked: corpus.TopkChecked) -> None:
    try:
        corpus.write_shard(out, index, table, subdir, checked=checked)
    except files.DiskFull as e:  # generate's advice (its shards are kept) is wrong here: say what a rerun does
        path = out / subdir / f"part-{index:05d}.parquet"
        raise files.DiskFull(f"no space left on device writing shard {index} (`{path}`); free space and rerun the "
                             "same command: curation starts over (no --overwrite needed)") from e


def pii_masks(batch, rows, masker: pii.PIIFilter, decode) -> dict[int, list[bool]]:
    text = batch.column("response").to_pylist()
    ids = batch.column("response_token_ids").to_pylist()
    return {i: pii.token_mask(ids[i], [(s, e) for _, s, e in pii.find_pii(text[i], list(masker.kinds))], decode)
            for i in rows}


def with_loss_mask(table: pa.Table, masks: dict[int, list[bool]]) -> pa.Table:
    """`loss_mask` on every row: the stored one (all True where absent or null), and False where
    `masks` (row -> a mask of its response tokens) says so. On Arrow and numpy: a Python bool per
    token was 5 us per realistic record."""
    lengths = pc.list_value_length(table.column("response_token_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.ones(int(starts[-1]), dtype=bool)
    if "loss_mask" in table.column_names:
        stored = table.column("loss_mask").combine_chunks()
        present = stored.is_valid().to_numpy(zero_copy_only=False)
        flat[np.repeat(present, lengths)] = stored.flatten().to_numpy(zero_copy_only=False)
    for row, mask in masks.items():
        flat[starts[row]:starts[row + 1]] &= np.asarray(mask, dtype=bool)
    column = pa.ListArray.from_arrays(pa.array(starts, pa.int32()), pa.array(flat))
    if "loss_mask" in table.column_names:
        return table.set_column(table.column_names.index("loss_mask"), "loss_mask", column)
    return table.append_column("loss_mask", column)


def decoder(manifest: corpus.Manifest):
    from transformers import AutoTokenizer

    model = manifest.teacher.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except Exception as e:
        raise ValueError(f"`pii.mode: mask` needs the teacher's tokenizer (`{model}`): {e}") from None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
