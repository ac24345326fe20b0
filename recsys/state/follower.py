"""The follower: folds the event log, in log order, into this process's LiveState.

Every server process runs one (a thread: applying a batch is NumPy work that releases the GIL in
parts, and a blocking read must not sit on the event loop). Start-up: the newest usable snapshot
(same feature config and catalogue size as the served model's state) replaces the initial state, the
journal's torn tail is truncated, and the log is replayed from the snapshot's position before the
server answers. Then the thread reads on and folds everything one read returned as one batch (the
cost of a fold hardly grows with its size, so a busy log is folded in fewer, larger batches; how
events are split into batches does not change the state, `tests/test_features.py` checks that
incremental batches equal a rebuild), resolves `wait_for` waiters, and stores a snapshot every
`snapshot_events` events (a served list counts as one) or `snapshot_s` seconds. A record whose
idempotency key was already folded is skipped: a retried StreamEvents lands twice in the log and
counts once. Served-lists records fold through `LiveState.apply_served` (recsys.state.codec).

Log errors (Redis down) do not stop serving: `error` is set (health and metrics report it), the
thread retries every `retry_s` and catches up when the log is back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol, cast

from recsys.serving.engine import LiveState
from recsys.serving.latency import NO_MONITOR, lower_priority
from recsys.serving.validation import EventsInput, ServedLists
from recsys.state.codec import Record, concat, concat_served, decode
from recsys.state.log import START, EventLog, Position, StateUnavailable
from recsys.state.snapshot import Snapshot, pack, unpack

log = logging.getLogger(__name__)
MAX_KEYS = 100_000  # idempotency keys remembered (the most recent)
LAG_CAP = 1000


class SnapshotStore(Protocol):
    def save(self, position: Position, blob: bytes) -> None: ...
    def blobs(self) -> list[bytes]: ...


class Follower:
    def __init__(
        self,
        event_log: EventLog,
        live: LiveState,
        *,
        snapshots: SnapshotStore | None = None,
        snapshot_events: int = 100_000,
        snapshot_s: float = 300.0,
        retry_s: float = 0.5,
    ) -> None:
        self.log = event_log
        self.live = live
        self.snapshots = snapshots
        self.snapshot_events = snapshot_events
        self.snapshot_s = snapshot_s
        self.retry_s = retry_s
        self.position: Position = START
        self.records = 0  # records folded by this process
        self.duplicates = 0  # records skipped for an idempotency key already folded
        self.error: str | None = None  # the log's last error while it lasts (degraded)
        self.lag = 0  # records in the log not folded yet (refreshed by refresh_lag)
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._cond = threading.Condition()
        self._waiters: list[tuple[Position, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.monitor: Any = NO_MONITOR  # the server's stall monitor marks folds and snapshots

    # ------------------------------------------------------------------ start-up

    def restore(self) -> bool:
        """Adopt the newest usable snapshot. -> whether one was loaded."""
        if self.snapshots is None:
            return False
        base = self.live.state
        for blob in self.snapshots.blobs():
            try:
                snap = unpack(blob)
            except Exception as exc:
                log.warning("state snapshot unreadable (%s); trying an older one", exc)
                continue
            if snap.state.config != base.config or snap.state.n_items != base.n_items:
                log.warning("state snapshot at %s was folded for other features or catalogue; replaying the log", snap.position)
                continue
            snap.users.capacity = self.live.users.capacity  # this server's --max-users
            snap.state.forget_users(snap.users.trim())
            self.live.state, self.live.users, self.live.events_applied = snap.state, snap.users, snap.events_applied
            self._keys = OrderedDict.fromkeys(snap.keys)
            self.position = snap.position
            log.info("state snapshot at %s loaded (%d users, %d events applied)", snap.position, len(snap.users), snap.events_applied)
            return True
        return False

    def catch_up(self, limit: int = 5000) -> int:
        """Fold until the log has nothing newer (start-up replay). -> records folded."""
        recover = getattr(self.log, "recover", None)
        if recover is not None:
            torn = recover(self.position)
            if torn:
                log.warning("%s: truncated a torn tail of %d bytes (never acknowledged)", self.log.describe(), torn)
        total = 0
        while True:
            n = self.step(0.0, limit)
            total += n
            if not n:
                return total

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="state-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------ folding

    def step(self, block_s: float, limit: int = 1000) -> int:
        records = self.log.read(self.position, limit, block_s)
        batches: list[Record] = []
        for _, payload in records:
            events, key = decode(payload)
            if key and key in self._keys:
                self.duplicates += 1
                continue
            if key:
                self._keys[key] = None
                if len(self._keys) > MAX_KEYS:
                    self._keys.popitem(last=False)
            batches.append(events)
        if batches:
            with self.monitor.activity("fold"):
                self._fold(batches)
        self._since_snapshot += sum(replay_cost(b) for b in batches)
        if records:
            self.position = records[-1][0]
            self.records += len(records)
            self._wake()
        return len(records)

    def _fold(self, batches: list[Record]) -> None:
        """Records in log order; a run of records of one kind is folded as one batch when that cannot
        change the state (see _regroup_safe), so users are admitted in log order either way."""
        self.live.state.defer_merges()
        if self._regroup_safe(batches):
            runs = [list(run) for _, run in itertools.groupby(batches, type)]
        else:  # near the user bound: eviction depends on batch boundaries
            runs = [[batch] for batch in batches]
        for run in runs:
            if isinstance(run[0], ServedLists):
                self.live.apply_served(concat_served(cast(list[ServedLists], run)))
            else:
                self.live.apply(concat(cast(list[EventsInput], run)))
        self._merge_sparse()

    def _merge_sparse(self) -> None:
        """Sparse-map delta merges (an O(entries) copy: a second at 10M) are built here, outside the
        write lock, while requests read on; only the swap takes the lock. This thread is the state's
        only writer, so nothing changes the maps in between (install_merge refuses if something did)."""
        state = self.live.state
        merges = state.prepare_merges()
        if merges:
            with self.live.lock.write():
                state.install_merges(merges)

    def _regroup_safe(self, batches: list[Record]) -> bool:
        """May these records be folded as one batch? Only eviction (UserIndex at its bound) depends on
        batch boundaries; when every user they name fits under the bound, no grouping evicts anyone
        and one batch gives the state record-by-record folding gives."""
        users = self.live.users
        if users.capacity is None:
            return True
        new = {u for b in batches for u in b.user_ids if users.get(u) < 0}
        return len(users) + len(new) <= users.capacity

    def _run(self) -> None:
        lower_priority()  # folds and snapshots yield the core to the event loop
        while not self._stop.is_set():
            try:
                self.step(0.2)
                self.error = None
                self._maybe_snapshot()
            except StateUnavailable as exc:
                if self.error is None:
                    log.error("event log unavailable, serving from the state folded so far: %s", exc)
                self.error = str(exc)
                self._stop.wait(self.retry_s)
            except Exception:  # a record this code cannot fold must not stop the follower silently
                log.exception("state follower failed at %s; retrying", self.position)
                self.error = "the follower failed to fold a record; see the server log"
                self._stop.wait(self.retry_s)

    def _maybe_snapshot(self, force: bool = False) -> None:
        if self.snapshots is None or not self._since_snapshot:
            return
        due = self._since_snapshot >= self.snapshot_events or time.monotonic() - self._last_snapshot >= self.snapshot_s
        if force or due:
            self.snapshot()

    def snapshot(self) -> None:
        """Store the folded state with its position (call from the follower thread or when it is stopped)."""
        if self.snapshots is None:
            return
        with self.monitor.activity("snapshot"):
            self._store_snapshot()

    def _store_snapshot(self) -> None:
        assert self.snapshots is not None
        started = time.perf_counter()
        snap = Snapshot(self.position, self.live.state, self.live.users, self.live.events_applied, list(self._keys))
        self.snapshots.save(self.position, pack(snap))
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        log.info("state snapshot at %s stored in %.2fs", self.position, time.perf_counter() - started)

    def close(self) -> None:
        """Stop following and store a final snapshot (a clean restart replays nothing)."""
        self.stop()
        try:
            self._maybe_snapshot(force=True)
        except Exception as exc:
            log.warning("final state snapshot failed: %s", exc)

    # ------------------------------------------------------------------ read-your-writes

    def _wake(self) -> None:
        with self._cond:
            ready = [w for w in self._waiters if w[0] <= self.position]
            self._waiters = [w for w in self._waiters if w[0] > self.position]
        for _, loop, future in ready:
            loop.call_soon_threadsafe(_resolve, future)

    async def wait_for(self, position: Position, timeout_s: float | None) -> bool:
        """Until this process folded `position` (or timeout). -> whether it did."""
        if self.position >= position:
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self.position >= position:
                return True
            self._waiters.append((position, loop, future))
        try:
            await asyncio.wait_for(future, timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def refresh_lag(self) -> int:
        """Records in the log after what this process folded, counted up to LAG_CAP (a count beyond
        it would cost a read of the records); keeps the last value on errors."""
        try:
            self.lag = self.log.count_after(self.position, LAG_CAP)
        except StateUnavailable as exc:
            self.error = str(exc)
        return self.lag

    def status(self) -> dict[str, Any]:
        return {"backend": self.log.describe(), "position": self.position, "records": self.records,
                "lag": self.lag, "error": self.error or "", "duplicates": self.duplicates}


def replay_cost(record: Record) -> int:
    """What a record adds toward `snapshot_events` (which bounds the replay a start-up needs): its
    events, and one per served list, whose fold costs about what one event row's does, not what its
    impressions would as rows (bench/state.py, served lists). Counting impressions would store a
    snapshot every few seconds on a busy server (100 per Rank) for almost no replay time saved."""
    return len(record.counts) if isinstance(record, ServedLists) else len(record)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
