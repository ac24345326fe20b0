"""Full-ranking metrics over a user x item score matrix, vectorised with NumPy.

Binary relevance (a target is relevant, everything else is not), the usual top-K protocol:
seen items are excluded by setting their scores to -inf before taking the top K (`top_k`, the one
top-k of the project: recsys.scoring.topk, ties by position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.scoring.topk import top_k

__all__ = ["PerUser", "bootstrap_ci", "per_user_metrics", "top_k"]


def _hits(ranked: np.ndarray, targets: Sequence[np.ndarray]) -> np.ndarray:
    """[U, k] bool: is the item at each rank one of the user's targets."""
    hits = np.zeros(ranked.shape, dtype=bool)
    for u, t in enumerate(targets):  # one vectorised isin per user; U is thousands, not millions
        hits[u] = np.isin(ranked[u], t)
    return hits


@dataclass(frozen=True)
class PerUser:
    """Per-user metric values (for bootstrap intervals and paired comparisons)."""

    ndcg: np.ndarray
    recall: np.ndarray
    hit: np.ndarray
    mrr: np.ndarray


def per_user_metrics(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> PerUser:
    """NDCG@k, Recall@k (hits / min(k, |targets|)), HitRate@k and MRR@k per user."""
    ranked = ranked[:, :k]
    hits = _hits(ranked, targets)
    n_targets = np.array([len(np.unique(t)) for t in targets], dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits * discounts).sum(1)
    ideal_counts = np.minimum(n_targets, k).astype(int)
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[ideal_counts]
    with np.errstate(invalid="ignore", divide="ignore"):
        ndcg = np.where(ideal > 0, dcg / ideal, 0.0)
        recall = np.where(n_targets > 0, hits.sum(1) / np.minimum(n_targets, k), 0.0)
    first = np.where(hits.any(1), hits.argmax(1) + 1, 0)
    mrr = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    hit = np.asarray(hits.any(1), dtype=np.float64)
    return PerUser(ndcg=ndcg, recall=recall, hit=hit, mrr=mrr)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over users."""
    rng = np.random.default_rng(seed)
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    means = np.empty(n_boot)
    for b in range(0, n_boot, 100):  # chunked to bound memory for large U
        idx = rng.integers(0, n, size=(min(100, n_boot - b), n))
        means[b : b + len(idx)] = values[idx].mean(1)
    return (float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2)))
