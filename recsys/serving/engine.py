"""The service's adapter over the one request path (`recsys.scoring.request.RequestScorer`, R = 1).

What stays here is serving-only: the live feature state and its reader/writer lock, id <-> item_idx
maps, a request's history override as item_idx, the edge check of extra features, and the baseline
rankers of experiment configs. The scoring itself (user tower, match scores, point-in-time features,
cold-item masking, LightGBM, top-k) is the scorer's, shared with batch scoring, ranker training and
evaluation, so all give the same score for the same (user, item, time).

Cold items (not in the catalogue): match score from the text encoded on the fly, or 0.0 (the neutral
cosine) when no text came; behavioural features are those of a brand-new item. Unknown users have
no stored history: the user tower returns its learned cold-start vector and the user features are
those of a new user (FeatureState's own rule).

Baseline rankers of an experiment config (`BaselineModel`) take `rank_baseline` /
`recommend_baseline`: popularity reads the decayed item counts of the same live state (the
`item_pop_7d` feature, checked equal by a test), random draws per request; both are one vectorised
pass over the candidates (or the catalogue), with the scorer's exclusion rule and top-k.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from recsys.data.prepared import Histories
from recsys.data.schema import EVENT_CODES, StrengthRule
from recsys.features import DAY_US, NEVER, EventBatch, Features, FeatureState, request_keys
from recsys.scoring.request import CATALOGUE, ENCODED, NO_TEXT, RequestBatch, ScoredBatch, exclusions
from recsys.scoring.topk import top_k
from recsys.serving.model import BaselineModel, ItemCatalogue, ServingModel
from recsys.serving.users import UserIndex
from recsys.serving.validation import (
    EventsInput,
    FieldError,
    HistoryInput,
    RankInput,
    RecommendInput,
    ServedLists,
)

__all__ = ["CATALOGUE", "ENCODED", "NO_TEXT", "LiveState", "Ranked", "StateBusy", "rank", "recommend"]
_STRENGTH = StrengthRule()


class StateBusy(Exception):
    """A non-blocking read of the feature state found a writer holding or waiting for it."""


class RWLock:
    """Many readers (requests computing features) or one writer (events being applied)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self, blocking: bool = True) -> Iterator[None]:
        """blocking=False raises StateBusy instead of waiting for a writer (event-loop callers)."""
        with self._cond:
            if not blocking and (self._writer or self._waiting_writers):
                raise StateBusy
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class LiveState:
    """The feature state the server keeps current from the events RPCs, with the id maps.

    Owned by the server, not by a model: a hot reload swaps models and keeps everything learned from
    live events. New users get a row on their first event; beyond `max_users` the least recently
    active users are evicted and served as unknown users again (recsys.serving.users)."""

    def __init__(
        self, state: FeatureState, user_ids: Sequence[str], catalogue: ItemCatalogue, max_users: int | None = None
    ) -> None:
        self.state = state
        self.catalogue = catalogue
        self.users = UserIndex(user_ids, state, max_users)  # bounded: least recently active evicted
        state.forget_users(self.users.trim())
        self.lock = RWLock()
        self.events_applied = 0

    def user_idx(self, user_id: str) -> int:
        return self.users.get(user_id, -1)

    def apply(self, events: EventsInput) -> tuple[int, int, int]:
        """-> (accepted, skipped for unknown items, new users). Runs in a worker thread (the follower).

        Everything that reads only the events (item lookup, strengths, event codes, request keys) is
        computed before the write lock; the lock covers the user index and the state update alone,
        so the requests it holds off (an inline Rank goes to the pool instead) wait the least."""
        items = self.catalogue.lookup(events.item_ids)
        keep = np.flatnonzero(items >= 0)
        types = [events.event_types[i] for i in keep]
        request = request_keys(pl.Series([events.request_ids[i] for i in keep], dtype=pl.Utf8))
        strength = strengths(types, events.values[keep])
        codes = np.asarray([EVENT_CODES[t] for t in types], np.int8)
        with self.lock.write():
            users, evicted, new_users = self.users.assign([events.user_ids[i] for i in keep], events.ts_us[keep])
            self.state.forget_users(evicted)
            if len(keep):
                self.state.apply(EventBatch(users, items[keep], events.ts_us[keep], strength, codes, request))
                self.events_applied += len(keep)
        return len(keep), len(events) - len(keep), new_users

    def apply_served(self, lists: ServedLists) -> int:
        """Served lists as impressions: the state `apply(lists.events())` gives, with per-list work
        instead of per-event work (one user row per list, NumPy over the items). -> impressions applied.

        Equal to the generic fold: items the catalogue does not know are skipped, a list none of
        whose items is known does not touch its user (`apply` only admits users of kept events), and
        users are admitted in the order of their first kept event (tests/test_state.py, served lists).
        Runs on the state's one writer thread (the follower): between its two short write-locked steps
        (admit the users; count the impressions) requests see the lists' users admitted and not yet
        counted, as if the lists came a moment later."""
        items = self.catalogue.lookup(lists.item_ids)
        keep = items >= 0
        per_list = np.bincount(lists.list_of_item()[keep], minlength=len(lists.counts))
        present = np.flatnonzero(per_list)
        with self.lock.write():
            users, evicted, _ = self.users.assign([lists.user_ids[j] for j in present.tolist()], lists.ts_us[present])
            self.state.forget_users(evicted)
        rows, items, ts = np.repeat(users, per_list[present]), items[keep], np.repeat(lists.ts_us[present], per_list[present])
        # The user x item counts' sort and delta copy, outside the lock (only this thread writes the state):
        # requests wait for the swap, not for the O(|delta|) work (see the follower's sparse merges).
        prepared = self.state.user_item_impr.prepare_add(rows, items)
        with self.lock.write():
            self.state.apply_impressions(rows, items, ts, prepared)
            self.events_applied += len(items)
        return len(items)


def strengths(event_types: list[str], values: np.ndarray) -> np.ndarray:
    """Event strengths [n] (StrengthRule, unknown types 0). Batches without ratings (served lists,
    clicks) map types through the rule's table; ratings take the rule's Polars expression."""
    table = _STRENGTH.event_strength
    if "rating" not in event_types:
        return np.fromiter((table.get(t, 0.0) for t in event_types), np.float64, len(event_types))
    frame = pl.DataFrame({"event_type": event_types, "value": values}, schema={"event_type": pl.Utf8, "value": pl.Float64})
    return frame.select(_STRENGTH.expr())["strength"].fill_null(0.0).to_numpy()


@dataclass
class Ranked:
    """One served list, best first: positions into the request's candidates and their scores."""

    order: np.ndarray  # [k] candidate positions
    scores: np.ndarray  # [n] final scores (all candidates)
    match: np.ndarray  # [n] match scores
    source: np.ndarray  # [n] CATALOGUE | ENCODED | NO_TEXT
    features: Features | None = None
    contributions: np.ndarray | None = None  # [k, F] with explain
    bias: np.ndarray | None = None  # [k]


def history_arrays(history: HistoryInput, catalogue: ItemCatalogue, size: int, t_us: int) -> Histories:
    """A request's history (any order) -> Histories [1, size], most recent first; unknown items dropped."""
    idx = catalogue.lookup(history.item_ids)
    stamps = np.asarray(history.ts_us, np.int64)
    codes = np.asarray(history.codes, np.int8)
    keep = np.flatnonzero(idx >= 0)
    keep = keep[np.argsort(-stamps[keep], kind="stable")][:size]
    items = np.full((1, size), -1, np.int32)
    code = np.full((1, size), -1, np.int8)
    age = np.zeros((1, size), np.float32)
    items[0, : len(keep)] = idx[keep]
    code[0, : len(keep)] = codes[keep]
    age[0, : len(keep)] = (t_us - stamps[keep]) / 1e6
    return Histories(items, code, age)


def _extra(model: ServingModel, extra: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    unknown = sorted(set(extra) - set(model.extra_names))
    if unknown:
        known = ", ".join(model.extra_names) or "none"
        raise FieldError(
            "candidates.features", f"unknown feature {unknown[0]!r}: this model takes {known}"
        )
    return dict(extra)


def _ranked(scored: ScoredBatch) -> Ranked:
    """Request 0 of a scored batch as the served list."""
    return Ranked(
        scored.order[0], scored.scores, scored.match, scored.source, scored.features,
        scored.contributions[0] if scored.contributions else None, scored.bias[0] if scored.bias else None,
    )


def _history(live: LiveState, history: HistoryInput | None, t_us: int) -> list[Histories | None] | None:
    if history is None:
        return None
    return [history_arrays(history, live.catalogue, live.state.config.max_history, t_us)]


def rank(
    model: ServingModel, live: LiveState, request: RankInput, item_idx: np.ndarray,
    cold_vectors: np.ndarray | None = None, *, blocking: bool = True, clock: Any = None,
) -> Ranked:
    """Score a validated Rank request's candidates item_idx [n] (-1 = not in the catalogue; the
    vectors of the ones with text in `cold_vectors` [m, D], in order) and order them.
    blocking=False: StateBusy rather than wait while events are being applied. `clock`: the request's
    stage stopwatch (recsys.serving.latency.StageClock)."""
    cold = bool(len(item_idx)) and int(item_idx.min()) < 0
    has_text = np.fromiter(map(bool, request.texts), bool, len(request.texts)) if cold else None
    batch = RequestBatch(
        users=np.asarray([live.user_idx(request.user_id)], np.int64),
        times=np.asarray([request.time_us], np.int64),
        indptr=np.asarray([0, len(item_idx)], np.int64),
        items=np.asarray(item_idx, np.int64),
        contexts=[request.context],
        extra=_extra(model, request.extra),
        histories=_history(live, request.history, request.time_us),
        cold_vectors=cold_vectors,
        has_text=has_text,
    )
    with live.lock.read(blocking):
        scored = model.scorer(live.state).score(batch, top_k=request.top_k, explain=request.explain, clock=clock)
    return _ranked(scored)


def recommend(model: ServingModel, live: LiveState, request: RecommendInput) -> tuple[Ranked, np.ndarray]:
    """Exact top-`retrieve_k` of the catalogue by cosine (minus excluded ids and, unless
    include_seen, items the user interacted with), blended by the ranker -> (Ranked, item_idx)."""
    banned = live.catalogue.lookup(list(request.exclude))
    batch = RequestBatch(
        users=np.asarray([live.user_idx(request.user_id)], np.int64),
        times=np.asarray([request.time_us], np.int64),
        indptr=np.zeros(2, np.int64),
        items=np.zeros(0, np.int64),
        contexts=[request.context],
        histories=_history(live, request.history, request.time_us),
    )
    with live.lock.read():
        scored = model.scorer(live.state).recommend(
            batch, retrieve_k=request.retrieve_k, top_k=request.top_k, exclude=[banned[banned >= 0]],
            include_seen=request.include_seen, explain=request.explain,
        )
    return _ranked(scored), scored.items


# ------------------------------------------------------------------------------------------ baselines

POPULARITY_DAYS = 7.0  # the popularity baseline reads the decay window closest to this


def popularity_window(state: FeatureState) -> int:
    """Index of the decay window the popularity baseline uses (closest to 7 days, log scale)."""
    days = np.asarray(state.config.decay_days, np.float64)
    return int(np.argmin(np.abs(np.log(days / POPULARITY_DAYS))))


def popularity(state: FeatureState, item_idx: np.ndarray, t_us: int) -> np.ndarray:
    """Decayed interaction counts [n] of item_idx (all >= 0) as of t_us: the ranker feature
    item_pop_<window> (FeatureState.compute's own formula, clamped for times before the last event)."""
    w = popularity_window(state)
    tau = state.config.decay_days[w] * DAY_US
    refs = state.item_decay_ref[item_idx]
    age = np.where(refs == NEVER, 0, np.maximum(t_us - refs, 0)).astype(np.float64)
    return np.asarray(state.item_decay[item_idx, w] * np.exp(-age / tau), np.float64)


def _draws(user_id: str, request_id: str, n: int) -> np.ndarray:
    """n uniform draws seeded by (user, request): deterministic per request, independent across requests."""
    seed = int.from_bytes(hashlib.sha256(f"{user_id}\x00{request_id}".encode()).digest()[:8], "big")
    return np.random.default_rng(seed).random(n)


def rank_baseline(
    model: BaselineModel, live: LiveState, request: RankInput, item_idx: np.ndarray, *, blocking: bool = True
) -> Ranked:
    """Order candidates item_idx [n] (-1 = not in the catalogue) by a baseline. Candidates the
    catalogue does not know have no counts (popularity 0; their text is not encoded: source NO_TEXT)."""
    user_id, request_id, t_us, k = request.user_id, request.request_id, request.time_us, request.top_k
    n = len(item_idx)
    known = item_idx >= 0
    if model.kind == "random":
        scores = _draws(user_id, request_id, n)
    else:
        scores = np.zeros(n, np.float64)
        with live.lock.read(blocking):
            scores[known] = popularity(live.state, item_idx[known], t_us)
    order = top_k(scores, n if k <= 0 else min(k, n))
    source = np.where(known, CATALOGUE, NO_TEXT).astype(np.int8)
    return Ranked(order, scores, np.zeros(n, np.float64), source)


def recommend_baseline(model: BaselineModel, live: LiveState, request: RecommendInput) -> tuple[Ranked, np.ndarray]:
    """Top-k of the whole catalogue by a baseline, with the scorer's exclusions -> (Ranked over the
    returned items, their item_idx)."""
    user_id, request_id, t_us, history = request.user_id, request.request_id, request.time_us, request.history
    n_items = len(live.catalogue.ids)
    user = live.user_idx(user_id)
    banned = live.catalogue.lookup(list(request.exclude))
    with live.lock.read():
        hist = _history(live, history, t_us)
        stored = hist[0] if hist and hist[0] is not None else live.state.history(user, t_us)
        drop = exclusions(live.state, user, stored, exclude=banned[banned >= 0], include_seen=request.include_seen)
        if model.kind == "random":
            scores = _draws(user_id, request_id, n_items)
        else:
            scores = popularity(live.state, np.arange(n_items), t_us)
    idx = top_k(scores, request.top_k, drop)
    m = len(idx)
    ranked = Ranked(
        np.arange(m, dtype=np.int64), scores[idx], np.zeros(m, np.float64), np.full(m, CATALOGUE, np.int8)
    )
    return ranked, idx
