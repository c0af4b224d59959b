"""Low teacher confidence, read from the stored logprobs: the likeliest hallucinations."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill.curation.base import Filter


def per_record_stats(batch: pa.RecordBatch, entropy: bool = True) -> dict[str, np.ndarray]:
    """Mean and min response-token logprob and (if asked) mean top-k entropy per record, vectorised."""
    lengths = pc.list_value_length(batch.column("response_logprobs")).to_numpy(zero_copy_only=False).astype(np.int64)
    lp = pc.list_flatten(batch.column("response_logprobs")).to_numpy(zero_copy_only=False).astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    filled = lengths > 0  # reduceat over the non-empty records only: their starts strictly increase
    n = np.maximum(lengths, 1)

    def reduce(values, ufunc, fill):
        out = np.full(len(lengths), fill, dtype=np.float64)
        if filled.any():
            out[filled] = ufunc.reduceat(values, starts[filled])
        return out

    stats = {"mean_logprob": reduce(lp, np.add, 0.0) / n, "min_logprob": reduce(lp, np.minimum, 0.0)}
    if entropy:
        rows = pc.list_flatten(batch.column("topk_logprobs"))
        k = int(pc.list_value_length(rows)[0].as_py()) if len(rows) else 1
        p = np.exp(pc.list_flatten(rows).to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, k))
        p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-12)  # renormalised over the top-k
        stats["mean_entropy"] = reduce(-(p * np.log(np.maximum(p, 1e-12))).sum(axis=1), np.add, 0.0) / n
    return stats


class TeacherConfidenceFilter(Filter):
    """Defaults are conservative: only a mean token logprob below -2.5 (the teacher gave its own
    tokens < 8 % on average) fails; set the other thresholds to tighten."""
    name = "teacher_confidence"
    columns = ("response_logprobs", "topk_logprobs")
    min_mean_logprob: float | None = -2.5
    min_token_logprob: float | None = None
    max_mean_entropy: float | None = None

    def reads(self):
        return self.columns if self.max_mean_entropy is not None else ("response_logprobs",)

    def check(self, record):
        """Per record (the reference for `check_batch`, and what plain loops would do)."""
        lp = np.asarray(record["response_logprobs"], dtype=np.float64)
        top = np.exp(np.asarray(record["topk_logprobs"], dtype=np.float64))
        p = top / np.maximum(top.sum(axis=1, keepdims=True), 1e-12)
        entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1)
        return self._verdict(lp.mean() if len(lp) else 0.0, lp.min() if len(lp) else 0.0,
                             entropy.mean() if len(lp) else 0.0)

    def check_batch(self, batch: pa.RecordBatch, rows: list[int]) -> dict[int, str]:
        s = per_record_stats(batch, entropy=self.max_mean_entropy is not None)
        entropy = s.get("mean_entropy", np.zeros(batch.num_rows))
        failed = {i: self._verdict(s["mean_logprob"][i], s["min_logprob"][i], entropy[i]) for i in rows}
        return {i: v for i, v in failed.items() if v is not None}

    def _verdict(self, mean_lp: float, min_lp: float, entropy: float) -> str | None:
        if self.min_mean_logprob is not None and mean_lp < self.min_mean_logprob:
            return f"mean logprob {mean_lp:.2f} < {self.min_mean_logprob}"
        if self.min_token_logprob is not None and min_lp < self.min_token_logprob:
            return f"min token logprob {min_lp:.2f} < {self.min_token_logprob}"
        if self.max_mean_entropy is not None and entropy > self.max_mean_entropy:
            return f"mean top-k entropy {entropy:.2f} > {self.max_mean_entropy}"
        return None
