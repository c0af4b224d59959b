"""The demo's students beyond the run's own: more seeds of both arms, the smaller corpora of the
learning curve, and how they are trained and scored cheaply on a 2-core CPU.

- Training: two students at a time, one CPU thread each (tiny models use a second thread poorly;
  two processes nearly double throughput). Each student's output goes to its `train.log`.
- Headline eval: every student through vLLM like the run's own (`evaluate`, greedy).
- Learning curve: batched greedy answers with transformers (`teacher.exact_match`).
A student whose directory already holds its result is skipped, so a rerun resumes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distill import corpus
from distill.config import EvalConfig, TrainConfig
from distill.lifetime import watch_parent
from distill.train.card import CARD

WORKERS = 2


def _train_quietly(cfg: TrainConfig) -> float:
    """One student in a worker process, one thread; returns its wall seconds."""
    import torch

    from distill.train.trainer import train

    torch.set_num_threads(1)
    start = time.time()
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.out) / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        train(cfg)
    return time.time() - start


def train_many(configs: list[TrainConfig], workers: int = WORKERS) -> None:
    """Train every config whose student is not there yet, `workers` at a time."""
    todo = [c for c in configs if not (Path(c.out) / CARD).exists()]
    if not todo:
        return
    print(f"[demo] training {len(todo)} students, {workers} at a time (logs: <student>/train.log)", flush=True)
    start = time.time()
    # A `Pool`, whose exit terminates its workers: on Ctrl-C or SIGTERM the demo stops at once instead
    # of waiting for every queued student. Each worker ends if the demo is SIGKILLed (`watch_parent`).
    with get_context("spawn").Pool(workers, initializer=watch_parent, initargs=(os.getpid(),)) as pool:
        for cfg, seconds in zip(todo, pool.imap(_train_quietly, todo)):
            print(f"[demo]   {Path(cfg.out).relative_to(Path(cfg.out).parent.parent)}: {cfg.max_steps} steps "
                  f"in {seconds:.0f} s", flush=True)
    print(f"[demo] trained {len(todo)} students in {time.time() - start:.0f} s", flush=True)


def evaluate_many(students: list[Path], eval_cfg: EvalConfig, teacher_answers: Path) -> None:
    """`evaluate` each student against the run's teacher answers (vLLM, no latency)."""
    from distill.evaluation.job import evaluate
    from distill.evaluation.report import REPORT

    todo = [s for s in students if not (s / "eval" / REPORT).exists()]
    start = time.time()
    for student in todo:
        evaluate(eval_cfg.model_copy(update={"student": str(student), "out": student / "eval", "corpus": teacher_answers,
                                             "latency": False}))
    if todo:
        print(f"[demo] evaluated {len(todo)} students in vLLM in {time.time() - start:.0f} s", flush=True)


def first_records(source: Path, n: int, out: Path) -> Path:
    """A corpus of the first `n` records of `source` (the learning curve's smaller corpora)."""
    return subset(source, out, lambda table: table.slice(0, n), f"first {n} records of {source}")


def subset(source: Path, out: Path, select, description: str) -> Path:
    """A corpus of the records `select(table)` keeps from `source`'s stored rows (as stored: no
    second encoding, unless its shards differ in encoding: then decoded and encoded once more, which
    gives a quantized grid point back exactly); `description` goes into the manifest's
    `source.subset`. Kept if it exists."""
    if (out / corpus.MANIFEST).exists():
        return out
    manifest = corpus.read_manifest(source)
    paths = corpus.shard_paths(source)
    encodings = [corpus.shard_encoding(pq.read_schema(path)) for path in paths]
    if all(e == encodings[0] for e in encodings):
        kept = select(pa.concat_tables([pq.read_table(path) for path in paths], promote_options="permissive"))
    else:  # shards of several layouts (a corpus resumed by a newer distill): one footer cannot name both;
        # layout 2's fine grid holds every grid point of layouts 1-3 exactly (layout 3's would coarsen 1 and 2)
        kept = corpus.encode(select(corpus.read_table(source)), manifest.generation.top_k,
                             manifest.generation.logprob_encoding, layout=2)
    corpus.write_shard(out, 0, kept)
    manifest.stats = corpus.corpus_stats(out)
    manifest.stats.complete = True
    manifest.rejected_stats = None
    manifest.source = {**manifest.source, "subset": description}
    corpus.copy_tokenizer(source, out)
    corpus.write_manifest(out, manifest)
    return out


def greedy_accuracy(students: list[Path], eval_prompts: Path) -> dict[Path, float]:
    """Held-out greedy exact match of each student with transformers (the learning curve's scorer)."""
    import json

    import torch

    from distill.demo.teacher import exact_match

    torch.set_num_threads(2)
    examples = [json.loads(line) for line in open(eval_prompts)]
    scores = {}
    for student in students:
        scores[student] = exact_match(student, examples)["overall"]
        print(f"[demo]   {student.name}: greedy accuracy {scores[student]:.3f}", file=sys.stderr, flush=True)
    return scores


def ask(student: Path, engine_cfg, messages: list[dict], max_tokens: int, keep_serving: bool = False) -> str | None:
    """Serve `student` like `distill serve` and send it one chat request through the `openai`
    client, printing both; with `keep_serving`, serve until Ctrl-C instead (returns None)."""
    from openai import OpenAI

    from distill.config import ServeConfig
    from distill.launcher import start_server
    from distill.serve.server import serve

    settings = ServeConfig(model=str(student), served_model_name="demo-student", **engine_cfg.engine_settings())
    if keep_serving:
        serve(settings)
        return None
    with start_server(settings.model_copy(update={"port": 0})) as server:
        reply = OpenAI(base_url=server.url, api_key="EMPTY").chat.completions.create(
            model=server.model, messages=messages, max_tokens=max_tokens, temperature=0)
    answer = reply.choices[0].message.content
    print(f"\nchat with the KD student over {server.url}:\n  user: {messages[-1]['content']}\n  student: {answer}")
    return answer
