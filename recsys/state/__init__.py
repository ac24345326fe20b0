"""Online state shared by restarts and replicas: an event log every server process folds.

    LogEvents / StreamEvents / served lists --append--> EventLog --read in order--> Follower
                                                                    └─ LiveState.apply / apply_served (FeatureState)

One `EventLog` interface (`recsys.state.log`), three backends:

* `Journal` (`--state-dir DIR`, the embedded default for one server): an append-only file of
  CRC-framed records, fsynced before an append is acknowledged (group commit: one fsync for every
  append pending at that moment); a torn tail left by kill -9 is detected by its CRC and truncated.
* `RedisLog` (`--state redis://HOST:PORT/DB`, shared by replicas): one Redis Stream, `XADD` per
  append (pipelined across concurrent appends); durable as far as the Redis server's AOF is
  (`appendonly yes`; `appendfsync always` for fsync-before-reply, `everysec` loses at most one second
  on a host crash, nothing on a Redis process crash).
* `MemoryLog` (neither flag): in-process only, nothing survives a restart (tests, quick trials).

A position is where a record ends in the log: a comparable pair (journal: byte offset, 0; Redis:
stream id ms, seq), written as a string consistency token in LogEvents replies. Snapshots of the
folded state are stored with the position they include (`recsys.state.snapshot`), so a start loads
the latest one and replays only the tail.
"""

from __future__ import annotations

from recsys.state.log import EventLog, MemoryLog, Position, StateUnavailable, format_position, parse_position

__all__ = ["EventLog", "MemoryLog", "Position", "StateUnavailable", "format_position", "open_log", "parse_position"]


def open_log(state: str | None, state_dir: str | None) -> EventLog:
    """The event log a server (or `recsys state export`) uses: Redis when `state` is a redis:// URL,
    else the journal under `state_dir`, else an in-memory log."""
    if state:
        from recsys.state.redis_log import RedisLog

        return RedisLog(state)
    if state_dir:
        from recsys.state.journal import Journal

        return Journal(state_dir)
    return MemoryLog()
