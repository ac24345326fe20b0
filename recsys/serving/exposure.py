"""Exposure log: every served list, written as parquet part files that `recsys prepare` reads back.

    <dir>/part-<utc>-<pid>-<seq>.parquet   one row per served item: user_id, item_id,
        event_type="impression", timestamp (UTC, µs), request_id, position (0-based), model_version,
        variant, score, match_score, source, latency_ms, session_id

`variant` is the label the router gave the request (with --experiments `{experiment}/{arm}@{config
version}`, see docs/experiments.md); `latency_ms` is the server-side time of the request (receipt to
scored list, the same for every row of a list) and `session_id` the request context's `session_id`
(null when absent): `recsys experiment analyze` reads them for its latency guardrail and for
session-randomised experiments.

Pass the directory (or a copy of it merged with later events) to `recsys prepare --events`: a folder of
.parquet files is one table, and impressions are the exposure events of the data contract.

Durability: rows are buffered in memory and flushed when `flush_records` rows are pending, every
`flush_s` seconds, and on shutdown. A flush writes a hidden temp file, fsyncs it, renames it into place
and fsyncs the directory, so a kill -9 loses at most the rows since the last flush and never leaves a
partial .parquet file (leftover temp files do not match *.parquet and are removed at the next start).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.files import output_lock
from recsys.serving.latency import NO_MONITOR, lower_priority

log = logging.getLogger(__name__)

SCHEMA: dict[str, Any] = {
    "user_id": pl.Utf8,
    "item_id": pl.Utf8,
    "event_type": pl.Utf8,
    "timestamp": pl.Datetime("us", "UTC"),
    "request_id": pl.Utf8,
    "position": pl.Int32,
    "model_version": pl.Utf8,
    "variant": pl.Utf8,
    "score": pl.Float64,
    "match_score": pl.Float64,
    "source": pl.Utf8,
    "latency_ms": pl.Float64,
    "session_id": pl.Utf8,
}
SOURCE_NAMES = {1: "catalogue", 2: "encoded", 3: "no_text"}


class ExposureLog:
    """Buffered, durable appends of served lists (thread-safe; writes happen on one writer thread)."""

    def __init__(self, directory: Path | str, flush_records: int = 50_000, flush_s: float = 1.0) -> None:
        self.directory = Path(directory)
        self._owner = contextlib.ExitStack()  # one server owns the directory: a second one is refused (exit 2)
        self._owner.enter_context(output_lock(self.directory, what=f"exposure log {self.directory}"))
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".part-*.tmp"):
            stale.unlink(missing_ok=True)
        self.flush_records = flush_records
        self.flush_s = flush_s
        self.written = 0  # rows durably on disk
        self._lists: list[tuple[Any, ...]] = []  # one tuple per served list; rows are built at flush
        self._pending = 0
        self._lock = threading.Lock()
        self._seq = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="exposure", initializer=lower_priority)
        self._last_flush = time.monotonic()
        self._closed = False
        self.monitor: Any = NO_MONITOR  # the server's stall monitor marks flushes

    @property
    def pending(self) -> int:
        return self._pending

    def append(
        self,
        request_id: str,
        user_id: str,
        t_us: int,
        model_version: str,
        variant: str,
        item_ids: Sequence[str],
        scores: np.ndarray,
        match: np.ndarray,
        source: np.ndarray,
        latency_ms: float | None = None,
        session_id: str | None = None,
    ) -> None:
        """One served list, best first (position = index). Cheap: one tuple appended under a lock; the
        writer thread expands lists into rows at flush time. The entry holds only strings, numbers and
        arrays in tuples, which the cyclic collector stops tracking: a second of buffered lists does
        not pile up in its oldest generation, whose full passes pause the event loop."""
        k = len(item_ids)
        if not k:
            return
        entry = (user_id, tuple(item_ids), t_us, request_id, model_version, variant, np.asarray(scores, np.float64),
                 np.asarray(match, np.float64), np.asarray(source, np.int8), latency_ms, session_id)
        with self._lock:
            if self._closed:
                raise RuntimeError("exposure log is closed")
            self._lists.append(entry)
            self._pending += k
            due = self._pending >= self.flush_records
        if due:
            self.flush_async()

    def flush_async(self) -> Future[int]:
        return self._writer.submit(self._write_pending)

    def flush_if_due(self) -> None:
        """Timer tick: flush when rows have waited `flush_s`."""
        if self._pending and time.monotonic() - self._last_flush >= self.flush_s:
            self.flush_async()

    def _take(self) -> pl.DataFrame | None:
        with self._lock:
            if not self._pending:
                return None
            lists, self._lists = self._lists, []
            self._pending = 0
        (users, items, stamps, requests, versions, variants, scores, match, source, latency, sessions) = zip(*lists, strict=True)
        sizes = np.fromiter(map(len, items), np.int64, len(items))
        row_list = np.repeat(np.arange(len(items)), sizes)  # list of each row

        def per_list(name: str, values: Sequence[Any]) -> pl.Series:
            return pl.Series(name, values, SCHEMA[name] if name != "timestamp" else pl.Int64).gather(row_list)

        starts = np.cumsum(sizes) - sizes
        labels = np.array([SOURCE_NAMES.get(code, "unknown") for code in range(len(SOURCE_NAMES) + 1)], object)
        codes = np.concatenate(source).astype(np.int64)
        codes[(codes < 0) | (codes >= len(labels))] = 0  # 0 = "unknown"
        frame = pl.DataFrame(
            [
                per_list("user_id", users),
                pl.Series("item_id", [item for lst in items for item in lst], pl.Utf8),
                per_list("timestamp", stamps).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
                per_list("request_id", requests),
                pl.Series("position", np.arange(len(row_list)) - np.repeat(starts, sizes), pl.Int32),
                per_list("model_version", versions),
                per_list("variant", variants),
                pl.Series("score", np.concatenate(scores), pl.Float64),
                pl.Series("match_score", np.concatenate(match), pl.Float64),
                pl.Series("source", labels[codes].tolist(), pl.Utf8),
                per_list("latency_ms", latency),
                per_list("session_id", sessions),
            ]
        )
        return frame.with_columns(pl.lit("impression", pl.Utf8).alias("event_type")).select(list(SCHEMA))

    def flush(self) -> int:
        """Make every row appended so far durable, and return how many rows this call wrote. Runs on the
        writer thread, after any flush already in flight there: a caller that flushes and then reads the
        directory sees every row it appended before the call (a flush on its own thread could return while
        the writer still held rows it had taken but not yet renamed into place)."""
        return self._writer.submit(self._write_pending).result()

    def _write_pending(self) -> int:
        """Write pending rows as one part file (temp + fsync + rename + directory fsync); writer thread only."""
        with self.monitor.activity("exposure-flush"):
            return self._write_frame()

    def _write_frame(self) -> int:
        frame = self._take()
        self._last_flush = time.monotonic()
        if frame is None:
            return 0
        with self._lock:
            self._seq += 1
            seq = self._seq
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"part-{stamp}-{os.getpid()}-{seq:06d}.parquet"
        tmp = self.directory / f".{name}.tmp"
        with tmp.open("wb") as fh:
            frame.write_parquet(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.directory / name)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.written += frame.height
        log.debug("exposure log: %d rows -> %s", frame.height, name)
        return frame.height

    def close(self) -> int:
        """Flush everything still buffered and stop the writer (shutdown path)."""
        with self._lock:
            self._closed = True
        self._writer.submit(self._write_pending).result()
        self._writer.shutdown(wait=True)
        self._owner.close()
        return self.written


def read_exposures(directory: Path | str) -> pl.DataFrame:
    """Every durable row (what `recsys prepare` would read from the folder)."""
    parts = sorted(Path(directory).glob("*.parquet"))
    if not parts:
        return pl.DataFrame(schema=SCHEMA)
    try:
        return pl.read_parquet(parts)
    except (pl.exceptions.SchemaError, pl.exceptions.ColumnNotFoundError):
        # Parts written before latency_ms/session_id existed: missing columns read as nulls.
        return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed")
