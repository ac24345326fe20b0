"""Non-learned baselines (NumPy only): the bar every learned model must clear."""

from __future__ import annotations

import numpy as np


class Popularity:
    """Score = how often the item was a positive in the training window (optionally strength-weighted).

    Ties are broken by item_idx through a tiny decreasing offset, so rankings are deterministic.
    """

    def __init__(self, counts: np.ndarray) -> None:
        counts = np.asarray(counts, dtype=np.float64)
        self.counts = counts
        self._scores = (counts - np.arange(len(counts)) * 1e-9).astype(np.float64)

    @classmethod
    def fit(cls, item_idx: np.ndarray, n_items: int, weights: np.ndarray | None = None) -> Popularity:
        """Count positives per item; `item_idx` [n] of the training positives."""
        return cls(np.bincount(np.asarray(item_idx, dtype=np.int64), weights=weights, minlength=n_items)[:n_items])

    @property
    def n_items(self) -> int:
        return len(self.counts)

    def scores(self, n_users: int) -> np.ndarray:
        """[n_users, n_items] scores (a broadcast view: no per-user copy)."""
        return np.broadcast_to(self._scores.astype(np.float32), (n_users, self.n_items))
