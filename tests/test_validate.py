"""validate(): canonical types, every error message, drop mode counts, duplicates."""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from recsys.data.readers import RawTables, load_generic
from recsys.data.schema import TIMESTAMP_DTYPE, RatingRule, StrengthRule
from recsys.data.validate import ValidationReport, validate
from recsys.errors import ConfigError, InputError

UTC = timezone.utc
NOW = datetime(2024, 6, 1, tzinfo=UTC)
EV_SRC, IT_SRC, US_SRC = "/data/events.csv", "/data/items.csv", "/data/users.csv"


def _items(**extra: list) -> pl.DataFrame:
    return pl.DataFrame({"item_id": ["i1", "i2", "i3"], "title": ["One", "Two", "Three"], **extra})


def _events(n: int = 4, **over: list) -> pl.DataFrame:
    cols: dict[str, list] = {
        "user_id": [f"u{k % 2}" for k in range(n)],
        "item_id": [["i1", "i2", "i3"][k % 3] for k in range(n)],
        "event_type": ["click"] * n,
        "timestamp": [f"2024-01-0{k + 1}T00:00:00Z" for k in range(n)],
    }
    cols.update(over)
    return pl.DataFrame(cols)


def _raw(
    events: pl.DataFrame, items: pl.DataFrame | None = None, users: pl.DataFrame | None = None
) -> RawTables:
    sources = {"events": EV_SRC, "items": IT_SRC}
    if users is not None:
        sources["users"] = US_SRC
    return RawTables(events=events, items=_items() if items is None else items, users=users, sources=sources)


def _error(raw: RawTables, **kw) -> str:
    with pytest.raises(InputError) as err:
        validate(raw, now=NOW, **kw)
    msg = str(err.value)
    assert "\n" not in msg and "Fix:" in msg  # one paragraph with the fix
    return msg


# --------------------------------------------------------------------------- canonical types


def test_canonical_types_and_strength() -> None:
    events = pl.DataFrame(
        {
            "user_id": [1, 2, 3, 4, 5],
            "item_id": [10, 20, 10, 20, 10],
            "event_type": [" VIEW ", "Add To Cart", "buy", "impressions", "Rating"],
            "timestamp": [1_700_000_000, 1_700_000_001, 1_700_000_002, 1_700_000_003, 1_700_000_004],
            "value": [None, None, 9.99, None, 5],
            "request_id": [None, None, None, 77, None],
            "position": [None, None, None, 3, None],
            "device": ["ios", "web", "web", "ios", "web"],
        }
    )
    items = pl.DataFrame(
        {
            "item_id": [10, 20],
            "title": [" Shoe ", None],
            "tags": ["red, sale;new", None],
            "brand": ["x", "y"],
            "description": [None, "A hat"],
        }
    )
    rule = StrengthRule(rating=RatingRule(positive_threshold=3.0))
    clean, report = validate(_raw(events, items), rule=rule, now=NOW)
    ev = clean.events
    assert dict(ev.schema) == (
        {
            "user_id": pl.Utf8,
            "item_id": pl.Utf8,
            "event_type": pl.Utf8,
            "timestamp": TIMESTAMP_DTYPE,
            "value": pl.Float64,
            "request_id": pl.Utf8,
            "position": pl.Int32,
            "strength": pl.Float64,
            "device": pl.Utf8,
        }
    )
    assert ev["user_id"].to_list() == ["1", "2", "3", "4", "5"]
    assert ev["event_type"].to_list() == ["view", "add_to_cart", "purchase", "impression", "rating"]
    assert ev["strength"].to_list() == [1.0, 3.0, 4.0, 0.0, 1.5]  # rating 5 >= 3 -> 1 + 2 * 0.25
    assert ev["timestamp"][0] == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert ev["request_id"].to_list() == [None, None, None, "77", None]
    assert ev["position"].to_list() == [None, None, None, 3, None]
    it = clean.items
    assert it.columns == ["item_id", "title", "description", "tags", "category", "brand"]
    assert it.row(0) == ("10", "Shoe", "", "red|sale|new", "", "x")
    assert it.row(1) == ("20", "", "A hat", "", "", "y")  # empty title is fine when there is text
    assert report.input_rows == {"events": 5, "items": 2} and report.output_rows == {"events": 5, "items": 2}
    assert report.dropped == {} and report.notes == []


def test_absent_optional_columns_are_typed_nulls() -> None:
    clean, _ = validate(_raw(_events(2)), now=NOW)
    ev = clean.events
    assert ev["value"].dtype == pl.Float64 and ev["value"].null_count() == 2
    assert ev["request_id"].dtype == pl.Utf8 and ev["position"].dtype == pl.Int32
    assert clean.items["description"].to_list() == ["", "", ""]
    assert clean.users is None


@pytest.mark.parametrize(
    ("values", "expected", "note"),
    [
        (["2024-01-02T03:04:05Z", "2024-01-02 05:04:05+02:00", "2024-01-02T03:04:05.5", "2024-01-02"],
         [datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
          datetime(2024, 1, 2, 3, 4, 5, 500000, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC)], None),
        (["2024-01-02T03:04:05+00:00"] * 4, [datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)] * 4, None),
        ([1_704_164_645_000, 1_704_164_645_500, 1_704_164_646_000, 1_704_164_647_000],
         [datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2024, 1, 2, 3, 4, 5, 500000, tzinfo=UTC),
          datetime(2024, 1, 2, 3, 4, 6, tzinfo=UTC), datetime(2024, 1, 2, 3, 4, 7, tzinfo=UTC)], "milliseconds"),
        ([1_704_164_645.25, 1_704_164_646.0, 1_704_164_647.0, 1_704_164_648.0],
         [datetime(2024, 1, 2, 3, 4, 5, 250000, tzinfo=UTC), datetime(2024, 1, 2, 3, 4, 6, tzinfo=UTC),
          datetime(2024, 1, 2, 3, 4, 7, tzinfo=UTC), datetime(2024, 1, 2, 3, 4, 8, tzinfo=UTC)], None),
        (["1704164645", "1704164646", "1704164647", "1704164648"],
         [datetime(2024, 1, 2, 3, 4, s, tzinfo=UTC) for s in (5, 6, 7, 8)], None),
        ([date(2024, 1, 2)] * 4, [datetime(2024, 1, 2, tzinfo=UTC)] * 4, None),
        ([datetime(2024, 1, 2, 3, 4, 5)] * 4, [datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)] * 4, None),
    ],
)  # fmt: skip
def test_timestamp_forms(values: list, expected: list, note: str | None) -> None:
    clean, report = validate(_raw(_events(4, timestamp=values)), now=NOW)
    assert clean.events["timestamp"].dtype == TIMESTAMP_DTYPE
    assert clean.events["timestamp"].to_list() == expected
    if note:
        assert any(note in n and "events.timestamp" in n for n in report.notes)
    else:
        assert report.notes == []


def test_tz_aware_datetimes_are_converted() -> None:
    ts = pl.Series([datetime(2024, 1, 2, 5, 0)] * 4).dt.replace_time_zone("Europe/Berlin")
    clean, _ = validate(_raw(_events(4, timestamp=ts.to_list()).with_columns(ts.alias("timestamp"))), now=NOW)
    assert clean.events["timestamp"][0] == datetime(2024, 1, 2, 4, 0, tzinfo=UTC)


def test_list_tags_are_joined() -> None:
    items = _items(tags=[["a", "b"], [], None])
    clean, _ = validate(_raw(_events(), items), now=NOW)
    assert clean.items["tags"].to_list() == ["a|b", "", ""]


# --------------------------------------------------------------------------- table-level errors


def test_missing_required_column() -> None:
    msg = _error(_raw(_events().drop("timestamp").with_columns(pl.lit(1).alias("ts"))))
    assert EV_SRC in msg and "'timestamp'" in msg
    assert "it has 'user_id', 'item_id', 'event_type', 'ts'" in msg
    assert "Required: user_id, item_id, event_type, timestamp" in msg
    msg = _error(_raw(_events(), pl.DataFrame({"item_id": ["i1"], "name": ["x"]})))
    assert IT_SRC in msg and "'title'" in msg and "'name'" in msg


def test_empty_tables() -> None:
    msg = _error(_raw(_events().clear()))
    assert EV_SRC in msg and "no rows" in msg and "user_id" in msg
    assert "no rows" in _error(_raw(_events(), _items().clear()))
    assert US_SRC in _error(_raw(_events(), users=pl.DataFrame({"user_id": []}, schema={"user_id": pl.Utf8})))


def test_non_numbers_raise_or_are_dropped_and_counted() -> None:
    """--on-invalid drop drops a non-numeric value/position row and counts it (as documented);
    error mode names the rows. Wrong column types (Boolean timestamps) raise in both modes."""
    raw = _raw(_events(4, value=["1.5", "", "abc", "x2"]))
    msg = _error(raw, on_invalid="error")
    assert EV_SRC in msg and "column 'value'" in msg and "2 values that are not numbers" in msg
    assert "data rows 3 ('abc'), 4 ('x2')" in msg
    clean, report = validate(raw, on_invalid="drop")
    assert clean.events.height == 2 and report.dropped == {"unparseable_value": 2}
    clean, report = validate(_raw(_events(4, position=[0.0, 1.0, 2.5, -1.0])), on_invalid="drop")
    assert clean.events.height == 2 and report.dropped == {"unparseable_position": 2}
    msg = _error(_raw(_events(4, position=[0.0, 1.0, 2.5, -1.0])))
    assert "column 'position'" in msg and "data rows 3 (2.5), 4 (-1.0)" in msg and "whole numbers" in msg
    msg = _error(_raw(_events(2, position=["3", "first"])))
    assert "data rows 2 ('first')" in msg
    msg = _error(_raw(_events(2, item_id=[1.0, 2.5])))
    assert "column 'item_id'" in msg and "fractional" in msg and "data rows 2 (2.5)" in msg
    for mode in ("error", "drop"):
        msg = _error(_raw(_events(2, timestamp=[True, False])), on_invalid=mode)
        assert "column 'timestamp'" in msg and "Boolean" in msg


def test_duplicate_item_ids_raise_even_in_drop_mode() -> None:
    items = pl.DataFrame({"item_id": ["i1", "i2", "i1", "i3", "i2"], "title": list("abcde")})
    for mode in ("error", "drop"):
        msg = _error(_raw(_events(), items), on_invalid=mode)
        assert IT_SRC in msg and "column 'item_id'" in msg and "4 rows whose id appears more than once" in msg
        assert "data rows 1 ('i1'), 2 ('i2'), 3 ('i1'), 5 ('i2')" in msg


def test_duplicate_user_ids_raise() -> None:
    users = pl.DataFrame({"user_id": [1, 2, 1], "age": [3, 4, 5]})
    msg = _error(_raw(_events(), users=users))
    assert US_SRC in msg and "data rows 1 (1), 3 (1)" in msg


def test_bad_on_invalid() -> None:
    with pytest.raises(ConfigError, match="on_invalid"):
        validate(_raw(_events()), on_invalid="skip")


# --------------------------------------------------------------------------- row-level errors and drops

ROW_CASES = [
    # (column, bad values for rows 2 and 4, reason, phrase in the message, value shown for row 2)
    ("timestamp", ["2024-13-45", "yesterday"], "unparseable_timestamp", "timestamps that cannot be parsed", "'2024-13-45'"),
    ("user_id", [None, "  "], "null_required", "empty values", "empty"),
    ("event_type", ["clicked", "LIKE it"], "unknown_event_type", "unknown event types", "'clicked'"),
    ("item_id", ["nope", "i9"], "unknown_item", f"item ids that are not in the items file {IT_SRC}", "'nope'"),
    ("timestamp", ["1969-12-31T00:00:00Z", "1900-01-01"], "negative_timestamp", "timestamps before 1970-01-01", "'1969-12-31T00:00:00Z'"),
    ("timestamp", ["2024-06-03T00:00:00Z", "2999-01-01"], "future_timestamp", "more than a day in the future", "'2024-06-03T00:00:00Z'"),
]  # fmt: skip


@pytest.mark.parametrize(("column", "bad", "reason", "phrase", "shown"), ROW_CASES)
def test_row_level_error_and_drop(column: str, bad: list, reason: str, phrase: str, shown: str) -> None:
    events = _events(5)
    values = events[column].to_list()
    values[1], values[3] = bad
    events = events.with_columns(pl.Series(column, values, dtype=pl.Utf8))
    msg = _error(_raw(events))
    assert EV_SRC in msg and f"column '{column}'" in msg and phrase in msg
    assert "has 2 " in msg
    assert f"data rows 2 ({shown}), 4 (" in msg
    assert "on_invalid='drop'" in msg  # the library's name; the CLI says --on-invalid drop (test_cli)
    clean, report = validate(_raw(events), on_invalid="drop", now=NOW)
    assert clean.events.height == 3
    assert report.dropped == {reason: 2}
    assert report.input_rows["events"] == 5 and report.output_rows["events"] == 3
    if reason == "unknown_event_type":
        assert "add_to_cart, click, comment, impression, purchase, rating, share, view" in msg


def test_future_bound_uses_now_plus_one_day() -> None:
    events = _events(2, timestamp=["2024-06-01T23:00:00Z", "2024-06-02T01:00:00Z"])
    _, report = validate(_raw(events), on_invalid="drop", now=datetime(2024, 6, 1))  # naive now = UTC
    assert report.dropped == {"future_timestamp": 1}


def test_rating_without_value() -> None:
    events = _events(3, event_type=["rating", "rating", "click"], value=[4.0, None, None])
    msg = _error(_raw(events))
    assert (
        "column 'value'" in msg and "'rating' events without a value" in msg and "data rows 2 (empty)" in msg
    )
    _, report = validate(_raw(events), on_invalid="drop", now=NOW)
    assert report.dropped == {"missing_rating_value": 1}


def test_items_without_id_or_text() -> None:
    items = pl.DataFrame(
        {"item_id": ["i1", None, "i2", "i3"], "title": ["A", "B", "", "C"], "tags": [None, None, " ", None]}
    )
    msg = _error(_raw(_events(), items))
    assert IT_SRC in msg and "column 'item_id'" in msg and "data rows 2 (empty)" in msg
    msg = _error(_raw(_events(), items.slice(2)))
    assert (
        "column 'title'" in msg
        and "items with no title, description or tags" in msg
        and "data rows 1 ('')" in msg
    )
    # drop: the text-less item i2 goes, and so do the events that name it.
    clean, report = validate(_raw(_events(6), items), on_invalid="drop", now=NOW)
    assert clean.items["item_id"].to_list() == ["i1", "i3"]
    assert report.dropped == {"item_missing_id": 1, "item_without_text": 1, "unknown_item": 2}
    assert report.output_rows == {"events": 4, "items": 2}


def test_drop_counts_each_row_once_under_its_first_reason() -> None:
    events = pl.DataFrame(
        {
            "user_id": ["u1", None, "u3", "u4", "u5", "u6", "u7", "u8"],
            "item_id": ["i1", "nope", "i2", "nope", "i3", "i1", "i1", "i1"],
            "event_type": ["click", "weird", "view", "click", "purchase", "wat", "click", "click"],
            "timestamp": ["2024-01-01", "bad", "garbage", "2024-01-01", "1960-01-01", "2024-01-01", "2030-01-01", "2024-01-02"],
        }
    )  # fmt: skip
    clean, report = validate(_raw(events), on_invalid="drop", now=NOW)
    assert clean.events["user_id"].to_list() == ["u1", "u8"]
    assert report.dropped == {
        "null_required": 1, "unparseable_timestamp": 1, "unknown_event_type": 1, "unknown_item": 1,
        "negative_timestamp": 1, "future_timestamp": 1,
    }  # fmt: skip
    summary = report.summary()
    assert "events: 8 rows read, 2 kept" in summary and "[unknown_item]" in summary
    d = report.to_dict()
    assert (
        d["dropped"]["null_required"] == 1 and d["input_rows"]["events"] == 8 and isinstance(d["notes"], list)
    )


def test_drop_everything_raises() -> None:
    events = _events(3, item_id=["x", "y", "z"])
    with pytest.raises(
        InputError, match=r"Every event in the events file /data/events.csv was dropped.*3 item ids"
    ):
        validate(_raw(events), on_invalid="drop", now=NOW)


# --------------------------------------------------------------------------- duplicates


def test_exact_duplicates_are_dropped_and_counted() -> None:
    events = pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u1", "u2", "u1"],
            "item_id": ["i1", "i1", "i1", "i1", "i1", "i1"],
            "event_type": ["click", "CLICK", "click", "view", "click", "click"],
            "timestamp": ["2024-01-01T00:00:00Z", "2024-01-01 00:00:00", "2024-01-01T00:00:00Z",
                          "2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z"],
            "request_id": [None, None, "r1", None, None, None],
            "n": [1, 2, 3, 4, 5, 6],
        }
    )  # fmt: skip
    for mode in ("error", "drop"):
        clean, report = validate(_raw(events), on_invalid=mode, now=NOW)
        assert clean.events["n"].to_list() == [1, 3, 4, 5]  # the first of each repeat is kept, in order
        assert report.dropped == {"duplicate_event": 2}
        assert "2 exact duplicate events" in report.summary()


# --------------------------------------------------------------------------- from files, with row numbers


def test_error_names_real_file_and_data_row(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,event_type,timestamp\nu1,i1,click,2024-01-01\nu2,i2,click,2024-01-02\nu3,i3,click,soon\n"
    )
    (tmp_path / "items.csv").write_text("item_id,title\ni1,A\ni2,B\ni3,C\n")
    raw = load_generic(tmp_path / "events.csv", tmp_path / "items.csv")
    with pytest.raises(InputError) as err:
        validate(raw, now=NOW)
    msg = str(err.value)
    assert (
        str(tmp_path / "events.csv") in msg and "column 'timestamp'" in msg and "data rows 3 ('soon')" in msg
    )


def test_users_are_canonicalised() -> None:
    users = pl.DataFrame({"user_id": [0, 1, None], "age": [30, 40, 50]})
    msg = _error(_raw(_events(), users=users))
    assert US_SRC in msg and "data rows 3 (empty)" in msg
    clean, report = validate(_raw(_events(), users=users), on_invalid="drop", now=NOW)
    assert clean.users is not None and clean.users.to_dicts() == [
        {"user_id": "0", "age": 30},
        {"user_id": "1", "age": 40},
    ]
    assert report.dropped == {"user_missing_id": 1}


def test_report_type() -> None:
    _, report = validate(_raw(_events()), now=NOW)
    assert isinstance(report, ValidationReport)
    assert report.summary().splitlines() == ["events: 4 rows read, 4 kept", "items: 3 rows read, 3 kept"]


def test_item_created_at() -> None:
    items = _items(created_at=["2023-05-01T10:00:00Z", "2023-05-02", "not a date"])
    msg = _error(_raw(_events(), items))
    assert IT_SRC in msg and "column 'created_at'" in msg and "data rows 3 ('not a date')" in msg
    clean, report = validate(_raw(_events(), items), on_invalid="drop", now=NOW)
    assert clean.items["created_at"].dtype == TIMESTAMP_DTYPE
    assert clean.items["created_at"].to_list() == [
        datetime(2023, 5, 1, 10, tzinfo=UTC),
        datetime(2023, 5, 2, tzinfo=UTC),
        None,
    ]
    assert clean.items.height == 3 and any("created_at" in n for n in report.notes)
