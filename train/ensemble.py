"""Several teachers' top-k rows of the same response tokens, combined into one training target
(`distill train --ensemble mixture|sum`, docs/recipes/multi-teacher.md).

Each teacher m left, at every response position, its k_m best token ids with their
log-probabilities; the mass outside them is its tail. Two ways to learn from all of them:

- `mixture`: one distribution, P = sum_m w_m P_m, on the union of the teachers' top-k ids plus
  one tail bin. An id in teacher A's top-k but not in B's has an unknown probability under B
  (at most B's k-th): it counts as 0 there, and B's mass on it stays in B's share of the tail,
  so the tail is exactly sum_m w_m tail_m and every stored probability is used once. The
  student then learns KL(P || Q) like from one teacher: the rows are ordinary top-k rows of
  width sum_m k_m (padded with `PAD_LOGPROB` where the union is smaller), sorted best first.
- `sum`: the weighted sum of per-teacher divergences, sum_m w_m KL(P_m || Q), each on teacher
  m's own top-k + tail partition. The rows keep a teacher dimension `[T, M, K]` and
  `losses.kd_per_position` sums over it.

The difference: the mixture is one target, so where teachers disagree the student is asked to
spread its mass over both answers (mean-seeking over the ensemble); the sum of KLs has the same
minimiser on a shared partition (for forward KL the mixture is where its gradient vanishes) but
compares each teacher on the partition that teacher described, so no teacher's tail is read as
zero on another's ids; with reverse KL or JSD the two differ in what they optimise too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distill.train.losses import PAD_LOGPROB

PAD_ID = 0  # the id of a padded slot: never read (its probability is 0 on both sides)


def mixture_rows(ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray],
                 weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Teacher m's rows `ids[m] [T, k_m]`, `logprobs[m] [T, k_m]` and weights summing to 1 ->
    the mixture's rows `[T, sum k_m]` (ids, logprobs), best first, padded with `PAD_LOGPROB`."""
    width = sum(i.shape[1] for i in ids)
    positions = ids[0].shape[0]
    out_ids = np.full((positions, width), PAD_ID, dtype=np.int64)
    out_lps = np.full((positions, width), PAD_LOGPROB, dtype=np.float64)
    for t in range(positions):
        mass: dict[int, float] = {}
        for m, w in enumerate(weights):
            for token, lp in zip(ids[m][t].tolist(), logprobs[m][t].tolist()):
                if lp > PAD_LOGPROB:  # a padded slot of a smaller k holds no mass
                    mass[token] = mass.get(token, 0.0) + w * float(np.exp(lp))
        ranked = sorted(mass.items(), key=lambda item: -item[1])
        out_ids[t, :len(ranked)] = [token for token, _ in ranked]
        out_lps[t, :len(ranked)] = [np.log(p) if p > 0 else PAD_LOGPROB for _, p in ranked]
    return out_ids, out_lps


def stacked_rows(ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Teacher m's rows `[T, k_m]` -> `[T, M, max k_m]` (ids, logprobs), smaller k padded with
    `PAD_LOGPROB`: the `sum` ensemble's teacher dimension."""
    width = max(i.shape[1] for i in ids)
    positions = ids[0].shape[0]
    out_ids = np.full((positions, len(ids), width), PAD_ID, dtype=np.int64)
    out_lps = np.full((positions, len(ids), width), PAD_LOGPROB, dtype=np.float64)
    for m, (i, lp) in enumerate(zip(ids, logprobs)):
        out_ids[:, m, :i.shape[1]] = i
        out_lps[:, m, :i.shape[1]] = lp
    return out_ids, out_lps
