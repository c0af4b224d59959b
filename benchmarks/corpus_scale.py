"""How do the corpus stages scale with the corpus? Seconds and peak memory of `validate`,
`inspect`, `curate` (default filters, and without near-dedup) and `train` (command start to its
first step) on realistic corpora of 1k / 10k / 100k records, side by side, with each stage's
growth per 10x records against linear (a ratio of 1.0 = linear in the records; below 1 =
a fixed cost still dominates).

A realistic record: a real prompt of the demo (distill/demo/prompts/train.jsonl), a unique
response of 64-128 tokens of the demo teacher's tokenizer (random words, so neither exact nor
near-dedup collapses the corpus), a top-20 row per response token whose first entry is the
response token, the rest drawn Zipf-like from the vocabulary, logprobs falling off like a
teacher's, stored in the default quantized encoding in shards of 1,024 records (generate's
`chunk_size`), each with the validation stamp generate writes. A base set of 1,024 records is
encoded once; larger corpora repeat its stored top-k rows under new ids and new unique responses,
written by `corpus.write_shard` as generate writes its shards (`write` times it on the base
shard). `--before` runs the other checkout on this checkout's corpus: where the two stamp shards
differently (stamp versions), the other one validates them in full.

With `--before PYTHON`, the interpreter of another checkout (e.g. main's venv), every stage also
runs on that code, on the same corpus, just before this checkout's run (a row "... (before)").

Every stage runs as its own process (`distill ...` as the command line runs it); peak memory is
sampled from /proc every 50 ms: RssAnon (heap: what must stay flat) and RssFile (memory-mapped
shards and libraries, which the OS can reclaim).

    python benchmarks/corpus_scale.py [--records 1000 10000 100000] [--stages ...] [--before PYTHON] [--quick]
    python benchmarks/corpus_scale.py --records 10000000 --stages curate --response-tokens 8   # 10M in 5.4 GB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from common import ROOT, Headline, emit, parse_args, train_until_first_step

DEMO = ROOT / "distill" / "demo"
TEACHER, STUDENT = DEMO / "teacher", DEMO / "student-init"
K, SHARD = 20, 1024
STAGES = ("validate", "inspect", "curate", "curate_no_near", "train")
NO_NEAR = ["finish_reason", "length", "repetition", "refusal", "pii", "dedup_exact", "teacher_confidence"]
TRAIN_FLAGS = ["--student", str(STUDENT), "--no-lora", "--batch-size", "8", "--max-length", "256",
               "--max-steps", "1", "--logging-steps", "1"]


def base_records(n: int, seed: int = 0, response_tokens: int | None = None) -> list[dict]:
    from transformers import AutoTokenizer

    from distill.tiny import WORDS

    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    prompts = [json.loads(line)["messages"] for line in (DEMO / "prompts" / "train.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    zipf = 1.0 / np.arange(1, vocab + 1)
    zipf /= zipf.sum()
    records = []
    for i in range(n):
        messages = prompts[i % len(prompts)]
        response = unique_text(rng, WORDS)
        ids = tokenizer(response, add_special_tokens=False)["input_ids"][:int(rng.integers(64, 129))][:response_tokens]
        t = len(ids)
        others = rng.choice(vocab, size=(t, K - 1), p=zipf)
        top_ids = np.concatenate([np.array(ids)[:, None], others], axis=1)
        # a teacher's row: the first entry takes most of the mass, the rest fall off geometrically
        first = -rng.exponential(0.3, size=(t, 1))
        rest = first - np.cumsum(rng.exponential(0.6, size=(t, K - 1)), axis=1) - 1.5
        logprobs = np.concatenate([first, rest], axis=1).astype(np.float32)
        records.append({"id": f"r{i}", "prompt_id": f"p{i}", "messages": messages, "response": tokenizer.decode(ids),
                        "prompt_token_ids": tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                                                      add_special_tokens=False)["input_ids"],
                        "response_token_ids": ids, "response_logprobs": logprobs[:, 0].copy(),
                        "topk_token_ids": top_ids, "topk_logprobs": logprobs, "finish_reason": "stop"})
    return records


def stored_shards(corpus_dir: Path | None, shards: int) -> list[pa.Table]:
    """The first `shards` shards of `corpus_dir` as stored, else one shard of `base_records`
    stored as generate stores it (what the shard-level benchmarks read)."""
    import pyarrow.parquet as pq

    from distill import corpus

    if corpus_dir:
        return [pq.read_table(p) for p in corpus.shard_paths(corpus_dir)[:shards]]
    return [corpus.records_to_table(base_records(SHARD), K)]


def unique_text(rng: np.random.Generator, words: list[str]) -> str:
    """80-140 random words: no two share most of their 5-word shingles."""
    return " ".join(words[j] for j in rng.integers(0, len(words), size=int(rng.integers(80, 141))))


def build(root: Path, n: int, base: pa.Table, max_topk_id: int, seed: int, source: str = "words") -> Path:
    """`n` records in shards of SHARD: `base`'s stored rows repeated, with new ids and responses
    (`source`: unique random words, or ShareGPT's real answers in file order, repeated after the
    last), each shard stamped (its top-k rows are base's, validated: `max_topk_id` is theirs)."""
    from distill import corpus
    from distill.tiny import WORDS

    rng = np.random.default_rng(seed)
    if source == "sharegpt":
        from distill.demo.sharegpt import answers

        real = list(answers())
    for index, start in enumerate(range(0, n, SHARD)):
        size = min(SHARD, n - start)
        table = base.slice(0, size)
        ids = pa.array([f"r{start + i}" for i in range(size)])
        texts = pa.array([real[(start + i) % len(real)] for i in range(size)] if source == "sharegpt"
                         else [unique_text(rng, WORDS) for _ in range(size)])
        table = table.set_column(table.schema.get_field_index("id"), "id", ids)
        table = table.set_column(table.schema.get_field_index("response"), "response", texts)
        # as generate writes its shards (settings, footer stats, stamp)
        corpus.write_shard(root, index, table, checked=corpus.TopkChecked(K, max_topk_id))
    write_manifest(root)
    return root


def write_manifest(root: Path) -> None:
    from transformers import AutoTokenizer

    from distill import corpus

    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    teacher = corpus.TeacherInfo(model=str(TEACHER), **corpus.tokenizer_fingerprint(tokenizer))
    corpus.write_manifest(root, corpus.Manifest(teacher=teacher, generation={"top_k": K},
                                                stats=corpus.corpus_stats(root)))


def measure(argv: list[str], env: dict | None = None) -> dict:
    """Run `argv`; seconds to its end (or to its `first_step_at` line), and peak RssAnon / RssFile (GB)."""
    started = time.time()
    # its output goes to files: a pipe nobody reads until the end fills (a progress bar over 1M
    # records does) and blocks the command
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, text=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
        peak = {"RssAnon": 0, "RssFile": 0}
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.05)
        ended = time.time()
        out, err = (f.seek(0) or f.read() for f in (stdout, stderr))
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{err[-3000:]}")
    for line in out.splitlines():
        if line.startswith('{"first_step_at"'):
            ended = json.loads(line)["first_step_at"]
    return {"seconds": ended - started, "anon_gb": peak["RssAnon"] / 1e6, "file_gb": peak["RssFile"] / 1e6}


def child_train(corpus_dir: str, out: str, eval_fraction: float | None) -> None:
    """`distill train` as the command line runs it, stopped when its first training step starts."""
    held_out = [] if eval_fraction is None else ["--eval-fraction", str(eval_fraction)]
    train_until_first_step(["--corpus", corpus_dir, "--out", out, *TRAIN_FLAGS, *held_out])


def run_stage(stage: str, root: Path, work: Path, py: str = sys.executable, eval_fraction: float | None = None) -> dict:
    """`stage` on the corpus `root`, by the interpreter `py` (another's: its checkout's code);
    `eval_fraction`: train's, where not its default."""
    cli = [py, "-m", "distill.cli"]
    out = Path(tempfile.mkdtemp(dir=work))
    # another checkout's interpreter imports its own `distill`, not this worktree's
    env = {} if py == sys.executable else {"PYTHONPATH": "", "DISTILL_WORKTREE": ""}
    if stage == "validate":
        return measure([py, "-c", f"from distill import corpus; corpus.validate({str(root)!r})"], env)
    if stage == "inspect":
        return measure([*cli, "inspect", str(root)], env)
    if stage == "curate":
        return measure([*cli, "curate", "--corpus", str(root), "--out", str(out / "c")], env)
    if stage == "curate_no_near":
        config = out / "curate.yaml"
        config.write_text(json.dumps({"corpus": str(root), "out": str(out / "c"), "filters": NO_NEAR}))
        return measure([*cli, "curate", "--config", str(config)], env)
    try:
        held_out = [] if eval_fraction is None else ["--eval-fraction", str(eval_fraction)]
        return measure([py, __file__, "--child-train", str(root), str(out / "t"), *held_out],
                       {**env, "HF_DATASETS_CACHE": str(out / "hf")})
    finally:  # the training data it left (a process stopped at its first step does not clean up)
        shutil.rmtree(out, ignore_errors=True)


def write_rate(base: pa.Table, repeat: int = 3) -> float:
    """Records/s of `corpus.write_shard` (what generate and curate write with) on the base shard,
    the median of `repeat` writes."""
    from distill import corpus

    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeat):
            started = time.perf_counter()
            corpus.write_shard(Path(tmp), 0, base)
            seconds.append(time.perf_counter() - started)
    return base.num_rows / sorted(seconds)[repeat // 2]


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--before", help="the Python of another checkout: every stage also runs on its code")
    ap.add_argument("--eval-fraction", type=float, help="train's held-out share (default: train's own); with 0 "
                    "no held-out metrics are scored before the first step")
    ap.add_argument("--texts", choices=("words", "sharegpt"), default="words",
                    help="the responses: unique random words, or ShareGPT's real answers (~67k, then repeated: "
                    "dedup_exact rejects the repeats); the tokens and top-k stay the base shard's")
    ap.add_argument("--response-tokens", type=int, help="cut every response's tokens and top-k rows to this many "
                    "(the texts, which the filters read, stay 80-140 words): 10M records of 8 tokens take 5.4 GB of "
                    "disk, of ~97 tokens 43 GB")
    ap.add_argument("--child-train", nargs=2, help=argparse.SUPPRESS)
    args = parse_args(ap, argv, quick={"records": [1_000, 10_000]})
    if args.child_train:
        child_train(*args.child_train, args.eval_fraction)
        return []
    from distill import corpus

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; one run per figure")
    with tempfile.TemporaryDirectory(prefix="distill-scale-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        base, base_checked = corpus.records_to_checked_table(base_records(SHARD, response_tokens=args.response_tokens),
                                                             K, corpus.DEFAULT_ENCODING, None)
        print(f"base shard: {SHARD:,} records, {sum(len(x) for x in base['response_token_ids'].to_pylist()):,} "
              f"response tokens, built in {time.perf_counter() - started:.1f} s")
        rate = write_rate(base)
        print(f"write (corpus.write_shard, median of 3): {rate:,.0f} records/s")
        results: dict[int, dict[str, dict]] = {}
        for n in args.records:
            root = build(tmp / f"c{n}", n, base, base_checked.max_topk_id, seed=n, source=args.texts)
            size = corpus.corpus_stats(root)
            print(f"\n{n:,} records: {size.shards} shards, {size.bytes / 1e6:.1f} MB", flush=True)
            results[n] = {}
            for stage in args.stages:
                runs = {f"{stage} (before)": args.before} if args.before else {}
                for name, python in {**runs, stage: sys.executable}.items():
                    r = run_stage(stage, root, tmp, python, args.eval_fraction)
                    results[n][name] = r
                    print(f"  {name:<25}{r['seconds']:>9.1f} s {n / r['seconds']:>10,.0f} rec/s   peak anon "
                          f"{r['anon_gb']:.2f} GB, file {r['file_gb']:.2f} GB", flush=True)
            shutil.rmtree(root)
    sizes = list(results)
    print(f"\n{'seconds (peak anon GB)':<24}" + "".join(f"{n:>18,}" for n in sizes)
          + "".join(f"{f'x{b // a} recs: ratio':>20}" for a, b in zip(sizes, sizes[1:])))
    for stage in results[sizes[0]]:
        cells = "".join(f"{results[n][stage]['seconds']:>10.1f} ({results[n][stage]['anon_gb']:.2f})" for n in sizes)
        # growth of the time per 10x records, over the growth linear scaling predicts
        ratios = "".join(f"{results[b][stage]['seconds'] / results[a][stage]['seconds'] / (b / a):>20.2f}"
                         for a, b in zip(sizes, sizes[1:]))
        print(f"{stage:<24}{cells}{ratios}")
    if args.json:
        args.json.write_text(json.dumps({"write_records_per_s": rate, "results": results}, indent=1))
    largest = sizes[-1]
    return [Headline(f"curate, {largest:,} records, records/s", f"{largest / results[largest]['curate']['seconds']:,.0f}",
                     "target >= 10,000", met=largest / results[largest]["curate"]["seconds"] >= 10_000)] \
        if "curate" in args.stages else []


if __name__ == "__main__":
    emit(main())
