"""Importers on small files written in the real public layouts."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest

from recsys.data.importers import detect_format, load_format, load_mind, load_movielens, load_recbole
from recsys.data.schema import TIMESTAMP_DTYPE
from recsys.data.validate import validate
from recsys.errors import InputError

UTC = timezone.utc

# --------------------------------------------------------------------------- MovieLens 100k, two forms

GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


# The oddities of the real ml-100k: 'unknown' item 267 without a date, the 'unknown' genre, non-ASCII
# latin-1 titles, commas, a "(V)" suffix after the year (RecBole's release_year is then 'V'), quotes.
GROUPLENS_ITEMS = [
    ("1", "Toy Story (1995)", "01-Jan-1995", _flags("Animation", "Children's", "Comedy")),
    ("12", "Usual Suspects, The (1995)", "14-Aug-1995", _flags("Crime", "Thriller")),
    ("267", "unknown", "", _flags("unknown")),
    ("543", "Misérables, Les (1995)", "01-Jan-1995", _flags("Drama", "Musical")),
    ("1373", "Good Morning (1971)", "4-Feb-1971", _flags("unknown")),
    ("1412", "Land Before Time III: The Time of the Great Giving (1995) (V)", "01-Jan-1995",
     _flags("Animation", "Children's")),
    ("1600", '"Weird" Al: Live! (1999)', "01-Jan-1999", _flags("Comedy", "Musical")),
]  # fmt: skip
RECBOLE_ITEMS = """item_id:token	movie_title:token_seq	release_year:token	class:token_seq
1	Toy Story	1995	Animation Children's Comedy
12	Usual Suspects, The	1995	Crime Thriller
267	unkonwn	unkonwn	unknown
543	Misérables, Les	1995	Drama Musical
1373	Good Morning	1971	unknown
1412	Land Before Time III: The Time of the Great Giving (1995)	V	Animation Children's
1600	"Weird" Al: Live!	1999	Comedy Musical
"""
RATINGS = [
    ("196", "1", 3, 881250949),
    ("196", "12", 5, 881250950),
    ("22", "267", 1, 878887116),
    ("22", "543", 4, 878887117),
    ("74", "1373", 2, 880606923),
    ("74", "1412", 5, 880606924),
    ("74", "1600", 4, 880606925),
    ("196", "1600", 3, 881250951),
]
USERS = [
    ("22", "25", "M", "writer", "40206"),
    ("74", "39", "M", "scientist", "T8H1N"),
    ("196", "49", "M", "writer", "55105"),
]


def write_grouplens_100k(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    (d / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)) + "\n")
    lines = "".join(
        f"{i}|{title}|{date}||{'http://x' if date else ''}|{flags}\n"
        for i, title, date, flags in GROUPLENS_ITEMS
    )
    (d / "u.item").write_bytes(lines.encode("latin-1"))
    (d / "u.user").write_text("".join("|".join(u) + "\n" for u in USERS))
    return d


def write_recbole_100k(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    (d / "ml-100k.inter").write_text(header + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    (d / "ml-100k.item").write_text(RECBOLE_ITEMS, encoding="utf-8")
    user_header = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    (d / "ml-100k.user").write_text(user_header + "".join("\t".join(u) + "\n" for u in USERS))
    return d


def test_ml100k_grouplens(tmp_path: Path) -> None:
    raw = load_movielens(write_grouplens_100k(tmp_path / "ml-100k"))
    assert raw.events.height == 8
    assert dict(raw.events.schema) == (
        {
            "user_id": pl.Utf8,
            "item_id": pl.Utf8,
            "event_type": pl.Utf8,
            "timestamp": TIMESTAMP_DTYPE,
            "value": pl.Float64,
        }
    )
    first = raw.events.row(0, named=True)
    assert first["event_type"] == "rating" and first["value"] == 3.0
    assert first["timestamp"] == datetime.fromtimestamp(881250949, UTC)
    items = {r["item_id"]: r for r in raw.items.to_dicts()}
    assert list(raw.items.columns) == ["item_id", "title", "description", "tags", "category", "year"]
    assert items["1"] == {"item_id": "1", "title": "Toy Story (1995)", "description": "",
                          "tags": "Animation|Children's|Comedy", "category": "Animation", "year": 1995}  # fmt: skip
    assert items["267"]["title"] == "unknown" and items["267"]["tags"] == "" and items["267"]["year"] is None
    assert items["1373"]["tags"] == "" and items["1373"]["year"] == 1971  # 'unknown' genre is no tag
    assert items["543"]["title"] == "Misérables, Les (1995)"  # latin-1 decoded
    assert items["1412"]["year"] == 1995
    assert items["1600"]["title"] == '"Weird" Al: Live! (1999)'
    assert raw.users is not None and raw.users.schema["age"] == pl.Int32
    assert raw.users.filter(pl.col("user_id") == "74")["zip_code"].item() == "T8H1N"
    assert raw.sources["events"].endswith("u.data") and raw.sources["items"].endswith("u.item")


def test_ml100k_grouplens_and_recbole_are_identical(tmp_path: Path) -> None:
    a = load_format("movielens", write_grouplens_100k(tmp_path / "gl"))
    b = load_format("recbole", write_recbole_100k(tmp_path / "rb"))
    assert a.events.sort(pl.all()).equals(b.events.sort(pl.all()))
    assert a.items.sort("item_id").equals(b.items.sort("item_id"))
    assert a.users is not None and b.users is not None
    assert a.users.sort("user_id").equals(b.users.sort("user_id"))
    ca, _ = validate(a)
    cb, _ = validate(b)
    keys = ["user_id", "item_id", "timestamp"]
    assert ca.events.sort(keys).equals(cb.events.sort(keys))
    assert ca.items.sort("item_id").equals(cb.items.sort("item_id"))
    assert ca.events.height == 8 and ca.items.height == 7 and ca.users is not None and ca.users.height == 3


def test_ml100k_bad_item_layout(tmp_path: Path) -> None:
    d = write_grouplens_100k(tmp_path / "ml")
    (d / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995||url|0|1\n")
    with pytest.raises(InputError, match="expected 24"):
        load_movielens(d)


# --------------------------------------------------------------------------- MovieLens latest / 1m


def test_ml_latest_with_tags(tmp_path: Path) -> None:
    d = tmp_path / "ml-latest-small"
    d.mkdir()
    (d / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '2,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama\n'
        "3,Babylon 5 ,(no genres listed)\n"
    )
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,0.5,964981247\n2,3,3.5,1445714835\n"
    )
    (d / "tags.csv").write_text(
        'userId,movieId,tag,timestamp\n1,1,pixar,1\n2,1,Pixar,2\n3,1,fun,3\n3,1,pixar,4\n1,2,"dark, surreal",5\n'
    )
    raw = load_format("auto", d)
    assert raw.events["event_type"].to_list() == ["rating"] * 3
    assert raw.events["value"].to_list() == [4.0, 0.5, 3.5]
    assert raw.events["user_id"].dtype == pl.Utf8
    items = {r["item_id"]: r for r in raw.items.to_dicts()}
    # genres first, then user tags by number of distinct users (pixar: 3 users, fun: 1)
    assert items["1"]["tags"] == "Adventure|Animation|Children|Comedy|Fantasy|pixar|fun"
    assert items["1"]["category"] == "Adventure"
    assert items["2"]["title"] == "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
    assert items["2"]["tags"] == "Adventure|Drama|dark surreal"
    assert items["3"] == {"item_id": "3", "title": "Babylon 5", "description": "", "tags": "",
                          "category": "", "year": None}  # fmt: skip
    assert raw.users is None
    clean, report = validate(raw)
    assert clean.events.height == 3 and report.dropped == {}


def test_ml1m(tmp_path: Path) -> None:
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::1193::5::978300760\n2::2::3::978302109\n")
    (d / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n2::Jumanji (1995)::Adventure|Children's\n".encode(
            "latin-1"
        )
        + "3::Cité des enfants perdus, La (1995)::Sci-Fi\n".encode("latin-1")
    )
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    raw = load_format("auto", d)
    assert raw.events["value"].to_list() == [5.0, 3.0]
    assert raw.items.filter(pl.col("item_id") == "3")["title"].item() == "Cité des enfants perdus, La (1995)"
    assert raw.items.filter(pl.col("item_id") == "2")["tags"].item() == "Adventure|Children's"
    assert raw.users is not None
    assert raw.users.columns == ["user_id", "age", "gender", "occupation", "zip_code"]
    assert raw.users["age"].to_list() == [1, 56]


# --------------------------------------------------------------------------- RecBole generic


def test_recbole_implicit_with_extra_fields(tmp_path: Path) -> None:
    d = tmp_path / "shop"
    d.mkdir()
    (d / "shop.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\tdevice:token\n"
        "u1\ta\t1700000000.5\tios\nu2\tb\t1700000100\tweb\n"
    )
    (d / "shop.item").write_text(
        "item_id:token\ttitle:token_seq\tcategories:token_seq\tprice:float\n"
        "a\tRed shoe\tshoes sale\t19.5\nb\tBlue hat\t\t5\n"
    )
    raw = load_recbole(d)
    assert raw.events["event_type"].to_list() == ["click", "click"]
    assert raw.events["value"].to_list() == [None, None]
    assert raw.events["device"].to_list() == ["ios", "web"]
    assert raw.events["timestamp"][0] == datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)
    assert raw.items.to_dicts() == [
        {
            "item_id": "a",
            "title": "Red shoe",
            "description": "",
            "tags": "shoes|sale",
            "category": "shoes",
            "price": 19.5,
        },
        {"item_id": "b", "title": "Blue hat", "description": "", "tags": "", "category": "", "price": 5.0},
    ]
    assert raw.users is None
    clean, _ = validate(raw)
    assert clean.events["strength"].to_list() == [2.0, 2.0]


def test_recbole_label_and_splits(tmp_path: Path) -> None:
    d = tmp_path / "ctr"
    d.mkdir()
    header = "user_id:token\titem_id:token\tlabel:float\ttimestamp:float\n"
    (d / "ctr.train.inter").write_text(header + "u1\ta\t1\t100\nu1\tb\t0\t101\n")
    (d / "ctr.valid.inter").write_text(header + "u2\ta\t0\t200\n")
    (d / "ctr.test.inter").write_text(header + "u2\tb\t1\t300\n")
    (d / "ctr.item").write_text("item_id:token\titem_name:token_seq\na\tA\nb\tB\n")
    raw = load_format("auto", d)
    assert raw.events["event_type"].to_list() == ["click", "impression", "impression", "click"]
    assert "ctr.train.inter + " in raw.sources["events"]
    assert raw.items["title"].to_list() == ["A", "B"]


def test_recbole_errors(tmp_path: Path) -> None:
    d = tmp_path / "x"
    d.mkdir()
    (d / "x.inter").write_text("user_id:token\titem_id:token\nu\ta\n")
    (d / "x.item").write_text("item_id:token\ttitle:token_seq\na\tA\n")
    with pytest.raises(InputError, match=r"lacks the field 'timestamp' \(found: user_id, item_id\)"):
        load_recbole(d)
    (d / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu\ta\tyesterday\n")
    with pytest.raises(
        InputError,
        match=r"column 'timestamp' has 1 value\(s\) that are not Float64 \(data rows 1 \('yesterday'\)\)",
    ):
        load_recbole(d)
    (d / "x.item").unlink()
    (d / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\n")
    with pytest.raises(InputError, match=r"x\.item"):
        load_recbole(d)


# --------------------------------------------------------------------------- MIND

BEHAVIORS = (
    "1\tU1\t11/15/2019 8:55:22 AM\tN1 N2\tN3-1 N4-0 N5-0\n"
    "2\tU1\t11/15/2019 9:00:00 AM\tN1 N2\tN4-1 N5-0\n"
    "3\tU2\t11/14/2019 11:30:01 PM\t\tN3-0 N1-1\n"
    "4\tU3\t11/16/2019 1:02:03 PM\tN2 N1\tN3 N5\n"  # test-set style: no labels
)
NEWS = (
    "N1\tsports\tfootball_nfl\tBig game\tThe big game happened.\thttps://n/1\t[]\t[]\n"
    'N2\tnews\tnewspolitics\t"Quoted" headline\t\thttps://n/2\t[]\t[]\n'
    "N3\tfinance\tmarkets\tStocks up\tStocks went up.\thttps://n/3\t[]\t[]\n"
    "N4\tlifestyle\tpets\tDog news\tA dog.\thttps://n/4\t[]\t[]\n"
    "N5\ttravel\ttrips\tA trip\tFar away.\thttps://n/5\t[]\t[]\n"
)


def _mind(tmp_path: Path) -> Path:
    d = tmp_path / "MINDsmall_train"
    d.mkdir()
    (d / "behaviors.tsv").write_text(BEHAVIORS)
    (d / "news.tsv").write_text(NEWS)
    return d


def test_mind_impressions_clicks_and_history(tmp_path: Path) -> None:
    raw = load_mind(_mind(tmp_path))
    ev = raw.events
    assert ev.columns == ["user_id", "item_id", "event_type", "timestamp", "value", "request_id", "position"]
    counts = dict(ev.group_by("event_type").len().iter_rows())
    assert counts == {"impression": 9, "click": 3 + 4}  # 3 impression clicks + 4 history clicks

    t1 = datetime(2019, 11, 15, 8, 55, 22, tzinfo=UTC)
    imp = ev.filter(pl.col("request_id") == "1").sort("position", "event_type")
    assert imp.select("item_id", "event_type", "position").rows() == [
        ("N3", "click", 0), ("N3", "impression", 0), ("N4", "impression", 1), ("N5", "impression", 2)
    ]  # fmt: skip
    assert set(imp["timestamp"].to_list()) == {t1} and set(imp["user_id"]) == {"U1"}
    clicks = ev.filter(pl.col("request_id").is_not_null() & (pl.col("event_type") == "click"))
    assert clicks.select("request_id", "item_id", "position").sort("request_id").rows() == [
        ("1", "N3", 0), ("2", "N4", 0), ("3", "N1", 1)
    ]  # fmt: skip
    assert ev.filter(pl.col("request_id") == "4")["event_type"].to_list() == ["impression", "impression"]

    # History: deduplicated across U1's two rows, in MIND order, one second apart before the first impression.
    hist = ev.filter(pl.col("request_id").is_null()).sort("user_id", "timestamp")
    assert hist.select("user_id", "item_id").rows() == [
        ("U1", "N1"),
        ("U1", "N2"),
        ("U3", "N2"),
        ("U3", "N1"),
    ]
    assert hist["timestamp"].to_list() == [
        t1 - timedelta(seconds=2), t1 - timedelta(seconds=1),
        datetime(2019, 11, 16, 13, 2, 1, tzinfo=UTC), datetime(2019, 11, 16, 13, 2, 2, tzinfo=UTC),
    ]  # fmt: skip
    assert hist["position"].null_count() == 4 and set(hist["event_type"]) == {"click"}

    items = {r["item_id"]: r for r in raw.items.to_dicts()}
    assert items["N1"] == {"item_id": "N1", "title": "Big game", "description": "The big game happened.",
                           "tags": "football_nfl", "category": "sports", "url": "https://n/1"}  # fmt: skip
    assert items["N2"]["title"] == '"Quoted" headline' and items["N2"]["description"] == ""
    assert "behaviors.tsv" in raw.sources["events"] and raw.users is None

    clean, report = validate(raw)
    assert clean.events.height == 16 and report.dropped == {}
    assert clean.events.filter(pl.col("event_type") == "impression")["strength"].to_list() == [0.0] * 9


def test_mind_bad_time(tmp_path: Path) -> None:
    d = _mind(tmp_path)
    (d / "behaviors.tsv").write_text("1\tU1\t2019-11-15 08:55\tN1\tN3-1\n")
    with pytest.raises(InputError, match=r"rows 1 \('2019-11-15 08:55'\)"):
        load_mind(d)


# --------------------------------------------------------------------------- detection / dispatch


def test_detect_format(tmp_path: Path) -> None:
    assert detect_format(write_grouplens_100k(tmp_path / "gl")) == "movielens"
    assert detect_format(write_recbole_100k(tmp_path / "rb")) == "recbole"
    assert detect_format(_mind(tmp_path)) == "mind"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(InputError) as err:
        detect_format(empty)
    msg = str(err.value)
    for looked_for in ("<name>.inter", "behaviors.tsv", "u.data", "ratings.csv", "ratings.dat", "readme.txt"):
        assert looked_for in msg
    with pytest.raises(InputError, match="does not exist"):
        detect_format(tmp_path / "missing")


def test_load_format_dispatch(tmp_path: Path) -> None:
    d = _mind(tmp_path)
    assert load_format("auto", d).events.height == 16
    assert load_format("MIND", d).items.height == 5
    with pytest.raises(InputError, match=r"Unknown input format 'amazon'.*auto, movielens, recbole, mind"):
        load_format("amazon", d)
    with pytest.raises(InputError, match="news file"):
        (d / "news.tsv").unlink()
        load_format("mind", d)
