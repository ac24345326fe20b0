"""Ranking features: the one module used by ranker training, the gRPC service and batch scoring.

Offline and online features cannot drift because there is only one implementation:

* `FeatureState` holds everything learned from events strictly before some time T, as NumPy arrays
  indexed by item_idx / user_idx plus sorted sparse maps (`SparseMap`) for user x category,
  user x tag, user x item and item x item (co-visitation) counts, and a per-user ring buffer of recent
  interactions (the user history the matcher and co-visitation read).
* `FeatureState.apply(events)` adds a batch of events, vectorised. Building from scratch is
  `apply(all events)` on an empty state, so "incremental == rebuild" holds by construction for
  batches split at strict time boundaries (tested).
* `FeatureState.compute(user, candidates, t, ...)` -> `Features(matrix [n, F] float32, names)`,
  vectorised over candidates (no per-candidate Python).

Point in time: the state never looks at an event it was not given, so the training loop
(training/ranker.py) replays the log in time order and applies only events with timestamp < the
request time before computing that request's features: exact point-in-time, with no window-start
approximation.

Windowed popularity/activity are exponentially decayed counts, value(t) = sum_i exp(-(t - t_i)/tau),
with tau = 1d / 7d / 30d: exactly updatable per event, exact at any query time, and needing no event
buffer for expiry (a hard sliding window would). Each row keeps its own reference time, so an update
only touches the rows it changes.

Interactions: positive events (strength > 0) of one (user, item, request_id) are one interaction
(a click -> cart -> purchase funnel counts once, at its first time, with its strongest event), as in
`recsys prepare`; events without a request_id are each their own interaction. Popularity, CTR
numerators, histories and co-visitation count interactions; category/tag affinities sum the strength
of every positive event. A funnel event whose interaction already left the user's last
`max_history` interactions starts a new one (rare; the only way batching can change the state).

Serialisation: `save(dir)` writes state.npz (arrays, loaded with allow_pickle=False) + state.json.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from recsys.data.prepared import Histories
from recsys.data.schema import EVENT_CODES, EVENT_COLUMNS
from recsys.errors import ConfigError, InputError, ModelError
from recsys.timestamps import RANGE_TEXT as TIME_RANGE
from recsys.timestamps import REPRESENTABLE_MAX_US, REPRESENTABLE_MIN_US, unrepresentable

STATE_FORMAT = 1
DAY_US = 86_400_000_000
NEVER = np.iinfo(np.int64).min  # "no event yet" for last-seen times
NOT_YET = np.iinfo(np.int64).max  # "no event yet" for first-seen times
_SHIFT = np.int64(32)  # SparseMap key = row << 32 | col (ids < 2**31)
_COL_MASK = np.int64((1 << 32) - 1)
# Columns of the prepared events table that are not request context.
_NON_CONTEXT = {
    *EVENT_COLUMNS,
    "strength",
    "item_idx",
    "user_idx",
    "split_global",
    "split_loo",
    "split_tail",
    # Exposure-log bookkeeping: which model served the list is not a property of the request.
    "model_version",
    "variant",
    "source",
    "config_version",
    "latency_ms",
    "session_id",
}

MAX_CONTEXT_VALUES = 1000  # text columns with more distinct values are ids, not context
MATCH_FEATURES = ("match_score", "match_rank", "match_z", "match_gap_top")


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def to_us(t: Any) -> int:
    """A timestamp (datetime, np.datetime64, ISO text, or int epoch microseconds) -> epoch µs. One
    beyond what a datetime can hold (years 1..9999) is an InputError, never an OverflowError later."""
    us = _to_us(t)
    if unrepresentable(us):
        raise InputError(f"time {t!r} is outside years 1..9999: pass a real timestamp ({TIME_RANGE} for requests)")
    return us


def _to_us(t: Any) -> int:
    if isinstance(t, bool):
        raise InputError(f"request time must be a timestamp, got {t!r}")
    if isinstance(t, int | np.integer):
        return int(t)
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        delta = t - datetime(1970, 1, 1, tzinfo=timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(t, np.datetime64):
        if np.isnat(t):
            raise InputError("request time is NaT (not a time): pass a timestamp")
        days = int(t.astype("datetime64[D]").astype(np.int64))
        if abs(days) > 10**6:  # far outside the accepted range; in µs it could wrap int64
            return REPRESENTABLE_MAX_US + 1 if days > 0 else REPRESENTABLE_MIN_US - 1
        return int(t.astype("datetime64[us]").astype(np.int64))
    if isinstance(t, str):
        try:
            return _to_us(datetime.fromisoformat(t.replace("Z", "+00:00")))
        except ValueError as exc:
            raise InputError(
                f"cannot parse request time {t!r}: use ISO-8601, e.g. 2026-01-31T12:00:00Z"
            ) from exc
    raise InputError(
        f"request time must be a datetime, ISO text or epoch microseconds, got {type(t).__name__}"
    )


def _window_name(days: float) -> str:
    return f"{days:g}d"


@functools.lru_cache(maxsize=256)
def _layout(
    decay_days: tuple[float, ...], numeric: tuple[str, ...], match: bool, context: tuple[str, ...], extra: tuple[str, ...]
) -> tuple[tuple[str, ...], dict[str, int]]:
    """(column names, name -> column) of `FeatureState.compute` for one set of optional groups."""
    windows = [_window_name(d) for d in decay_days]
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


def request_keys(request_id: pl.Series) -> np.ndarray:
    """request_id strings -> non-negative int64 keys (-1 where null). Polars' seeded hash: stable
    within a Polars version, which is all the state needs (keys only match recent interactions)."""
    hashed = request_id.cast(pl.Utf8).hash(seed=0)
    keys = (hashed.to_numpy().astype(np.uint64) & np.uint64((1 << 62) - 1)).astype(np.int64)
    return np.where(request_id.is_null().to_numpy(), -1, keys)


def _run_starts(*keys: np.ndarray) -> np.ndarray:
    """Indices where any of the (already sorted) key arrays changes value; always includes 0."""
    n = len(keys[0])
    change = np.zeros(n, dtype=bool)
    if n:
        change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def _grow(array: np.ndarray, n: int, fill: Any) -> np.ndarray:
    """Pad axis 0 of `array` to length n with `fill` (users appear as the stream goes on)."""
    if len(array) >= n:
        return array
    pad = np.full((n - len(array), *array.shape[1:]), fill, dtype=array.dtype)
    return np.concatenate([array, pad])


# --------------------------------------------------------------------------------------------------
# Sparse counts
# --------------------------------------------------------------------------------------------------


class SparseMap:
    """(row, col) -> float64 as sorted unique int64 keys (row << 32 | col) and a value array.

    Updates merge a batch in O(nnz + b log b) (in-place adds for known keys, one np.insert for new
    ones); lookups are one searchsorted: no Python per key, and it saves as two arrays.
    """

    def __init__(self, keys: np.ndarray | None = None, values: np.ndarray | None = None) -> None:
        self.keys = np.zeros(0, np.int64) if keys is None else np.asarray(keys, np.int64)
        self.values = np.zeros(0, np.float64) if values is None else np.asarray(values, np.float64)

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def key(rows: np.ndarray | int, cols: np.ndarray | int) -> np.ndarray:
        return (np.asarray(rows, np.int64) << _SHIFT) | np.asarray(cols, np.int64)

    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray | float = 1.0) -> None:
        """values[(rows[j], cols[j])] += values[j] (duplicates summed)."""
        keys = self.key(rows, cols).ravel()
        if not len(keys):
            return
        weights = np.broadcast_to(np.asarray(values, np.float64), keys.shape)
        uniq, inverse = np.unique(keys, return_inverse=True)
        sums = np.bincount(inverse, weights=weights, minlength=len(uniq))
        pos = np.searchsorted(self.keys, uniq)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == uniq[found]
        self.values[pos[found]] += sums[found]
        new = ~found
        if new.any():
            self.keys = np.insert(self.keys, pos[new], uniq[new])
            self.values = np.insert(self.values, pos[new], sums[new])

    def drop_rows(self, rows: np.ndarray) -> None:
        """Remove every entry of `rows` (an evicted user's affinities)."""
        keep = ~np.isin(self.keys >> _SHIFT, np.asarray(rows, np.int64))
        if not keep.all():
            self.keys, self.values = self.keys[keep], self.values[keep]

    def get(self, rows: np.ndarray | int, cols: np.ndarray | int) -> np.ndarray:
        """Values for broadcast (rows, cols); 0 where absent. Shape of the broadcast."""
        keys = self.key(rows, cols)
        flat = keys.ravel()
        pos = np.minimum(np.searchsorted(self.keys, flat), max(len(self.keys) - 1, 0))
        if not len(self.keys):
            return np.zeros(keys.shape, np.float64)
        hit = self.keys[pos] == flat
        return np.where(hit, self.values[pos], 0.0).reshape(keys.shape)

    def get_row(self, row: int, cols: np.ndarray) -> np.ndarray:
        """Values of one row at cols [n]; 0 where absent. Searches only that row's slice of the keys."""
        base = int(row) << 32
        lo, hi = self.keys.searchsorted(base), self.keys.searchsorted(base + (1 << 32))
        if lo == hi:
            return np.zeros(len(cols), np.float64)
        keys = self.keys[lo:hi]
        want = np.asarray(cols, np.int64) | base
        pos = keys.searchsorted(want)
        np.minimum(pos, hi - lo - 1, out=pos)
        out = self.values[lo:hi][pos]
        out[keys[pos] != want] = 0.0
        return out

    def row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(cols, values) of one row, cols ascending."""
        lo, hi = np.searchsorted(self.keys, [np.int64(row) << _SHIFT, np.int64(row + 1) << _SHIFT])
        return (self.keys[lo:hi] & _COL_MASK).astype(np.int64), self.values[lo:hi]


# --------------------------------------------------------------------------------------------------
# Configuration, catalogue, events
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureConfig:
    """What the state tracks; saved with every model so serving computes the same features."""

    decay_days: tuple[float, ...] = (1.0, 7.0, 30.0)
    max_history: int = 20  # interactions kept per user (history for the matcher, co-visitation)
    covis_lag: int = 3  # an interaction co-visits the user's previous `covis_lag` interactions
    covis_recent: int = 5  # at scoring: the user's most recent items compared with candidates
    ctr_prior_weight: float = 20.0  # pseudo-impressions at the global rate (CTR smoothing)
    item_numeric: tuple[str, ...] | None = None  # catalogue columns; None = every numeric one
    context_columns: tuple[str, ...] | None = None  # request context; None = detect from events

    def __post_init__(self) -> None:
        if not self.decay_days or any(d <= 0 for d in self.decay_days):
            raise ConfigError(f"decay_days must be positive day counts, got {self.decay_days}")
        if not 1 <= self.max_history <= 512:
            raise ConfigError(f"max_history must be in [1, 512], got {self.max_history}")
        if not 1 <= self.covis_lag <= self.max_history:
            raise ConfigError(f"covis_lag must be in [1, max_history], got {self.covis_lag}")
        if not 1 <= self.covis_recent <= self.max_history:
            raise ConfigError(f"covis_recent must be in [1, max_history], got {self.covis_recent}")
        if self.ctr_prior_weight < 0:
            raise ConfigError(f"ctr_prior_weight must be >= 0, got {self.ctr_prior_weight}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FeatureConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"unknown feature config keys {sorted(unknown)}; known: {sorted(known)}")
        values = dict(raw)
        for name in ("decay_days", "item_numeric", "context_columns"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)


@dataclass(frozen=True)
class Catalogue:
    """Item attributes the features need, indexed by item_idx.

    category [n_items] i32 (-1 = none) into `categories`; tags as CSR (tag_indptr [n_items+1],
    tag_ids [nnz]) into `tags`; numeric [n_items, k] f32 (NaN = missing) named `numeric_names`;
    created_us [n_items] i64 (NEVER = unknown).
    """

    category: np.ndarray
    categories: tuple[str, ...]
    tag_indptr: np.ndarray
    tag_ids: np.ndarray
    tags: tuple[str, ...]
    numeric: np.ndarray
    numeric_names: tuple[str, ...]
    created_us: np.ndarray

    @property
    def n_items(self) -> int:
        return len(self.category)

    @classmethod
    def from_items(cls, items: pl.DataFrame, numeric: Sequence[str] | None = None) -> Catalogue:
        """From the prepared items table (row i = item_idx i). Vocabularies are sorted, so the same
        catalogue always gives the same codes."""
        n = items.height
        if "item_idx" in items.columns and not np.array_equal(items["item_idx"].to_numpy(), np.arange(n)):
            raise InputError("items table must be sorted by item_idx 0..n-1 (as recsys prepare writes it)")
        if "category" in items.columns:
            cat = items["category"].cast(pl.Utf8)
            categories = tuple(sorted(cat.drop_nulls().unique().to_list()))
            category = cat.replace_strict(
                {c: i for i, c in enumerate(categories)}, default=-1, return_dtype=pl.Int32
            ).to_numpy()
        else:
            categories, category = (), np.full(n, -1, np.int32)
        if "tags" in items.columns:
            tag_lists = (
                items["tags"]
                .cast(pl.Utf8)
                .fill_null("")
                .str.split("|")
                .list.eval(pl.element().str.strip_chars().filter(pl.element() != ""))
                .list.unique()
                .list.sort()
            )
            tags = tuple(sorted(tag_lists.explode().drop_nulls().unique().to_list()))
            lengths = tag_lists.list.len().to_numpy().astype(np.int64)
            flat = tag_lists.explode().drop_nulls()
            tag_ids = flat.replace_strict(
                {t: i for i, t in enumerate(tags)}, return_dtype=pl.Int32
            ).to_numpy()
        else:
            tags, lengths, tag_ids = (), np.zeros(n, np.int64), np.zeros(0, np.int32)
        tag_indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if numeric is None:
            skip = {"item_idx"}
            numeric = [c for c, t in items.schema.items() if t.is_numeric() and c not in skip]
        missing = [c for c in numeric if c not in items.columns]
        if missing:
            raise InputError(
                f"items table has no column {missing[0]!r} (asked for as a numeric item feature)"
            )
        bad = [c for c in numeric if not items.schema[c].is_numeric()]
        if bad:
            raise InputError(
                f"item column {bad[0]!r} is {items.schema[bad[0]]}, not numeric: drop it from item_numeric"
            )
        values = (
            np.column_stack([items[c].cast(pl.Float32).fill_null(np.nan).to_numpy() for c in numeric])
            if numeric
            else np.zeros((n, 0), np.float32)
        )
        created = np.full(n, NEVER, np.int64)
        if "created_at" in items.columns:
            ts = items["created_at"]
            if ts.dtype.is_temporal():
                us = ts.cast(pl.Datetime("us")).dt.epoch("us")
                created = us.fill_null(NEVER).to_numpy().astype(np.int64)
        return cls(
            category=category.astype(np.int32),
            categories=categories,
            tag_indptr=tag_indptr,
            tag_ids=tag_ids.astype(np.int32),
            tags=tags,
            numeric=values.astype(np.float32),
            numeric_names=tuple(numeric),
            created_us=created,
        )


@dataclass(frozen=True)
class EventBatch:
    """Events as aligned arrays [n]: what `FeatureState.apply` consumes (cheap to slice)."""

    user_idx: np.ndarray  # i64
    item_idx: np.ndarray  # i64
    ts_us: np.ndarray  # i64 epoch µs
    strength: np.ndarray  # f64; > 0 positive, <= 0 exposure (impression / known negative)
    event_code: np.ndarray  # i8 (recsys.data.schema.EVENT_CODES; -1 unknown)
    request: np.ndarray  # i64 request key (-1 = none), see request_keys

    def __len__(self) -> int:
        return len(self.user_idx)

    @classmethod
    def from_frame(cls, events: pl.DataFrame) -> EventBatch:
        """From a frame with user_idx, item_idx, timestamp, strength [, event_type, request_id]."""
        for column in ("user_idx", "item_idx", "timestamp", "strength"):
            if column not in events.columns:
                raise InputError(f"events are missing column {column!r} (have: {', '.join(events.columns)})")
        if events.schema["timestamp"].is_temporal():
            ts = events["timestamp"].cast(pl.Datetime("us")).dt.epoch("us").to_numpy()
        else:
            ts = events["timestamp"].to_numpy()
        if "event_type" in events.columns:
            code = (
                events["event_type"].replace_strict(EVENT_CODES, default=-1, return_dtype=pl.Int8).to_numpy()
            )
        else:
            code = np.full(events.height, -1, np.int8)
        if "request_id" in events.columns:
            request = request_keys(events["request_id"])
        else:
            request = np.full(events.height, -1, np.int64)
        return cls(
            user_idx=events["user_idx"].to_numpy().astype(np.int64),
            item_idx=events["item_idx"].to_numpy().astype(np.int64),
            ts_us=np.asarray(ts, np.int64),
            strength=events["strength"].cast(pl.Float64).fill_null(0.0).to_numpy(),
            event_code=np.asarray(code, np.int8),
            request=request,
        )

    def slice(self, lo: int, hi: int) -> EventBatch:
        return EventBatch(*(getattr(self, f)[lo:hi] for f in self.__dataclass_fields__))

    def take(self, index: np.ndarray) -> EventBatch:
        return EventBatch(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


class Features(NamedTuple):
    matrix: np.ndarray  # [n_candidates, n_features] float32
    names: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# Match scores (pluggable)
# --------------------------------------------------------------------------------------------------

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
    (L2-normalised), user_encoder maps padded histories to [B, D] (the ONNX user tower in
    production, `mean_pool_encoder` in tests)."""

    item_embeddings: np.ndarray
    user_encoder: UserEncoderFn

    def scores(self, history: Histories, candidates: np.ndarray) -> np.ndarray:
        """history [1, N], candidates [n] -> [n] float32."""
        user = self.user_encoder(history.item_idx, history.event_code, history.age_s)  # [1, D]
        return np.asarray(self.item_embeddings[np.asarray(candidates, np.int64)] @ user[0], np.float32)


# --------------------------------------------------------------------------------------------------
# The state
# --------------------------------------------------------------------------------------------------

_ITEM_ARRAYS = (
    "item_count",
    "item_decay",
    "item_decay_ref",
    "item_impr",
    "item_clicks",
    "item_first_us",
    "item_last_us",
)
_USER_ARRAYS = (
    "user_count",
    "user_decay",
    "user_decay_ref",
    "user_impr",
    "user_clicks",
    "user_strength",
    "user_last_us",
    "hist_item",
    "hist_code",
    "hist_strength",
    "hist_ts",
    "hist_req",
)
_SPARSE = ("user_cat", "user_tag", "user_item", "user_item_impr", "covis")
_USER_FILL: dict[str, Any] = {
    "user_decay_ref": NEVER,
    "user_last_us": NEVER,
    "hist_item": -1,
    "hist_code": -1,
    "hist_ts": NEVER,
    "hist_req": -1,
}


@dataclass
class FeatureState:
    """Everything the features know, learned from the events applied so far (see module doc).

    Item arrays [n_items] (decay: [n_items, W]); user arrays [n_users] (decay [n_users, W]; history
    ring buffer [n_users, H], most recent first, -1 padded); sparse maps keyed (row, col).
    """

    config: FeatureConfig
    catalogue: Catalogue
    context_vocab: dict[str, list[str]]
    item_count: np.ndarray
    item_decay: np.ndarray
    item_decay_ref: np.ndarray
    item_impr: np.ndarray
    item_clicks: np.ndarray
    item_first_us: np.ndarray
    item_last_us: np.ndarray
    user_count: np.ndarray
    user_decay: np.ndarray
    user_decay_ref: np.ndarray
    user_impr: np.ndarray
    user_clicks: np.ndarray
    user_strength: np.ndarray
    user_last_us: np.ndarray
    hist_item: np.ndarray
    hist_code: np.ndarray
    hist_strength: np.ndarray
    hist_ts: np.ndarray
    hist_req: np.ndarray
    user_cat: SparseMap = field(default_factory=SparseMap)
    user_tag: SparseMap = field(default_factory=SparseMap)
    user_item: SparseMap = field(default_factory=SparseMap)
    user_item_impr: SparseMap = field(default_factory=SparseMap)
    covis: SparseMap = field(default_factory=SparseMap)
    global_impr: float = 0.0
    global_clicks: float = 0.0
    as_of_us: int = int(NEVER)  # latest event time applied
    n_users: int = 0  # users known (user arrays may hold spare capacity beyond this)

    # ---------------------------------------------------------------- construction

    @classmethod
    def empty(
        cls,
        catalogue: Catalogue,
        n_users: int = 0,
        config: FeatureConfig | None = None,
        context_vocab: Mapping[str, Sequence[str]] | None = None,
    ) -> FeatureState:
        config = config or FeatureConfig()
        n, w, h = catalogue.n_items, len(config.decay_days), config.max_history
        return cls(
            config=config,
            catalogue=catalogue,
            context_vocab={k: list(v) for k, v in (context_vocab or {}).items()},
            item_count=np.zeros(n),
            item_decay=np.zeros((n, w)),
            item_decay_ref=np.full(n, NEVER, np.int64),
            item_impr=np.zeros(n),
            item_clicks=np.zeros(n),
            item_first_us=np.full(n, NOT_YET, np.int64),
            item_last_us=np.full(n, NEVER, np.int64),
            user_count=np.zeros(n_users),
            user_decay=np.zeros((n_users, w)),
            user_decay_ref=np.full(n_users, NEVER, np.int64),
            user_impr=np.zeros(n_users),
            user_clicks=np.zeros(n_users),
            user_strength=np.zeros(n_users),
            user_last_us=np.full(n_users, NEVER, np.int64),
            hist_item=np.full((n_users, h), -1, np.int32),
            hist_code=np.full((n_users, h), -1, np.int8),
            hist_strength=np.zeros((n_users, h), np.float32),
            hist_ts=np.full((n_users, h), NEVER, np.int64),
            hist_req=np.full((n_users, h), -1, np.int64),
            n_users=n_users,
        )

    @classmethod
    def build(
        cls,
        items: pl.DataFrame,
        events: pl.DataFrame,
        before: Any = None,
        config: FeatureConfig | None = None,
        n_users: int = 0,
    ) -> FeatureState:
        """State from the prepared items and events, using only events with timestamp < `before`
        (all when None). Context vocabularies come from every event's context columns (the values a
        request can carry, not outcomes)."""
        config = config or FeatureConfig()
        catalogue = Catalogue.from_items(items, config.item_numeric)
        if config.item_numeric is None:
            config = FeatureConfig.from_dict({**config.to_dict(), "item_numeric": catalogue.numeric_names})
        vocab, config = context_vocabulary(events, config)
        state = cls.empty(catalogue, n_users, config, vocab)
        frame = events.sort("timestamp", maintain_order=True)
        if before is not None:
            frame = frame.filter(pl.col("timestamp").dt.epoch("us") < to_us(before))
        state.apply(EventBatch.from_frame(frame))
        return state

    @property
    def n_items(self) -> int:
        return self.catalogue.n_items

    def _ensure_users(self, n: int) -> None:
        if n > len(self.user_count):
            capacity = max(n, int(len(self.user_count) * 1.25) + 16)  # amortised growth for streams
            for name in _USER_ARRAYS:
                setattr(self, name, _grow(getattr(self, name), capacity, _USER_FILL.get(name, 0)))
        self.n_users = max(self.n_users, n)

    def forget_users(self, rows: np.ndarray) -> None:
        """Reset user rows to a brand-new user's state (bounded user state reuses evicted rows:
        recsys.serving.users). Item-side statistics the users contributed are kept."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return
        for name in _USER_ARRAYS:
            getattr(self, name)[rows] = _USER_FILL.get(name, 0)
        for sparse in (self.user_cat, self.user_tag, self.user_item, self.user_item_impr):
            sparse.drop_rows(rows)

    # ---------------------------------------------------------------- updates

    def apply(self, events: EventBatch | pl.DataFrame) -> None:
        """Add a batch of events (any order inside the batch; batches in time order). Vectorised."""
        batch = events if isinstance(events, EventBatch) else EventBatch.from_frame(events)
        if not len(batch):
            return
        if batch.item_idx.min() < 0 or batch.item_idx.max() >= self.n_items:
            bad = int(batch.item_idx[(batch.item_idx < 0) | (batch.item_idx >= self.n_items)][0])
            raise InputError(f"event for item_idx {bad}, outside the catalogue (0..{self.n_items - 1})")
        if batch.user_idx.min() < 0:
            raise InputError(f"event for user_idx {int(batch.user_idx.min())}: user indices must be >= 0")
        self._ensure_users(int(batch.user_idx.max()) + 1)
        np.minimum.at(self.item_first_us, batch.item_idx, batch.ts_us)
        self.as_of_us = max(self.as_of_us, int(batch.ts_us.max()))

        exposure = batch.take(np.flatnonzero(batch.strength <= 0))
        if len(exposure):
            np.add.at(self.item_impr, exposure.item_idx, 1.0)
            np.add.at(self.user_impr, exposure.user_idx, 1.0)
            self.user_item_impr.add(exposure.user_idx, exposure.item_idx)
            self.global_impr += len(exposure)

        pos = batch.take(np.flatnonzero(batch.strength > 0))
        if not len(pos):
            return
        # Strength-weighted affinities and seen counts: every positive event.
        np.add.at(self.user_strength, pos.user_idx, pos.strength)
        np.maximum.at(self.item_last_us, pos.item_idx, pos.ts_us)
        np.maximum.at(self.user_last_us, pos.user_idx, pos.ts_us)
        self.user_item.add(pos.user_idx, pos.item_idx)
        cat = self.catalogue.category[pos.item_idx]
        has_cat = cat >= 0
        self.user_cat.add(pos.user_idx[has_cat], cat[has_cat], pos.strength[has_cat])
        ptr = self.catalogue.tag_indptr
        n_tags = ptr[pos.item_idx + 1] - ptr[pos.item_idx]
        if n_tags.sum():
            rows = np.repeat(np.arange(len(pos)), n_tags)
            offsets = np.arange(len(rows)) - np.repeat(np.cumsum(n_tags) - n_tags, n_tags)
            tags = self.catalogue.tag_ids[ptr[pos.item_idx][rows] + offsets]
            self.user_tag.add(pos.user_idx[rows], tags, pos.strength[rows])
        self._apply_interactions(self._new_interactions(pos))

    def _new_interactions(self, pos: EventBatch) -> EventBatch:
        """Collapse positives to interactions; merge funnel events into interactions already in the
        history buffer. Returns the new interactions sorted by (user, time, item)."""
        # Runs of (user, item, request) sorted by strength: last = strongest, min ts = first time.
        solo = pos.request < 0
        group = np.where(solo, -2 - np.arange(len(pos)), pos.request)  # unique group for no-request events
        order = np.lexsort((pos.ts_us, pos.strength, group, pos.item_idx, pos.user_idx))
        p = pos.take(order)
        group = group[order]
        starts = _run_starts(p.user_idx, p.item_idx, group)
        last = np.append(starts[1:], len(p)) - 1
        inter = p.take(last)
        inter = EventBatch(
            inter.user_idx,
            inter.item_idx,
            np.minimum.reduceat(p.ts_us, starts),
            inter.strength,
            inter.event_code,
            inter.request,
        )
        # Merge into buffered interactions of the same (user, item, request).
        has_req = np.flatnonzero(inter.request >= 0)
        if len(has_req):
            users = inter.user_idx[has_req]
            match = (self.hist_item[users] == inter.item_idx[has_req, None]) & (
                self.hist_req[users] == inter.request[has_req, None]
            )
            merged = match.any(1)
            if merged.any():
                rows, slot = users[merged], match[merged].argmax(1)
                src = has_req[merged]
                stronger = inter.strength[src] > self.hist_strength[rows, slot]
                self.hist_code[rows[stronger], slot[stronger]] = inter.event_code[src[stronger]]
                self.hist_strength[rows[stronger], slot[stronger]] = inter.strength[src[stronger]]
                keep = np.ones(len(inter), dtype=bool)
                keep[src] = False
                inter = inter.take(np.flatnonzero(keep))
        return inter.take(np.lexsort((inter.item_idx, inter.ts_us, inter.user_idx)))

    def _decay_add(self, values: np.ndarray, refs: np.ndarray, rows: np.ndarray, ts: np.ndarray) -> None:
        """values[r] (decayed to refs[r]) += sum exp(-(ref_new - t)/tau) over events of row r."""
        taus = np.asarray(self.config.decay_days) * DAY_US
        uniq, inverse = np.unique(rows, return_inverse=True)
        latest = np.full(len(uniq), NEVER, np.int64)
        np.maximum.at(latest, inverse, ts)
        old = refs[uniq]
        new_ref = np.maximum(old, latest)
        age_old = np.where(old == NEVER, 0, new_ref - old).astype(np.float64)
        values[uniq] *= np.exp(-age_old[:, None] / taus)
        age_new = (new_ref[inverse] - ts).astype(np.float64)
        contrib = np.exp(-age_new[:, None] / taus)  # [b, W]
        for w in range(len(taus)):
            values[uniq, w] += np.bincount(inverse, weights=contrib[:, w], minlength=len(uniq))
        refs[uniq] = new_ref

    def _apply_interactions(self, new: EventBatch) -> None:
        if not len(new):
            return
        np.add.at(self.item_count, new.item_idx, 1.0)
        np.add.at(self.user_count, new.user_idx, 1.0)
        self._decay_add(self.item_decay, self.item_decay_ref, new.item_idx, new.ts_us)
        self._decay_add(self.user_decay, self.user_decay_ref, new.user_idx, new.ts_us)
        served = new.request >= 0  # outcome of a served slate: counts toward CTR
        np.add.at(self.item_clicks, new.item_idx[served], 1.0)
        np.add.at(self.user_clicks, new.user_idx[served], 1.0)
        self.global_clicks += float(served.sum())

        # Co-visitation: sequence = user's last `lag` buffered items (oldest first) + new ones.
        lag, h = self.config.covis_lag, self.config.max_history
        starts = _run_starts(new.user_idx)
        users = new.user_idx[starts]
        prev = self.hist_item[users, :lag][:, ::-1]  # [U, lag] chronological
        prev_ok = prev >= 0
        seq_user = np.concatenate([np.repeat(users, lag)[prev_ok.ravel()], new.user_idx])
        seq_item = np.concatenate([prev.ravel()[prev_ok.ravel()], new.item_idx])
        seq_new = np.concatenate([np.zeros(int(prev_ok.sum()), bool), np.ones(len(new), bool)])
        seq_pos = np.concatenate(
            [np.tile(np.arange(lag), len(users))[prev_ok.ravel()], lag + np.arange(len(new))]
        )
        order = np.lexsort((seq_pos, seq_user))
        seq_user, seq_item, seq_new = seq_user[order], seq_item[order], seq_new[order]
        a_parts, b_parts = [], []
        for k in range(1, lag + 1):
            ok = (seq_user[k:] == seq_user[:-k]) & seq_new[k:] & (seq_item[k:] != seq_item[:-k])
            a_parts.append(seq_item[:-k][ok])
            b_parts.append(seq_item[k:][ok])
        a, b = np.concatenate(a_parts), np.concatenate(b_parts)
        self.covis.add(np.concatenate([a, b]), np.concatenate([b, a]))

        # History ring buffers: prepend the user's new interactions (newest first), keep h.
        counts = np.diff(np.append(starts, len(new)))
        take = np.minimum(counts, h)
        j = np.arange(h)[None, :]
        from_new = j < take[:, None]
        new_src = (starts + counts - 1)[:, None] - j  # newest first
        old_src = np.clip(j - take[:, None], 0, h - 1)
        for name, values in (
            ("hist_item", new.item_idx),
            ("hist_code", new.event_code),
            ("hist_strength", new.strength),
            ("hist_ts", new.ts_us),
            ("hist_req", new.request),
        ):
            buf = getattr(self, name)
            old = np.take_along_axis(buf[users], old_src, 1)
            buf[users] = np.where(from_new, values[np.where(from_new, new_src, 0)].astype(buf.dtype), old)

    # ---------------------------------------------------------------- reading

    def history(self, user_idx: int, t: Any) -> Histories:
        """The user's interactions as of the state, ages relative to t: Histories [1, H]."""
        h = self.config.max_history
        if not 0 <= user_idx < self.n_users:
            return Histories(
                np.full((1, h), -1, np.int32), np.full((1, h), -1, np.int8), np.zeros((1, h), np.float32)
            )
        items = self.hist_item[user_idx : user_idx + 1]
        age = np.where(items >= 0, (to_us(t) - self.hist_ts[user_idx : user_idx + 1]) / 1e6, 0.0)
        return Histories(items.copy(), self.hist_code[user_idx : user_idx + 1].copy(), age.astype(np.float32))

    def feature_names(
        self, match: bool = True, context: Sequence[str] = (), extra: Sequence[str] = ()
    ) -> tuple[str, ...]:
        """Column names `compute` returns for these optional groups, in order."""
        return _layout(
            tuple(self.config.decay_days), self.catalogue.numeric_names, match, tuple(sorted(context)), tuple(sorted(extra))
        )[0]

    def compute(
        self,
        user_idx: int,
        candidates: np.ndarray | Sequence[int],
        request_time: Any,
        match_scores: np.ndarray | Sequence[float] | None = None,
        history: Histories | None = None,
        context: Mapping[str, Any] | None = None,
        extra: Mapping[str, np.ndarray | Sequence[float]] | None = None,
    ) -> Features:
        """Features of one request: candidates [n] item_idx -> Features(matrix [n, F] f32, names).

        match_scores [n] (from an `EmbeddingMatcher` or any scorer) add the match_* features;
        history (Histories [1, N], most recent first) overrides the state's buffer for co-visitation;
        context values are numbers or strings from the context vocabulary; extra maps a feature name
        to per-candidate values [n] passed through unchanged (e.g. a retrieval score).

        This is the service's per-request hot path: every column is written straight into the output
        matrix (scalars broadcast), and user-row lookups search only that user's slice of a sparse map.
        """
        cand = np.asarray(candidates)
        if cand.ndim != 1 or (len(cand) and not np.issubdtype(cand.dtype, np.integer)):
            raise InputError(
                f"candidates must be a 1-d array of item_idx integers, got {cand.dtype} {cand.shape}"
            )
        cand = cand.astype(np.int64)
        n = len(cand)
        if n and (cand.min() < 0 or cand.max() >= self.n_items):
            bad = int(cand[(cand < 0) | (cand >= self.n_items)][0])
            raise InputError(f"candidate item_idx {bad} is not in the catalogue (0..{self.n_items - 1})")
        t = to_us(request_time)
        context = context or {}
        extra = extra or {}
        names, index = _layout(
            tuple(self.config.decay_days), self.catalogue.numeric_names, match_scores is not None,
            tuple(sorted(context)), tuple(sorted(extra)),
        )
        if len(index) < len(names):
            clash = next(name for name in sorted(extra) if names.count(name) > 1)
            raise InputError(f"extra feature {clash!r} clashes with a built-in feature: rename it")
        matrix = np.empty((n, len(names)), np.float32)

        def put(name: str, values: np.ndarray | float) -> None:
            matrix[:, index[name]] = values

        if match_scores is not None:
            s = _numeric("match_score", match_scores, n)
            put("match_score", s)
            rank = np.empty(n)
            rank[np.argsort(-s, kind="stable")] = np.arange(n)
            put("match_rank", rank)
            if n:
                centred = s - s.mean()
                std = math.sqrt(np.add.reduce(centred * centred) / n)  # bit-identical to s.std()
                put("match_z", centred / std if std > 1e-12 else 0.0)
                put("match_gap_top", s.max() - s)

        taus = np.asarray(self.config.decay_days) * DAY_US
        windows = [_window_name(d) for d in self.config.decay_days]

        def decayed(values: np.ndarray, refs: np.ndarray) -> np.ndarray:  # [m, W] as of t
            # Clamped: a request older than the state's last event must not grow the counts.
            age = np.where(refs == NEVER, 0, np.maximum(t - refs, 0)).astype(np.float64)
            return values * np.exp(-age[:, None] / taus)

        def days_since(stamp: np.ndarray, missing: int) -> np.ndarray:
            return np.where(stamp == missing, np.nan, (t - stamp.astype(np.float64)) / DAY_US)

        prior = self.ctr_prior
        a = self.config.ctr_prior_weight

        # Item.
        count = self.item_count[cand]
        put("item_pop_all", count)
        pop = decayed(self.item_decay[cand], self.item_decay_ref[cand])
        for w, window in enumerate(windows):
            put(f"item_pop_{window}", pop[:, w])
        impr = self.item_impr[cand]
        put("item_impressions", impr)
        put("item_ctr", (self.item_clicks[cand] + a * prior) / (impr + a) if self.global_impr > 0 else math.nan)
        put("item_age_days", days_since(self.item_first_us[cand], NOT_YET))
        put("item_catalogue_age_days", days_since(self.catalogue.created_us[cand], NEVER))
        put("item_days_since_last", days_since(self.item_last_us[cand], NEVER))
        for j, name in enumerate(self.catalogue.numeric_names):
            put(f"item_{name}", self.catalogue.numeric[cand, j])

        # User (scalars broadcast to the list; unknown users look like new ones).
        known = 0 <= user_idx < self.n_users
        u = user_idx if known else 0
        total = float(self.user_strength[u]) if known else 0.0
        put("user_interactions", self.user_count[u] if known else 0.0)
        act = decayed(self.user_decay[u : u + 1], self.user_decay_ref[u : u + 1])[0] if known else np.zeros(len(taus))
        for w, window in enumerate(windows):
            put(f"user_act_{window}", act[w])
        user_impr = float(self.user_impr[u]) if known else 0.0
        put("user_impressions", user_impr)
        user_clicks = float(self.user_clicks[u]) if known else 0.0
        put("user_ctr", (user_clicks + a * prior) / (user_impr + a) if self.global_impr > 0 else math.nan)
        last = int(self.user_last_us[u]) if known else int(NEVER)
        put("user_days_since_last", math.nan if last == NEVER else (t - float(last)) / DAY_US)
        hist = history if history is not None else self.history(user_idx, t)
        recent = np.asarray(hist.item_idx, np.int64).reshape(-1)
        recent = recent[recent >= 0]
        put("user_hist_len", float(len(recent)))

        # User x item.
        if known:
            ui = self.user_item.get_row(user_idx, cand)
            put("seen", ui > 0)
            put("ui_count", ui)
            put("ui_impressions", self.user_item_impr.get_row(user_idx, cand))
            cat = self.catalogue.category[cand].astype(np.int64)
            cat_w = np.where(cat >= 0, self.user_cat.get_row(user_idx, np.maximum(cat, 0)), 0.0)
            put("cat_affinity", cat_w / total if total > 0 else 0.0)
            put("cat_weight", cat_w)
        else:
            for name in ("seen", "ui_count", "ui_impressions", "cat_affinity", "cat_weight"):
                put(name, 0.0)
        ptr = self.catalogue.tag_indptr
        starts = ptr[cand]
        n_tags = ptr[cand + 1] - starts
        if known and total > 0 and n_tags.sum():
            seg = np.repeat(np.arange(n), n_tags)
            offsets = np.arange(len(seg)) - np.repeat(np.cumsum(n_tags) - n_tags, n_tags)
            share = self.user_tag.get_row(user_idx, self.catalogue.tag_ids[starts[seg] + offsets]) / total
            put("tag_affinity", np.bincount(seg, weights=share, minlength=n) / np.maximum(n_tags, 1))
            tag_max = np.zeros(n)
            np.maximum.at(tag_max, seg, share)
            put("tag_affinity_max", tag_max)
        else:
            put("tag_affinity", 0.0)
            put("tag_affinity_max", 0.0)
        items = recent[: self.config.covis_recent]
        if len(items) and n:
            co = self.covis.get(items[:, None], cand[None, :])  # [k, n]
            weight = 1.0 / np.arange(1, len(items) + 1)  # most recent counts most
            put("covis_sum", weight @ co)
            put("covis_max", co.max(0))
            norm = np.sqrt((self.item_count[items] + 1.0)[:, None] * (count + 1.0)[None, :])
            put("covis_norm", (co / norm).sum(0))
        else:
            for name in ("covis_sum", "covis_max", "covis_norm"):
                put(name, 0.0)

        # Context.
        day = t // DAY_US
        put("hour_of_day", (t - day * DAY_US) / 3.6e9)
        put("day_of_week", float((day + 3) % 7))  # 1970-01-01 was a Thursday; Monday = 0
        for name, value in context.items():
            put(f"ctx_{name}", self._context_value(name, value))
        for name, values in extra.items():
            put(name, _numeric(name, values, n))
        return Features(matrix, names)

    @property
    def ctr_prior(self) -> float:
        """The smoothing prior of the CTR features: global clicks / impressions (NaN before any)."""
        return min(self.global_clicks / self.global_impr, 1.0) if self.global_impr > 0 else math.nan

    def mask_unseen_items(self, features: Features, rows: np.ndarray, in_catalogue: bool = True) -> None:
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
                "item_impressions", *(f"item_pop_{_window_name(d)}" for d in self.config.decay_days)}
        missing = {"item_age_days", "item_days_since_last"}
        if not in_catalogue:
            zero |= {"cat_affinity", "cat_weight", "tag_affinity", "tag_affinity_max"}
            missing |= {"item_catalogue_age_days", *(f"item_{c}" for c in self.catalogue.numeric_names)}
        for j, name in enumerate(features.names):
            if name in zero:
                features.matrix[rows, j] = 0.0
            elif name in missing:
                features.matrix[rows, j] = np.nan
            elif name == "item_ctr":  # compute's (0 + a * prior) / (0 + a)
                features.matrix[rows, j] = self.ctr_prior if self.config.ctr_prior_weight > 0 else np.nan

    def _context_value(self, name: str, value: Any) -> float:
        if isinstance(value, str):
            vocab = self.context_vocab.get(name)
            if vocab is None:
                raise InputError(
                    f"context {name!r} has text value {value!r} but no vocabulary: known text contexts are "
                    f"{sorted(self.context_vocab) or 'none'}; pass a number or train with that context column"
                )
            return float(vocab.index(value)) if value in vocab else math.nan
        if value is None:
            return math.nan
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"context {name!r} must be a number or text, got {type(value).__name__}"
            ) from exc

    # ---------------------------------------------------------------- persistence

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the state by name (sparse maps as <name>.keys / <name>.values)."""
        out = {name: getattr(self, name) for name in _ITEM_ARRAYS}
        out.update({name: getattr(self, name)[: self.n_users] for name in _USER_ARRAYS})
        for name in _SPARSE:
            sparse: SparseMap = getattr(self, name)
            out[f"{name}.keys"], out[f"{name}.values"] = sparse.keys, sparse.values
        cat = self.catalogue
        out.update(
            {
                "catalogue.category": cat.category,
                "catalogue.tag_indptr": cat.tag_indptr,
                "catalogue.tag_ids": cat.tag_ids,
                "catalogue.numeric": cat.numeric,
                "catalogue.created_us": cat.created_us,
            }
        )
        return out

    def save(self, directory: Path | str) -> Path:
        """Write state.npz + state.json into `directory` (no pickle)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = self.arrays()
        np.savez(directory / "state.npz", **arrays)
        meta = {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "context_vocab": self.context_vocab,
            "categories": list(self.catalogue.categories),
            "tags": list(self.catalogue.tags),
            "numeric_names": list(self.catalogue.numeric_names),
            "global_impr": self.global_impr,
            "global_clicks": self.global_clicks,
            "as_of_us": self.as_of_us,
        }
        (directory / "state.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: Path | str) -> FeatureState:
        directory = Path(directory)
        try:
            meta = json.loads((directory / "state.json").read_text())
            npz = np.load(directory / "state.npz", allow_pickle=False)
            arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(
                f"cannot read feature state in {directory}: {exc}. Rebuild it with recsys train ranker"
            ) from exc
        if meta.get("format") != STATE_FORMAT:
            raise ModelError(
                f"feature state {directory} has format {meta.get('format')}, this code reads {STATE_FORMAT}"
            )
        catalogue = Catalogue(
            category=arrays["catalogue.category"],
            categories=tuple(meta["categories"]),
            tag_indptr=arrays["catalogue.tag_indptr"],
            tag_ids=arrays["catalogue.tag_ids"],
            tags=tuple(meta["tags"]),
            numeric=arrays["catalogue.numeric"],
            numeric_names=tuple(meta["numeric_names"]),
            created_us=arrays["catalogue.created_us"],
        )
        state = cls.empty(catalogue, 0, FeatureConfig.from_dict(meta["config"]), meta["context_vocab"])
        for name in (*_ITEM_ARRAYS, *_USER_ARRAYS):
            setattr(state, name, arrays[name])
        state.n_users = len(state.user_count)
        for name in _SPARSE:
            setattr(state, name, SparseMap(arrays[f"{name}.keys"], arrays[f"{name}.values"]))
        state.global_impr, state.global_clicks = float(meta["global_impr"]), float(meta["global_clicks"])
        state.as_of_us = int(meta["as_of_us"])
        return state


def context_vocabulary(
    events: pl.DataFrame, config: FeatureConfig
) -> tuple[dict[str, list[str]], FeatureConfig]:
    """Text context columns -> sorted vocabularies; resolves config.context_columns when None.

    Detection only takes low-cardinality text columns (device, country, surface): a numeric column
    may be an outcome of the event itself (dwell time, rating), a leak, so numeric context has to be
    named in context_columns."""
    columns = config.context_columns
    if columns is None:
        columns = tuple(
            c
            for c, t in events.schema.items()
            if c not in _NON_CONTEXT and t == pl.Utf8 and events[c].n_unique() <= MAX_CONTEXT_VALUES
        )
        config = FeatureConfig.from_dict({**config.to_dict(), "context_columns": columns})
    missing = [c for c in columns if c not in events.columns]
    if missing:
        raise InputError(f"events have no context column {missing[0]!r} (have: {', '.join(events.columns)})")
    vocab = {
        c: sorted(events[c].drop_nulls().unique().cast(pl.Utf8).to_list())
        for c in columns
        if events.schema[c] == pl.Utf8
    }
    return vocab, config


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
        raise InputError(
            f"feature {name!r} has shape {array.shape}, expected ({n},): one value per candidate"
        )
    return array
