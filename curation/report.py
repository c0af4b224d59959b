"""The curation report: counts and percentages per filter, tokens kept, example rejections and
before/after histograms, as `report.json`, `report.md` and PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill.curation.confidence import per_record_stats
from distill.files import write_json

EXAMPLES_PER_FILTER = 3
EXAMPLE_CHARS = 200


class Report:
    """Counts per filter, in pipeline order: `filter_names[n]` labels the n-th filter, and
    `add` is told which filter dropped each row by that index (never by parsing the reason)."""
    READS = ("id", "response", "response_token_ids", "response_logprobs")  # the columns `add` reads

    def __init__(self, filter_names: list[str]):
        self.names = filter_names
        self.rejected = [0] * len(filter_names)
        self.rejected_tokens = [0] * len(filter_names)
        self.examples: list[list[dict]] = [[] for _ in filter_names]
        self.masked = 0
        self.lengths: list[np.ndarray] = []
        self.mean_logprobs: list[np.ndarray] = []
        self.kept: list[np.ndarray] = []

    def add(self, batch: pa.RecordBatch, rejected_by: list[int | None], reasons: list[str | None]) -> None:
        """`rejected_by[i]`: index of the filter that dropped row i (None = kept); `reasons[i]` its
        `reject_reason`."""
        keep = np.array([n is None for n in rejected_by], dtype=bool)
        lengths = pc.list_value_length(batch.column("response_token_ids")).to_numpy(zero_copy_only=False)
        self.lengths.append(lengths)
        self.mean_logprobs.append(per_record_stats(batch, entropy=False)["mean_logprob"])
        self.kept.append(keep)
        ids, texts = batch.column("id"), batch.column("response")
        for i, n in enumerate(rejected_by):
            if n is None:
                continue
            self.rejected[n] += 1
            self.rejected_tokens[n] += int(lengths[i])
            if len(self.examples[n]) < EXAMPLES_PER_FILTER:
                text = texts[i].as_py() or ""
                self.examples[n].append({"id": ids[i].as_py(), "reason": reasons[i],
                                            "response": text[:EXAMPLE_CHARS] + ("..." if len(text) > EXAMPLE_CHARS else "")})

    def summary(self) -> dict:
        lengths, keep = np.concatenate(self.lengths or [[]]), np.concatenate(self.kept or [[]]).astype(bool)
        n = len(lengths)
        pct = lambda x: round(100.0 * x / max(n, 1), 2)
        return {
            "input": {"records": n, "response_tokens": int(lengths.sum())},
            "kept": {"records": int(keep.sum()), "percent": pct(keep.sum()), "response_tokens": int(lengths[keep].sum())},
            "rejected": {"records": int((~keep).sum()), "percent": pct((~keep).sum())},
            "pii_masked_records": self.masked,
            "filters": [{"name": name, "rejected": self.rejected[n], "percent": pct(self.rejected[n]),
                         "rejected_tokens": self.rejected_tokens[n], "examples": self.examples[n]}
                        for n, name in enumerate(self.names)],
        } | {"advice": advice(self.names, self.rejected, int((~keep).sum()))}

    def write(self, out: Path) -> str:
        summary = self.summary()
        summary["plots"] = self._plots(Path(out))
        (Path(out) / "report.md").write_text(markdown(summary))
        write_json(Path(out) / "report.json", summary)  # written last: `distill run` trusts it as "done"
        return table(summary)

    def _plots(self, out: Path) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keep = np.concatenate(self.kept or [[]]).astype(bool)
        names = []
        for key, values, xlabel in (("response_length", self.lengths, "response tokens"),
                                    ("mean_logprob", self.mean_logprobs, "mean teacher logprob per token")):
            data = np.concatenate(values or [[]]).astype(float)
            fig, ax = plt.subplots(figsize=(6, 3.5))
            bins = np.histogram_bin_edges(data, bins=40) if len(data) else 10
            ax.hist(data, bins=bins, alpha=0.5, label=f"before ({len(data)})")
            ax.hist(data[keep], bins=bins, alpha=0.7, label=f"after ({int(keep.sum())})")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("records")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / f"{key}.png", dpi=100)
            plt.close(fig)
            names.append(f"{key}.png")
        return names


def advice(names: list[str], rejected: list[int], total_rejected: int) -> list[str]:
    """What to change upstream when one cause dominates the rejections."""
    cut = sum(r for name, r in zip(names, rejected) if name == "finish_reason")
    if total_rejected and cut > total_rejected / 2:
        return [f"most rejections ({cut:,} of {total_rejected:,}) are answers that did not finish (cut at "
                "`max_tokens`): raise generate's `max_tokens`, or drop the `finish_reason` filter to train on "
                "truncated answers"]
    return []


def table(summary: dict) -> str:
    lines = [f"{'filter':<22}{'rejected':>10}{'%':>8}{'tokens':>12}"]
    for f in summary["filters"]:
        lines.append(f"{f['name']:<22}{f['rejected']:>10,}{f['percent']:>8.2f}{f['rejected_tokens']:>12,}")
    k, i = summary["kept"], summary["input"]
    lines.append(f"{'kept':<22}{k['records']:>10,}{k['percent']:>8.2f}{k['response_tokens']:>12,}")
    lines.append(f"{'input':<22}{i['records']:>10,}{100:>8.2f}{i['response_tokens']:>12,}")
    if summary["pii_masked_records"]:
        lines.append(f"PII masked (kept, loss_mask false on PII tokens): {summary['pii_masked_records']:,} records")
    lines += [f"advice: {a}" for a in summary["advice"]]
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    rows = ["| filter | rejected | % | rejected tokens |", "|---|---:|---:|---:|"]
    rows += [f"| {f['name']} | {f['rejected']:,} | {f['percent']:.2f} | {f['rejected_tokens']:,} |"
             for f in summary["filters"]]
    k, i = summary["kept"], summary["input"]
    rows.append(f"| **kept** | {k['records']:,} | {k['percent']:.2f} | {k['response_tokens']:,} tokens kept |")
    parts = ["# Curation report", "", f"{i['records']:,} records in, {k['records']:,} kept "
             f"({k['percent']:.2f} %), {i['response_tokens']:,} -> {k['response_tokens']:,} response tokens.", "",
             *rows, ""]
    if summary["pii_masked_records"]:
        parts += [f"{summary['pii_masked_records']:,} records kept with PII tokens masked out of the loss.", ""]
    parts += [*(f"**Advice:** {a}" for a in summary["advice"]), ""] if summary["advice"] else []
    parts += ["## Example rejections", ""]
    for f in summary["filters"]:
        for ex in f["examples"]:
            parts.append(f"- `{ex['id']}` **{ex['reason']}**: {ex['response']!r}")
    parts += ["", *[f"![{p}]({p})" for p in summary.get("plots", [])], ""]
    return "\n".join(parts)
