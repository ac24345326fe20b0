"""Cold-item exploration: reserved places in the top-k for items nobody has interacted with yet.

A blender trained on logged behaviour ranks an item without behaviour below every item with some,
so new items never get the exposure that would give them behaviour. The policy here is explicit and
measured: of each user's top `k`, the last `slots` places go to the items without behaviour that
the text matcher scores highest for that user (the exploration rate is slots / k); the other places
keep the ranker's order. `recsys evaluate --cold-slots N` reports it as the `blend_explore` system
next to the plain blend, with each system's share of cold items in its top k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.errors import ConfigError


def reserve_cold_slots(
    scores: np.ndarray, prior: np.ndarray, cold: np.ndarray, seen: Sequence[np.ndarray], *, k: int, slots: int
) -> np.ndarray:
    """scores [U, I] (ranker, -inf = not a candidate), prior [U, I] (text match), cold [I] bool (no
    behaviour), seen per user (never shown) -> scores [U, I] whose top k are the ranker's top
    k - slots items with behaviour, then the `slots` best cold items by prior."""
    if not 0 <= slots <= k:
        raise ConfigError(f"cold slots must be in [0, k={k}], got {slots}")
    out = np.array(scores, np.float64, copy=True)
    if slots == 0:
        return out
    for u in range(len(out)):
        row = out[u]
        excluded = np.zeros(len(row), bool)
        excluded[np.asarray(seen[u], np.int64)] = True
        warm = np.flatnonzero(~cold & ~excluded & np.isfinite(row))
        head = warm[np.argsort(-row[warm], kind="stable")[: k - slots]]
        pool = np.flatnonzero(cold & ~excluded & np.isfinite(prior[u]))
        picked = pool[np.argsort(-prior[u][pool], kind="stable")[:slots]]
        top = np.concatenate([head, picked])
        finite = row[np.isfinite(row)]
        base = (finite.max() if len(finite) else 0.0) + 1.0
        row[top] = base + np.arange(len(top), 0, -1)  # above every other score, in this order
    return out


def cold_share(scores: np.ndarray, cold: np.ndarray, seen: Sequence[np.ndarray], k: int) -> float:
    """Mean share of each user's top k (seen items excluded, -inf never counted) held by cold items."""
    shares = []
    for u in range(len(scores)):
        row = np.array(scores[u], np.float64, copy=True)
        row[np.asarray(seen[u], np.int64)] = -np.inf
        top = np.argsort(-row, kind="stable")[:k]
        top = top[np.isfinite(row[top])]
        shares.append(float(cold[top].mean()) if len(top) else 0.0)
    return float(np.mean(shares)) if shares else 0.0
