"""`generate()` and `score()`: prompts in, a resumable teacher corpus out.

Requests are numbered in input order (prompt by prompt, sample by sample) and chunk `c` holds
requests `[c * chunk_size, (c + 1) * chunk_size)`. A chunk becomes shard `data/part-{c}` the
moment its last request finishes, so an interrupted job loses at most the chunks in flight,
and a rerun skips every chunk whose shard exists. The job's identity (teacher, sampling,
prompt file hash, chunking) is stored in the manifest; a rerun with another identity is
refused unless `overwrite` is set.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from distill import corpus, files
from distill.config import CorpusJobConfig, GenerateConfig, ScoreConfig
from distill.engine import check_model
from distill.generate.prompts import (
    BadRecord,
    Prompt,
    PromptError,
    iter_prompts,
    resolve_format,
)
from distill.generate.student_view import StudentView, load_view
from distill.generate.templating import (
    ChatTokenizer,
    load_tokenizer,
    model_max_len,
    stop_token_ids,
    vocab_size,
)
from distill.models import model_source
from distill.teacher import Completion, Request, Sampling, Teacher, start_teacher

MAX_RECORDED_SKIPS = 1000
TOKENIZE_BATCH = 256


def generate(cfg: GenerateConfig, teacher: Teacher | None = None) -> corpus.Corpus:
    """Run the teacher over `cfg.prompts` into the corpus `cfg.out`.
    `teacher`: an already started backend to reuse (else `cfg.backend` is started, and closed at the end)."""
    return CorpusJob(cfg, cfg.prompts, scoring=False).run(teacher)


def score(cfg: ScoreConfig, teacher: Teacher | None = None) -> corpus.Corpus:
    """Teacher top-k along the existing answers of `cfg.data` into the corpus `cfg.out`; with
    `cfg.corpus`, along that corpus's responses into a sibling corpus (`generate/sibling.py`)."""
    if cfg.corpus is not None:
        from distill.generate.sibling import score_sibling

        return score_sibling(cfg, teacher)
    return CorpusJob(cfg, cfg.data, scoring=True).run(teacher)


def per_second(amount: int, seconds: float) -> str:
    """A rate with three significant digits below 100 (a short run's whole-run rate is below 1)."""
    rate = amount / max(seconds, 1e-9)
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def request_id(prompt_id: str, sample: int) -> str:
    return hashlib.sha256(f"{prompt_id}:{sample}".encode()).hexdigest()[:16]


def request_seed(base: int, rid: str) -> int:
    return int(hashlib.sha256(f"{base}:{rid}".encode()).hexdigest()[:15], 16)


@dataclass(frozen=True)
class StudentPrompt:
    """The student's view of a prompt (`--student-view`) and its token ids."""
    messages: list[dict[str, str]]
    prompt_token_ids: list[int]


@dataclass
class Chunks:
    """Finished requests grouped by chunk until the chunk is whole."""
    expected: Counter = field(default_factory=Counter)
    closed: set = field(default_factory=set)
    buffers: dict = field(default_factory=lambda: defaultdict(list))

    def ready(self, chunk: int) -> bool:
        return chunk in self.closed and len(self.buffers[chunk]) == self.expected[chunk]


class CorpusJob:
    def __init__(self, cfg: CorpusJobConfig, source: Path, scoring: bool):
        self.cfg, self.source, self.scoring = cfg, Path(source), scoring
        self.samples = 1 if scoring else cfg.samples
        self.seed = 0 if scoring else cfg.seed
        self.sampling = None if scoring else Sampling(cfg.top_k, cfg.max_tokens, cfg.temperature, cfg.top_p)
        self.out = Path(cfg.out)
        self.stage = "score" if scoring else "generate"

    # -- validation, before any model loads ---------------------------------------------
    def _prepare(self) -> None:
        cfg = self.cfg
        self.format = resolve_format(self.source, cfg.format)
        view = None if self.scoring else cfg.student_view
        self.view: StudentView | None = load_view(view) if view else None
        check_model(cfg.teacher, "teacher")
        tokenizer = load_tokenizer(cfg)
        self.chat = ChatTokenizer(tokenizer, stop_token_ids(cfg, tokenizer))
        self.fingerprint = corpus.tokenizer_fingerprint(tokenizer)
        self.vocab_size = vocab_size(cfg, tokenizer)
        self.dictionary: str | None = None  # the corpus's top-k dictionary (`_run` reads it from the shards written)
        self.identity = self._identity()
        self._check_resume()
        if cfg.backend == "ray":  # an unreachable cluster: one line in seconds, before anything is written
            from distill.generate.ray_teacher import check_address

            check_address(cfg.ray_address)

    def _identity(self) -> dict:
        cfg = self.cfg
        generation = {"mode": "score" if self.scoring else "sample", "top_k": cfg.top_k,
                      "logprobs": "raw_logprobs", "logprob_encoding": cfg.logprob_encoding}
        if not self.scoring:
            generation |= {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                           "samples_per_prompt": cfg.samples, "seed": cfg.seed,
                           "student_view": self.view.identity if self.view else None}
        source = model_source(cfg.teacher)
        teacher_source = {"source": source.model_dump()} if source else {}
        return {
            "teacher": {"model": cfg.teacher, "revision": cfg.revision, **self.fingerprint, **teacher_source,
                        "vocab_size": self.vocab_size},
            "generation": generation,
            # the file's hash, not its path: a moved prompt file still resumes
            "source": {"sha256": files.sha256(self.source), "format": self.format,
                       "chunk_size": cfg.chunk_size, "skip_bad": cfg.skip_bad},
        }

    def _check_resume(self) -> None:
        path = self.out / corpus.MANIFEST
        if self.cfg.overwrite:
            return  # `run` discards the old corpus once the input has been checked
        if not path.exists():
            if not files.is_empty(self.out):
                raise FileExistsError(f"`{self.out}` exists and is not a corpus: choose another `out` or pass `--overwrite`")
            return
        old = corpus.read_manifest(self.out).dump()
        # a corpus begun before distill recorded `teacher.vocab_size` still resumes
        changed = [f"{section}.{key}" for section, values in self.identity.items() for key, value in values.items()
                   if old.get(section, {}).get(key, value if key == "vocab_size" else None) != value]
        if changed:
            raise FileExistsError(
                f"`{self.out}` holds a corpus made with other settings ({', '.join(changed)} differ): "
                "rerun with the same settings to resume, or pass `--overwrite` to discard it")

    def _scan(self, max_len: int) -> tuple[int, list[BadRecord]]:
        """One pass over the input: how many good prompts, and every bad record."""
        good, bad = 0, []
        for item in tqdm(self._items(max_len), desc="checking prompts", unit="prompt", file=sys.stderr,
                         dynamic_ncols=True, mininterval=1.0, leave=False, disable=None):
            if isinstance(item, BadRecord):
                bad.append(item)
            else:
                good += 1
        if bad and not self.cfg.skip_bad:
            more = f" (and {len(bad) - 1} more bad records)" if len(bad) > 1 else ""
            raise PromptError(f"{bad[0]}{more}; fix the input or pass `--skip-bad` to skip them")
        return good, bad

    def _items(self, max_len: int) -> Iterator[BadRecord | tuple[Prompt, list[int], list[int], StudentPrompt | None]]:
        """Input records in order, each bad or tokenised (in batches: the tokenizer is Rust), with
        the student's view of the prompt when there is one."""
        records = iter_prompts(self.source, self.format, with_response=self.scoring)
        while batch := list(itertools.islice(records, TOKENIZE_BATCH)):
            prompts = [item for item in batch if isinstance(item, Prompt)]
            encoded = iter(self.chat.tokenize_many([p.messages for p in prompts], self.scoring))
            views = [self.view(p.messages) for p in prompts] if self.view else []
            student = iter(zip(views, self.chat.tokenize_many(views, False)) if views else [])
            for item in batch:
                if isinstance(item, BadRecord):
                    yield item
                    continue
                result = next(encoded)
                view = next(student, None)
                if isinstance(result, Exception):  # the template raised (e.g. on the order of roles)
                    yield BadRecord(item.where, f"chat template failed: {result}", "malformed")
                    continue
                if view is not None and isinstance(view[1], Exception):
                    yield BadRecord(item.where, f"chat template failed on the student view: {view[1]}", "malformed")
                    continue
                prompt_ids, response_ids = result
                length = len(prompt_ids) + len(response_ids)
                if length + (0 if self.scoring else 1) > max_len:
                    yield BadRecord(item.where, f"{'conversation' if self.scoring else 'prompt'} has {length} "
                                    f"tokens; the context (`max_model_len`) holds {max_len}", "too_long")
                    continue
                yield item, prompt_ids, response_ids, StudentPrompt(view[0], view[1][0]) if view else None

    # -- the run ----------------------------------------------------------------------------
    def run(self, teacher: Teacher | None = None) -> corpus.Corpus:
        with files.exclusive(self.out):
            return self._run(teacher)

    def _run(self, teacher: Teacher | None) -> corpus.Corpus:
        start = time.time()
        cfg = self.cfg
        self._prepare()
        max_len = teacher.max_model_len if teacher is not None and teacher.max_model_len else model_max_len(cfg)
        good, bad = self._scan(max_len)
        if cfg.overwrite:
            files.clear_dir(self.out)
        total = good * self.samples
        n_chunks = -(-total // cfg.chunk_size)
        files.remove_partial_files(self.out)
        done = {corpus.shard_index(p) for p in corpus.shard_paths(self.out)}
        old_history = corpus.read_manifest(self.out).history if (self.out / corpus.MANIFEST).exists() else []
        # This job's history entry is there from the start: an interrupted corpus says what made it.
        self.manifest = corpus.Manifest(**self.identity, history=[*old_history, corpus.history_entry(
            self.stage, cfg, 0.0, complete=False)])
        # the tokenizer files too: a student of another tokenizer reads the top-k ids' strings from them
        self.manifest.teacher.tokenizer_files = corpus.store_tokenizer(self.out, self.chat.tokenizer)
        self.manifest.source |= {"file": str(self.source), "prompts": good, "requests": total, "skipped": len(bad),
                                 "skipped_by_kind": dict(Counter(b.kind for b in bad)),
                                 "skipped_records": [str(b) for b in bad[:MAX_RECORDED_SKIPS]]}
        try:
            self._update_stats(complete=False)
        except corpus.CorpusError as e:  # a shard kept from the earlier run is damaged
            raise corpus.CorpusError(f"{e}: delete it and rerun to regenerate its records") from None
        # every shard codes its top-k with the dictionary the first one learnt (layout 4), so the
        # corpus's shards share one encoding (train keeps their top-k stored)
        self.dictionary = corpus.corpus_dictionary(self.out)
        todo = [c for c in range(n_chunks) if c not in done]
        done_requests = sum(min(cfg.chunk_size, total - c * cfg.chunk_size) for c in done if c < n_chunks)
        generated = (0, 0.0)
        if todo:
            started = None if teacher is not None else start_teacher(cfg, max_logprobs=cfg.top_k, max_model_len=max_len)
            try:
                generated = self._generate(teacher or started, max_len, set(todo), total, done_requests)
            finally:
                if started is not None:
                    started.close()
        stats = self._update_stats(complete=True, wall_time=time.time() - start)
        self._summary(stats, len(bad), time.time() - start, resumed=len(done), generated=generated)
        return corpus.Corpus(self.out, self.manifest)

    def _generate(self, teacher: Teacher, max_len: int, todo: set[int], total: int, done_requests: int) -> tuple[int, float]:
        """Run the missing chunks; returns (response tokens produced, seconds)."""
        cfg = self.cfg
        chunks = Chunks()
        bar = tqdm(total=total, initial=done_requests, unit="req", desc="score" if self.scoring else "generate",
                   dynamic_ncols=True, file=sys.stderr)
        tokens, t0, last = 0, time.time(), [0.0]

        def requests() -> Iterator[Request]:
            index, current = 0, None
            for item in self._items(max_len):
                if isinstance(item, BadRecord):
                    continue
                prompt, prompt_ids, response_ids, student = item
                messages = prompt.messages[:-1] if self.scoring else prompt.messages
                for sample in range(self.samples):
                    chunk = index // cfg.chunk_size
                    if chunk in todo:
                        if current is not None and current != chunk:
                            self._close(chunks, current)
                        current = chunk
                        rid = request_id(prompt.prompt_id, prompt.occurrence if self.scoring else sample)
                        chunks.expected[chunk] += 1
                        yield Request(index, rid, prompt.prompt_id, messages, prompt_ids,
                                      seed=request_seed(self.seed, rid),
                                      response_token_ids=response_ids,
                                      response=prompt.messages[-1]["content"] if self.scoring else None,
                                      student_messages=student.messages if student else None,
                                      student_prompt_token_ids=student.prompt_token_ids if student else None)
                    index += 1
            for chunk in todo:
                self._close(chunks, chunk)

        def on_done(req: Request, completion: Completion) -> None:
            nonlocal tokens
            chunk = req.index // cfg.chunk_size
            chunks.buffers[chunk].append((req, completion))
            tokens += len(completion.response_token_ids)
            bar.update(1)
            now = time.time()
            if now - last[0] > 0.5:
                bar.set_postfix_str(f"{tokens / max(now - t0, 1e-9):,.0f} tok/s")
                last[0] = now
            if chunks.ready(chunk):
                self._flush(chunks, chunk)

        try:
            if self.scoring:
                teacher.score(requests(), cfg.top_k, on_done, window=2 * cfg.chunk_size)
            else:
                teacher.generate(requests(), self.sampling, on_done, window=2 * cfg.chunk_size)
        finally:
            bar.close()
        unfinished = [c for c in todo if chunks.buffers.get(c)]
        if unfinished:
            raise RuntimeError(f"chunks {unfinished} did not complete")
        return tokens, time.time() - t0

    def _close(self, chunks: Chunks, chunk: int) -> None:
        if chunk not in chunks.closed:
            chunks.closed.add(chunk)
            if chunks.ready(chunk):
                self._flush(chunks, chunk)

    def _flush(self, chunks: Chunks, chunk: int) -> None:
        done = sorted(chunks.buffers.pop(chunk), key=lambda rc: rc[0].index)
        texts = self.chat.decode_many([c.response_token_ids for _, c in done])
        records = [self._record(req, c, text) for (req, c), text in zip(done, texts)]
        # stamped where the records pass the validator's checks, so readers need not decode the top-k again
        table, checked = corpus.records_to_checked_table(records, self.cfg.top_k, self.cfg.logprob_encoding,
                                                         self.vocab_size, self.dictionary)
        path = corpus.write_shard(self.out, chunk, table, checked=checked)
        self.dictionary = corpus.shard_encoding(table.schema).get("dictionary")
        stats = self.manifest.stats
        stats.records += table.num_rows
        stats.response_tokens += corpus.shard_stats(path)["response_tokens"]
        stats.shards += 1
        stats.bytes += path.stat().st_size
        corpus.write_manifest(self.out, self.manifest)

    def _record(self, req: Request, c: Completion, text: str) -> dict:
        return {
            "id": req.id, "prompt_id": req.prompt_id, "messages": req.messages,
            "response": req.response if req.response is not None else text,
            "prompt_token_ids": req.prompt_token_ids, "response_token_ids": c.response_token_ids,
            "response_logprobs": c.response_logprobs, "topk_token_ids": c.topk_token_ids,
            "topk_logprobs": c.topk_logprobs, "finish_reason": c.finish_reason,
            **({corpus.STUDENT_MESSAGES: req.student_messages, corpus.STUDENT_PROMPT_IDS: req.student_prompt_token_ids}
               if req.student_prompt_token_ids is not None else {}),
        }

    def _update_stats(self, complete: bool, wall_time: float | None = None) -> corpus.CorpusStats:
        """Recount from the shards (at start and end; in between, `_flush` adds each shard)."""
        stats = corpus.corpus_stats(self.out)
        stats.complete = complete
        self.manifest.stats = stats
        if wall_time is not None:
            self.manifest.history[-1] = corpus.history_entry(self.stage, self.cfg, wall_time)
        corpus.write_manifest(self.out, self.manifest)
        return stats

    def _summary(self, stats: corpus.CorpusStats, skipped: int, wall: float, resumed: int, generated: tuple[int, float]) -> None:
        tokens = stats.response_tokens
        new_tokens, seconds = generated
        # Only this run's tokens count: shards kept from an earlier run cost it nothing.
        throughput = (f"{per_second(new_tokens, seconds)} tok/s while generating ({new_tokens:,} new tokens in "
                      f"{seconds:.1f} s); {per_second(new_tokens, wall)} tok/s over the whole run (with the "
                      "engine's start)") if new_tokens else "no new tokens: every shard was already there"
        lines = [
            f"corpus      {self.out}",
            f"records     {stats.records:,} in {stats.shards} shards"
            + (f" ({resumed} shards kept from an earlier run)" if resumed else ""),
            f"tokens      {tokens:,} response tokens",
            f"throughput  {throughput}",
            f"storage     {stats.bytes / max(tokens, 1):.1f} bytes per response token ({stats.bytes / 2**20:.1f} MiB)",
            f"skipped     {skipped} bad input records" + (" (see manifest `source.skipped_records`)" if skipped else ""),
            f"wall time   {wall:.1f} s",
        ]
        print("\n".join(lines), file=sys.stderr)
