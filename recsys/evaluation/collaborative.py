"""Collaborative-filtering baselines for full-ranking evaluation (no text): item-kNN, EASE, ALS.

All share one shape: `fit(user_idx, item_idx, n_users, n_items)` on training interactions, then
`scores(user_items)` -> [U, I] float32, where `user_items` is a CSR matrix of each evaluated user's
interactions before their cutoff (so a user's newest interactions count even if they are newer than
the training window, exactly as the text models see them through their histories).
"""

from __future__ import annotations

import numpy as np

from recsys.compat import require


def interaction_matrix(user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, n_items: int):
    """Binary CSR [n_users, n_items] (duplicates collapse to 1)."""
    sparse = require("scipy.sparse")
    data = np.ones(len(user_idx), dtype=np.float32)
    matrix = sparse.csr_matrix((data, (user_idx, item_idx)), shape=(n_users, n_items))
    matrix.data[:] = 1.0
    return matrix


def rows_matrix(rows: list[np.ndarray], n_items: int):
    """CSR [len(rows), n_items] with ones at each row's items."""
    lengths = [len(r) for r in rows]
    user = np.repeat(np.arange(len(rows)), lengths)
    items = np.concatenate(rows).astype(np.int64) if rows and sum(lengths) else np.zeros(0, dtype=np.int64)
    return interaction_matrix(user, items, len(rows), n_items)


class ItemKNN:
    """Item-item cosine similarity over co-occurrence in users' histories, top-k neighbours kept."""

    def __init__(self, neighbours: int = 100, shrink: float = 10.0) -> None:
        self.neighbours = neighbours
        self.shrink = shrink

    def fit(self, user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, n_items: int) -> ItemKNN:
        x = interaction_matrix(user_idx, item_idx, n_users, n_items)
        co = (x.T @ x).toarray().astype(np.float32)
        norms = np.sqrt(np.diag(co))
        sim = co / (np.outer(norms, norms) + self.shrink)
        np.fill_diagonal(sim, 0.0)
        if self.neighbours < n_items:
            cut = np.partition(sim, -self.neighbours, axis=0)[-self.neighbours]
            sim = np.where(sim >= cut[None, :], sim, 0.0)
        self.similarity = sim.astype(np.float32)
        return self

    def scores(self, user_items) -> np.ndarray:
        return np.asarray(user_items @ self.similarity, dtype=np.float32)


class EASE:
    """Embarrassingly Shallow Autoencoder (Steck 2019): closed-form item-item weights, zero diagonal."""

    def __init__(self, l2: float = 200.0) -> None:
        self.l2 = l2

    def fit(self, user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, n_items: int) -> EASE:
        x = interaction_matrix(user_idx, item_idx, n_users, n_items)
        gram = (x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices(n_items)] += self.l2
        precision = np.linalg.inv(gram)
        weights = precision / (-np.diag(precision))
        np.fill_diagonal(weights, 0.0)
        self.weights = weights.astype(np.float32)
        return self

    def scores(self, user_items) -> np.ndarray:
        return np.asarray(user_items @ self.weights, dtype=np.float32)


class ALS:
    """Implicit-feedback ALS (the `implicit` package); users folded in from their interactions."""

    def __init__(self, factors: int = 64, regularization: float = 0.05, iterations: int = 15, alpha: float = 10.0, seed: int = 0) -> None:
        self.factors = factors
        self.regularization = regularization
        self.iterations = iterations
        self.alpha = alpha
        self.seed = seed

    def fit(self, user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, n_items: int) -> ALS:
        implicit_als = require("implicit.als")
        threadpoolctl = require("threadpoolctl")
        x = interaction_matrix(user_idx, item_idx, n_users, n_items)
        with threadpoolctl.threadpool_limits(1, "blas"):  # implicit wants single-threaded BLAS
            model = implicit_als.AlternatingLeastSquares(
                factors=self.factors, regularization=self.regularization, iterations=self.iterations,
                alpha=self.alpha, random_state=self.seed, use_gpu=False,
            )
            model.fit(x, show_progress=False)
        self.model = model
        return self

    def scores(self, user_items) -> np.ndarray:
        user_factors = self.model.recalculate_user(np.arange(user_items.shape[0]), user_items)
        return np.asarray(user_factors @ self.model.item_factors.T, dtype=np.float32)
