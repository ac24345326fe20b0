"""Validation: raw tables in, canonical typed tables and a report out.

Everything downstream trusts `CleanTables`, so this is where bad input is stopped, with one-paragraph
`InputError`s that name the file, the column, the first offending data rows (1-based, header not
counted) with their values, and the fix. Row-level problems can be dropped instead (`on_invalid="drop"`),
counted per reason in the `ValidationReport`; table-level problems always raise. All checks are polars
expressions over whole columns (no per-row Python), so 10M events validate in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.readers import RawTables
from recsys.data.schema import (
    EVENT_ALIASES,
    EVENT_COLUMNS,
    EVENT_REQUIRED,
    ITEM_REQUIRED,
    TIMESTAMP_DTYPE,
    StrengthRule,
)
from recsys.errors import ConfigError, InputError

ON_INVALID = ("error", "drop")
CLEAN_EVENT_COLUMNS = (*EVENT_COLUMNS, "strength")
ITEM_TEXT = ("title", "description", "tags", "category")
_ROW = "__row"
_SHOWN = 5
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
RATING_LIMIT = 100.0  # |rating| above this is refused (row-level): 0-5, 1-10 and 0-100 scales all fit

# Row-level reasons, in the order they are checked (a row is counted under the first that applies).
REASONS: dict[str, str] = {
    "null_required": "empty required values",
    "unparseable_timestamp": "timestamps that cannot be parsed",
    "mixed_timestamp_unit": "unix timestamps in another unit than the rest of the column",
    "unparseable_value": "values that are not numbers",
    "unparseable_position": "positions that are not non-negative whole numbers",
    "unknown_event_type": "unknown event types",
    "missing_rating_value": "'rating' events without a value",
    "rating_out_of_range": f"ratings outside [-{RATING_LIMIT:g}, {RATING_LIMIT:g}]",
    "negative_timestamp": "timestamps before 1970-01-01",
    "future_timestamp": "timestamps more than a day in the future",
    "unknown_item": "item ids that are not in the items table",
    "duplicate_event": "exact duplicate events (same user, item, type, time and request)",
    "item_missing_id": "items without an item_id",
    "item_without_text": "items with no title, description or tags",
    "user_missing_id": "users without a user_id",
}

# ISO-8601 shapes tried after normalising ' '->'T' and 'Z'->'+00:00'; (format, has offset).
_TS_FORMATS = (
    ("%Y-%m-%dT%H:%M:%S%.f%z", True),
    ("%Y-%m-%dT%H:%M%z", True),
    ("%Y-%m-%dT%H:%M:%S%.f", False),
    ("%Y-%m-%dT%H:%M", False),
    ("%Y-%m-%d", False),
)
# Unix epoch units by magnitude of the median |value|: below 1e11 seconds reach year 5138.
_EPOCH_UNITS = ((1e11, "seconds", 1_000_000.0), (1e14, "milliseconds", 1_000.0), (1e17, "microseconds", 1.0))


@dataclass
class CleanTables:
    """Canonical tables (see `recsys.data.schema`): ids Utf8, UTC timestamps, `strength` computed."""

    events: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame | None = None


@dataclass
class ValidationReport:
    """What validation read, kept, dropped (by reason) and assumed (notes)."""

    input_rows: dict[str, int] = field(default_factory=dict)
    output_rows: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{table}: {self.input_rows.get(table, 0):,} rows read, {self.output_rows.get(table, 0):,} kept"
            for table in self.input_rows
        ]
        for reason, n in self.dropped.items():
            lines.append(f"dropped {n:,} {REASONS.get(reason, reason)} [{reason}]")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def _drop(self, reason: str, n: int) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


# --------------------------------------------------------------------------- messages


def _fmt(value: Any) -> str:
    if value is None:
        return "empty"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _rows_text(raw: pl.DataFrame, rows: list[int], column: str) -> str:
    """'3 ('abc'), 7 (empty)': row numbers with the values as read."""
    values: dict[int, Any] = {}
    if column in raw.columns and rows:
        picked = raw.select(pl.col(column).gather([r - 1 for r in rows]))[column].to_list()
        values = dict(zip(rows, picked, strict=True))
    return ", ".join(f"{r} ({_fmt(values.get(r))})" for r in rows)


def _error(
    where: str, column: str, count: int, what: str, raw: pl.DataFrame, rows: list[int], fix: str
) -> InputError:
    more = f" and {count - len(rows)} more" if count > len(rows) else ""
    return InputError(
        f"In the {where}, column '{column}' has {count:,} {what}: data rows {_rows_text(raw, rows, column)}"
        f"{more} (data rows count from 1, not counting a header line). Fix: {fix}"
    )


def _first_rows(df: pl.DataFrame, mask: pl.Expr) -> tuple[int, list[int]]:
    hits = df.filter(mask)
    return hits.height, hits[_ROW].head(_SHOWN).to_list()


_DROP_HINT = " Or pass on_invalid='drop' to drop such rows and count them."


def _where(raw: RawTables, role: str) -> str:
    src = raw.sources.get(role)
    return f"{role} file {src}" if src else f"{role} table"


# --------------------------------------------------------------------------- column canonicalisers


def _id_column(df: pl.DataFrame, col: str, where: str, raw: pl.DataFrame) -> pl.Expr:
    """Ids as stripped text; integers (and integral floats) become their decimal text."""
    dtype = df.schema[col]
    s = pl.col(col)
    if dtype == pl.Utf8 or isinstance(dtype, pl.Categorical | pl.Enum):
        text = s.cast(pl.Utf8).str.strip_chars().replace("", None)
    elif dtype.is_integer():
        text = s.cast(pl.Utf8)
    elif dtype.is_float():
        n, rows = _first_rows(df, s.is_not_null() & (s.is_nan() | (s != s.floor())))
        if n:
            raise _error(where, col, n, "ids that are fractional numbers", raw, rows,
                         "ids must be text or whole numbers; write them as text.")  # fmt: skip
        text = s.cast(pl.Int64).cast(pl.Utf8)
    else:
        _, rows = _first_rows(df, pl.lit(True))
        raise _error(where, col, df.height, f"values of type {dtype}, not ids", raw, rows,
                     "ids must be text or whole numbers.")  # fmt: skip
    return text.alias(col)


def _text_column(df: pl.DataFrame, col: str) -> pl.Expr:
    """Optional text: absent or null -> ''; lists (e.g. parquet tags) joined with '|'."""
    if col not in df.columns:
        return pl.lit("").alias(col)
    dtype = df.schema[col]
    s = pl.col(col)
    if isinstance(dtype, pl.List):
        s = s.list.eval(pl.element().cast(pl.Utf8)).list.join("|")
    elif dtype != pl.Utf8:
        s = s.cast(pl.Utf8)
    return s.str.strip_chars().fill_null("").alias(col)


def _normalise_tags() -> pl.Expr:
    """'a, b;c||d' -> 'a|b|c|d'."""
    return (
        pl.col("tags")
        .str.replace_all(r"(\s*[|,;]\s*)+", "|")
        .str.strip_chars("|")
        .str.strip_chars()
        .alias("tags")
    )


def _numeric_parts(df: pl.DataFrame, col: str, integer: bool) -> tuple[pl.Expr, pl.Expr]:
    """(the column as Float64, mask of values that are not numbers of the required kind)."""
    src = df.schema[col]
    s = pl.col(col)
    if src == pl.Utf8:
        s = pl.when(s.str.strip_chars() == "").then(None).otherwise(s.str.strip_chars())
    if not (src == pl.Utf8 or src.is_numeric() or src == pl.Boolean):
        return s, pl.lit(True)
    f = s.cast(pl.Float64, strict=False)
    bad = s.is_not_null() & (f.is_null() | ~f.is_finite())
    if integer:
        bad = bad | (f.is_not_null() & ((f != f.floor()) | (f < 0)))
    return f, bad


def _drop_non_numeric(df: pl.DataFrame, report: ValidationReport) -> pl.DataFrame:
    """--on-invalid drop: rows whose value/position is not a number of the right kind are dropped and counted."""
    for col, integer in (("value", False), ("position", True)):
        if col in df.columns:
            _, bad = _numeric_parts(df, col, integer)
            n = df.select(bad.sum()).item()
            if n:
                report._drop(f"unparseable_{col}", int(n))
                df = df.filter(~bad)
    return df


def _numeric(
    df: pl.DataFrame, col: str, dtype: pl.DataType, where: str, raw: pl.DataFrame, integer: bool
) -> pl.Expr:
    """A numeric column (`value`, `position`); raises on text that is not a number (table-level)."""
    f, bad = _numeric_parts(df, col, integer)
    n, rows = _first_rows(df, bad)
    if n:
        kind = "non-negative whole numbers (0-based slots)" if integer else "numbers"
        raise _error(where, col, n, f"values that are not {kind}", raw, rows,
                     f"write {kind} in '{col}' or leave them empty.")  # fmt: skip
    if integer:
        return f.cast(pl.Int64).cast(dtype).alias(col)
    return f.cast(dtype).alias(col)


def _event_types(s: pl.Series, accepted: list[str]) -> pl.Series:
    """Lower-case, strip and resolve aliases once per distinct value; an Enum keeps later steps cheap.

    The Enum holds the accepted names plus every other name seen, so unknown types survive to be reported.
    """
    cat = s.cast(pl.Utf8).cast(pl.Categorical)
    names = cat.unique().drop_nulls().cast(pl.Utf8)
    canon = names.str.strip_chars().str.to_lowercase().replace(EVENT_ALIASES)
    canon = pl.select(pl.when(canon == "").then(None).otherwise(canon)).to_series()
    enum = pl.Enum(sorted({*accepted, *canon.drop_nulls().to_list()}))
    return cat.replace_strict(names, canon, default=None, return_dtype=enum).alias("event_type")


def _epoch_to_utc(s: pl.Series) -> tuple[pl.Series, str | None, pl.Series]:
    """Unix epoch numbers -> UTC datetimes, a note and the `foreign` mask.

    The unit is chosen by the magnitude of the column's median and reported; values whose own
    magnitude says another unit (seconds mixed with milliseconds) are flagged in `foreign` rather than
    read in the column's unit, where they would land in 1970 or far in the future."""
    f = s.cast(pl.Float64)
    sample = f.gather_every(max(1, f.len() // 100_000))  # the unit is a column property: a sample decides
    sample = sample.filter(sample.is_finite())
    median = float(sample.abs().median() or 0.0) if sample.len() else 0.0  # type: ignore[arg-type]
    unit, factor = "nanoseconds", 0.001
    for limit, name, mult in _EPOCH_UNITS:
        if median < limit:
            unit, factor = name, mult
            break
    frame = pl.DataFrame({"s": s})
    x = pl.col("s")
    if s.dtype.is_integer() and unit == "nanoseconds":
        micros = x.cast(pl.Int64) // 1000
    elif s.dtype.is_integer():
        # Exact integer arithmetic; out-of-range values become null (counted as unparseable).
        limit = int(9.0e18 / factor)
        micros = pl.when(x.cast(pl.Float64).abs() < limit).then(
            x.cast(pl.Int64).clip(-limit, limit) * int(factor)
        )
    else:
        scaled = (x.cast(pl.Float64) * factor).round()
        micros = pl.when(scaled.is_finite() & (scaled.abs() < 9.0e18)).then(scaled).cast(pl.Int64)
    micros_s = frame.select(micros.alias("s")).to_series()
    out = micros_s.cast(pl.Datetime("us")).dt.replace_time_zone("UTC").cast(TIMESTAMP_DTYPE)
    note = None if unit == "seconds" else f"read as unix {unit} (median value {median:.3g})"
    magnitude = f.abs()
    bounds = [limit for limit, _, _ in _EPOCH_UNITS]
    own = next((i for i, (_, name, _) in enumerate(_EPOCH_UNITS) if name == unit), len(bounds))
    lo, hi = (bounds[own - 1] if own else 0.0), (bounds[own] if own < len(bounds) else float("inf"))
    foreign = (f.is_finite() & ((magnitude < lo) | (magnitude >= hi))).fill_null(False)
    return out, note, foreign


def _arrow_iso(text: pl.Series) -> pl.Series | None:
    """Arrow's vectorised ISO-8601 cast (about 20x faster than strptime), or None if any value fails."""
    present = text.drop_nulls()
    if present.len() == 0:
        return None
    zoned = present.head(1000).str.contains(r"(?:[zZ]|[+-]\d{2}:?\d{2})$")
    if not (zoned.all() or not zoned.any()):
        return None  # a mix of zoned and naive values: the slow path handles each
    target = pa.timestamp("us", "UTC") if zoned.all() else pa.timestamp("us")
    try:
        arr = pc.cast(text.to_arrow(), target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    out = pl.Series(text.name, arr)
    if not zoned.all():
        out = out.dt.replace_time_zone("UTC")
    return out.cast(TIMESTAMP_DTYPE)


def _text_to_utc(text: pl.Series) -> pl.Series:
    """ISO-8601 text -> UTC datetimes (null where unparseable); offsets honoured, naive taken as UTC.

    Arrow's cast when the whole column parses; otherwise polars formats are tried one by one on the
    rows still unparsed.
    """
    if text.null_count() == text.len():
        return pl.Series(text.name, [], dtype=TIMESTAMP_DTYPE).extend_constant(None, text.len())
    fast = _arrow_iso(text)
    if fast is not None:
        return fast
    norm = (
        text.str.replace(r"^(\d{4}-\d{1,2}-\d{1,2})[ tT]", "${1}T")
        .str.replace(r"\s*(?:[zZ]|UTC|GMT)$", "+00:00")
        .str.replace(r"\s+([+-]\d{2}:?\d{2})$", "${1}")
    )
    sample = norm.drop_nulls().head(1000)
    ranked = sorted(
        _TS_FORMATS,
        key=lambda f: -sample.str.to_datetime(f[0], strict=False, time_unit="us").is_not_null().sum(),
    )
    out = pl.Series(text.name, [], dtype=TIMESTAMP_DTYPE).extend_constant(None, text.len())
    for fmt, aware in ranked:
        todo = (out.is_null() & norm.is_not_null()).arg_true()
        if todo.len() == 0:
            break
        parsed = norm.gather(todo).str.to_datetime(fmt, strict=False, time_unit="us")
        if not aware:
            parsed = parsed.dt.replace_time_zone("UTC")
        out = out.scatter(todo, parsed.cast(TIMESTAMP_DTYPE))
    return out


def _to_utc(s: pl.Series, where: str, raw: pl.DataFrame) -> tuple[pl.Series, pl.Series, str | None, pl.Series]:
    """(timestamps, unparseable mask, note, mixed-unit mask). Nulls in -> nulls out, not counted."""
    dtype = s.dtype
    none = pl.repeat(False, s.len(), eager=True)
    if isinstance(dtype, pl.Datetime):
        conv = s.dt.replace_time_zone("UTC") if dtype.time_zone is None else s.dt.convert_time_zone("UTC")
        out = conv.cast(TIMESTAMP_DTYPE)
        return out, none, None, none
    if dtype == pl.Date:
        out = s.cast(pl.Datetime("us")).dt.replace_time_zone("UTC").cast(TIMESTAMP_DTYPE)
        return out, none, None, none
    if dtype.is_numeric():
        out, note, foreign = _epoch_to_utc(s)
        return out, s.is_not_null() & out.is_null(), note, foreign
    if dtype == pl.Utf8 or isinstance(dtype, pl.Categorical | pl.Enum):
        raw_text = s.cast(pl.Utf8)
        sample = raw_text.drop_nulls().head(1000).str.strip_chars()
        sample = sample.filter(sample != "")
        numeric = sample.cast(pl.Float64, strict=False).is_not_null().sum() > sample.len() / 2
        if not numeric and (fast := _arrow_iso(raw_text)) is not None:
            return fast, none, None, none  # clean ISO column: one pass
        text = raw_text.str.strip_chars().replace("", None)
        foreign = none
        if numeric:  # unix epoch numbers written as text
            out, note, foreign = _epoch_to_utc(text.cast(pl.Float64, strict=False))
        else:
            out, note = _text_to_utc(text), None
        return out, text.is_not_null() & out.is_null(), note, foreign
    rows = list(range(1, min(_SHOWN, s.len()) + 1))
    raise _error(where, s.name, s.len(), f"values of type {dtype}, not timestamps", raw, rows,
                 "write datetimes, ISO-8601 text such as 2024-05-01T12:30:00Z, or unix seconds.")  # fmt: skip


# --------------------------------------------------------------------------- tables


def _check_table(df: pl.DataFrame | None, required: tuple[str, ...], where: str) -> pl.DataFrame:
    if df is None or df.height == 0:
        cols = f" (columns: {', '.join(df.columns)})" if df is not None and df.columns else ""
        raise InputError(f"The {where} has no rows{cols}. Fix: pass a file with data rows.")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(
            f"The {where} lacks the required column(s) {', '.join(repr(c) for c in missing)}; it has "
            f"{', '.join(repr(c) for c in df.columns)}. Required: {', '.join(required)}. Fix: rename or "
            f"add the columns (names are case-sensitive)."
        )
    return df.with_row_index(_ROW, offset=1)


def _unique_ids(df: pl.DataFrame, col: str, where: str, raw: pl.DataFrame) -> None:
    n, rows = _first_rows(df, pl.col(col).is_not_null() & pl.col(col).is_duplicated())
    if n:
        raise _error(where, col, n, "rows whose id appears more than once", raw, rows,
                     f"keep one row per {col} (merge or remove the duplicates).")  # fmt: skip


def _items(raw: RawTables, drop: bool, report: ValidationReport) -> pl.DataFrame:
    where = _where(raw, "items")
    src = raw.items
    df = _check_table(src, ITEM_REQUIRED, where)
    report.input_rows["items"] = df.height
    df = df.with_columns(_id_column(df, "item_id", where, src), *(_text_column(df, c) for c in ITEM_TEXT))
    df = df.with_columns(_normalise_tags())
    if "created_at" in df.columns:
        ts, bad, note, foreign = _to_utc(df["created_at"], where, src)
        bad = bad | foreign
        n, rows = _first_rows(df, pl.lit(bad))
        if n and not drop:
            raise _error(where, "created_at", n, "timestamps that cannot be parsed", src, rows,
                         "write ISO-8601 text such as 2024-05-01T12:30:00Z or unix seconds." + _DROP_HINT)  # fmt: skip
        if n:
            report.notes.append(f"{n:,} unparseable items.created_at values set to empty")
        if note:
            report.notes.append(f"items.created_at {note}")
        df = df.with_columns(ts.alias("created_at"))
    no_text = (pl.col("title") == "") & (pl.col("description") == "") & (pl.col("tags") == "")
    checks = (
        ("item_missing_id", "item_id", pl.col("item_id").is_null(), "empty item ids", "give every item an id."),
        ("item_without_text", "title", no_text, "items with no title, description or tags",
         "give every item a title (or a description or tags): the matcher reads item text."),
    )  # fmt: skip
    df = _apply_row_checks(df, checks, where, src, drop, report)
    _unique_ids(df, "item_id", where, src)
    report.output_rows["items"] = df.height
    rest = [c for c in df.columns if c not in ("item_id", *ITEM_TEXT, _ROW)]
    return df.select("item_id", *ITEM_TEXT, *rest)


def _users(raw: RawTables, drop: bool, report: ValidationReport) -> pl.DataFrame | None:
    if raw.users is None:
        return None
    where = _where(raw, "users")
    src = raw.users
    df = _check_table(src, ("user_id",), where)
    report.input_rows["users"] = df.height
    df = df.with_columns(_id_column(df, "user_id", where, src))
    checks = (
        (
            "user_missing_id",
            "user_id",
            pl.col("user_id").is_null(),
            "empty user ids",
            "give every user an id.",
        ),
    )
    df = _apply_row_checks(df, checks, where, src, drop, report)
    _unique_ids(df, "user_id", where, src)
    report.output_rows["users"] = df.height
    return df.drop(_ROW)


def _apply_row_checks(
    df: pl.DataFrame,
    checks: tuple[tuple[str, str, pl.Expr, str, str], ...],
    where: str,
    raw: pl.DataFrame,
    drop: bool,
    report: ValidationReport,
) -> pl.DataFrame:
    """Raise on the first failing check, or drop failing rows counting each under its first reason."""
    if not drop:
        for _, col, mask, what, fix in checks:
            n, rows = _first_rows(df, mask)
            if n:
                raise _error(where, col, n, what, raw, rows, fix + _DROP_HINT)
        return df
    reason = pl.lit(None, pl.Utf8)
    for name, _, mask, _, _ in reversed(checks):
        reason = pl.when(mask).then(pl.lit(name)).otherwise(reason)
    df = df.with_columns(reason.alias("__reason"))
    counts = df.group_by("__reason").len().drop_nulls()
    for name, n in counts.iter_rows():
        report._drop(name, n)
    return df.filter(pl.col("__reason").is_null()).drop("__reason")


def _event_checks(
    accepted: list[str], item_ids: pl.Series, now: datetime, note: str | None, items_name: str
) -> tuple[tuple[str, str, pl.Expr, str, str], ...]:
    """Row-level checks of the events, in order: (reason, column, bad-row mask, what, fix)."""
    ts_col = pl.col("timestamp")
    nulls = tuple(
        ("null_required", c, (ts_col.is_null() & ~pl.col("__unparseable")) if c == "timestamp" else pl.col(c).is_null(),
         "empty values", "fill in user_id, item_id, event_type and timestamp on every row.")
        for c in EVENT_REQUIRED
    )  # fmt: skip
    checks = (
        *nulls,
        ("unparseable_timestamp", "timestamp", pl.col("__unparseable"), "timestamps that cannot be parsed",
         "write ISO-8601 text such as 2024-05-01T12:30:00Z, a datetime, or unix seconds."),
        ("mixed_timestamp_unit", "timestamp", pl.col("__foreign_unit"),
         f"unix timestamps in another unit than the column's ({note or 'read as unix seconds'}; e.g. "
         "milliseconds among seconds)",
         "write every timestamp in one unit (or as ISO-8601 text); mixed units would put events in 1970."),
        ("unknown_event_type", "event_type",
         pl.col("event_type").is_not_null() & ~pl.col("event_type").is_in(accepted), "unknown event types",
         f"use one of {', '.join(accepted)} (case-insensitive; aliases such as "
         f"{', '.join(sorted(EVENT_ALIASES)[:6])} are accepted)."),
        ("missing_rating_value", "value", (pl.col("event_type") == "rating") & pl.col("value").is_null(),
         "'rating' events without a value", "put the rating in the 'value' column."),
        ("rating_out_of_range", "value", (pl.col("event_type") == "rating") & (pl.col("value").abs() > RATING_LIMIT),
         f"ratings outside [-{RATING_LIMIT:g}, {RATING_LIMIT:g}] (a rating's strength grows with it, so one such "
         "row would outweigh thousands of purchases)",
         "check the column (a price or a timestamp in 'value'?) or rescale the ratings."),
        ("negative_timestamp", "timestamp", ts_col < pl.lit(_EPOCH), "timestamps before 1970-01-01",
         "check the timestamp unit and format (unix seconds, or ISO-8601 with a year after 1970)."),
        ("future_timestamp", "timestamp", ts_col > pl.lit(now + timedelta(days=1)),
         f"timestamps after {(now + timedelta(days=1)).isoformat(timespec='seconds')} (more than a day in the future)",
         "check the timestamp unit (seconds vs milliseconds) and the clock that wrote them."),
        ("unknown_item", "item_id", pl.col("item_id").is_not_null() & ~pl.col("item_id").is_in(item_ids.implode()),
         f"item ids that are not in the items file {items_name}",
         "add those items to the items file or remove their events."),
    )  # fmt: skip
    return checks


def _events(
    raw: RawTables,
    item_ids: pl.Series,
    rule: StrengthRule,
    drop: bool,
    now: datetime,
    report: ValidationReport,
) -> pl.DataFrame:
    where = _where(raw, "events")
    src = raw.events
    df = _check_table(src, EVENT_REQUIRED, where)
    report.input_rows["events"] = df.height
    accepted = sorted({*rule.event_strength, "rating"})
    if drop:
        df = _drop_non_numeric(df, report)

    etype = _event_types(df["event_type"], accepted)
    optional = [
        _numeric(df, "value", pl.Float64(), where, src, integer=False)
        if "value" in df.columns
        else pl.lit(None, pl.Float64).alias("value"),
        _id_column(df, "request_id", where, src)
        if "request_id" in df.columns
        else pl.lit(None, pl.Utf8).alias("request_id"),
        _numeric(df, "position", pl.Int32(), where, src, integer=True)
        if "position" in df.columns
        else pl.lit(None, pl.Int32).alias("position"),
    ]
    ts, unparseable, note, foreign = _to_utc(df["timestamp"], where, src)
    if note:
        report.notes.append(f"events.timestamp {note}")
    df = df.with_columns(
        _id_column(df, "user_id", where, src),
        _id_column(df, "item_id", where, src),
        etype.alias("event_type"),
        *optional,
        ts.alias("timestamp"),
        unparseable.alias("__unparseable"),
        foreign.alias("__foreign_unit"),
    )

    checks = _event_checks(accepted, item_ids, now, note, raw.sources.get("items", "the items table"))
    df = _apply_row_checks(df, checks, where, src, drop, report)
    if df.height == 0:
        dropped = ", ".join(f"{n:,} {REASONS.get(r, r)}" for r, n in report.dropped.items())
        raise InputError(
            f"Every event in the {where} was dropped as invalid ({dropped}), so nothing is left to train "
            f"on. Fix: correct the events (see the reasons) before preparing."
        )
    before = df.height
    df = _drop_duplicate_events(df)
    report._drop("duplicate_event", before - df.height)
    df = df.with_columns(rule.expr()).with_columns(pl.col("event_type").cast(pl.Utf8))
    report.output_rows["events"] = df.height
    rest = [c for c in df.columns if c not in (*CLEAN_EVENT_COLUMNS, _ROW, "__unparseable", "__foreign_unit")]
    return df.select(*CLEAN_EVENT_COLUMNS, *rest)


def _drop_duplicate_events(df: pl.DataFrame) -> pl.DataFrame:
    """Keep the first of exactly repeated events; a row-hash pre-check makes the clean case cheap."""
    key = ["user_id", "item_id", "event_type", "timestamp", "request_id"]
    hashes = df.select(key).hash_rows()
    ordered = np.sort(hashes.to_numpy())
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(repeated):
        return df
    suspect = hashes.is_in(pl.Series(np.unique(repeated)).implode())
    candidates = df.filter(suspect)  # hash collisions are resolved by the exact check below
    repeats = candidates.filter(~pl.struct(key).is_first_distinct())[_ROW]
    return df.filter(~pl.col(_ROW).is_in(repeats.implode()))


def validate(
    raw: RawTables,
    *,
    rule: StrengthRule | None = None,
    on_invalid: str = "error",
    now: datetime | None = None,
) -> tuple[CleanTables, ValidationReport]:
    """Check and canonicalise raw tables.

    `on_invalid="drop"` drops rows with row-level problems (counted per reason in the report) instead
    of raising; missing columns, empty tables, wrong column types and duplicate ids always raise.
    `now` (default: the current time) bounds future timestamps, with a day of slack for clock skew.
    """
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"on_invalid must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}.")
    drop = on_invalid == "drop"
    rule = rule or StrengthRule()
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    report = ValidationReport()
    items = _items(raw, drop, report)
    users = _users(raw, drop, report)
    events = _events(raw, items["item_id"], rule, drop, now, report)
    # Restore table order in the report: events first.
    report.input_rows = {
        k: report.input_rows[k] for k in ("events", "items", "users") if k in report.input_rows
    }
    report.output_rows = {
        k: report.output_rows[k] for k in ("events", "items", "users") if k in report.output_rows
    }
    return CleanTables(events=events, items=items, users=users), report
