"""`recsys prepare`: clean canonical tables -> the prepared dataset (see recsys/data/prepared.py).

Steps: index users and items, order each user's events by time, same-second ties in input order then
item id (a rule that never looks at the label), split by time (global cutoffs, per-user leave-last-out
and per-user tail fraction), build item texts from a template, build each positive event's history (the user's
most recent positives strictly before it: no leakage), attach hard negatives (impressed, not acted on
in the same request), write pairs and evaluation sets, and a manifest. Output is written to a temp
directory and renamed into place, so a failure never leaves a half-written dataset.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.data.prepared import PROTOCOLS, SPLIT_COLUMN
from recsys.data.schema import EVENT_CODES, SCHEMA_VERSION
from recsys.errors import ConfigError, InputError
from recsys.files import fault_point, output_lock, replace_path, temp_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareConfig:
    max_history: int = 20
    valid_frac: float = 0.1  # global split: share of positive events in the validation window
    test_frac: float = 0.1
    valid_start: str | None = None  # explicit ISO timestamps override the fractions
    test_start: str | None = None
    tail_frac: float = 0.2  # per-user tail protocol: last 20% of a user's positives are test
    min_tail_positives: int = 5  # users with fewer positives stay in train for the tail protocol
    text_template: str = "{title}. {tags}. {description}"
    max_text_words: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.max_history <= 512:
            raise ConfigError(f"max_history must be in [1, 512], got {self.max_history}")
        for name in ("valid_frac", "test_frac", "tail_frac"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.valid_frac + self.test_frac >= 1.0:
            raise ConfigError("valid_frac + test_frac must be < 1: nothing would be left to train on")
        if self.max_text_words < 1:
            raise ConfigError(f"max_text_words must be >= 1, got {self.max_text_words}")
        for field_name in ("{title}",):
            if field_name not in self.text_template:
                raise ConfigError(f"text_template must contain {field_name}, got {self.text_template!r}")
        for name in ("valid_start", "test_start"):
            parse_cutoff(getattr(self, name), name)


def parse_cutoff(text: str | None, name: str) -> Any:
    """An ISO-8601 split boundary as a UTC datetime (None stays None); ConfigError naming the flag."""
    if text is None:
        return None
    try:
        return pl.Series([text]).str.to_datetime(time_zone="UTC").item()
    except Exception:  # polars raises several types for unparseable text
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} {text!r} is not an ISO-8601 time: write e.g. 2026-01-15 or "
                          f"2026-01-15T00:00:00Z") from None


def build_item_text(items: pl.DataFrame, template: str, max_words: int) -> pl.Series:
    """Fill the template per item (tags '|' -> ', '), drop empty parts, truncate to max_words."""
    fields = {
        name: (
            items[name].cast(pl.Utf8).fill_null("").str.replace_all(r"\|", ", ").to_list()
            if name in items.columns
            else [""] * items.height
        )
        for name in ("title", "tags", "description", "category")
    }
    texts = []
    for row in zip(*fields.values(), strict=True):
        values = dict(zip(fields, row, strict=True))
        text = template.format(**values)
        # Remove separators left by empty fields ("Title. . desc" -> "Title. desc").
        parts = [p.strip() for p in text.split(". ") if p.strip(" .")]
        words = ". ".join(parts).split()
        texts.append(" ".join(words[:max_words]))
    return pl.Series("text", texts, dtype=pl.Utf8)


def split_time() -> pl.Expr:
    """The time a split boundary judges an event by: its request's first event, else its own time."""
    return (
        pl.when(pl.col("request_id").is_null())
        .then(pl.col("timestamp"))
        .otherwise(pl.col("timestamp").min().over("request_id"))
    )


def _global_cutoffs(positive_ts: pl.Series, config: PrepareConfig) -> tuple[Any, Any]:
    if config.valid_start or config.test_start:
        if not (config.valid_start and config.test_start):
            raise ConfigError("give both --valid-start and --test-start, or neither (fractions are used)")
        valid_start = parse_cutoff(config.valid_start, "valid_start")
        test_start = parse_cutoff(config.test_start, "test_start")
        if test_start < valid_start:
            raise ConfigError(f"test_start {test_start} is before valid_start {valid_start}")
        n_valid = int(((positive_ts >= valid_start) & (positive_ts < test_start)).sum())
        n_test = int((positive_ts >= test_start).sum())
        if not n_valid or not n_test:
            raise ConfigError(
                f"--valid-start {config.valid_start} / --test-start {config.test_start} leave {n_valid:,} positive "
                f"events in the validation window and {n_test:,} in the test window (the positives run from "
                f"{positive_ts.min()!s} to {positive_ts.max()!s}, {positive_ts.len():,} in all): both must hold some. "
                "Fix: pick boundaries inside the data, or drop the flags to split by --valid-frac/--test-frac."
            )
        return valid_start, test_start
    valid_start = positive_ts.quantile(1.0 - config.valid_frac - config.test_frac, "lower")
    test_start = positive_ts.quantile(1.0 - config.test_frac, "lower")
    return valid_start, test_start


def _histories(user: np.ndarray, ts_us: np.ndarray, item: np.ndarray, code: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Histories for rows sorted by (user, ts): the n most recent rows strictly before each row.

    Returns hist_item_idx [R, n] i32, hist_event_code [R, n] i8, hist_age_s [R, n] f32, hist_len [R].
    Rows sharing a timestamp never see each other: history ends before the first row of the tie.
    """
    rows = len(user)
    index = np.arange(rows)
    new_user = np.ones(rows, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    new_tie = new_user.copy()
    new_tie[1:] |= ts_us[1:] != ts_us[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, index, 0))
    tie_start = np.maximum.accumulate(np.where(new_tie, index, 0))
    out_item = np.full((rows, n), -1, dtype=np.int32)
    out_code = np.full((rows, n), -1, dtype=np.int8)
    out_age = np.zeros((rows, n), dtype=np.float32)
    offsets = np.arange(1, n + 1)
    chunk = 1 << 18  # bounds the [chunk, n] int64 temporaries
    for lo in range(0, rows, chunk):
        hi = min(rows, lo + chunk)
        src = tie_start[lo:hi, None] - offsets[None, :]
        valid = src >= user_start[lo:hi, None]
        src = np.where(valid, src, 0)
        out_item[lo:hi] = np.where(valid, item[src], -1)
        out_code[lo:hi] = np.where(valid, code[src], -1)
        out_age[lo:hi] = np.where(valid, (ts_us[lo:hi, None] - ts_us[src]) / 1e6, 0.0)
    hist_len = np.minimum(tie_start - user_start, n).astype(np.int16)
    return {"hist_item_idx": out_item, "hist_event_code": out_code, "hist_age_s": out_age, "hist_len": hist_len}


def _per_user_splits(positives: pl.DataFrame, config: PrepareConfig) -> pl.DataFrame:
    """Add split_loo and split_tail to positives sorted by (user_idx, timestamp)."""
    rank = pl.int_range(pl.len()).over("user_idx")
    count = pl.len().over("user_idx")
    from_end = count - 1 - rank  # 0 = the user's last positive
    n_test = (count * config.tail_frac).ceil()
    n_valid = (count * config.tail_frac / 2).ceil()
    tail_ok = count >= config.min_tail_positives
    return positives.with_columns(
        pl.when((count >= 3) & (from_end == 0))
        .then(pl.lit("test"))
        .when((count >= 3) & (from_end == 1))
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
        .alias("split_loo"),
        pl.when(tail_ok & (from_end < n_test))
        .then(pl.lit("test"))
        .when(tail_ok & (from_end < n_test + n_valid))
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
        .alias("split_tail"),
    )


def _hard_negatives(events: pl.DataFrame) -> pl.DataFrame:
    """request_id -> neg_item_idx: items impressed in the request that got no positive event."""
    with_request = events.filter(pl.col("request_id").is_not_null())
    shown = with_request.filter(pl.col("strength") <= 0).select("request_id", "item_idx").unique()
    acted = with_request.filter(pl.col("strength") > 0).select("request_id", "item_idx").unique()
    return (
        shown.join(acted, on=["request_id", "item_idx"], how="anti")
        .group_by("request_id")
        .agg(pl.col("item_idx").sort().alias("neg_item_idx"))
    )


def _eval_sets(pairs: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Per protocol/split: one row per user, history as of the user's first window positive."""
    out = {}
    hist_cols = ["hist_len", "hist_item_idx", "hist_event_code", "hist_age_s"]
    for protocol in PROTOCOLS:
        column = SPLIT_COLUMN[protocol]
        for split in ("valid", "test"):
            window = pairs.filter(pl.col(column) == split)
            first = (
                window.sort("user_idx", "timestamp")
                .group_by("user_idx", maintain_order=True)
                .first()
                .select("user_idx", pl.col("timestamp").alias("cutoff"), *hist_cols)
            )
            # Keep the strongest event per target item (a click then a purchase counts once).
            targets = (
                window.group_by("user_idx", "item_idx")
                .agg(pl.col("strength").max())
                .sort("user_idx", "item_idx")
                .group_by("user_idx", maintain_order=True)
                .agg(pl.col("item_idx").alias("target_item_idx"), pl.col("strength").alias("target_strength"))
            )
            out[f"{protocol}_{split}"] = first.join(targets, on="user_idx").sort("user_idx")
    return out


def _indexed(
    events: pl.DataFrame, items: pl.DataFrame, users: pl.DataFrame | None, config: PrepareConfig
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Dense item/user indices, item texts, and one positive row per (user, item, interaction)."""
    items = items.with_row_index("item_idx").with_columns(pl.col("item_idx").cast(pl.Int32))
    items = items.with_columns(build_item_text(items, config.text_template, config.max_text_words))
    first_seen = events.group_by("item_id").agg(pl.col("timestamp").min().alias("first_seen"))
    items = items.join(first_seen, on="item_id", how="left", maintain_order="left")

    user_ids = events.select(pl.col("user_id").unique().sort())
    user_frame = user_ids.with_row_index("user_idx").with_columns(pl.col("user_idx").cast(pl.Int32))
    if users is not None:
        user_frame = user_frame.join(users.unique("user_id", keep="first", maintain_order=True), on="user_id", how="left",
                                     maintain_order="left")

    # Same-second ties keep the input order (then item id): never the label. Ordering ties by
    # strength would make the highest-rated tie each user's last positive, the leave-last-out target.
    events = (
        events.with_row_index("_row")
        .join(items.select("item_id", "item_idx"), on="item_id", how="left")
        .join(user_frame.select("user_id", "user_idx"), on="user_id", how="left")
        .with_columns(pl.col("strength").cast(pl.Float32))
        .sort("user_idx", "timestamp", "_row", "item_idx")
    )
    # One interaction per (user, item, request): a click -> cart -> purchase funnel is one target
    # at its first timestamp with its strongest event, not three near-identical pairs.
    # A request (the served list and what followed it) is never cut by a split boundary: the global
    # split of a request's events is decided by the request's first event (its impression time).
    events = events.with_columns(
        pl.coalesce(pl.col("request_id"), pl.format("#{}", pl.int_range(pl.len()))).alias("_interaction"),
        split_time().alias("_split_ts"),
    )
    positive = (
        events.filter(pl.col("strength") > 0)
        .group_by("user_idx", "item_idx", "_interaction")
        .agg(
            pl.col("timestamp").min(),
            pl.col("event_type").sort_by("strength").last(),
            pl.col("strength").max(),
            pl.col("request_id").first(),
            pl.col("_split_ts").min(),
            pl.col("_row").min(),
        )
        .sort("user_idx", "timestamp", "_row", "item_idx")
    )
    return events, items, user_frame, positive


def _manifest(
    config: PrepareConfig, *, events: pl.DataFrame, pairs: pl.DataFrame, items: pl.DataFrame, users: pl.DataFrame,
    eval_sets: dict[str, pl.DataFrame], cutoffs: tuple[Any, Any], inputs: dict[str, str] | None,
    validation: dict[str, Any] | None, started: float,
) -> dict[str, Any]:
    valid_start, test_start = cutoffs
    user_frame = users
    def split_counts(column: str) -> dict[str, int]:
        counts = pairs.group_by(column).len().sort(column)
        return dict(zip(counts[column].to_list(), counts["len"].to_list(), strict=True))

    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "inputs": inputs or {},
        "config": asdict(config),
        "cutoffs": {"valid_start": str(valid_start), "test_start": str(test_start)},
        "rows": {
            "events": events.height,
            "positive_events": int((events["strength"] > 0).sum()),
            "interactions": pairs.height,
            "items": items.height,
            "users": user_frame.height,
            "pairs_with_hard_negatives": int((pairs["neg_item_idx"].list.len() > 0).sum()),
        },
        "splits": {protocol: split_counts(SPLIT_COLUMN[protocol]) for protocol in PROTOCOLS},
        "eval_users": {name: frame.height for name, frame in eval_sets.items()},
        "validation": validation or {},
        # The one part that differs between two runs on the same input (everything else is byte-identical).
        "run": {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.perf_counter() - started, 3)},
    }
    return manifest


def is_prepared(path: Path) -> bool:
    """Whether `path` holds a prepared dataset (its manifest names a schema version): what --out may replace."""
    try:
        return "schema_version" in json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


ROW_GROUP_ROWS = 512 * 512


def write_table(frame: pl.DataFrame, path: Path) -> None:
    """Same rows, same bytes: row groups of a fixed size, not wherever the frame's chunks happen to end
    (a join or sort splits its output by thread, so the chunks depend on the machine's core count)."""
    frame.write_parquet(path, row_group_size=ROW_GROUP_ROWS)


def write_prepared(out_dir: Path, tables: dict[str, pl.DataFrame], manifest: dict[str, Any],
                   timeline: dict[str, Any] | None = None) -> None:
    """Write into a temp sibling, manifest last, then move it over `out_dir` (the caller holds the lock).
    `timeline`: the series of timeline.png (drawn unless None)."""
    tmp_dir = temp_path(out_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    (tmp_dir / "eval").mkdir(parents=True)
    for name, frame in tables.items():
        write_table(frame, tmp_dir / name)
    if timeline is not None:
        from recsys.data.timeline import write_timeline

        write_timeline(tmp_dir, timeline)
    fault_point("prepare:written")
    # The manifest last: a directory with a manifest is a complete prepared dataset.
    (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    replace_path(tmp_dir, out_dir)


def prepare_tables(
    events: pl.DataFrame,
    items: pl.DataFrame,
    users: pl.DataFrame | None,
    out_dir: Path,
    config: PrepareConfig | None = None,
    *,
    inputs: dict[str, str] | None = None,
    validation: dict[str, Any] | None = None,
    locked: bool = False,
    plots: bool = True,
) -> dict[str, Any]:
    """Write the prepared dataset for clean canonical tables (events carry `strength`).

    Returns the manifest. Writes atomically under `out_dir`'s output lock (`locked`: the caller holds
    it): a temp sibling directory renamed over `out_dir`. `plots`: also timeline.png (events per day,
    split cutoffs marked) with its numbers in timeline.json.
    """
    config = config or PrepareConfig()
    started = time.perf_counter()
    positives_total = events.filter(pl.col("strength") > 0).height
    if positives_total == 0:
        raise InputError(
            "no positive events to learn from: every event has strength 0 (impressions, or ratings "
            "below the rating threshold). Lower --rating-threshold or include clicks/purchases."
        )

    events, items, user_frame, positive = _indexed(events, items, users, config)
    valid_start, test_start = _global_cutoffs(positive["_split_ts"], config)
    split_global = (
        pl.when(pl.col("_split_ts") >= test_start)
        .then(pl.lit("test"))
        .when(pl.col("_split_ts") >= valid_start)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
        .alias("split_global")
    )
    events = events.with_columns(split_global)
    positive = _per_user_splits(positive.with_columns(split_global), config)

    codes = positive["event_type"].replace_strict(EVENT_CODES, return_dtype=pl.Int8).to_numpy()
    ts_us = positive["timestamp"].dt.epoch("us").to_numpy()
    hist = _histories(
        positive["user_idx"].to_numpy(), ts_us, positive["item_idx"].to_numpy(), codes, config.max_history
    )
    pairs = positive.select(
        "user_idx", "item_idx", "timestamp", "event_type", "strength", "request_id",
        "split_global", "split_loo", "split_tail",
    ).with_columns(
        pl.Series("hist_len", hist["hist_len"]),
        pl.Series("hist_item_idx", hist["hist_item_idx"]),
        pl.Series("hist_event_code", hist["hist_event_code"]),
        pl.Series("hist_age_s", hist["hist_age_s"]),
    )
    negatives = _hard_negatives(events)
    pairs = pairs.join(negatives, on="request_id", how="left", maintain_order="left").with_columns(
        pl.col("neg_item_idx").fill_null(pl.lit([], dtype=pl.List(pl.Int32)))
    )
    # Per-user split labels of interactions back onto every event of them (impressions: "train").
    keys = ["user_idx", "item_idx", "_interaction"]
    events = (
        events.join(positive.select(*keys, "split_loo", "split_tail"), on=keys, how="left", maintain_order="left")
        .with_columns(pl.col("split_loo", "split_tail").fill_null("train"))
        .drop("_interaction", "_split_ts", "_row")
    )
    eval_sets = _eval_sets(pairs)

    manifest = _manifest(config, events=events, pairs=pairs, items=items, users=user_frame, eval_sets=eval_sets,
                         cutoffs=(valid_start, test_start), inputs=inputs, validation=validation, started=started)
    tables = {"items.parquet": items, "users.parquet": user_frame, "events.parquet": events, "pairs.parquet": pairs,
              **{f"eval/{name}.parquet": frame for name, frame in eval_sets.items()}}
    timeline = None
    if plots:
        from recsys.data.timeline import timeline_series

        timeline = timeline_series(events, valid_start, test_start)
    with nullcontext() if locked else output_lock(out_dir, what=f"prepared dataset {out_dir}"):
        write_prepared(out_dir, tables, manifest, timeline)
    log.debug("prepared %s: %s", out_dir, manifest["rows"])
    return manifest
