"""Snapshots of the folded state with the log position they include.

A snapshot is one uncompressed .npz blob: the FeatureState as `FeatureState.save` writes it
(state.npz + state.json, embedded as bytes), the user index (row -> user id, free rows, last-active
times: eviction must continue exactly as before the restart) and live.json (position, events
applied, recent idempotency keys). Stores: a directory (`<state-dir>/snapshots/`, temp + fsync +
rename, the newest two kept) and, for a Redis log, one Redis hash beside the stream (written only
when newer than what it holds), so a new replica on another machine starts from it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.features import FeatureState
from recsys.serving.users import UserIndex
from recsys.state.log import Position, format_position

log = logging.getLogger(__name__)
KEEP = 2


@dataclass
class Snapshot:
    position: Position
    state: FeatureState
    users: UserIndex
    events_applied: int
    keys: list[str]


def pack(snapshot: Snapshot) -> bytes:
    with tempfile.TemporaryDirectory(prefix="recsys-snap-") as tmp:
        snapshot.state.save(tmp)
        state_npz = Path(tmp, "state.npz").read_bytes()
        state_json = Path(tmp, "state.json").read_bytes()
    users = snapshot.users
    live = {
        "position": list(snapshot.position),
        "user_ids": users.ids,
        "free_rows": users.free,
        "evicted": users.evicted,
        "events_applied": snapshot.events_applied,
        "keys": snapshot.keys,
    }
    buf = io.BytesIO()
    np.savez(
        buf,
        state_npz=np.frombuffer(state_npz, np.uint8),
        state_json=np.frombuffer(state_json, np.uint8),
        live_json=np.frombuffer(json.dumps(live).encode(), np.uint8),
        user_active=users.active,
    )
    return buf.getvalue()


def unpack(blob: bytes) -> Snapshot:
    npz = np.load(io.BytesIO(blob), allow_pickle=False)
    with tempfile.TemporaryDirectory(prefix="recsys-snap-") as tmp:
        Path(tmp, "state.npz").write_bytes(npz["state_npz"].tobytes())
        Path(tmp, "state.json").write_bytes(npz["state_json"].tobytes())
        state = FeatureState.load(tmp)
    live = json.loads(npz["live_json"].tobytes())
    users = UserIndex([], state)
    users.ids = list(live["user_ids"])
    users.rows = {u: i for i, u in enumerate(users.ids) if u is not None}
    users.active = np.asarray(npz["user_active"], np.int64)
    users.free, users.evicted = [int(r) for r in live["free_rows"]], int(live["evicted"])
    return Snapshot(
        position=(int(live["position"][0]), int(live["position"][1])),
        state=state,
        users=users,
        events_applied=int(live["events_applied"]),
        keys=list(live["keys"]),
    )


class DirSnapshots:
    """snapshots/snap-<a>-<b>.npz under the state directory."""

    def __init__(self, state_dir: Path | str) -> None:
        self.dir = Path(state_dir) / "snapshots"
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".snap-*.tmp"):
            stale.unlink(missing_ok=True)

    def _files(self) -> list[tuple[Position, Path]]:
        out = []
        for path in self.dir.glob("snap-*.npz"):
            a, _, b = path.stem.removeprefix("snap-").partition("-")
            if a.isdigit() and b.isdigit():
                out.append(((int(a), int(b)), path))
        return sorted(out)

    def save(self, position: Position, blob: bytes) -> None:
        final = self.dir / f"snap-{format_position(position)}.npz"
        tmp = self.dir / f".snap-{format_position(position)}-{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
        for _, old in self._files()[:-KEEP]:
            old.unlink(missing_ok=True)

    def blobs(self) -> list[bytes]:
        """Newest first (a damaged newest one falls back to the one before)."""
        return [path.read_bytes() for _, path in reversed(self._files())]


class RedisSnapshots:
    """One hash `<stream>:snapshot` {position, blob}, replaced only by a newer position."""

    def __init__(self, client: Any, stream: str) -> None:
        self.client = client
        self.key = f"{stream}:snapshot"

    def save(self, position: Position, blob: bytes) -> None:
        import redis

        with self.client.pipeline() as pipe:
            try:
                pipe.watch(self.key)
                held = pipe.hget(self.key, "position")
                if held is not None and tuple(int(x) for x in held.decode().split("-")) >= position:
                    return
                pipe.multi()
                pipe.hset(self.key, mapping={"position": format_position(position), "blob": blob})
                pipe.execute()
            except redis.WatchError:  # another replica stored one meanwhile
                return

    def blobs(self) -> list[bytes]:
        blob = self.client.hget(self.key, "blob")
        return [] if blob is None else [blob]
