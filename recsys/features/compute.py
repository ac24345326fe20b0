"""Point-in-time features of one request: state + (user, candidates, time) -> Features [n, F].

`compute` is the body of `FeatureState.compute`, whose one caller is the request scorer
(`recsys.scoring.request`). Vectorised over candidates: every column is written straight into the
output matrix (scalars broadcast), and user-row lookups search only that user's slice of a sparse
map, because this is the service's per-request hot path. Column groups, in order: match (when match
scores are given), item, user, user x item, time and context, extra. `mask_unseen_items` rewrites
the item columns of chosen rows as those of an item no event has touched yet (cold items).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from recsys.data.prepared import Histories
from recsys.errors import InputError
from recsys.features.catalogue import DAY_US, NEVER, NOT_YET, to_us

if TYPE_CHECKING:
    from recsys.features.state import FeatureState

MATCH_FEATURES = ("match_score", "match_rank", "match_z", "match_gap_top")


class Features(NamedTuple):
    matrix: np.ndarray  # [n_candidates, n_features] float32
    names: tuple[str, ...]


def window_name(days: float) -> str:
    return f"{days:g}d"


# Features an earlier version computed and this one does not, by what they were and why they went.
# A ranker trained on any of them is refused at load with the fix (`recsys.ranker.Ranker.load`)
# instead of failing every request on a missing column.
RETIRED_FEATURES: dict[str, tuple[str, ...]] = {
    "the transition features of state format 2, dropped in format 3: they measured no gain in the blend": (
        "trans_last", "trans_last_norm", "trans_recent",
    ),
}


@functools.lru_cache(maxsize=256)
def layout(
    decay_days: tuple[float, ...], numeric: tuple[str, ...], match: bool, context: tuple[str, ...], extra: tuple[str, ...]
) -> tuple[tuple[str, ...], dict[str, int]]:
    """(column names, name -> column) of `compute` for one set of optional groups."""
    windows = [window_name(d) for d in decay_days]
    names = [*MATCH_FEATURES] if match else []
    names += [
        "item_pop_all",
        *(f"item_pop_{w}" for w in windows),
        "item_impressions",
        "item_ctr",
        "item_age_days",
        "item_catalogue_age_days",
        "item_days_since_last",
        *(f"item_{c}" for c in numeric),
    ]
    names += [
        "user_interactions",
        *(f"user_act_{w}" for w in windows),
        "user_impressions",
        "user_ctr",
        "user_days_since_last",
        "user_hist_len",
    ]
    names += [
        "seen",
        "ui_count",
        "ui_impressions",
        "cat_affinity",
        "cat_weight",
        "tag_affinity",
        "tag_affinity_max",
        "covis_sum",
        "covis_max",
        "covis_norm",
    ]
    names += ["hour_of_day", "day_of_week", *(f"ctx_{c}" for c in context), *extra]
    return tuple(names), {name: j for j, name in enumerate(names)}


class _Columns:
    """The output matrix [n, F] being filled, addressed by feature name, as of request time `now_us`."""

    def __init__(self, state: FeatureState, index: dict[str, int], *, n: int, now_us: int) -> None:
        self.matrix = np.empty((n, len(index)), np.float32)
        self.index = index
        self.now_us = now_us
        self.taus = np.asarray(state.config.decay_days) * DAY_US
        self.windows = [window_name(d) for d in state.config.decay_days]

    def put(self, name: str, values: np.ndarray | float) -> None:
        self.matrix[:, self.index[name]] = values

    def decayed(self, values: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """Decayed counts [m, W] as of now. Clamped: a request older than the state's last event
        must not grow the counts."""
        age = np.where(refs == NEVER, 0, np.maximum(self.now_us - refs, 0)).astype(np.float64)
        return values * np.exp(-age[:, None] / self.taus)

    def days_since(self, stamp: np.ndarray, missing: int) -> np.ndarray:
        return np.where(stamp == missing, np.nan, (self.now_us - stamp.astype(np.float64)) / DAY_US)


def compute(
    state: FeatureState,
    user_idx: int,
    candidates: np.ndarray | Sequence[int],
    request_time: Any,
    *,
    match_scores: np.ndarray | Sequence[float] | None = None,
    history: Histories | None = None,
    context: Mapping[str, Any] | None = None,
    extra: Mapping[str, np.ndarray | Sequence[float]] | None = None,
) -> Features:
    """Features of one request: candidates [n] item_idx -> Features(matrix [n, F] f32, names).

    match_scores [n] add the match_* features; history (Histories [1, N], most recent first)
    overrides the state's buffer for co-visitation; context values are numbers or strings from the
    context vocabulary; extra maps a feature name to per-candidate values [n] passed through."""
    cand = _candidates(state, candidates)
    n = len(cand)
    now_us = to_us(request_time)
    context = context or {}
    extra = extra or {}
    names, index = layout(
        tuple(state.config.decay_days), state.catalogue.numeric_names, match_scores is not None,
        tuple(sorted(context)), tuple(sorted(extra)),
    )
    if len(index) < len(names):
        clash = next(name for name in sorted(extra) if names.count(name) > 1)
        raise InputError(f"extra feature {clash!r} clashes with a built-in feature: rename it")
    out = _Columns(state, index, n=n, now_us=now_us)
    if match_scores is not None:
        _match_columns(out, _numeric("match_score", match_scores, n))
    item_count = _item_columns(out, state, cand)
    recent, strength = _user_columns(out, state, user_idx, history)
    _affinity_columns(out, state, user_idx, cand, strength)
    _covis_columns(out, state, cand, recent, item_count)
    day = now_us // DAY_US
    out.put("hour_of_day", (now_us - day * DAY_US) / 3.6e9)
    out.put("day_of_week", float((day + 3) % 7))  # 1970-01-01 was a Thursday; Monday = 0
    for name, value in context.items():
        out.put(f"ctx_{name}", context_value(state, name, value))
    for name, values in extra.items():
        out.put(name, _numeric(name, values, n))
    return Features(out.matrix, names)


def _candidates(state: FeatureState, candidates: np.ndarray | Sequence[int]) -> np.ndarray:
    cand = np.asarray(candidates)
    if cand.ndim != 1 or (len(cand) and not np.issubdtype(cand.dtype, np.integer)):
        raise InputError(f"candidates must be a 1-d array of item_idx integers, got {cand.dtype} {cand.shape}")
    cand = cand.astype(np.int64)
    if len(cand) and (cand.min() < 0 or cand.max() >= state.n_items):
        bad = int(cand[(cand < 0) | (cand >= state.n_items)][0])
        raise InputError(f"candidate item_idx {bad} is not in the catalogue (0..{state.n_items - 1})")
    return cand


def _match_columns(out: _Columns, match: np.ndarray) -> None:
    n = len(match)
    out.put("match_score", match)
    rank = np.empty(n)
    rank[np.argsort(-match, kind="stable")] = np.arange(n)
    out.put("match_rank", rank)
    if n:
        centred = match - match.mean()
        std = math.sqrt(np.add.reduce(centred * centred) / n)  # bit-identical to match.std()
        out.put("match_z", centred / std if std > 1e-12 else 0.0)
        out.put("match_gap_top", match.max() - match)


def _item_columns(out: _Columns, state: FeatureState, cand: np.ndarray) -> np.ndarray:
    """Item popularity, CTR, ages and catalogue attributes; returns the interaction counts [n]."""
    count = state.item_count[cand]
    out.put("item_pop_all", count)
    pop = out.decayed(state.item_decay[cand], state.item_decay_ref[cand])
    for w, window in enumerate(out.windows):
        out.put(f"item_pop_{window}", pop[:, w])
    impressions = state.item_impr[cand]
    out.put("item_impressions", impressions)
    out.put("item_ctr", _ctr(state, state.item_clicks[cand], impressions))
    out.put("item_age_days", out.days_since(state.item_first_us[cand], NOT_YET))
    out.put("item_catalogue_age_days", out.days_since(state.catalogue.created_us[cand], NEVER))
    out.put("item_days_since_last", out.days_since(state.item_last_us[cand], NEVER))
    for j, name in enumerate(state.catalogue.numeric_names):
        out.put(f"item_{name}", state.catalogue.numeric[cand, j])
    return count


def _ctr(state: FeatureState, clicks: np.ndarray | float, impressions: np.ndarray | float) -> np.ndarray | float:
    """CTR smoothed towards the global rate with `ctr_prior_weight` pseudo-impressions (NaN before any)."""
    weight = state.config.ctr_prior_weight
    return (clicks + weight * state.ctr_prior) / (impressions + weight) if state.global_impr > 0 else math.nan


def _user_columns(
    out: _Columns, state: FeatureState, user_idx: int, history: Histories | None
) -> tuple[np.ndarray, float]:
    """User scalars broadcast to the list (unknown users look like new ones); returns the user's
    recent item_idx (most recent first) and total positive strength."""
    known = 0 <= user_idx < state.n_users
    row = user_idx if known else 0
    strength = float(state.user_strength[row]) if known else 0.0
    out.put("user_interactions", state.user_count[row] if known else 0.0)
    activity = (
        out.decayed(state.user_decay[row : row + 1], state.user_decay_ref[row : row + 1])[0]
        if known
        else np.zeros(len(out.taus))
    )
    for w, window in enumerate(out.windows):
        out.put(f"user_act_{window}", activity[w])
    impressions = float(state.user_impr[row]) if known else 0.0
    out.put("user_impressions", impressions)
    out.put("user_ctr", _ctr(state, float(state.user_clicks[row]) if known else 0.0, impressions))
    last = int(state.user_last_us[row]) if known else int(NEVER)
    out.put("user_days_since_last", math.nan if last == NEVER else (out.now_us - float(last)) / DAY_US)
    hist = history if history is not None else state.history(user_idx, out.now_us)
    recent = np.asarray(hist.item_idx, np.int64).reshape(-1)
    recent = recent[recent >= 0]
    out.put("user_hist_len", float(len(recent)))
    return recent, strength


def _affinity_columns(out: _Columns, state: FeatureState, user_idx: int, cand: np.ndarray, strength: float) -> None:
    """User x item: seen counts, impressions, category and tag affinities."""
    known = 0 <= user_idx < state.n_users
    if known:
        seen = state.user_item.get_row(user_idx, cand)
        out.put("seen", seen > 0)
        out.put("ui_count", seen)
        out.put("ui_impressions", state.user_item_impr.get_row(user_idx, cand))
        category = state.catalogue.category[cand].astype(np.int64)
        weight = np.where(category >= 0, state.user_cat.get_row(user_idx, np.maximum(category, 0)), 0.0)
        out.put("cat_affinity", weight / strength if strength > 0 else 0.0)
        out.put("cat_weight", weight)
    else:
        for name in ("seen", "ui_count", "ui_impressions", "cat_affinity", "cat_weight"):
            out.put(name, 0.0)
    indptr = state.catalogue.tag_indptr
    starts = indptr[cand]
    n_tags = indptr[cand + 1] - starts
    if known and strength > 0 and n_tags.sum():
        n = len(cand)
        owner = np.repeat(np.arange(n), n_tags)  # candidate of each (candidate, tag) pair
        offsets = np.arange(len(owner)) - np.repeat(np.cumsum(n_tags) - n_tags, n_tags)
        share = state.user_tag.get_row(user_idx, state.catalogue.tag_ids[starts[owner] + offsets]) / strength
        out.put("tag_affinity", np.bincount(owner, weights=share, minlength=n) / np.maximum(n_tags, 1))
        tag_max = np.zeros(n)
        np.maximum.at(tag_max, owner, share)
        out.put("tag_affinity_max", tag_max)
    else:
        out.put("tag_affinity", 0.0)
        out.put("tag_affinity_max", 0.0)


def _covis_columns(
    out: _Columns, state: FeatureState, cand: np.ndarray, recent: np.ndarray, item_count: np.ndarray
) -> None:
    """Co-visitation of each candidate with the user's `covis_recent` most recent items."""
    items = recent[: state.config.covis_recent]
    if len(items) and len(cand):
        co = state.covis.get(items[:, None], cand[None, :])  # [k, n]
        weight = 1.0 / np.arange(1, len(items) + 1)  # most recent counts most
        out.put("covis_sum", weight @ co)
        out.put("covis_max", co.max(0))
        norm = np.sqrt((state.item_count[items] + 1.0)[:, None] * (item_count + 1.0)[None, :])
        out.put("covis_norm", (co / norm).sum(0))
    else:
        for name in ("covis_sum", "covis_max", "covis_norm"):
            out.put(name, 0.0)


def mask_unseen_items(state: FeatureState, features: Features, rows: np.ndarray, in_catalogue: bool = True) -> None:
    """Overwrite the item columns of `rows` (in place) with what an item no event has touched yet
    gets: zero counts, co-visitation and user x item history, CTR at the global prior, no
    first/last-seen ages. in_catalogue=False also blanks what the catalogue would know (numeric
    attributes, catalogue age, category/tag affinity): an id the catalogue has never heard of.

    The service applies it to unknown candidate ids; ranker training applies it to a random share
    of candidates (`RankerConfig.cold_item_dropout`, as DropoutNet drops preference inputs), so the
    blender learns to rank an item without behaviour by its text match instead of burying it."""
    if not len(rows):
        return
    zero = {"seen", "ui_count", "ui_impressions", "covis_sum", "covis_max", "covis_norm", "item_pop_all",
            "item_impressions", *(f"item_pop_{window_name(d)}" for d in state.config.decay_days)}
    missing = {"item_age_days", "item_days_since_last"}
    if not in_catalogue:
        zero |= {"cat_affinity", "cat_weight", "tag_affinity", "tag_affinity_max"}
        missing |= {"item_catalogue_age_days", *(f"item_{c}" for c in state.catalogue.numeric_names)}
    for j, name in enumerate(features.names):
        if name in zero:
            features.matrix[rows, j] = 0.0
        elif name in missing:
            features.matrix[rows, j] = np.nan
        elif name == "item_ctr":  # compute's (0 + a * prior) / (0 + a)
            features.matrix[rows, j] = state.ctr_prior if state.config.ctr_prior_weight > 0 else np.nan


def context_value(state: FeatureState, name: str, value: Any) -> float:
    """A request's context value -> its feature: vocabulary position for text (NaN when unseen)."""
    if isinstance(value, str):
        vocab = state.context_vocab.get(name)
        if vocab is None:
            raise InputError(
                f"context {name!r} has text value {value!r} but no vocabulary: known text contexts are "
                f"{sorted(state.context_vocab) or 'none'}; pass a number or train with that context column"
            )
        return float(vocab.index(value)) if value in vocab else math.nan
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"context {name!r} must be a number or text, got {type(value).__name__}") from exc


def _numeric(name: str, values: Any, n: int) -> np.ndarray:
    """Per-candidate values -> float64 [n], or an InputError naming the feature."""
    try:
        array = np.asarray(values)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"dtype {array.dtype}")
        array = array.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"feature {name!r} must be numeric per candidate, got {exc}") from exc
    if array.shape != (n,):
        raise InputError(f"feature {name!r} has shape {array.shape}, expected ({n},): one value per candidate")
    return array
