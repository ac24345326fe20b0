"""Match scores: the matcher's role in the request path, independent of how its towers run.

An `EmbeddingMatcher` is catalogue item embeddings [n_items, D] (L2-normalised) plus a user encoder
that maps padded histories to user embeddings [B, D]. In production the encoder is the ONNX user
tower over the same item embeddings (`recsys.scoring.matcher.tower_encoder`); in tests and baselines
it is `mean_pool_encoder`. `user_vectors` is the one place a history becomes a user vector, for every
caller (service, batch, ranker training, evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from recsys.data.prepared import Histories

# hist_item_idx [B, N] (-1 pad), hist_event_code [B, N], hist_age_s [B, N] -> user embeddings [B, D]
UserEncoderFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def mean_pool_encoder(item_embeddings: np.ndarray, half_life_s: float = 7 * 86_400.0) -> UserEncoderFn:
    """A weight-free user tower: recency-weighted mean of history item embeddings, L2-normalised.
    Stands in for the ONNX user tower wherever only item embeddings exist (tests, baselines)."""
    emb = np.asarray(item_embeddings, np.float32)

    def encode(items: np.ndarray, codes: np.ndarray, ages: np.ndarray) -> np.ndarray:
        items = np.asarray(items, np.int64)
        mask = items >= 0
        weight = np.where(mask, np.exp2(-np.asarray(ages, np.float64) / half_life_s), 0.0)
        pooled = (emb[np.maximum(items, 0)] * weight[..., None].astype(np.float32)).sum(-2)
        norm = np.linalg.norm(pooled, axis=-1, keepdims=True)
        return np.asarray(pooled / np.maximum(norm, 1e-12), np.float32)

    return encode


@dataclass
class EmbeddingMatcher:
    """Match score = <user embedding from history, item embedding>. item_embeddings [n_items, D]
    (L2-normalised), user_encoder maps padded histories to [B, D]."""

    item_embeddings: np.ndarray
    user_encoder: UserEncoderFn

    @property
    def dim(self) -> int:
        return int(self.item_embeddings.shape[1])

    def user_vectors(self, history: Histories) -> np.ndarray:
        """Histories [B, N] (most recent first, -1 padded) -> user embeddings [B, D] float32.
        Row-wise: a row's vector does not depend on the other rows of the batch."""
        if not len(history.item_idx):
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.user_encoder(history.item_idx, history.event_code, history.age_s), np.float32)
