"""The shared event log: one Redis Stream (`--state redis://HOST:PORT/DB[?stream=NAME]`).

Appends are `XADD <stream> * p <payload>`, every record pending in this process pipelined in one
round trip (the group commit of `EventLog`); the Future resolves once Redis answered, so an append is
as durable as the Redis server makes it: with `appendonly yes` the entry is in the AOF before the
reply (`appendfsync always`: fsynced; `everysec`: a Redis process crash loses nothing, a host crash
up to one second). Replicas read with `XREAD BLOCK` from the id they applied last, so they fold the
same records in the same order. Positions are stream ids (ms, seq).

Connection errors become `StateUnavailable` (LogEvents: UNAVAILABLE); the follower retries.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

from recsys.compat import require
from recsys.errors import ConfigError
from recsys.state.log import START, EventLog, Position, StateUnavailable, format_position

log = logging.getLogger(__name__)
DEFAULT_STREAM = "recsys:events"
FIELD = b"p"


def _position(stream_id: bytes | str) -> Position:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class RedisLog(EventLog):
    kind = "redis"

    def __init__(self, url: str) -> None:
        super().__init__()
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"--state {url!r}: expected redis://HOST:PORT/DB (or rediss://, unix://)")
        redis = require("redis")
        query = parse_qs(parts.query)
        self.stream = query.pop("stream", [DEFAULT_STREAM])[0]
        base = url.split("?", 1)[0]
        self.url = base
        # Writes and quick reads; blocking XREADs get their own client (a blocked connection serves nobody).
        self._client: Any = redis.Redis.from_url(base, socket_timeout=5.0, socket_connect_timeout=2.0)
        self._reader: Any = redis.Redis.from_url(base, socket_timeout=30.0, socket_connect_timeout=2.0)
        self._errors = (redis.ConnectionError, redis.TimeoutError)

    def describe(self) -> str:
        return f"redis {self.url} stream {self.stream}"

    def check(self) -> str:
        """Ping Redis; -> its appendonly setting (the durability an acknowledgement carries)."""
        try:
            self._client.ping()
            return str(self._client.config_get("appendonly").get("appendonly", "unknown"))
        except self._errors as exc:
            raise StateUnavailable(f"cannot reach Redis at {self.url}: {exc}. Start it or fix --state") from exc
        except Exception:  # CONFIG may be disabled on managed Redis
            return "unknown"

    def _commit(self, payloads: list[bytes]) -> list[Position]:
        try:
            pipe = self._client.pipeline(transaction=False)
            for payload in payloads:
                pipe.xadd(self.stream, {FIELD: payload})
            ids = pipe.execute()
        except self._errors as exc:
            raise StateUnavailable(f"Redis at {self.url} is unreachable ({exc}); nothing was acknowledged") from exc
        return [_position(i) for i in ids]

    def read(self, after: Position, limit: int = 1000, block_s: float = 0.0) -> list[tuple[Position, bytes]]:
        client = self._reader if block_s > 0 else self._client
        try:
            reply = client.xread(
                {self.stream: format_position(after)}, count=limit, block=int(block_s * 1000) if block_s > 0 else None
            )
        except self._errors as exc:
            raise StateUnavailable(f"Redis at {self.url} is unreachable ({exc})") from exc
        if not reply:
            return []
        return [(_position(i), fields[FIELD]) for i, fields in reply[0][1]]

    def head(self) -> Position:
        try:
            info = self._client.xinfo_stream(self.stream)
        except self._errors as exc:
            raise StateUnavailable(f"Redis at {self.url} is unreachable ({exc})") from exc
        except Exception:  # no such stream yet
            return START
        return _position(info["last-generated-id"])

    def count_after(self, after: Position, cap: int = 100_000) -> int:
        try:
            return len(self._client.xrange(self.stream, min=f"({format_position(after)}", count=cap))
        except self._errors as exc:
            raise StateUnavailable(f"Redis at {self.url} is unreachable ({exc})") from exc

    def close(self) -> None:
        super().close()
        self._client.close()
        self._reader.close()
