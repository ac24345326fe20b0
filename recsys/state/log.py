"""The `EventLog` interface and the parts every backend shares: positions, group commit, errors.

`append(payload)` hands a record to a committer thread and returns a Future of its position, set only
once the record is durable (backend `_commit`). The committer takes every record pending at that
moment and commits them together (one fsync, one pipelined round trip), so concurrent appends share
the cost: group commit, as in database write-ahead logs. `read(after, ...)` returns records in log
order, blocking up to `block_s` for new ones; every reader sees the same order.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import ClassVar

from recsys.errors import InputError, RecsysError

Position = tuple[int, int]  # comparable: (byte offset, 0) in a journal, (ms, seq) of a Redis stream id
START: Position = (0, 0)
MAX_GROUP = 4096  # records per commit
MAX_PENDING = 100_000  # records waiting for a commit before appends are refused (a log that stopped answering)


class StateUnavailable(RecsysError):
    """The event log cannot be reached (Redis down, disk error): nothing was acknowledged."""


def format_position(position: Position) -> str:
    return f"{position[0]}-{position[1]}"


def parse_position(token: str, field: str = "consistency_token") -> Position:
    """A consistency token (`format_position`) -> Position; InputError names the field."""
    first, sep, second = token.partition("-")
    if not sep or not first.isdigit() or not second.isdigit():
        raise InputError(f"{field} {token[:64]!r} is not a token this service issued (expected N-M, from a LogEvents reply)")
    return int(first), int(second)


class EventLog:
    """Base of the backends: the committer thread and the read/commit contract."""

    kind: ClassVar[str] = "log"
    durable: ClassVar[bool] = True

    def __init__(self) -> None:
        self._pending: list[tuple[bytes, Future[Position]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._committer: threading.Thread | None = None
        self.appended = 0  # records this process appended
        self.commits = 0  # group commits (fsyncs / pipelined round trips) that carried them

    # ------------------------------------------------------------------ writing

    def append(self, payload: bytes) -> Future[Position]:
        """Queue one record; the Future resolves to its position once durable (or to the error)."""
        future: Future[Position] = Future()
        future.set_running_or_notify_cancel()  # a caller giving up cannot cancel a record already queued
        with self._cond:
            if self._closed:
                raise StateUnavailable(f"the {self.kind} event log is closed")
            if len(self._pending) >= MAX_PENDING:
                raise StateUnavailable(f"the {self.kind} event log has {len(self._pending)} records waiting to be "
                                       "stored (it stopped answering); nothing was acknowledged")
            if self._committer is None:
                self._committer = threading.Thread(target=self._commit_loop, name=f"{self.kind}-commit", daemon=True)
                self._committer.start()
            self._pending.append((payload, future))
            self._cond.notify()
        return future

    def append_wait(self, payload: bytes, timeout: float | None = None) -> Position:
        return self.append(payload).result(timeout)

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
            try:
                positions = self._commit([payload for payload, _ in group])
            except Exception as exc:
                error = exc if isinstance(exc, StateUnavailable) else StateUnavailable(
                    f"the {self.kind} event log refused the append ({type(exc).__name__}: {exc}); nothing was acknowledged"
                )
                for _, future in group:
                    future.set_exception(error)
                continue
            self.appended += len(group)
            self.commits += 1
            for (_, future), position in zip(group, positions, strict=True):
                future.set_result(position)

    def _commit(self, payloads: list[bytes]) -> list[Position]:
        """Make the records durable, in order; return their positions."""
        raise NotImplementedError

    # ------------------------------------------------------------------ reading

    def read(self, after: Position, limit: int = 1000, block_s: float = 0.0) -> list[tuple[Position, bytes]]:
        """Up to `limit` records after `after`, in log order; waits up to block_s when there are none."""
        raise NotImplementedError

    def head(self) -> Position:
        """The position of the last durable record (START when empty)."""
        raise NotImplementedError

    def count_after(self, after: Position, cap: int = 100_000) -> int:
        """Records after `after` (at most `cap`): a replica's lag."""
        return len(self.read(after, cap))

    def describe(self) -> str:
        return self.kind

    def close(self) -> None:
        """Commit what is pending, then stop the committer."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._committer is not None:
            self._committer.join()


class MemoryLog(EventLog):
    """In-process log: the same code path as the durable ones, nothing survives the process."""

    kind = "memory"
    durable = False

    def __init__(self) -> None:
        super().__init__()
        self._records: list[bytes] = []
        self._grown = threading.Condition()

    def _commit(self, payloads: list[bytes]) -> list[Position]:
        with self._grown:
            start = len(self._records)
            self._records.extend(payloads)
            self._grown.notify_all()
        return [(start + i + 1, 0) for i in range(len(payloads))]

    def read(self, after: Position, limit: int = 1000, block_s: float = 0.0) -> list[tuple[Position, bytes]]:
        with self._grown:
            if len(self._records) <= after[0] and block_s > 0:
                self._grown.wait(block_s)
            chunk = self._records[after[0] : after[0] + limit]
        return [((after[0] + i + 1, 0), p) for i, p in enumerate(chunk)]

    def head(self) -> Position:
        return (len(self._records), 0)
