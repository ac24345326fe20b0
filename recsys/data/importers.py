"""Importers for public dataset layouts: GroupLens MovieLens, RecBole atomic files and Microsoft MIND.

Each importer returns `RawTables` already in the canonical columns of `recsys.data.schema`
(string ids, UTC timestamps, canonical event types); `validate` then checks them like any other input.

Canonical choices (documented here because they are part of the contract between the importers):

* MovieLens items: `title` is the GroupLens form with the year, "Toy Story (1995)"; `year` (Int32) is
  the last "(YYYY)" of the title; `tags` are the genres '|'-separated in the file's order, without the
  placeholder genres 'unknown' and '(no genres listed)'; `category` is the first remaining genre
  ('' when none); `description` is ''. GroupLens release/video dates and IMDb URLs are dropped because
  the RecBole form does not carry them and the two forms of one dataset must give identical tables.
  RecBole splits the title into `movie_title` + `release_year` (the text of the last parentheses) and
  writes 'unkonwn' for missing values; we rebuild the GroupLens title from the two.
* MovieLens ratings: event_type 'rating', `value` = the rating; `schema.RatingRule` grades them later.
  ml-latest `tags.csv` (free-text user tags) are appended to the genres in `tags` (the 20 most used per
  movie, lower-cased); they do not become events, because a tag is a description of the movie, not a
  behaviour we can weight against clicks and ratings.
* MovieLens users: user_id, age (Int32), gender, occupation, zip_code (text: Canadian codes have letters).
* MIND: every impressed news item is an 'impression' event with request_id = impression id and
  position = its 0-based slot; a clicked one ('-1') is also a 'click' with the same request, slot and
  time. The `history` column has no times: each user's history (union over their rows, first occurrence
  order, which MIND gives oldest first) becomes 'click' events stamped just before that user's earliest
  impression, one second apart, so the last history click is at earliest impression - 1 s and the
  order survives a time sort. Items: title, description = abstract, category, tags = subcategory, url.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from recsys.data.readers import RawTables
from recsys.data.schema import EVENT_COLUMNS, TIMESTAMP_DTYPE
from recsys.errors import InputError

FORMATS = ("movielens", "recbole", "mind")

# u.genre of ml-100k, used when the file is absent.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_PLACEHOLDER_GENRES = ["unknown", "(no genres listed)", ""]
_RECBOLE_MISSING = "unkonwn"  # sic: RecBole's conversion scripts write this for missing values
_MAX_USER_TAGS = 20
_ITEM_TEXT = ("title", "description", "tags", "category")

# RecBole field names that carry each canonical item text column, first match wins.
_TITLE_FIELDS = ("title", "movie_title", "item_name", "name", "book_title", "track_name")
_DESCRIPTION_FIELDS = ("description", "abstract", "desc", "overview", "plot", "summary")
_TAG_FIELDS = ("tags", "class", "genre", "genres", "categories", "tag")
_CATEGORY_FIELDS = ("category", "main_category")


# --------------------------------------------------------------------------- shared helpers


def _need(path: Path, what: str, fmt: str) -> Path:
    if not path.is_file():
        found = ", ".join(sorted(p.name for p in path.parent.iterdir())[:15]) if path.parent.is_dir() else ""
        raise InputError(
            f"The {fmt} {what} '{path}' does not exist (the folder holds: {found or 'nothing'}). Fix: point "
            f"--input at the folder that holds the {fmt} files."
        )
    return path


def _read_sep(
    data: Path | bytes, sep: str, names: list[str] | None, what: str, header: bool | None = None
) -> pl.DataFrame:
    """All-text read of an unquoted delimited file; typing is explicit afterwards.

    With `names` the file has no header; without, `header` says whether the first line is one.
    """
    source: Path | io.BytesIO = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return pl.read_csv(
            source,
            separator=sep,
            has_header=(names is None) if header is None else header,
            new_columns=names,
            quote_char=None,
            infer_schema=False,
            truncate_ragged_lines=False,
        )
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"Could not read {what}: {str(exc).strip().splitlines()[0]}. Fix: check that the file is "
            f"complete and in the documented layout."
        ) from exc


def _latin1(path: Path) -> bytes:
    """GroupLens .item/.dat files are latin-1; polars reads UTF-8 only."""
    return path.read_bytes().decode("latin-1").encode("utf-8")


def _unix_seconds(col: str) -> pl.Expr:
    return (
        (pl.col(col).cast(pl.Float64) * 1_000_000)
        .round()
        .cast(pl.Int64)
        .cast(pl.Datetime("us"))
        .dt.replace_time_zone("UTC")
        .cast(TIMESTAMP_DTYPE)
        .alias("timestamp")
    )


def _cast_checked(df: pl.DataFrame, col: str, dtype: pl.DataType, what: str) -> pl.DataFrame:
    """Cast a text column, raising an InputError that names the first bad rows."""
    cast = pl.col(col).cast(dtype, strict=False)
    bad = df.with_row_index("__row", offset=1).filter(pl.col(col).is_not_null() & cast.is_null())
    if bad.height:
        rows = ", ".join(f"{r} ({v!r})" for r, v in bad.select("__row", col).head(5).iter_rows())
        raise InputError(
            f"{what}: column '{col}' has {bad.height} value(s) that are not {dtype} (data rows {rows}). "
            f"Fix: correct or remove those rows."
        )
    return df.with_columns(cast)


def _movie_items(df: pl.DataFrame) -> pl.DataFrame:
    """Canonical MovieLens items from `item_id`, `title` and `genres` (a list), extra columns kept."""
    genres = pl.col("genres").list.eval(
        pl.element().str.strip_chars().filter(~pl.element().str.strip_chars().is_in(_PLACEHOLDER_GENRES))
    )
    title = pl.col("title").str.strip_chars()
    year = (
        title.str.extract_all(r"\(\d{4}(?:[-–]\d{0,4})?\)")
        .list.last()
        .str.slice(1, 4)
        .cast(pl.Int32, strict=False)
    )
    out = df.with_columns(title.fill_null(""), genres.alias("genres")).with_columns(
        pl.lit("").alias("description"),
        pl.col("genres").list.join("|").fill_null("").alias("tags"),
        pl.col("genres").list.first().fill_null("").alias("category"),
        year.alias("year"),
    )
    extra = [c for c in out.columns if c not in ("item_id", *_ITEM_TEXT, "year", "genres")]
    return out.select("item_id", *_ITEM_TEXT, "year", *extra)


def _movie_users(df: pl.DataFrame) -> pl.DataFrame:
    """user_id, age as Int32 (when every age is a number), everything else text."""
    if "age" in df.columns and df["age"].dtype == pl.Utf8:
        age = df["age"].cast(pl.Int32, strict=False)
        if age.null_count() == df["age"].null_count():
            df = df.with_columns(age.alias("age"))
    return df


def _rating_events(df: pl.DataFrame) -> pl.DataFrame:
    """Canonical rating events from user_id, item_id, rating and unix-seconds timestamp columns."""
    return df.select(
        pl.col("user_id").cast(pl.Utf8),
        pl.col("item_id").cast(pl.Utf8),
        pl.lit("rating").alias("event_type"),
        _unix_seconds("timestamp"),
        pl.col("rating").cast(pl.Float64).alias("value"),
    )


# --------------------------------------------------------------------------- MovieLens


def load_movielens(input_dir: Path) -> RawTables:
    """GroupLens MovieLens: ml-100k (u.data), ml-1m (ratings.dat) or ml-latest/ml-25m (ratings.csv)."""
    d = Path(input_dir)
    if (d / "u.data").is_file():
        return _load_ml100k(d)
    if (d / "ratings.csv").is_file():
        return _load_ml_latest(d)
    if (d / "ratings.dat").is_file():
        return _load_ml1m(d)
    raise InputError(
        f"'{d}' is not a MovieLens folder: looked for u.data (ml-100k), ratings.csv (ml-latest, ml-25m) "
        f"or ratings.dat (ml-1m). Fix: point --input at the unzipped MovieLens folder."
    )


def _load_ml100k(d: Path) -> RawTables:
    data, item_path, user_path = d / "u.data", _need(d / "u.item", "items file", "MovieLens"), d / "u.user"
    ratings = _read_sep(data, "\t", ["user_id", "item_id", "rating", "timestamp"], f"'{data}'")
    ratings = _cast_checked(ratings, "rating", pl.Float64(), f"'{data}'")
    ratings = _cast_checked(ratings, "timestamp", pl.Int64(), f"'{data}'")
    genres = list(ML100K_GENRES)
    if (d / "u.genre").is_file():
        rows = _read_sep(_latin1(d / "u.genre"), "|", ["name", "index"], f"'{d / 'u.genre'}'")
        rows = rows.drop_nulls().with_columns(pl.col("index").cast(pl.Int32, strict=False)).sort("index")
        genres = rows["name"].to_list()
    flags = [f"__g{i}" for i in range(len(genres))]
    raw = _read_sep(_latin1(item_path), "|", None, f"'{item_path}'", header=False)
    expected = 5 + len(genres)
    if raw.width != expected:
        raise InputError(
            f"'{item_path}' has {raw.width} '|'-separated fields per line, expected {expected} (id, title, "
            f"release date, video release date, URL and one flag per genre in u.genre). Fix: use the "
            f"original ml-100k u.item and u.genre."
        )
    raw.columns = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *flags]
    picked = pl.concat_list(
        [pl.when(pl.col(f) == "1").then(pl.lit(g)) for f, g in zip(flags, genres, strict=True)]
    ).list.drop_nulls()
    items = _movie_items(raw.select("item_id", "title", picked.alias("genres")))
    users = None
    sources = {"events": str(data), "items": str(item_path)}
    if user_path.is_file():
        users = _read_sep(
            _latin1(user_path), "|", ["user_id", "age", "gender", "occupation", "zip_code"], f"'{user_path}'"
        )
        users = _movie_users(users)
        sources["users"] = str(user_path)
    return RawTables(events=_rating_events(ratings), items=items, users=users, sources=sources)


def _load_ml_latest(d: Path) -> RawTables:
    ratings_path, movies_path = d / "ratings.csv", _need(d / "movies.csv", "items file", "MovieLens")
    try:
        ratings = pl.read_csv(
            ratings_path,
            schema_overrides={
                "userId": pl.Utf8,
                "movieId": pl.Utf8,
                "rating": pl.Float64,
                "timestamp": pl.Float64,
            },
        )
        movies = pl.read_csv(movies_path, schema_overrides={"movieId": pl.Utf8}, infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"Could not read MovieLens CSV files in '{d}': {str(exc).strip().splitlines()[0]}. Fix: use the "
            f"original ratings.csv (userId,movieId,rating,timestamp) and movies.csv (movieId,title,genres)."
        ) from exc
    _require_columns(ratings, ("userId", "movieId", "rating", "timestamp"), ratings_path)
    _require_columns(movies, ("movieId", "title", "genres"), movies_path)
    events = _rating_events(ratings.rename({"userId": "user_id", "movieId": "item_id"}))
    items = _movie_items(
        movies.select(
            pl.col("movieId").alias("item_id"),
            pl.col("title"),
            pl.col("genres").fill_null("").str.split("|").alias("genres"),
        )
    )
    sources = {"events": str(ratings_path), "items": str(movies_path)}
    tags_path = d / "tags.csv"
    if tags_path.is_file():
        items = _add_user_tags(items, tags_path)
    return RawTables(events=events, items=items, users=None, sources=sources)


def _add_user_tags(items: pl.DataFrame, tags_path: Path) -> pl.DataFrame:
    """Append each movie's most used free-text tags (by distinct users) to its genre tags."""
    try:
        tags = pl.read_csv(tags_path, schema_overrides={"userId": pl.Utf8, "movieId": pl.Utf8, "tag": pl.Utf8})
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"Could not read the MovieLens tags file '{tags_path}': {str(exc).strip().splitlines()[0]}. Fix: use the "
            "original tags.csv (header userId,movieId,tag,timestamp; quoted tags), or remove it (tags are optional)."
        ) from None
    _require_columns(tags, ("userId", "movieId", "tag"), tags_path)
    clean = pl.col("tag").str.to_lowercase().str.replace_all(r"[|,;\s]+", " ").str.strip_chars()
    top = (
        tags.select(pl.col("movieId").alias("item_id"), pl.col("userId"), clean.alias("tag"))
        .filter(pl.col("tag").is_not_null() & (pl.col("tag") != ""))
        .group_by("item_id", "tag")
        .agg(pl.col("userId").n_unique().alias("n"))
        .sort(["item_id", "n", "tag"], descending=[False, True, False])
        .group_by("item_id", maintain_order=True)
        .agg(pl.col("tag").head(_MAX_USER_TAGS).str.join("|").alias("__user_tags"))
    )
    joined = pl.concat_str(
        [pl.col("tags").replace("", None), pl.col("__user_tags")], separator="|", ignore_nulls=True
    )
    return (
        items.join(top, on="item_id", how="left")
        .with_columns(joined.fill_null("").alias("tags"))
        .drop("__user_tags")
    )


def _load_ml1m(d: Path) -> RawTables:
    ratings_path, movies_path = d / "ratings.dat", _need(d / "movies.dat", "items file", "MovieLens")
    ratings = _read_sep(
        ratings_path.read_bytes().replace(b"::", b"\t"),
        "\t",
        ["user_id", "item_id", "rating", "timestamp"],
        f"'{ratings_path}'",
    )
    ratings = _cast_checked(ratings, "rating", pl.Float64(), f"'{ratings_path}'")
    ratings = _cast_checked(ratings, "timestamp", pl.Int64(), f"'{ratings_path}'")
    movies = _read_sep(
        _latin1(movies_path).replace(b"::", b"\t"), "\t", ["item_id", "title", "genres"], f"'{movies_path}'"
    )
    items = _movie_items(movies.with_columns(pl.col("genres").fill_null("").str.split("|")))
    sources = {"events": str(ratings_path), "items": str(movies_path)}
    users = None
    users_path = d / "users.dat"
    if users_path.is_file():
        users = _read_sep(
            _latin1(users_path).replace(b"::", b"\t"),
            "\t",
            ["user_id", "gender", "age", "occupation", "zip_code"],
            f"'{users_path}'",
        )
        users = _movie_users(users.select("user_id", "age", "gender", "occupation", "zip_code"))
        sources["users"] = str(users_path)
    return RawTables(events=_rating_events(ratings), items=items, users=users, sources=sources)


def _require_columns(df: pl.DataFrame, cols: tuple[str, ...], path: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(
            f"'{path}' lacks column(s) {', '.join(missing)} (found: {', '.join(df.columns)}). Fix: use the "
            f"original file, whose header is {','.join(cols)}."
        )


# --------------------------------------------------------------------------- RecBole atomic files


def _read_atomic(path: Path) -> tuple[pl.DataFrame, dict[str, str]]:
    """A RecBole atomic file: names with the ':type' suffix stripped, float fields as Float64."""
    try:
        with path.open(encoding="utf-8") as fh:
            header = fh.readline().rstrip("\r\n").split("\t")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"'{path}' is not UTF-8 text (byte {exc.start}: {exc.reason}). Fix: convert it, e.g. "
            f"iconv -f latin1 -t utf-8 '{path}' > fixed; RecBole atomic files are UTF-8."
        ) from None
    df = _read_sep(path, "\t", None, f"'{path}'")
    types: dict[str, str] = {}
    names = []
    for field in header:
        name, _, ftype = field.partition(":")
        names.append(name)
        types[name] = ftype or "token"
    df.columns = names
    for name, ftype in types.items():
        if ftype == "float":
            df = _cast_checked(df, name, pl.Float64(), f"'{path}'")
    return df, types


def _recbole_name(d: Path, name: str | None) -> tuple[str, list[Path]]:
    """The dataset name and its interaction files (one .inter, or benchmark .train/.valid/.test splits)."""
    inters = sorted(d.glob("*.inter"))
    if name is None:
        stems = sorted({p.name.split(".")[0] for p in inters})
        if not stems:
            raise InputError(
                f"'{d}' holds no RecBole '<name>.inter' file. Fix: point --input at the RecBole dataset folder."
            )
        if len(stems) > 1 and d.name not in stems:
            raise InputError(
                f"'{d}' holds several RecBole datasets ({', '.join(stems)}). Fix: keep one dataset per folder."
            )
        name = d.name if d.name in stems else stems[0]
    single = d / f"{name}.inter"
    if single.is_file():
        return name, [single]
    splits = [d / f"{name}.{s}.inter" for s in ("train", "valid", "test")]
    found = [p for p in splits if p.is_file()]
    if not found:
        raise InputError(f"'{d}' has no '{name}.inter'. Fix: point --input at the RecBole dataset folder.")
    return name, found


def _first_present(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def load_recbole(input_dir: Path, name: str | None = None) -> RawTables:
    """RecBole atomic files `<name>.inter`, `<name>.item` and optional `<name>.user`.

    Interactions with a `rating` field become 'rating' events (value = rating); with a 0/1 `label`
    field, 'click' (label > 0) or 'impression'; otherwise every row is an implicit 'click'. Other fields
    pass through. token_seq tag fields become '|'-separated tags.
    """
    d = Path(input_dir)
    name, inter_paths = _recbole_name(d, name)
    parts = [_read_atomic(p) for p in inter_paths]
    inter = pl.concat([df for df, _ in parts], how="diagonal_relaxed")
    inter_src = " + ".join(str(p) for p in inter_paths)
    for col in ("user_id", "item_id", "timestamp"):
        if col not in inter.columns:
            raise InputError(
                f"'{inter_src}' lacks the field '{col}' (found: {', '.join(inter.columns)}). Fix: add it; "
                f"the engine needs user_id, item_id and timestamp (unix seconds) to split by time."
            )
    inter = _cast_checked(inter, "timestamp", pl.Float64(), f"'{inter_src}'")
    if "rating" in inter.columns:
        kind, value = pl.lit("rating"), pl.col("rating").cast(pl.Float64)
        used = ["rating"]
    elif "label" in inter.columns:
        label = pl.col("label").cast(pl.Float64, strict=False)
        kind, value = pl.when(label > 0).then(pl.lit("click")).otherwise(pl.lit("impression")), pl.lit(None)
        used = ["label"]
    else:
        kind, value, used = pl.lit("click"), pl.lit(None), []
    extra = [c for c in inter.columns if c not in ("user_id", "item_id", "timestamp", *used)]
    events = inter.select(
        pl.col("user_id"),
        pl.col("item_id"),
        kind.alias("event_type"),
        _unix_seconds("timestamp"),
        value.cast(pl.Float64).alias("value"),
        *extra,
    )
    item_path = _need(d / f"{name}.item", "items file", "RecBole")
    items = _recbole_items(*_read_atomic(item_path), item_path)
    sources = {"events": inter_src, "items": str(item_path)}
    users = None
    user_path = d / f"{name}.user"
    if user_path.is_file():
        users, _ = _read_atomic(user_path)
        if "user_id" not in users.columns:
            raise InputError(
                f"'{user_path}' lacks the field 'user_id' (found: {', '.join(users.columns)}). Fix: rename "
                f"the user id field to user_id:token."
            )
        users = _movie_users(users)
        sources["users"] = str(user_path)
    return RawTables(events=events, items=items, users=users, sources=sources)


def _recbole_items(df: pl.DataFrame, types: dict[str, str], path: Path) -> pl.DataFrame:
    if "item_id" not in df.columns:
        raise InputError(
            f"'{path}' lacks the field 'item_id' (found: {', '.join(df.columns)}). Fix: rename the item id "
            f"field to item_id:token."
        )
    cols = df.columns
    title_col = _first_present(cols, _TITLE_FIELDS)
    tag_col = _first_present(cols, _TAG_FIELDS)
    tag_list = (
        pl.col(tag_col).fill_null("").str.split(" " if types.get(tag_col) == "token_seq" else "|")
        if tag_col
        else pl.lit([], dtype=pl.List(pl.Utf8))
    )
    if title_col == "movie_title":
        # MovieLens converted by RecBole: rebuild "Title (year)" so it matches the GroupLens form.
        year = pl.col("release_year") if "release_year" in cols else pl.lit(None, pl.Utf8)
        year = pl.when(year.is_in([_RECBOLE_MISSING, ""])).then(None).otherwise(year.str.strip_chars())
        base = pl.col("movie_title").str.strip_chars().replace(_RECBOLE_MISSING, "unknown")
        title = pl.when(year.is_null()).then(base).otherwise(base + " (" + year + ")")
        consumed = {"item_id", "movie_title", "release_year", tag_col}
        extra = [c for c in cols if c not in consumed]
        return _movie_items(df.select("item_id", title.alias("title"), tag_list.alias("genres"), *extra))
    desc_col = _first_present(cols, _DESCRIPTION_FIELDS)
    cat_col = _first_present(cols, _CATEGORY_FIELDS)
    tags = tag_list.list.eval(pl.element().filter(pl.element() != ""))
    out = df.with_columns(
        (pl.col(title_col) if title_col else pl.lit("")).fill_null("").alias("__title"),
        (pl.col(desc_col) if desc_col else pl.lit("")).fill_null("").alias("__description"),
        tags.list.join("|").fill_null("").alias("__tags"),
        (pl.col(cat_col).fill_null("") if cat_col else tags.list.first().fill_null("")).alias("__category"),
    )
    consumed = {"item_id", title_col, desc_col, tag_col, cat_col}
    extra = [c for c in cols if c not in consumed and c not in _ITEM_TEXT]
    return out.select("item_id", *(pl.col(f"__{c}").alias(c) for c in _ITEM_TEXT), *extra)


# --------------------------------------------------------------------------- MIND


_MIND_TIME = "%m/%d/%Y %I:%M:%S %p"


def load_mind(input_dir: Path) -> RawTables:
    """Microsoft MIND (behaviors.tsv + news.tsv) as impressions, clicks and history clicks."""
    d = Path(input_dir)
    beh_path = _need(d / "behaviors.tsv", "behaviors file", "MIND")
    news_path = _need(d / "news.tsv", "news file", "MIND")
    beh = _mind_behaviors(beh_path)
    cols = ["user_id", "item_id", "event_type", "timestamp", "request_id", "position"]
    events = pl.concat([_mind_history(beh).select(cols), *(part.select(cols) for part in _mind_impressions(beh))])
    events = events.with_columns(pl.lit(None, pl.Float64).alias("value")).select(*EVENT_COLUMNS)
    sources = {
        "events": f"{beh_path} (expanded to one event per history item, impression and click)",
        "items": str(news_path),
    }
    return RawTables(events=events, items=_mind_news(news_path), users=None, sources=sources)


def _mind_behaviors(beh_path: Path) -> pl.DataFrame:
    """behaviors.tsv with its time parsed into `ts` (UTC); unparseable times name their rows."""
    beh = _read_sep(
        beh_path, "\t", ["request_id", "user_id", "time", "history", "impressions"], f"'{beh_path}'"
    )
    beh = beh.with_columns(
        pl.col("time").str.strip_chars().str.to_datetime(_MIND_TIME, strict=False).alias("ts")
    )
    bad = beh.with_row_index("__row", offset=1).filter(pl.col("ts").is_null())
    if bad.height:
        rows = ", ".join(f"{r} ({v!r})" for r, v in bad.select("__row", "time").head(5).iter_rows())
        raise InputError(
            f"'{beh_path}': column 3 (time) has {bad.height} value(s) not in the MIND form "
            f"'11/15/2019 8:55:22 AM' (rows {rows}). Fix: correct or remove those rows."
        )
    return beh.with_columns(pl.col("ts").dt.replace_time_zone("UTC").cast(TIMESTAMP_DTYPE))


def _mind_impressions(beh: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(impressions, clicks): one impression per shown item with its position, a click per `-1` label."""
    shown = (
        beh.select(
            "request_id",
            "user_id",
            "ts",
            pl.col("impressions").fill_null("").str.strip_chars().str.split(" ").alias("imp"),
        )
        .with_columns(pl.int_ranges(0, pl.col("imp").list.len(), dtype=pl.Int32).alias("position"))
        .explode(["imp", "position"])
        .filter(pl.col("imp").is_not_null() & (pl.col("imp") != ""))
        .with_columns(
            pl.col("imp").str.replace(r"-[01]$", "").alias("item_id"),
            pl.col("imp").str.extract(r"-([01])$").alias("label"),
        )
    )
    impressions = shown.select(
        "user_id", "item_id", pl.lit("impression").alias("event_type"), pl.col("ts").alias("timestamp"),
        "request_id", "position",
    )  # fmt: skip
    clicks = shown.filter(pl.col("label") == "1").select(
        "user_id", "item_id", pl.lit("click").alias("event_type"), pl.col("ts").alias("timestamp"),
        "request_id", "position",
    )  # fmt: skip
    return impressions, clicks


def _mind_history(beh: pl.DataFrame) -> pl.DataFrame:
    """History clicks (no timestamps in MIND): each user's distinct history items, oldest first, one
    second apart and ending one second before the user's first request."""
    first_seen = beh.group_by("user_id").agg(pl.col("ts").min().alias("t0"))
    return (
        beh.select(
            "user_id",
            "ts",
            pl.col("history").fill_null("").str.strip_chars().str.split(" ").alias("item_id"),
        )
        .with_columns(pl.int_ranges(0, pl.col("item_id").list.len()).alias("k"))
        .explode(["item_id", "k"])
        .filter(pl.col("item_id").is_not_null() & (pl.col("item_id") != ""))
        .sort(["user_id", "ts", "k"])
        .unique(["user_id", "item_id"], keep="first", maintain_order=True)
        .join(first_seen, on="user_id", how="left")
        .with_columns((pl.len().over("user_id") - pl.int_range(pl.len()).over("user_id")).alias("back"))
        .select(
            "user_id",
            "item_id",
            pl.lit("click").alias("event_type"),
            (pl.col("t0") - pl.duration(seconds=pl.col("back"))).alias("timestamp"),
            pl.lit(None, pl.Utf8).alias("request_id"),
            pl.lit(None, pl.Int32).alias("position"),
        )
    )


def _mind_news(news_path: Path) -> pl.DataFrame:
    """news.tsv as the item table: title, abstract as description, subcategory as tags."""
    columns = ["item_id", "category", "subcategory", "title", "abstract", "url", "title_entities", "abstract_entities"]
    news = _read_sep(news_path, "\t", columns, f"'{news_path}'")
    return news.select(
        "item_id",
        pl.col("title").fill_null(""),
        pl.col("abstract").fill_null("").alias("description"),
        pl.col("subcategory").fill_null("").alias("tags"),
        pl.col("category").fill_null(""),
        pl.col("url").fill_null(""),
    )


# --------------------------------------------------------------------------- detection and dispatch


def detect_format(input_dir: Path) -> str:
    """Which public layout `input_dir` holds: 'recbole', 'mind' or 'movielens'."""
    d = Path(input_dir)
    if not d.is_dir():
        raise InputError(f"The input folder '{d}' does not exist or is not a folder. Fix: check the path.")
    if any(d.glob("*.inter")):
        return "recbole"
    if (d / "behaviors.tsv").is_file() and (d / "news.tsv").is_file():
        return "mind"
    if any((d / f).is_file() for f in ("u.data", "ratings.csv", "ratings.dat")):
        return "movielens"
    found = sorted(p.name for p in d.iterdir())
    shown = ", ".join(found[:15]) + (f" and {len(found) - 15} more" if len(found) > 15 else "")
    raise InputError(
        f"Could not tell the format of '{d}': looked for a RecBole '<name>.inter', MIND 'behaviors.tsv' + "
        f"'news.tsv', or MovieLens 'u.data' (ml-100k), 'ratings.csv' (ml-latest/ml-25m) or 'ratings.dat' "
        f"(ml-1m), and found {shown or 'an empty folder'}. Fix: point --input at the unzipped dataset "
        f"folder, pass --format explicitly, or use --events/--items for your own files."
    )


def load_format(fmt: str, input_dir: Path) -> RawTables:
    """Import a public layout; `fmt` is one of FORMATS or 'auto' (detect from the files)."""
    key = fmt.strip().lower()
    if key == "auto":
        key = detect_format(input_dir)
    loaders = {"movielens": load_movielens, "recbole": load_recbole, "mind": load_mind}
    if key not in loaders:
        raise InputError(f"Unknown input format '{fmt}'. Fix: use one of auto, {', '.join(FORMATS)}.")
    if not Path(input_dir).is_dir():
        raise InputError(
            f"The input folder '{input_dir}' does not exist or is not a folder. Fix: check the path."
        )
    return loaders[key](Path(input_dir))
