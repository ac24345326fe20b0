"""Cold-item exploration: reserved places in the top-k for items nobody has interacted with yet.

A blender trained on logged behaviour ranks an item without behaviour below every item with some,
so new items never get the exposure that would give them behaviour. The policy here is explicit and
measured: of each user's top `k`, the last `slots` places go to the items without behaviour that
a text matcher scores highest for that user (the exploration rate is slots / k); the other places
keep the ranker's order. One rule, `cold_slot_order`, serves both callers:

    evaluation   `recsys evaluate --cold-slots N [--cold-prior MATCHER]` reports it as the
                 `blend_explore` system next to the plain blend (`reserve_cold_slots`), with each
                 system's share of cold items in its top k;
    serving      a ranker trained with `recsys train ranker --cold-slots N` records the rate, and
                 the one request path (`RequestScorer.score`) applies it to every ranked list, the
                 served matcher's score choosing the cold candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.errors import ConfigError


def check_slots(slots: int, k: int) -> None:
    if not 0 <= slots <= k:
        raise ConfigError(f"cold slots must be in [0, k={k}], got {slots}")


def cold_slot_order(scores: np.ndarray, prior: np.ndarray, cold: np.ndarray, *, k: int, slots: int) -> np.ndarray:
    """One list: scores [n] (ranker; -inf = not rankable), prior [n] (text match; -inf = none), cold
    [n] bool (no behaviour) -> positions [<= k]: the ranker's best k - slots items with behaviour,
    then the `slots` best cold items by prior, then (if either side ran short) the best of the rest
    by score. Ties keep input order (stable sorts)."""
    check_slots(slots, k)
    rankable = np.isfinite(scores)
    warm = np.flatnonzero(~cold & rankable)
    head = warm[np.argsort(-scores[warm], kind="stable")[: k - slots]]
    pool = np.flatnonzero(cold & np.isfinite(prior))
    picked = pool[np.argsort(-prior[pool], kind="stable")[:slots]]
    top = np.concatenate([head, picked]).astype(np.int64)
    if len(top) < k:  # too few warm or cold items: fill from the rest in the ranker's order
        rest = np.flatnonzero(rankable)
        rest = rest[~np.isin(rest, top)]
        top = np.concatenate([top, rest[np.argsort(-scores[rest], kind="stable")[: k - len(top)]]])
    return top


def reserve_cold_slots(
    scores: np.ndarray, prior: np.ndarray, cold: np.ndarray, seen: Sequence[np.ndarray], *, k: int, slots: int
) -> np.ndarray:
    """scores [U, I] (ranker, -inf = not a candidate), prior [U, I] (text match), cold [I] bool (no
    behaviour), seen per user (never shown) -> scores [U, I] whose top k are `cold_slot_order`'s."""
    check_slots(slots, k)
    out = np.array(scores, np.float64, copy=True)
    if slots == 0:
        return out
    for u in range(len(out)):
        row = out[u]
        excluded = np.zeros(len(row), bool)
        excluded[np.asarray(seen[u], np.int64)] = True
        masked = np.where(excluded, -np.inf, row)
        top = cold_slot_order(masked, np.where(excluded, -np.inf, prior[u]), cold, k=k, slots=slots)
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
