"""Write the GroupLens ml-100k layout (u.data, u.item, u.genre, u.user) from RecBole's ml-100k files.

The GroupLens archive cannot be downloaded here, but RecBole's atomic files hold the same data, so this
rebuilds the original layout (latin-1 u.item with release date, empty video date, IMDb URL and 19 genre
flags in u.genre order) to check that both importers give identical canonical tables:

    python bench/ml100k_grouplens.py --recbole ~/.cache/recsys-data/recbole/dataset_example/ml-100k \
        --out /tmp/ml-100k --check
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import urllib.parse
from pathlib import Path

import polars as pl

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
DEFAULT_RECBOLE = Path.home() / ".cache/recsys-data/recbole/dataset_example/ml-100k"


def _atomic(path: Path) -> pl.DataFrame:
    df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False)
    return df.rename({c: c.split(":")[0] for c in df.columns})


def write_grouplens(recbole_dir: Path, out: Path) -> None:
    """Write u.data, u.item, u.genre and u.user into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    inter = _atomic(recbole_dir / "ml-100k.inter")
    (out / "u.data").write_text(
        "".join(
            f"{u}\t{i}\t{r}\t{t}\n"
            for u, i, r, t in inter.select("user_id", "item_id", "rating", "timestamp").iter_rows()
        )
    )
    (out / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)) + "\n")
    lines = []
    for item_id, title, year, classes in _atomic(recbole_dir / "ml-100k.item").iter_rows():
        if title == "unkonwn":  # RecBole's placeholder for GroupLens item 267 "unknown" with no date
            full, date = "unknown", ""
        else:
            full = f"{title} ({year})" if year not in (None, "", "unkonwn") else title
            years = re.findall(r"\((\d{4})\)", full)
            date = f"01-Jan-{years[-1]}" if years else ""
        url = f"http://us.imdb.com/M/title-exact?{urllib.parse.quote_plus(full)}" if date else ""
        names = set((classes or "").split())
        flags = "|".join("1" if g in names else "0" for g in GENRES)
        lines.append(f"{item_id}|{full}|{date}||{url}|{flags}\n")
    (out / "u.item").write_bytes("".join(lines).encode("latin-1"))
    users = _atomic(recbole_dir / "ml-100k.user")
    (out / "u.user").write_text(
        "".join(
            "|".join(r) + "\n"
            for r in users.select("user_id", "age", "gender", "occupation", "zip_code").iter_rows()
        )
    )


def check(recbole_dir: Path, grouplens_dir: Path) -> dict[str, object]:
    """Import both forms, validate, and compare the sorted canonical tables."""
    from recsys.data.importers import load_format
    from recsys.data.validate import validate

    t0 = time.perf_counter()
    a, rep_a = validate(load_format("movielens", grouplens_dir))
    t1 = time.perf_counter()
    b, rep_b = validate(load_format("recbole", recbole_dir))
    t2 = time.perf_counter()
    ev = ["user_id", "item_id", "timestamp", "event_type"]
    result: dict[str, object] = {
        "events_equal": a.events.sort(ev).equals(b.events.sort(ev)),
        "items_equal": a.items.sort("item_id").equals(b.items.sort("item_id")),
        "users_equal": a.users is not None
        and b.users is not None
        and a.users.sort("user_id").equals(b.users.sort("user_id")),
        "events": a.events.height,
        "users_in_events": a.events["user_id"].n_unique(),
        "items": a.items.height,
        "users": 0 if a.users is None else a.users.height,
        "grouplens_s": round(t1 - t0, 3),
        "recbole_s": round(t2 - t1, 3),
        "dropped": {"grouplens": rep_a.dropped, "recbole": rep_b.dropped},
    }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recbole", type=Path, default=DEFAULT_RECBOLE, help="RecBole ml-100k folder")
    ap.add_argument("--out", type=Path, required=True, help="folder to write the GroupLens files into")
    ap.add_argument("--check", action="store_true", help="import both forms and compare the tables")
    args = ap.parse_args()
    write_grouplens(args.recbole, args.out)
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir()))} to {args.out}")
    if args.check:
        result = check(args.recbole, args.out)
        for key, value in result.items():
            print(f"{key:16s} {value}")
        ok = result["events_equal"] and result["items_equal"] and result["users_equal"]
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
