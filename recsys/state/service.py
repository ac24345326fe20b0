"""What a server process holds of the shared state: the event log, its follower, the snapshot store.

`StateService.open(...)` runs the start-up replay (newest snapshot, then the log's tail) before the
server answers; `start()` launches the follower thread. Appends are awaited on the event loop
(`asyncio.wrap_future` of the log's group-commit Future), never on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from recsys.serving.engine import LiveState
from recsys.serving.latency import NO_MONITOR, lower_priority
from recsys.serving.validation import EventsInput, ServedLists
from recsys.state import open_log
from recsys.state.codec import encode
from recsys.state.follower import Follower, SnapshotStore
from recsys.state.log import EventLog, Position, StateUnavailable, format_position, parse_position
from recsys.state.snapshot import DirSnapshots, RedisSnapshots

log = logging.getLogger(__name__)
EXPOSURE_FLUSH_S = 0.25  # served lists reach the log (and every replica's impression counts) within this
EXPOSURE_FLUSH_LISTS = 256


class StateService:
    def __init__(self, event_log: EventLog, follower: Follower) -> None:
        self.log = event_log
        self.follower = follower
        self.exposure_errors = 0
        self._exposures: list[tuple[str, int, str | None, list[str]]] = []  # served lists not appended yet
        self._exposure_lock = threading.Lock()
        self._exposure_flushed = time.monotonic()
        # Served lists are encoded and appended on this thread, never on the Rank that crossed the bound.
        self._exposure_writer = ThreadPoolExecutor(1, thread_name_prefix="state-exposures", initializer=lower_priority)
        self.monitor: Any = NO_MONITOR  # the server's stall monitor (marks background work)

    @classmethod
    def open(
        cls,
        live: LiveState,
        *,
        state: str | None,
        state_dir: Path | None,
        snapshot_events: int = 100_000,
        snapshot_s: float = 300.0,
    ) -> StateService:
        started = time.perf_counter()
        event_log = open_log(state, str(state_dir) if state_dir is not None else None)
        snapshots: SnapshotStore | None = None
        if state:
            from recsys.state.redis_log import RedisLog

            assert isinstance(event_log, RedisLog)
            if event_log.check() != "yes":
                log.warning("Redis at %s runs without appendonly: an acknowledged event survives only in its memory "
                            "(set appendonly yes for durable acknowledgements)", event_log.url)
            snapshots = DirSnapshots(state_dir) if state_dir is not None else RedisSnapshots(event_log._client, event_log.stream)
        elif state_dir is not None:
            snapshots = DirSnapshots(state_dir)
        follower = Follower(event_log, live, snapshots=snapshots, snapshot_events=snapshot_events, snapshot_s=snapshot_s)
        restored = follower.restore()
        replayed = follower.catch_up()
        log.info("state: %s; %s, %d records replayed in %.2fs (%d events applied)", event_log.describe(),
                 "snapshot loaded" if restored else "no snapshot", replayed, time.perf_counter() - started,
                 live.events_applied)
        return cls(event_log, follower)

    def start(self) -> None:
        self.follower.start()

    def close(self) -> None:
        self._exposure_writer.submit(self.flush_exposures).result()
        self._exposure_writer.shutdown(wait=True)
        self.follower.close()
        self.log.close()

    async def append(self, events: EventsInput, key: str = "") -> Position:
        """Durably append one batch (StateUnavailable when the log cannot take it)."""
        return await asyncio.wrap_future(self.log.append(encode(events, key)))

    def append_exposure(self, user_id: str, t_us: int, request_id: str | None, item_ids: list[str]) -> None:
        """A served list (its impressions), buffered and appended with the others as one served-lists
        record (recsys.state.codec) per EXPOSURE_FLUSH_S or EXPOSURE_FLUSH_LISTS lists: a Rank never
        waits for it and only appends a tuple here; the log and every follower see a few records a
        second, not one per request. The parquet exposure log keeps the rows too."""
        with self._exposure_lock:
            self._exposures.append((user_id, t_us, request_id, item_ids))
            due = len(self._exposures) >= EXPOSURE_FLUSH_LISTS or time.monotonic() - self._exposure_flushed >= EXPOSURE_FLUSH_S
            if due:
                self._exposure_flushed = time.monotonic()  # one flush per bound, however many Ranks see it due
        if due:
            self.flush_exposures_soon()

    def flush_exposures_soon(self) -> None:
        """Flush on the exposure writer thread (the event loop's quiet-moment timer calls this too)."""
        self._exposure_writer.submit(self.flush_exposures)

    def flush_exposures(self) -> None:
        """Append the buffered served lists as one record (the exposure writer thread, or close)."""
        with self._exposure_lock:
            lists, self._exposures = self._exposures, []
            self._exposure_flushed = time.monotonic()
        if not lists:
            return
        try:
            with self.monitor.activity("state-exposures"):
                future = self.log.append(encode(ServedLists.from_lists(lists)))
        except StateUnavailable as exc:
            future = Future()
            future.set_exception(exc)
        future.add_done_callback(self._exposure_done)

    def _exposure_done(self, future: Any) -> None:
        if future.exception() is not None:
            self.exposure_errors += 1
            if self.exposure_errors in (1, 10, 100) or self.exposure_errors % 1000 == 0:
                log.warning("served lists not folded into the shared state (%d so far): %s",
                            self.exposure_errors, future.exception())

    async def wait_token(self, token: str, timeout_s: float) -> bool:
        """Read-your-writes: until this process folded the token's position, at most timeout_s."""
        if not token:
            return True
        return await self.follower.wait_for(parse_position(token), timeout_s)

    def token(self) -> str:
        return format_position(self.follower.position)
