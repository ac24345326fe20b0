"""The data contract: canonical columns, event types and the event-strength rule.

Every reader and importer produces these canonical tables; everything downstream relies on them.

Items (one row per item):
    item_id      str       required, unique
    title        str       required (may be empty only if description or tags exist)
    description  str       optional
    tags         str       optional; '|'-, ','- or ';'-separated labels, normalised to '|'-separated
    category     str       optional; the primary category (used for affinity features)
    created_at   datetime  optional; when the item entered the catalogue
    <any other>  numeric or string attribute columns, passed through

Events (one row per behaviour):
    user_id      str       required
    item_id      str       required, must exist in items
    event_type   str       required, one of EVENT_TYPES (case-insensitive; aliases accepted)
    timestamp    datetime  required, UTC; accepted as datetime, ISO-8601 text or unix seconds
    value        float     optional (a rating, a price, dwell seconds)
    request_id   str       optional; groups items shown together (impressions and their outcomes)
    position     int       optional; 0-based slot in the served list
    <any other>  context columns (device, country, ...), passed through

Users (optional): user_id plus attribute columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from recsys.errors import ConfigError

SCHEMA_VERSION = 1

TIMESTAMP_DTYPE = pl.Datetime("us", "UTC")

# Event strength: graded relevance used as the training weight for the matcher and the label gain
# for the ranker. Impressions are exposure only (strength 0): negatives when nothing followed.
EVENT_TYPES: dict[str, float] = {
    "impression": 0.0,
    "view": 1.0,
    "click": 2.0,
    "comment": 2.0,
    "share": 3.0,
    "add_to_cart": 3.0,
    "purchase": 4.0,
    "rating": 1.0,  # replaced per row by RatingRule
}

# Stable integer codes for event types (histories store these; -1 is padding).
EVENT_CODES: dict[str, int] = {name: code for code, name in enumerate(EVENT_TYPES)}

EVENT_ALIASES: dict[str, str] = {
    "impressions": "impression",
    "show": "impression",
    "exposure": "impression",
    "views": "view",
    "detail_view": "view",
    "clicks": "click",
    "cart": "add_to_cart",
    "addtocart": "add_to_cart",
    "add-to-cart": "add_to_cart",
    "add to cart": "add_to_cart",
    "buy": "purchase",
    "order": "purchase",
    "transaction": "purchase",
    "purchases": "purchase",
    "rate": "rating",
    "ratings": "rating",
    "like": "share",
}

ITEM_REQUIRED = ("item_id", "title")
# The canonical event columns, in order; anything else on an event is context.
EVENT_COLUMNS = ("user_id", "item_id", "event_type", "timestamp", "value", "request_id", "position")
EVENT_REQUIRED = ("user_id", "item_id", "event_type", "timestamp")


@dataclass(frozen=True)
class RatingRule:
    """How explicit ratings become event strengths.

    A rating >= `positive_threshold` is a positive interaction with strength
    `base + (rating - positive_threshold) * step`; a rating below it has strength 0 (like an
    impression that was not acted on: a known negative). The default threshold 0 keeps every rating
    as an interaction, the usual implicit-feedback protocol for MovieLens.
    """

    positive_threshold: float = 0.0
    base: float = 1.0
    step: float = 0.25

    def __post_init__(self) -> None:
        if self.base <= 0:
            raise ConfigError(f"RatingRule.base must be > 0, got {self.base}")
        if self.step < 0:
            raise ConfigError(f"RatingRule.step must be >= 0, got {self.step}")

    def strength_expr(self, value: pl.Expr) -> pl.Expr:
        over = (value - self.positive_threshold).clip(lower_bound=0.0)
        return (
            pl.when(value >= self.positive_threshold)
            .then(self.base + over * self.step)
            .otherwise(0.0)
        )


@dataclass(frozen=True)
class StrengthRule:
    """Event type -> strength, with ratings graded by `rating`."""

    event_strength: dict[str, float] = field(default_factory=lambda: dict(EVENT_TYPES))
    rating: RatingRule = field(default_factory=RatingRule)

    def expr(self) -> pl.Expr:
        """Polars expression computing `strength` from `event_type` and `value`."""
        by_type = pl.col("event_type").replace_strict(
            self.event_strength, default=None, return_dtype=pl.Float64
        )
        rated = self.rating.strength_expr(pl.col("value").cast(pl.Float64))
        return (
            pl.when(pl.col("event_type") == "rating")
            .then(rated)
            .otherwise(by_type)
            .alias("strength")
        )
