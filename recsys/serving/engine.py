"""The request path: ids -> item_idx, match scores, point-in-time features, LightGBM, top-k.

Vectorised over candidates (NumPy arrays indexed by position; no per-candidate Python beyond the id
lookup). Requests whose candidates the catalogue knows, without a history override, go through
`recsys.ranker.score_request` itself, the path the batch scorer and the evaluator use, so all three
give the same score for the same (user, item, time). Other requests take the same steps with two
documented substitutions:

* history override: the request's history replaces the stored one for the user tower and the
  co-visitation features (`FeatureState.compute(history=...)`);
* cold items (not in the catalogue): match score from the text encoded on the fly, or 0.0 (the
  neutral cosine) when no text came; behavioural features are those of a brand-new item (no counts,
  no attributes: zeros and NaN, CTR at the global prior), which the trees handle as missing values.

Unknown users have no stored history: the user tower returns its learned cold-start vector and the
user features are those of a new user (FeatureState's own rule).

Baseline rankers of an experiment config (`BaselineModel`) take `rank_baseline` / `recommend_baseline`:
popularity reads the decayed item counts of the same live state (the `item_pop_7d` feature, checked
equal by a test), random draws per request; both are one vectorised pass over the candidates (or the
catalogue), with the same exclusion rules as `retrieve`.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from recsys.data.prepared import Histories
from recsys.data.schema import EVENT_CODES, StrengthRule
from recsys.features import DAY_US, NEVER, EventBatch, Features, FeatureState, request_keys
from recsys.ranker import score_request
from recsys.serving.model import BaselineModel, ItemCatalogue, ServingModel
from recsys.serving.users import UserIndex
from recsys.serving.validation import EventsInput, FieldError, HistoryInput

# Sources of a scored item (values of the proto enum ItemSource).
CATALOGUE, ENCODED, NO_TEXT = 1, 2, 3
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
        """-> (accepted, skipped for unknown items, new users). Runs in a worker thread."""
        items = self.catalogue.lookup(events.item_ids)
        keep = np.flatnonzero(items >= 0)
        with self.lock.write():
            users, evicted, new_users = self.users.assign([events.user_ids[i] for i in keep], events.ts_us[keep])
            self.state.forget_users(evicted)
            if len(keep):
                types = [events.event_types[i] for i in keep]
                frame = pl.DataFrame(
                    {
                        "event_type": types,
                        "value": events.values[keep],
                        "request_id": pl.Series([events.request_ids[i] for i in keep], dtype=pl.Utf8),
                    }
                ).with_columns(_STRENGTH.expr())
                batch = EventBatch(
                    user_idx=users,
                    item_idx=items[keep],
                    ts_us=events.ts_us[keep],
                    strength=frame["strength"].fill_null(0.0).to_numpy(),
                    event_code=np.asarray([EVENT_CODES[t] for t in types], np.int8),
                    request=request_keys(frame["request_id"]),
                )
                self.state.apply(batch)
                self.events_applied += len(keep)
        return len(keep), len(events) - len(keep), new_users


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


def _context(model: ServingModel, context: Mapping[str, str | float]) -> dict[str, str | float | None]:
    """Every context the ranker knows (None -> NaN when the request lacks it); others are ignored."""
    return {name: context.get(name) for name in model.ranker.context_names}


def _extra(model: ServingModel, extra: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    unknown = sorted(set(extra) - set(model.extra_names))
    if unknown:
        known = ", ".join(model.extra_names) or "none"
        raise FieldError(
            "candidates.features", f"unknown feature {unknown[0]!r}: this model takes {known}"
        )
    return {name: extra.get(name, np.full(n, np.nan)) for name in model.extra_names}


def rank(
    model: ServingModel,
    live: LiveState,
    user_id: str,
    item_idx: np.ndarray,
    t_us: int,
    context: Mapping[str, str | float],
    extra: Mapping[str, np.ndarray],
    history: HistoryInput | None = None,
    cold_vectors: np.ndarray | None = None,
    has_text: np.ndarray | None = None,
    top_k: int = 0,
    explain: bool = False,
    blocking: bool = True,
) -> Ranked:
    """Score candidates item_idx [n] (-1 = not in the catalogue; their vectors in `cold_vectors`
    [m, D] for the ones with text, in order) and order them. blocking=False: StateBusy rather than
    wait while events are being applied."""
    n = len(item_idx)
    known = item_idx >= 0
    ctx = _context(model, context)
    extras = _extra(model, extra, n)
    user = live.user_idx(user_id)
    state = live.state
    source = np.where(known, CATALOGUE, NO_TEXT).astype(np.int8)
    if has_text is not None:
        source[~known & has_text] = ENCODED
    with live.lock.read(blocking):
        if known.all() and history is None:
            scores, features = score_request(model.ranker, state, user, item_idx, t_us, model.matcher, ctx, extras)
            match = features.matrix[:, features.names.index("match_score")].astype(np.float64)
        else:
            hist = (
                history_arrays(history, live.catalogue, state.config.max_history, t_us)
                if history is not None
                else state.history(user, t_us)
            )
            u = model.user_vectors(hist.item_idx, hist.event_code, hist.age_s)[0]
            match = np.zeros(n, np.float32)
            match[known] = model.item_emb[item_idx[known]] @ u
            encoded = np.flatnonzero(source == ENCODED)
            if len(encoded):
                assert cold_vectors is not None and len(cold_vectors) == len(encoded)
                match[encoded] = cold_vectors @ u
            features = state.compute(user, np.where(known, item_idx, 0), t_us, match, hist, ctx, extras)
            state.mask_unseen_items(features, np.flatnonzero(~known), in_catalogue=False)
            scores = model.ranker.score(features)
            match = match.astype(np.float64)
    k = n if top_k <= 0 else min(top_k, n)
    order = np.argsort(-scores, kind="stable")[:k]
    result = Ranked(order, scores, match, source, features)
    if explain:
        exp = model.ranker.explain(Features(features.matrix[order], features.names))
        result.contributions, result.bias = exp.contributions, exp.bias
    return result


def _excluded(
    live: LiveState, user_id: str, t_us: int, exclude: Sequence[str], include_seen: bool, history: HistoryInput | None
) -> tuple[Histories, np.ndarray]:
    """(the user's history, item_idx never to recommend: excluded ids, and unless include_seen the
    items the user interacted with). Call under the state's read lock."""
    user = live.user_idx(user_id)
    state = live.state
    hist = (
        history_arrays(history, live.catalogue, state.config.max_history, t_us)
        if history is not None
        else state.history(user, t_us)
    )
    banned = live.catalogue.lookup(list(exclude))
    drop = [banned[banned >= 0]]
    if not include_seen:
        seen = state.user_item.row(user)[0] if user >= 0 else np.zeros(0, np.int64)
        drop += [seen, hist.item_idx[hist.item_idx >= 0]]
    return hist, np.concatenate(drop).astype(np.int64)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best finite scores, best first (ties: lower position first)."""
    k = min(k, int(np.isfinite(scores).sum()))
    if k <= 0:
        return np.zeros(0, np.int64)
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.lexsort((top, -scores[top]))].astype(np.int64)


def retrieve(
    model: ServingModel,
    live: LiveState,
    user_id: str,
    t_us: int,
    k: int,
    exclude: Sequence[str],
    include_seen: bool,
    history: HistoryInput | None,
) -> np.ndarray:
    """Exact top-k item_idx by cosine over the whole catalogue (one [n_items, D] @ [D] product),
    minus excluded ids and (unless include_seen) items the user already interacted with."""
    with live.lock.read():
        hist, drop = _excluded(live, user_id, t_us, exclude, include_seen, history)
    u = model.user_vectors(hist.item_idx, hist.event_code, hist.age_s)[0]
    scores = model.item_emb @ u
    scores[drop] = -np.inf
    return _top(scores, k)


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
    model: BaselineModel,
    live: LiveState,
    user_id: str,
    request_id: str,
    item_idx: np.ndarray,
    t_us: int,
    top_k: int = 0,
    blocking: bool = True,
) -> Ranked:
    """Order candidates item_idx [n] (-1 = not in the catalogue) by a baseline. Candidates the
    catalogue does not know have no counts (popularity 0; their text is not encoded: source NO_TEXT)."""
    n = len(item_idx)
    known = item_idx >= 0
    if model.kind == "random":
        scores = _draws(user_id, request_id, n)
    else:
        scores = np.zeros(n, np.float64)
        with live.lock.read(blocking):
            scores[known] = popularity(live.state, item_idx[known], t_us)
    k = n if top_k <= 0 else min(top_k, n)
    order = np.argsort(-scores, kind="stable")[:k]
    source = np.where(known, CATALOGUE, NO_TEXT).astype(np.int8)
    return Ranked(order, scores, np.zeros(n, np.float64), source)


def recommend_baseline(
    model: BaselineModel,
    live: LiveState,
    user_id: str,
    request_id: str,
    t_us: int,
    k: int,
    exclude: Sequence[str],
    include_seen: bool,
    history: HistoryInput | None,
) -> tuple[Ranked, np.ndarray]:
    """Top-k of the whole catalogue by a baseline, with `retrieve`'s exclusions -> (Ranked over the
    returned items, their item_idx)."""
    n_items = len(live.catalogue.ids)
    with live.lock.read():
        _, drop = _excluded(live, user_id, t_us, exclude, include_seen, history)
        if model.kind == "random":
            scores = _draws(user_id, request_id, n_items)
        else:
            scores = popularity(live.state, np.arange(n_items), t_us)
    scores[drop] = -np.inf
    idx = _top(scores, k)
    m = len(idx)
    ranked = Ranked(
        np.arange(m, dtype=np.int64), scores[idx], np.zeros(m, np.float64), np.full(m, CATALOGUE, np.int8)
    )
    return ranked, idx
