"""What the features read besides events: the feature config, the item catalogue, event batches, times.

* `FeatureConfig`: what the state tracks (decay windows, history length, co-visitation lag, CTR
  prior, item numeric columns, context columns); saved with every model.
* `Catalogue`: item attributes indexed by item_idx (category, tags as CSR, numeric columns, creation
  time), with sorted vocabularies so the same catalogue always gives the same codes.
* `EventBatch`: events as aligned arrays, what `FeatureState.apply` consumes.
* `to_us`, `request_keys`, `context_vocabulary`: timestamps, request ids and context values as the
  state stores them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import polars as pl

from recsys.data.schema import EVENT_CODES, EVENT_COLUMNS
from recsys.errors import ConfigError, InputError
from recsys.timestamps import RANGE_TEXT as TIME_RANGE
from recsys.timestamps import REPRESENTABLE_MAX_US, REPRESENTABLE_MIN_US, unrepresentable

DAY_US = 86_400_000_000
NEVER = np.iinfo(np.int64).min  # "no event yet" for last-seen times
NOT_YET = np.iinfo(np.int64).max  # "no event yet" for first-seen times
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



def request_keys(request_id: pl.Series) -> np.ndarray:
    """request_id strings -> non-negative int64 keys (-1 where null). Polars' seeded hash: stable
    within a Polars version, which is all the state needs (keys only match recent interactions)."""
    hashed = request_id.cast(pl.Utf8).hash(seed=0)
    keys = (hashed.to_numpy().astype(np.uint64) & np.uint64((1 << 62) - 1)).astype(np.int64)
    return np.where(request_id.is_null().to_numpy(), -1, keys)




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
