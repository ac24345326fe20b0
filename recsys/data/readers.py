"""Reading tables from disk: parquet, CSV, TSV and JSON lines, optionally gzip-compressed.

Readers only read: ids and timestamps are kept as the file holds them (except that CSV id columns are
read as text, so '007' stays '007'); `recsys.data.validate` turns them into canonical types.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from recsys.errors import InputError

# Columns whose text form is the identity: inferring them as integers would drop leading zeros.
_ID_COLUMNS = {"user_id": pl.Utf8, "item_id": pl.Utf8, "request_id": pl.Utf8}
_INFER_ROWS = 10_000

SUPPORTED_EXTENSIONS = (
    ".parquet",
    ".pq",
    ".csv",
    ".tsv",
    ".tab",
    ".jsonl",
    ".ndjson",
    ".json",
    "(and .gz of the text formats; a folder of .parquet files)",
)


@dataclass
class RawTables:
    """Tables as read or imported, before validation.

    `sources` maps a role ('events', 'items', 'users') to the file it came from (or a description),
    so validation errors can name the file.
    """

    events: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame | None = None
    sources: dict[str, str] = field(default_factory=dict)


def _suffix(path: Path) -> tuple[str, bool]:
    """The format extension, and whether the file is gzip-compressed ('x.csv.gz' -> '.csv', True)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".gzip"):
        return (suffixes[-2] if len(suffixes) >= 2 else ""), True
    return (suffixes[-1] if suffixes else ""), False


def _read_delimited(source: Path | bytes, separator: str) -> pl.DataFrame:
    """CSV/TSV with id columns as text; retry with full-file type inference if sampling guessed wrong."""
    quote: str | None = '"' if separator == "," else None  # TSV is unquoted by convention
    data: Path | io.BytesIO = io.BytesIO(source) if isinstance(source, bytes) else source

    def read(infer: int | None) -> pl.DataFrame:
        if isinstance(data, io.BytesIO):
            data.seek(0)
        return pl.read_csv(
            data,
            separator=separator,
            quote_char=quote,
            schema_overrides=_ID_COLUMNS,
            infer_schema_length=infer,
        )

    try:
        return read(_INFER_ROWS)
    except pl.exceptions.ComputeError:
        # A later row does not fit the type guessed from the first rows (e.g. '4.5' after ints).
        return read(None)


def _read_ndjson(source: Path | bytes) -> pl.DataFrame:
    data: Path | io.BytesIO = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return pl.read_ndjson(data, infer_schema_length=_INFER_ROWS)
    except pl.exceptions.ComputeError:
        if isinstance(data, io.BytesIO):
            data.seek(0)
        return pl.read_ndjson(data, infer_schema_length=None)


def _read_json(source: Path | bytes) -> pl.DataFrame:
    """A JSON array of records; falls back to JSON lines, which people often name '.json'."""
    raw = source if isinstance(source, bytes) else source.read_bytes()
    if raw.lstrip()[:1] == b"[":
        return pl.read_json(io.BytesIO(raw), infer_schema_length=None)
    return _read_ndjson(raw)


_READERS: dict[str, Callable[[Path | bytes], pl.DataFrame]] = {
    ".csv": lambda s: _read_delimited(s, ","),
    ".tsv": lambda s: _read_delimited(s, "\t"),
    ".tab": lambda s: _read_delimited(s, "\t"),
    ".jsonl": _read_ndjson,
    ".ndjson": _read_ndjson,
    ".json": _read_json,
}


def read_table(path: Path, role: str) -> pl.DataFrame:
    """Read one table, choosing the reader by extension.

    `role` ('events file', 'items file', ...) only names the file in error messages. Every failure is an
    `InputError` that names the path, the role and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"The {role} '{path}' does not exist. Fix: check the path (relative paths are taken from "
            f"the current directory '{Path.cwd()}') or create the file."
        )
    if path.is_dir():
        parts = sorted(path.rglob("*.parquet"))
        if not parts:
            raise InputError(
                f"The {role} '{path}' is a folder without .parquet files. Fix: pass a file "
                f"({', '.join(SUPPORTED_EXTENSIONS)}) or a folder of .parquet files."
            )
        return _guard(lambda: pl.read_parquet(parts), path, role, "parquet")
    ext, compressed = _suffix(path)
    if ext in (".parquet", ".pq") and not compressed:
        return _guard(lambda: pl.read_parquet(path), path, role, "parquet")
    reader = _READERS.get(ext)
    if reader is None:
        raise InputError(
            f"The {role} '{path}' has an unsupported extension '{''.join(path.suffixes) or '(none)'}'. "
            f"Supported: {', '.join(SUPPORTED_EXTENSIONS)}. Fix: convert the file or rename it to the "
            f"extension that matches its content."
        )
    if path.stat().st_size == 0:
        raise InputError(f"The {role} '{path}' is empty (0 bytes). Fix: write the table (with a header row).")

    def load() -> pl.DataFrame:
        source: Path | bytes = path
        if compressed:
            source = gzip.decompress(path.read_bytes())
        return reader(source)

    return _guard(load, path, role, ext.lstrip("."))


def _guard(load: Callable[[], pl.DataFrame], path: Path, role: str, kind: str) -> pl.DataFrame:
    """Run a reader, turning library errors into one-paragraph InputErrors."""
    try:
        return load()
    except InputError:
        raise
    except pl.exceptions.NoDataError as exc:
        raise InputError(
            f"The {role} '{path}' has no data ({_first_line(exc)}). Fix: write the table with a header row."
        ) from exc
    except (pl.exceptions.PolarsError, OSError, ValueError, EOFError, gzip.BadGzipFile) as exc:
        hint = ""
        if "utf-8" in str(exc).lower() or "utf8" in str(exc).lower():
            hint = " The file is not valid UTF-8: re-save it as UTF-8."
        raise InputError(
            f"Could not read the {role} '{path}' as {kind}: {_first_line(exc)}.{hint} Fix: check that the "
            f"file is complete and its extension matches its content (supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)})."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


def load_generic(events: Path, items: Path, users: Path | None = None) -> RawTables:
    """Read the generic contract: an events file, an items file and optionally a users file."""
    event_table = read_table(Path(events), "events file")
    item_table = read_table(Path(items), "items file")
    sources = {"events": str(events), "items": str(items)}
    user_table = None
    if users is not None:
        user_table = read_table(Path(users), "users file")
        sources["users"] = str(users)
    return RawTables(events=event_table, items=item_table, users=user_table, sources=sources)
