"""The one top-k: best-first positions of the k largest scores, with exclusions and a fixed tie rule.

Used by the request scorer (Rank, Recommend, batch top-K), the evaluation metrics and the baselines.
Ties are broken by position (lower first), never by anything else, so a list never depends on how
argpartition happened to split equal scores (and tie order never looks at a label).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k(scores: np.ndarray, k: int, exclude: Sequence[np.ndarray] | np.ndarray | None = None) -> np.ndarray:
    """scores [n] -> positions [<= k] of the k best finite scores, best first (excluded: never);
    scores [U, n] -> [U, min(k, n)] per row (rows with fewer finite scores end in non-finite ones).
    `exclude`: positions [m] for 1-d scores, one array per row for 2-d."""
    scores = np.array(scores, copy=True)
    if scores.ndim == 1:
        if exclude is not None and len(exclude):
            scores[np.asarray(exclude, np.int64)] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        return _row_top(scores, k) if k > 0 else np.zeros(0, np.int64)
    if exclude is not None:
        rows = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
        cols = np.concatenate([np.asarray(e, np.int64) for e in exclude]) if len(rows) else rows
        scores[rows, cols] = -np.inf
    k = min(k, scores.shape[1])
    if k <= 0:
        return np.zeros((len(scores), 0), np.int64)
    negated = -scores
    part = np.argpartition(negated, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(negated, part, 1).max(1)
    out = np.take_along_axis(part, np.lexsort((part, np.take_along_axis(negated, part, 1)), axis=1), 1)
    # Rows with more ties at the k-th score than argpartition kept: choose the lowest positions.
    for u in np.flatnonzero((negated <= kth[:, None]).sum(1) > k):
        out[u] = _row_top(scores[u], k)
    return out.astype(np.int64)


def _row_top(scores: np.ndarray, k: int) -> np.ndarray:
    """1-d: the k best positions (k <= number of finite scores), best first, ties by position."""
    negated = -scores
    part = np.argpartition(negated, k - 1)[:k]
    kth = negated[part].max()
    pool = np.flatnonzero(negated <= kth)  # every position tied with the k-th score included
    return pool[np.lexsort((pool, negated[pool]))][:k].astype(np.int64)
