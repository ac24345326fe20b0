"""read_table / load_generic on real files of every supported format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from recsys.data.readers import RawTables, load_generic, read_table
from recsys.errors import InputError

EVENTS = pl.DataFrame(
    {
        "user_id": ["007", "u2", "u3"],
        "item_id": ["i1", "i2", "i1"],
        "event_type": ["click", "view", "purchase"],
        "timestamp": [1_700_000_000, 1_700_000_100, 1_700_000_200],
        "value": [None, 1.5, 20.0],
    }
)


def _check(df: pl.DataFrame) -> None:
    assert df.height == 3
    assert df["user_id"].to_list() == ["007", "u2", "u3"]  # leading zeros survive
    assert df["item_id"].to_list() == ["i1", "i2", "i1"]
    assert df["timestamp"].to_list() == [1_700_000_000, 1_700_000_100, 1_700_000_200]
    assert df["value"].to_list() == [None, 1.5, 20.0]


def _jsonl() -> bytes:
    return "".join(json.dumps(r) + "\n" for r in EVENTS.to_dicts()).encode()


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("e.parquet", lambda p: EVENTS.write_parquet(p)),
        ("e.csv", lambda p: EVENTS.write_csv(p)),
        ("e.tsv", lambda p: EVENTS.write_csv(p, separator="\t")),
        ("e.jsonl", lambda p: p.write_bytes(_jsonl())),
        ("e.ndjson", lambda p: p.write_bytes(_jsonl())),
        ("e.json", lambda p: p.write_text(json.dumps(EVENTS.to_dicts()))),
        ("e.csv.gz", lambda p: p.write_bytes(gzip.compress(EVENTS.write_csv().encode()))),
        ("e.jsonl.gz", lambda p: p.write_bytes(gzip.compress(_jsonl()))),
    ],
)
def test_every_format(tmp_path: Path, name: str, write) -> None:
    path = tmp_path / name
    write(path)
    _check(read_table(path, "events file"))


def test_csv_ids_are_text_even_when_numeric(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("user_id,item_id,n\n001,42,1\n2,0042,2\n")
    df = read_table(path, "events file")
    assert df["user_id"].to_list() == ["001", "2"]
    assert df["item_id"].to_list() == ["42", "0042"]
    assert df["n"].dtype == pl.Int64  # other columns are still inferred


def test_csv_type_inference_survives_late_floats(tmp_path: Path) -> None:
    # ints for the first 10,000+ rows, then a float: the sampled guess is wrong, the retry reads it.
    path = tmp_path / "e.csv"
    path.write_text("item_id,value\n" + "".join(f"i{k},{k}\n" for k in range(12_000)) + "ix,2.5\n")
    df = read_table(path, "events file")
    assert df.height == 12_001
    assert df["value"].dtype == pl.Float64
    assert df["value"][-1] == 2.5


def test_tsv_keeps_quotes_in_text(tmp_path: Path) -> None:
    path = tmp_path / "items.tsv"
    path.write_text('item_id\ttitle\n1\t"Weird" Al, the movie\n')
    assert read_table(path, "items file")["title"].to_list() == ['"Weird" Al, the movie']


def test_parquet_folder(tmp_path: Path) -> None:
    folder = tmp_path / "events"
    folder.mkdir()
    EVENTS.head(2).write_parquet(folder / "part-0.parquet")
    EVENTS.tail(1).write_parquet(folder / "part-1.parquet")
    _check(read_table(folder, "events file"))


def test_missing_file_names_path_role_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(InputError) as err:
        read_table(path, "events file")
    msg = str(err.value)
    assert str(path) in msg and "events file" in msg and "does not exist" in msg and "Fix:" in msg


def test_unsupported_extension_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "items.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(InputError) as err:
        read_table(path, "items file")
    msg = str(err.value)
    assert "items file" in msg and ".xlsx" in msg and ".parquet" in msg and ".jsonl" in msg and ".csv" in msg


def test_empty_and_corrupt_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        read_table(empty, "events file")
    bad = tmp_path / "e.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(InputError) as err:
        read_table(bad, "events file")
    assert str(bad) in str(err.value) and "parquet" in str(err.value)
    bad_gz = tmp_path / "e.csv.gz"
    bad_gz.write_bytes(b"not gzip")
    with pytest.raises(InputError, match="Could not read the events file"):
        read_table(bad_gz, "events file")
    folder = tmp_path / "dir"
    folder.mkdir()
    with pytest.raises(InputError, match=r"folder without \.parquet"):
        read_table(folder, "items file")


def test_load_generic(tmp_path: Path) -> None:
    EVENTS.write_csv(tmp_path / "events.csv")
    pl.DataFrame({"item_id": ["i1", "i2"], "title": ["A", "B"]}).write_parquet(tmp_path / "items.parquet")
    raw = load_generic(tmp_path / "events.csv", tmp_path / "items.parquet")
    assert isinstance(raw, RawTables)
    assert raw.users is None
    assert raw.events.height == 3 and raw.items.height == 2
    assert raw.sources == {"events": str(tmp_path / "events.csv"), "items": str(tmp_path / "items.parquet")}

    (tmp_path / "users.jsonl").write_text('{"user_id": "007", "age": 30}\n')
    raw = load_generic(tmp_path / "events.csv", tmp_path / "items.parquet", tmp_path / "users.jsonl")
    assert raw.users is not None and raw.users.to_dicts() == [{"user_id": "007", "age": 30}]
    assert raw.sources["users"] == str(tmp_path / "users.jsonl")

    with pytest.raises(InputError, match="users file"):
        load_generic(tmp_path / "events.csv", tmp_path / "items.parquet", tmp_path / "missing.csv")
