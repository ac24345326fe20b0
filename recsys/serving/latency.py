"""Where a request's milliseconds go: per-stage histograms and an event-loop stall monitor.

Stages (`recsys_stage_seconds{rpc, stage}`), in request order: `parse` (protobuf decoding of the
request, in the method's deserializer), `validate` (edge checks, routing, id lookup), `cold_encode`
(waiting for the cold-text batcher), `user_tower`, `features`, `lightgbm`, `topk`, `reply` (building
the reply message), `exposure` (appending the served list to the exposure log and the event log) and
`serialise` (protobuf encoding, in the method's serializer). `pool_wait` is the time a request sent to
the worker pool waited for a thread. A `StageClock` is one request's stopwatch: each `lap(stage)`
observes the time since the previous lap (about a microsecond each).

The stall monitor records every event-loop callback that ran longer than a threshold (1 ms in the
bench), with what it was (the task's coroutine chain or the callback), the garbage collections that
ran inside it (generation, pause) and what the process's background threads were doing meanwhile
(exposure flush, event-log append, fold, snapshot): a thread holding the GIL stalls the loop as
surely as the loop's own work. It times `asyncio.Handle._run` of the monitored loop only (one
attribute read per callback elsewhere) and listens on `gc.callbacks`; `activity(name)` marks
background work. `timeline()` is the record; `recsys serve --stall-log FILE` writes it at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STAGES = (
    "parse", "validate", "cold_encode", "pool_wait", "user_tower", "features", "lightgbm", "topk", "reply", "exposure",
    "serialise",
)
# 10 us .. 100 ms: stages are small; the tail is what matters.
STAGE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


BACKGROUND_NICE = 10  # niceness of a server's background threads (the request path stays at the process's)


def lower_priority(nice: int = BACKGROUND_NICE) -> None:
    """Lower the calling thread's scheduling priority (Linux: threads have their own niceness).

    A server's background threads (exposure flush, event-log appends, the follower's folds and
    snapshots) otherwise take the core from the event loop for a whole scheduler slice, 3-5 ms, when
    they wake up beside it; niced, the loop preempts them as soon as it has work. The GIL they may
    hold when preempted is handed over within the switch interval the server sets (0.5 ms)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or not permitted: leave it as is
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, min(current + nice, 19)))


class StageClock:
    """One request's stopwatch: lap(stage) observes the seconds since the previous lap (or start)."""

    __slots__ = ("_children", "_last")

    def __init__(self, children: dict[str, Any]) -> None:
        self._children = children
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self._children[stage].observe(now - self._last)
        self._last = now

    def restart(self) -> None:
        """Start the next lap now (time since the last lap belongs to no stage)."""
        self._last = time.perf_counter()


class _NoClock:
    def lap(self, stage: str) -> None:
        pass

    def restart(self) -> None:
        pass


NO_CLOCK: Any = _NoClock()


# ------------------------------------------------------------------------------------------- stalls

_FIELDS = ("t_s", "unix_s", "ms", "cpu_ms", "what", "gc", "background", "cause")
_MONITORS: dict[asyncio.AbstractEventLoop, StallMonitor] = {}
_original_run: Callable[[asyncio.Handle], None] | None = None


def _timed_run(handle: asyncio.Handle) -> None:
    assert _original_run is not None
    monitor = _MONITORS.get(handle._loop) if _MONITORS else None  # type: ignore[attr-defined]
    if monitor is None:
        _original_run(handle)
        return
    start, cpu = time.perf_counter(), time.thread_time()
    try:
        _original_run(handle)
    finally:
        end = time.perf_counter()
        if end - start >= monitor.threshold_s:
            monitor._stall(handle, start, end, time.thread_time() - cpu)


def describe(handle: asyncio.Handle) -> str:
    """What a loop callback runs: a task's coroutine chain (outermost first), else the callback's name."""
    callback = handle._callback  # type: ignore[attr-defined]
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        names: list[str] = []
        coro: Any = owner.get_coro()
        while coro is not None and len(names) < 6:
            name = getattr(coro, "__qualname__", None) or type(coro).__name__
            names.append(name)
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        return "task " + " > ".join(names)
    target = getattr(callback, "func", callback)  # functools.partial
    return getattr(target, "__qualname__", None) or repr(target)


class StallMonitor:
    """Loop callbacks longer than `threshold_s`, with the GC pauses and background work around them."""

    def __init__(self, threshold_s: float = 0.001, capacity: int = 20_000, on_stall: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.threshold_s = threshold_s
        self.on_stall = on_stall
        self.started = time.perf_counter()
        self.stalls: deque[tuple[Any, ...]] = deque(maxlen=capacity)
        self.count = 0
        self.gc_pauses: deque[tuple[float, float, int]] = deque(maxlen=4096)  # (start, end, generation)
        self._gc_start: dict[int, float] = {}
        self._activities: deque[tuple[float, float, str]] = deque(maxlen=4096)  # finished background work
        self._running: dict[int, tuple[float, str]] = {}  # id -> (start, name) of background work in progress
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- install

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        global _original_run
        if _original_run is None:
            _original_run = asyncio.Handle._run
            asyncio.Handle._run = _timed_run  # type: ignore[method-assign,assignment]
        self._loop = loop
        _MONITORS[loop] = self
        gc.callbacks.append(self._gc)

    def uninstall(self) -> None:
        if self._loop is not None:
            _MONITORS.pop(self._loop, None)
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._gc)

    # ---------------------------------------------------------------- sources

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        ident = threading.get_ident()
        if phase == "start":
            self._gc_start[ident] = now
        else:
            start = self._gc_start.pop(ident, now)
            if now - start >= 1e-4:
                self.gc_pauses.append((start, now, int(info.get("generation", -1))))

    @contextlib.contextmanager
    def activity(self, name: str) -> Iterator[None]:
        """Mark background work (any thread) so stalls that overlap it name it."""
        key = id(object())
        start = time.perf_counter()
        with self._lock:
            self._running[key] = (start, name)
        try:
            yield
        finally:
            end = time.perf_counter()
            with self._lock:
                self._running.pop(key, None)
                self._activities.append((start, end, name))

    # ---------------------------------------------------------------- record

    def _stall(self, handle: asyncio.Handle, start: float, end: float, cpu_s: float) -> None:
        gcs = [(g, round((min(e, end) - max(s, start)) * 1000, 3)) for s, e, g in list(self.gc_pauses)[-32:] if e > start and s < end]
        with self._lock:
            background = sorted({n for s, e, n in list(self._activities)[-64:] if e > start and s < end}
                                | {n for s, n in self._running.values() if s < end})
        record = {
            "t_s": round(start - self.started, 4),
            "unix_s": round(time.time() - (end - start), 4),
            "ms": round((end - start) * 1000, 3),
            "cpu_ms": round(cpu_s * 1000, 3),  # the loop thread's own CPU time: the rest it waited (GIL, scheduler)
            "what": describe(handle),
            "gc": [{"generation": g, "ms": ms} for g, ms in gcs],
            "background": background,
        }
        record["cause"] = cause(record)
        self.count += 1
        # Kept as a tuple of tuples of numbers and strings, which the cyclic collector stops tracking:
        # 20,000 kept dicts would make its full passes (the stalls this records) longer.
        self.stalls.append((*(record[k] for k in _FIELDS[:5]), tuple(gcs), tuple(background), record["cause"]))
        if self.on_stall is not None:
            self.on_stall(record)

    def timeline(self) -> list[dict[str, Any]]:
        out = []
        for kept in list(self.stalls):
            record = dict(zip(_FIELDS, kept, strict=True))
            record["gc"] = [{"generation": g, "ms": ms} for g, ms in record["gc"]]
            record["background"] = list(record["background"])
            out.append(record)
        return out

    def write(self, path: Path) -> None:
        """The timeline as JSON (temp + rename): threshold, stall count, the most recent stalls."""
        from recsys.files import write_json_atomic

        write_json_atomic(Path(path), {"threshold_ms": self.threshold_s * 1000, "count": self.count, "stalls": self.timeline()})


def cause(record: dict[str, Any]) -> str:
    """One word for a stall. `gc`: collections took half of it. Off the CPU for half of it (the loop
    thread's CPU time below half the wall time): `gil:<work>` when background work overlapped it (a
    thread held the GIL or the core), else `preempted` (another process or the VM took the core).
    Else the loop's own work: `rpc` (a request's inline work, a task step) or `callback`."""
    if sum(g["ms"] for g in record["gc"]) >= record["ms"] / 2:
        return "gc"
    if record["cpu_ms"] < record["ms"] / 2:
        return "gil:" + "+".join(record["background"]) if record["background"] else "preempted"
    return "rpc" if record["what"].startswith("task ") else "callback"


class _NoMonitor:
    @contextlib.contextmanager
    def activity(self, name: str) -> Iterator[None]:
        yield


NO_MONITOR: Any = _NoMonitor()
