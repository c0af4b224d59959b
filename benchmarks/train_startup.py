"""How long does `distill train` take before its first step? Seconds from the command's start to
the first training step (imports, the corpus pre-pass, model load, trainer set-up), and of the
corpus pre-pass alone (validate, decode, max token id, max_length filter, dataset), on the demo
corpus and on a 100k-record corpus of copies of the demo records in several shards.

With `--before PYTHON`, the interpreter of another checkout (e.g. an older branch's venv: it
imports that checkout's `distill`), the same measurements run on that code too, side by side.
"cold": a fresh `datasets` cache; "warm": the same command again (checkouts that cached the
decoded corpus in the `datasets` cache reuse it there). Each figure is the median of `--repeat`
runs, each in a fresh process.

    python benchmarks/train_startup.py [--corpus DEMO_CORPUS] [--records 100000] [--shards 8]
                                       [--before OTHER/.venv/bin/python] [--repeat 3] [--quick]

Without `--corpus` (a corpus of `distill generate` on distill/demo/prompts/train.jsonl with the
demo teacher), demo-shaped records are synthesised: 2,000 records, 22-token prompts, 1-6 token
answers, top-20, quantized, ids of the demo teacher's vocabulary. `--quick`: that corpus and
10,000 copies (the start-up to the first step on the demo corpus only), this checkout only,
cold only, once (under a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import train_until_first_step

DEMO = Path(__file__).resolve().parent.parent / "distill" / "demo"
TEACHER, STUDENT = DEMO / "teacher", DEMO / "student-init"
K, MAX_LENGTH = 20, 128
# The demo's train section (distill/demo/demo.yaml), one step.
TRAIN_FLAGS = ["--student", str(STUDENT), "--no-lora", "--alpha", "0.9", "--batch-size", "64",
               "--max-length", str(MAX_LENGTH), "--eval-fraction", "0", "--max-steps", "1", "--logging-steps", "1"]


def synthetic_demo_corpus(root: Path, n: int = 2000, seed: int = 0) -> Path:
    from transformers import AutoTokenizer

    from distill import corpus

    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        t = int(rng.integers(1, 7))
        top = np.sort(rng.uniform(-12, 0, size=(t, K)).astype(np.float32), axis=1)[:, ::-1]
        ids = rng.integers(0, len(tokenizer), size=(t, K))
        records.append({"id": f"r{i}", "prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}],
                        "response": f"a{i}", "prompt_token_ids": rng.integers(0, len(tokenizer), size=22).tolist(),
                        "response_token_ids": ids[:, 0].tolist(), "response_logprobs": top[:, 0].copy(),
                        "topk_token_ids": ids, "topk_logprobs": top, "finish_reason": "stop"})
    table, checked = corpus.records_to_checked_table(records, K, corpus.DEFAULT_ENCODING, len(tokenizer))
    corpus.write_shard(root, 0, table, checked=checked)  # stamped, as generate writes it
    teacher = corpus.TeacherInfo(model=str(TEACHER), **corpus.tokenizer_fingerprint(tokenizer))
    corpus.write_manifest(root, corpus.Manifest(teacher=teacher, generation={"top_k": K},
                                                stats=corpus.corpus_stats(root)))
    return root


def copies(source: Path, root: Path, n: int, shards: int) -> Path:
    """`n` records: the source's records over and over (ids made unique), in `shards` shards, as stored,
    each stamped as curate stamps rows taken from stamped shards (where the source's are)."""
    from distill import corpus

    stored = pa.concat_tables([pq.read_table(p) for p in corpus.shard_paths(source)])
    table = pa.concat_tables([stored] * -(-n // stored.num_rows)).slice(0, n)
    ids = [f"{rid}-{i}" for i, rid in enumerate(table["id"].to_pylist())]
    table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids))
    size = -(-n // shards)
    stamps = [corpus.verified_stamp(p) for p in corpus.shard_paths(source)]
    bound = max(s.max_topk_id for s in stamps) if all(stamps) else None
    checked = None if bound is None else corpus.TopkChecked(corpus.read_manifest(source).generation.top_k, bound)
    for shard in range(shards):
        corpus.write_shard(root, shard, table.slice(shard * size, size), checked=checked)
    manifest = corpus.read_manifest(source)
    corpus.write_manifest(root, manifest.model_copy(update={"stats": corpus.corpus_stats(root)}))
    return root


def child_startup(corpus_dir: str, out: str) -> None:
    """`distill train` as the command line runs it, stopped when its first training step starts."""
    train_until_first_step(["--corpus", corpus_dir, "--out", out, *TRAIN_FLAGS])


def child_prepass(corpus_dir: str, scratch: str) -> None:
    """The corpus work `train` does before loading the model, timed in-process after the imports."""
    import datasets  # noqa: F401  (imported here, outside the timing, as train imports it)

    from distill import corpus
    from distill.train import data

    if hasattr(data, "prepare_training_data"):
        def prepass():
            data.prepare_training_data(Path(corpus_dir), MAX_LENGTH, Path(scratch))
    else:  # a checkout from before the single pass: the four reads its `train` made
        import pyarrow.compute as pc

        def prepass():
            corpus.validate(corpus_dir)
            max((pc.max(pc.list_flatten(pc.list_flatten(b.column(0)))).as_py() or 0
                 for b in corpus.iter_batches(corpus_dir, columns=["topk_token_ids"])), default=0)
            corpus.load_dataset(corpus_dir).filter(lambda r: data.trainable(r, MAX_LENGTH))
    started = time.perf_counter()
    prepass()
    print(json.dumps({"prepass_s": time.perf_counter() - started}), flush=True)


def checkout(python: str) -> str:
    """Where `python` imports `distill` from (as the children run: a script, not from the working directory)."""
    probe = "import distill, pathlib; print(pathlib.Path(distill.__file__).parent.parent)"
    return subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, check=True,
                          cwd=tempfile.gettempdir()).stdout.strip()


def measure(python: str, what: str, corpus_dir: Path, work: Path, cache: Path) -> float:
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    out = tempfile.mkdtemp(dir=work)
    started = time.time()
    done = subprocess.run([python, __file__, "--child", what, str(corpus_dir), out], env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{python} {what} on {corpus_dir} failed:\n{done.stderr[-3000:]}")
    return lines[-1]["first_step_at"] - started if what == "startup" else lines[-1]["prepass_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, help="the demo corpus (default: synthesised demo-shaped records)")
    ap.add_argument("--records", type=int, default=100_000, help="records of the copied corpus")
    ap.add_argument("--shards", type=int, default=8, help="shards of the copied corpus")
    ap.add_argument("--before", help="the Python of another checkout, measured side by side")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is shown)")
    ap.add_argument("--quick", action="store_true", help="small corpora, this checkout only, cold only, once")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, corpus_dir, out = args.child
        (child_startup if what == "startup" else child_prepass)(corpus_dir, out)
        return
    from distill import corpus

    if args.quick:
        args.records, args.shards, args.before, args.repeat = 10_000, 4, None, 1
    runs = {"this checkout": sys.executable, **({"before": args.before} if args.before else {})}
    for name, python in runs.items():
        print(f"{name}: {checkout(python)} ({python})")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; median of {args.repeat} run(s)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = args.corpus or synthetic_demo_corpus(tmp / "demo")
        corpora = {"demo": demo, f"{args.records:,} copies": copies(demo, tmp / "copies", args.records, args.shards)}
        columns = list(reversed(runs))
        print(f"\n{'seconds':<44}" + "".join(f"{name:>16}" for name in columns))
        for label, root in corpora.items():
            stats = corpus.read_manifest(root).stats
            print(f"{label} corpus: {stats.records:,} records, {stats.shards} shard(s), {stats.bytes / 1e6:.1f} MB")
            for what, title in (("startup", "command -> first training step"), ("prepass", "corpus pre-pass alone")):
                if args.quick and what == "startup" and label != "demo":
                    continue
                temperatures = ("cold",) if args.quick else ("cold", "warm")
                results = {t: {} for t in temperatures}
                for name in columns:
                    times = {t: [] for t in temperatures}
                    for run in range(args.repeat):
                        cache = tmp / f"cache-{name}-{what}-{label}-{run}".replace(" ", "_")
                        for temperature in temperatures:  # warm: the same cache again
                            times[temperature].append(measure(runs[name], what, root, tmp / "work", cache))
                    for temperature in temperatures:
                        results[temperature][name] = statistics.median(times[temperature])
                for temperature, row in results.items():
                    print(f"  {title + ', ' + temperature:<42}" + "".join(f"{row[n]:>16.2f}" for n in columns))


if __name__ == "__main__":
    main()
