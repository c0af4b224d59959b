"""`distill score --corpus C --teacher T2 --out C2`: a second teacher's top-k along the first
teacher's responses, as a sibling corpus aligned record by record (docs/corpus-format.md,
"Sibling corpora").

C2 holds C's records with their ids, messages and token ids unchanged; only the teacher columns
(`response_logprobs`, `topk_token_ids`, `topk_logprobs`) are T2's, teacher-forced along the same
tokens (never re-tokenised: T2 must share C's tokenizer, checked before the engine starts). Shard
i of C2 is shard i of C scored, so a rerun resumes shard by shard, and `distill train --corpus C
--corpus C2 --ensemble mixture` finds the same records in the same order. The manifest names T2
as its teacher and C as `source.sibling_of`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from distill import corpus, files
from distill.config import ScoreConfig
from distill.engine import check_model
from distill.generate.templating import load_tokenizer, model_max_len, vocab_size
from distill.models import model_source
from distill.teacher import Completion, Request, Teacher, start_teacher

# What a sibling copies from its source record; the teacher columns are its own teacher's.
COPIED = ("id", "prompt_id", "messages", "response", "prompt_token_ids", "response_token_ids", "finish_reason")


def score_sibling(cfg: ScoreConfig, teacher: Teacher | None = None) -> corpus.Corpus:
    """Score `cfg.corpus`'s responses with `cfg.teacher` into the sibling corpus `cfg.out`.
    `teacher`: an already started backend to reuse (else `cfg.backend` is started and closed)."""
    with files.exclusive(Path(cfg.out)):
        return _score(cfg, teacher)


def _identity(cfg: ScoreConfig, source: corpus.Manifest, tokenizer) -> dict:
    found = model_source(cfg.teacher)
    return {
        "teacher": {"model": cfg.teacher, "revision": cfg.revision, **corpus.tokenizer_fingerprint(tokenizer),
                    **({"source": found.model_dump()} if found else {}), "vocab_size": vocab_size(cfg, tokenizer)},
        "generation": {"mode": "score", "top_k": cfg.top_k, "logprobs": "raw_logprobs",
                       "logprob_encoding": cfg.logprob_encoding},
        "source": {"sibling_of": str(cfg.corpus), "sibling_manifest_sha256": source.sha256()},
    }


def _score(cfg: ScoreConfig, teacher: Teacher | None) -> corpus.Corpus:
    start, src, out = time.time(), Path(cfg.corpus), Path(cfg.out)
    source = corpus.read_manifest(src)
    corpus.check_complete(src, source, allow_incomplete=False)
    check_model(cfg.teacher, "teacher")
    tokenizer = load_tokenizer(cfg)
    identity = _identity(cfg, source, tokenizer)
    if identity["teacher"]["tokenizer_sha256"] != source.teacher.tokenizer_sha256:
        raise ValueError(f"`{cfg.teacher}` does not share the tokenizer of `{source.teacher.model}`, which made `{src}`: "
                         "a sibling corpus scores the same token ids, so its teacher needs the same tokenizer")
    if (out / corpus.MANIFEST).exists() and not cfg.overwrite:
        old = corpus.read_manifest(out).dump()
        changed = [f"{section}.{key}" for section, values in identity.items() for key, value in values.items()
                   if old.get(section, {}).get(key) != value]
        if changed:
            raise FileExistsError(f"`{out}` holds a corpus made with other settings ({', '.join(changed)} differ): rerun "
                                  "with the same settings to resume, or pass `--overwrite` to discard it")
    elif cfg.overwrite:
        files.clear_dir(out)
    elif not files.is_empty(out):
        raise FileExistsError(f"`{out}` exists and is not a corpus: choose another `out` or pass `--overwrite`")
    manifest = corpus.Manifest(**identity, history=[*source.history, corpus.history_entry("score", cfg, 0.0, False)])
    corpus.write_manifest(out, manifest)
    files.remove_partial_files(out)
    done = {corpus.shard_index(p) for p in corpus.shard_paths(out)}
    todo = [p for p in corpus.shard_paths(src) if corpus.shard_index(p) not in done]
    if todo:
        started = None if teacher is not None else start_teacher(cfg, max_logprobs=cfg.top_k,
                                                                   max_model_len=model_max_len(cfg))
        dictionary = corpus.corpus_dictionary(out)  # the first scored shard's, for every shard (as generate)
        try:
            for path in todo:
                dictionary = _score_shard(teacher or started, cfg, path, out, manifest.teacher.vocab_size, dictionary)
                print(f"score: {path.name} of `{src}` scored", file=sys.stderr, flush=True)
        finally:
            if started is not None:
                started.close()
    manifest.stats = corpus.corpus_stats(out)
    manifest.stats.complete = True
    manifest.history[-1] = corpus.history_entry("score", cfg, time.time() - start)
    corpus.write_manifest(out, manifest)
    return corpus.Corpus(out, manifest)


def _score_shard(teacher: Teacher, cfg: ScoreConfig, path: Path, out: Path, teacher_vocab_size: int | None,
                 dictionary: str | None) -> str | None:
    """Score one shard of the source into `out`, its top-k coded with the corpus's `dictionary` (None:
    learnt from this shard) -> the dictionary the shard was written with."""
    table = corpus.read_shard(path)
    columns = [*COPIED, *(["loss_mask"] if "loss_mask" in table.column_names else [])]
    records = table.select(columns).to_pylist()
    requests = [Request(i, r["id"], r["prompt_id"], r["messages"], r["prompt_token_ids"],
                        response_token_ids=r["response_token_ids"], response=r["response"],
                        finish_reason=r["finish_reason"]) for i, r in enumerate(records)]
    scored: dict[int, Completion] = {}
    teacher.score(iter(requests), cfg.top_k, lambda req, c: scored.__setitem__(req.index, c), window=2 * cfg.chunk_size)
    rows = [{**r, "response_logprobs": scored[i].response_logprobs, "topk_token_ids": scored[i].topk_token_ids,
             "topk_logprobs": scored[i].topk_logprobs} for i, r in enumerate(records)]
    table, checked = corpus.records_to_checked_table(rows, cfg.top_k, cfg.logprob_encoding, teacher_vocab_size,
                                                     dictionary)
    corpus.write_shard(out, corpus.shard_index(path), table, checked=checked)
    return corpus.shard_encoding(table.schema).get("dictionary")
