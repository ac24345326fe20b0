"""Batch inputs: streamed in chunks that never split a user, read back by row range, normalised.

Every input ends up as one parquet file (CSV is converted once, streaming, with malformed lines
recorded as rejects), because parquet gives both a bounded streaming read (`iter_batches`) and cheap
row-range reads (row-group metadata) for Ray actors. Chunk boundaries come from one function over the
cutting columns only, so the local engine, the Ray planner and a resumed run all cut identically.

List features (match_rank, match_z, ...) depend on a request's whole candidate list, so a pairs
request (user, time) must be scored in one chunk: chunks end only where the user changes, and a user
that reappears after its chunk was closed is an error (the input must be grouped by user).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.errors import InputError

MODES = ("pairs", "candidates", "topk")
CANDIDATE_SEPARATOR = "|"  # candidate lists in CSV text cells
REJECT_SCHEMA = pa.schema(
    [
        ("input_row", pa.int64()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("code", pa.string()),
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class InputSpec:
    """Which columns hold what; `mode` says what a row is (a pair, a candidate list, a user)."""

    mode: str = "pairs"
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "time"
    candidates_col: str = "candidates"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown input mode {self.mode!r}: use one of {', '.join(MODES)}")


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # first input row (0-based row of the parquet input)
    table: pa.Table

    @property
    def rows(self) -> int:
        return self.table.num_rows


# ------------------------------------------------------------------------------------ files


def fingerprint(path: Path) -> dict[str, Any]:
    """Identity of an input file for resume checks (a changed file must not resume old chunks)."""
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_csv(path: Path) -> bool:
    return path.suffix.lower() in {".csv", ".tsv", ".txt"} or path.name.lower().endswith((".csv.gz", ".tsv.gz"))


def csv_to_parquet(src: Path, dst: Path, block_bytes: int = 8 << 20) -> pa.Table:
    """Stream a CSV/TSV into parquet, every column as text (typing happens in `normalize`, where a
    bad value becomes a reject, not a crash). Returns the rejects for malformed lines."""
    pacsv = __import__("pyarrow.csv", fromlist=["csv"])
    delimiter = "\t" if ".tsv" in src.name.lower() else ","
    with src.open(newline="") as fh:
        header = next(csv.reader(fh, delimiter=delimiter), None)
    if not header:
        raise InputError(f"{src} is empty: a CSV input needs a header line naming its columns")
    bad: list[dict[str, Any]] = []

    def on_invalid(row: Any) -> str:
        bad.append(
            {
                "input_row": -1,
                "user_id": None,
                "item_id": None,
                "code": "malformed_line",
                "reason": f"line {row.number}: expected {row.expected_columns} fields, got {row.actual_columns}: "
                f"{(row.text or '')[:200]!r}",
            }
        )
        return "skip"

    reader = pacsv.open_csv(
        src,
        read_options=pacsv.ReadOptions(block_size=block_bytes, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=True
        ),
    )
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with pq.ParquetWriter(tmp, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch, row_group_size=64_000)
    os.replace(tmp, dst)
    return pa.Table.from_pylist(bad, schema=REJECT_SCHEMA)


def check_columns(path: Path, spec: InputSpec) -> list[str]:
    """The input's column names, or an InputError naming the missing one and the fix."""
    names = pq.ParquetFile(path).schema_arrow.names
    need = {"pairs": [spec.user_col, spec.item_col], "candidates": [spec.user_col, spec.candidates_col]}.get(
        spec.mode, [spec.user_col]
    )
    for column in need:
        if column not in names:
            flag = {spec.user_col: "--user-col", spec.item_col: "--item-col", spec.candidates_col: "--candidates-col"}
            raise InputError(
                f"{path} has no column {column!r} (mode {spec.mode}; columns: {', '.join(names)}). "
                f"Name the right one with {flag.get(column, '--user-col')}"
            )
    return names


# ------------------------------------------------------------------------------------ chunking


class _ClosedUsers:
    """64-bit hashes of users whose chunk is finished (8 bytes per user): a reappearing user means
    the input is not grouped by user, which would split its request."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.uint64)

    def check_and_close(self, users: pa.ChunkedArray | pa.Array, start: int) -> None:
        series = pl.Series(pa.chunked_array([users]) if isinstance(users, pa.Array) else users).cast(pl.Utf8)
        hashed = series.hash(seed=0).to_numpy()
        if len(self.keys):
            pos = np.minimum(np.searchsorted(self.keys, hashed), len(self.keys) - 1)
            again = np.flatnonzero(self.keys[pos] == hashed)
            if len(again):
                row = int(again[0])
                raise InputError(
                    f"user {series[row]!r} appears again at input row {start + row} after its earlier rows "
                    f"were scored in a previous chunk: batch input must keep each user's rows together "
                    f"(a user's candidates form one request). Sort the input by user first, e.g. "
                    f"polars: pl.scan_parquet(IN).sort('user_id', maintain_order=True).sink_parquet(OUT), "
                    f"or raise --chunk-rows above the input size"
                )
        self.keys = np.union1d(self.keys, hashed)


def _weights(table: pa.Table, spec: InputSpec, per_user: int) -> np.ndarray:
    """Pairs each row will produce (what chunk size counts)."""
    n = table.num_rows
    if spec.mode == "pairs":
        return np.ones(n, np.int64)
    if spec.mode == "topk":
        return np.full(n, max(per_user, 1), np.int64)
    col = table.column(spec.candidates_col)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = pc.fill_null(pc.list_value_length(col), 0)
    else:  # "a|b|c" text
        lengths = pc.fill_null(pc.list_value_length(pc.split_pattern(col, CANDIDATE_SEPARATOR)), 0)
    return np.maximum(np.asarray(lengths.to_numpy(zero_copy_only=False), np.int64), 1)


def _cut(table: pa.Table, spec: InputSpec, chunk_pairs: int, per_user: int) -> int | None:
    """Rows to put in the next chunk, or None when the buffer cannot end a chunk yet."""
    cum = np.cumsum(_weights(table, spec, per_user))
    if not len(cum) or cum[-1] < chunk_pairs:
        return None
    at = int(np.searchsorted(cum, chunk_pairs)) + 1  # rows [0, at) reach the target size
    if spec.mode != "pairs":
        return at
    keys = table.column(spec.user_col)
    if at >= table.num_rows:
        return None
    change = pc.fill_null(pc.not_equal(keys.slice(at - 1, table.num_rows - at), keys.slice(at)), True)
    first = pc.index(change, True).as_py()
    return None if first < 0 else at + first


def iter_chunks(
    path: Path,
    spec: InputSpec,
    chunk_pairs: int,
    columns: Sequence[str] | None = None,
    per_user: int = 1,
) -> Iterator[Chunk]:
    """Stream the parquet input as chunks of about `chunk_pairs` pairs, cut between users (pairs
    mode) or between rows. Memory: one chunk plus one read batch. `columns` limits what is read
    (the Ray planner reads only the cutting columns; boundaries do not depend on the others)."""
    if chunk_pairs < 1:
        raise InputError(f"--chunk-rows must be >= 1, got {chunk_pairs}")
    pf = pq.ParquetFile(path)
    batch_rows = int(min(max(chunk_pairs // max(per_user, 1), 1024), 65_536))
    closed = _ClosedUsers() if spec.mode == "pairs" else None
    buffer: list[pa.RecordBatch] = []
    index = start = 0
    schema = pf.schema_arrow if columns is None else pa.schema([pf.schema_arrow.field(c) for c in columns])

    def emit(table: pa.Table) -> Chunk:
        nonlocal index, start
        if closed is not None:
            closed.check_and_close(pc.unique(table.column(spec.user_col)), start)
        chunk = Chunk(index, start, table)
        index, start = index + 1, start + table.num_rows
        return chunk

    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None):
        buffer.append(batch)
        while buffer:
            table = pa.Table.from_batches(buffer, schema=schema)
            at = _cut(table, spec, chunk_pairs, per_user)
            if at is None:
                break
            yield emit(table.slice(0, at))
            buffer = table.slice(at).combine_chunks().to_batches() if at < table.num_rows else []
    if buffer:
        table = pa.Table.from_batches(buffer, schema=schema)
        if table.num_rows:
            yield emit(table)


def read_rows(path: Path, start: int, count: int, columns: Sequence[str] | None = None) -> pa.Table:
    """Rows [start, start + count) of a parquet file, reading only the row groups they span."""
    pf = pq.ParquetFile(path)
    sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], np.int64)
    ends = np.cumsum(sizes)
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(ends, start + count - 1, side="right")) if count else first
    groups = list(range(first, min(last, pf.num_row_groups - 1) + 1))
    table = pf.read_row_groups(groups, columns=list(columns) if columns else None)
    offset = start - (int(ends[first - 1]) if first else 0)
    return table.slice(offset, count)


# ------------------------------------------------------------------------------------ normalising


@dataclass
class Normalised:
    """A chunk as typed pairs (one row per scored pair; requests grouped by `_req`) plus rejects.

    pairs: _row (input row), _req (request number within the chunk), user_id, user_idx, item_id,
    item_idx, time_us, <context columns>, <extra feature columns f64>. For topk rows item_* are absent.
    """

    pairs: pl.DataFrame
    rejects: pl.DataFrame
    input_rows: int


def _reject(frame: pl.DataFrame, mask: pl.Expr | pl.Series, code: str, reason: pl.Expr) -> pl.DataFrame:
    return frame.filter(mask).select(
        pl.col("_row").alias("input_row"),
        pl.col("user_id").cast(pl.Utf8),
        (pl.col("item_id").cast(pl.Utf8) if "item_id" in frame.columns else pl.lit(None, pl.Utf8)).alias("item_id"),
        pl.lit(code).alias("code"),
        reason.alias("reason"),
    )


def parse_time_us(column: pl.Series) -> pl.Series:
    """Timestamps -> epoch µs (null where unparseable): datetimes, integers (epoch µs), ISO text
    with or without offset/fraction/'Z' (naive = UTC, as `recsys.features.to_us`), digit strings."""
    if column.dtype.is_temporal():
        if column.dtype == pl.Date:
            column = column.cast(pl.Datetime("us"))
        return column.cast(pl.Datetime("us", getattr(column.dtype, "time_zone", None))).dt.epoch("us")
    if column.dtype.is_integer():
        return column.cast(pl.Int64)
    if column.dtype.is_float():
        return column.cast(pl.Int64, strict=False)
    text = column.cast(pl.Utf8).str.strip_chars()
    iso = (
        text.str.replace(r"^(\d{4}-\d\d-\d\d)$", "${1}T00:00:00")
        .str.replace(" ", "T", literal=True)
        .str.replace(r"Z$", "+00:00")
    )
    iso = pl.select(
        pl.when(iso.str.contains(r"[+-]\d\d:?\d\d$")).then(iso).otherwise(iso + "+00:00")
    ).to_series()
    parsed = iso.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", time_unit="us", strict=False).dt.epoch("us")
    digits = pl.select(
        pl.when(text.str.contains(r"^-?\d+$")).then(text.cast(pl.Int64, strict=False))
    ).to_series()
    return parsed.fill_null(digits)


class _Chunk:
    """A chunk's frame while it is being normalised, and the rows dropped from it so far."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self.frame = frame
        self.rejects: list[pl.DataFrame] = []

    def drop(self, mask: pl.Expr | pl.Series, code: str, reason: pl.Expr) -> None:
        """Move the rows under `mask` to the rejects, with `code` and a `reason` naming the value."""
        self.rejects.append(_reject(self.frame, mask, code, reason))
        self.frame = self.frame.filter(~mask)


def normalize(
    table: pa.Table,
    start: int,
    spec: InputSpec,
    users: pl.DataFrame,
    items: pl.DataFrame,
    default_time_us: int,
    context_text: Mapping[str, bool],
    extra_names: Sequence[str],
) -> Normalised:
    """Typed, validated pairs of one chunk. users: (user_id, user_idx), items: (item_id, item_idx);
    context_text: context name -> True for text contexts (vocabulary), False for numeric ones.
    Bad rows become rejects (code + reason naming the value); the rest go on."""
    loaded = pl.from_arrow(table)
    assert isinstance(loaded, pl.DataFrame)
    n = loaded.height
    chunk = _Chunk(_named_ids(loaded.with_columns(pl.Series("_row", np.arange(start, start + n, dtype=np.int64))), spec))
    chunk.drop(pl.col("user_id").is_null() | (pl.col("user_id") == ""), "missing_user", pl.lit("user_id is empty"))
    _request_time(chunk, spec.time_col, default_time_us)
    _typed_columns(chunk, context_text, extra_names)
    if spec.mode == "candidates":
        _explode_candidates(chunk, spec.candidates_col)
    if spec.mode in ("pairs", "candidates"):
        _known_items(chunk, items)
    frame = chunk.frame.join(users, on="user_id", how="left", maintain_order="left").with_columns(
        pl.col("user_idx").fill_null(-1).cast(pl.Int64)
    )
    if spec.mode == "pairs":
        # A request = the user's rows at one time (the input keeps a user's rows in one chunk).
        heads = frame.select("user_id", "time_us").unique(maintain_order=True).with_row_index("_req")
        frame = frame.join(heads.with_columns(pl.col("_req").cast(pl.Int64)), on=["user_id", "time_us"],
                           how="left", maintain_order="left")
    elif spec.mode == "topk":
        frame = frame.with_columns(pl.col("_row").alias("_req"))
    keep = ["_row", "_req", "user_id", "user_idx", "time_us", *context_text, *extra_names]
    if spec.mode != "topk":
        keep[4:4] = ["item_id", "item_idx"]
    rejected = pl.concat(chunk.rejects) if chunk.rejects else pl.DataFrame(schema=pl.Schema(REJECT_SCHEMA))
    return Normalised(frame.select(keep), rejected.sort("input_row"), n)


def _named_ids(frame: pl.DataFrame, spec: InputSpec) -> pl.DataFrame:
    """The input's id columns as user_id (stripped text) and, for pairs, item_id. Index columns come
    from the model's id maps, never from the input (a users.parquet has them)."""
    frame = frame.drop([c for c in ("user_idx", "item_idx") if c not in (spec.user_col, spec.item_col)], strict=False)
    frame = frame.rename({spec.user_col: "user_id"}) if spec.user_col != "user_id" else frame
    frame = frame.with_columns(pl.col("user_id").cast(pl.Utf8).str.strip_chars())
    if spec.mode == "pairs" and spec.item_col != "item_id":
        frame = frame.drop("item_id", strict=False).rename({spec.item_col: "item_id"})
    return frame


def _request_time(chunk: _Chunk, time_col: str, default_time_us: int) -> None:
    """time_us: the column's value, or the run's time where the column is absent or empty."""
    if time_col not in chunk.frame.columns:
        chunk.frame = chunk.frame.with_columns(pl.lit(default_time_us, pl.Int64).alias("time_us"))
        return
    raw = chunk.frame[time_col]
    parsed = parse_time_us(raw)
    chunk.frame = chunk.frame.with_columns(parsed.fill_null(default_time_us).alias("time_us"), raw.alias("_time_raw"))
    bad_time = parsed.is_null() & raw.is_not_null()
    if raw.dtype == pl.Utf8:
        bad_time &= raw.str.strip_chars() != ""
    chunk.drop(
        pl.Series(bad_time),
        "bad_time",
        pl.format(
            "{} {} is not a timestamp: use ISO-8601 (2026-01-31T12:00:00Z) or epoch microseconds",
            pl.lit(time_col),
            pl.col("_time_raw").cast(pl.Utf8),
        ),
    )


def _typed_columns(chunk: _Chunk, context_text: Mapping[str, bool], extra_names: Sequence[str]) -> None:
    """Context (one value per request) and caller features (one per candidate), typed; bad numbers rejected."""
    for name, text in context_text.items():
        if name not in chunk.frame.columns:
            chunk.frame = chunk.frame.with_columns(pl.lit(None, pl.Utf8 if text else pl.Float64).alias(name))
        elif text:
            chunk.frame = chunk.frame.with_columns(pl.col(name).cast(pl.Utf8))
        else:
            chunk.frame, bad = _numeric_column(chunk.frame, name)
            chunk.drop(bad, "bad_context", pl.format(f"{name} value {{}} is not a number", pl.col("_raw")))
    for name in extra_names:
        if name not in chunk.frame.columns:
            chunk.frame = chunk.frame.with_columns(pl.lit(float("nan"), pl.Float64).alias(name))
        else:
            chunk.frame, bad = _numeric_column(chunk.frame, name)
            chunk.drop(bad, "bad_feature", pl.format(f"{name} value {{}} is not a number", pl.col("_raw")))
            chunk.frame = chunk.frame.with_columns(pl.col(name).fill_null(float("nan")))


def _explode_candidates(chunk: _Chunk, candidates_col: str) -> None:
    """One row per (request, candidate): the request's input row becomes `_req`, each id `item_id`."""
    col = chunk.frame[candidates_col]
    if col.dtype == pl.Utf8:
        lists = col.str.split(CANDIDATE_SEPARATOR).list.eval(pl.element().str.strip_chars().filter(pl.element() != ""))
    elif isinstance(col.dtype, pl.List):
        lists = col.cast(pl.List(pl.Utf8))
    else:
        raise InputError(
            f"candidates column {candidates_col!r} is {col.dtype}: use a list of item ids, or text "
            f"with ids separated by {CANDIDATE_SEPARATOR!r}"
        )
    chunk.frame = chunk.frame.with_columns(lists.alias("_cands"))
    chunk.drop(
        pl.col("_cands").is_null() | (pl.col("_cands").list.len() == 0),
        "empty_candidates",
        pl.lit(f"{candidates_col} has no item ids"),
    )
    chunk.frame = chunk.frame.with_columns(pl.col("_row").alias("_req")).explode("_cands").rename({"_cands": "item_id"})


def _known_items(chunk: _Chunk, items: pl.DataFrame) -> None:
    """item_idx from the model's catalogue; empty and unknown item ids rejected."""
    chunk.frame = chunk.frame.with_columns(pl.col("item_id").cast(pl.Utf8).str.strip_chars())
    chunk.drop(pl.col("item_id").is_null() | (pl.col("item_id") == ""), "missing_item", pl.lit("item_id is empty"))
    chunk.frame = chunk.frame.join(items, on="item_id", how="left", maintain_order="left")
    chunk.drop(
        pl.col("item_idx").is_null(),
        "unknown_item",
        pl.format("item_id {} is not in the model's catalogue: score catalogue items only", pl.col("item_id")),
    )


def _numeric_column(frame: pl.DataFrame, name: str) -> tuple[pl.DataFrame, pl.Series]:
    """-> (frame with `name` as f64 and its text in `_raw`, mask of values that are not numbers)."""
    raw = frame[name]
    if raw.dtype.is_numeric():
        return frame.with_columns(pl.col(name).cast(pl.Float64), raw.cast(pl.Utf8).alias("_raw")), pl.Series(
            [False] * frame.height
        )
    text = raw.cast(pl.Utf8).str.strip_chars()
    values = text.cast(pl.Float64, strict=False)
    bad = values.is_null() & text.is_not_null() & (text != "")
    return frame.with_columns(values.alias(name), raw.cast(pl.Utf8).alias("_raw")), bad
