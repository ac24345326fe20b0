"""The embedded event log: one append-only file of CRC-framed records under the state directory.

    <state-dir>/events.journal   records: b"RSJ1" | u32 length | u32 crc32(payload) | payload
    <state-dir>/journal.lock     flock held by the one process that writes the journal

An append is acknowledged after write + fsync (group commit: every record pending when the committer
wakes shares one write and one fsync). Readers see only fsynced records. A kill -9 can leave a torn
last group (a short header or payload, or a CRC mismatch): `recover` truncates it, which loses nothing
acknowledged, because nothing in that group was acknowledged. A bad record with valid records after
it is not a torn tail but damage: recovery refuses to truncate and names the offset.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import zlib
from pathlib import Path

from recsys.errors import InputError, ModelError
from recsys.state.log import START, EventLog, Position, StateUnavailable

MAGIC = b"RSJ1"
HEADER = struct.Struct("<4sII")
JOURNAL = "events.journal"
CHUNK = 4 << 20


class Journal(EventLog):
    kind = "journal"

    def __init__(self, state_dir: Path | str, readonly: bool = False) -> None:
        """readonly: a reader beside the writing server (`recsys state export`): no lock, no appends,
        whole valid records up to the current end of the file."""
        super().__init__()
        self.dir = Path(state_dir)
        self.path = self.dir / JOURNAL
        self._end: int | None = None  # end of the valid records, known after recover()
        self._durable = threading.Condition()
        self._durable_end = 0
        self._lock_fd = -1
        if readonly:
            if not self.path.is_file():
                raise InputError(f"{self.path} does not exist: pass the --state-dir a server wrote its journal to")
            self._fd = os.open(self.path, os.O_RDONLY)
            self._closed = True
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.dir / "journal.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ModelError(
                f"the event journal in {self.dir} is in use by another process: one server writes a journal "
                "(for several processes use --state redis://HOST:PORT/DB)"
            ) from None
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if created:
            dir_fd = os.open(self.dir, os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)

    def describe(self) -> str:
        return f"journal {self.path}"

    # ------------------------------------------------------------------ recovery

    def recover(self, after: Position = START) -> int:
        """Find the end of the valid records scanning from `after` (a known-good position, e.g. a
        snapshot's); truncate a torn tail. -> bytes truncated."""
        size = os.fstat(self._fd).st_size
        offset = after[0]
        if offset > size:
            raise ModelError(
                f"{self.path} is {size} bytes but the state snapshot includes records up to byte {offset}: "
                "the journal was replaced or truncated; remove the snapshots under "
                f"{self.dir / 'snapshots'} to replay the journal from its start"
            )
        while True:
            _, offset_next = self._parse(offset, size, 10_000)
            if offset_next == offset:
                break
            offset = offset_next
        torn = size - offset
        if torn:
            if self._valid_record_after(offset + 1, size):
                raise ModelError(
                    f"{self.path}: damaged record at byte {offset} with valid records after it (not a torn tail "
                    "from a crash). Copy the file aside and truncate it at that byte to keep what precedes it"
                )
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
        self._end = offset
        with self._durable:
            self._durable_end = offset
        return torn

    def _valid_record_after(self, start: int, size: int) -> bool:
        data = os.pread(self._fd, size - start, start)
        at = data.find(MAGIC)
        while at >= 0:
            if self._parse(start + at, size, 1)[0]:
                return True
            at = data.find(MAGIC, at + 1)
        return False

    # ------------------------------------------------------------------ the log

    def _commit(self, payloads: list[bytes]) -> list[Position]:
        if self._end is None:
            self.recover(START)
        assert self._end is not None
        frames, positions, end = [], [], self._end
        for payload in payloads:
            frames.append(HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)))
            frames.append(payload)
            end += HEADER.size + len(payload)
            positions.append((end, 0))
        data = b"".join(frames)
        try:
            written = os.pwrite(self._fd, data, self._end)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            os.fsync(self._fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)
            raise StateUnavailable(f"cannot append to {self.path}: {exc}; nothing was acknowledged") from exc
        self._end = end
        with self._durable:
            self._durable_end = end
            self._durable.notify_all()
        return positions

    def _parse(self, offset: int, end: int, limit: int) -> tuple[list[tuple[Position, bytes]], int]:
        """Whole valid records in [offset, end), at most `limit` -> (records, offset after them)."""
        out: list[tuple[Position, bytes]] = []
        while len(out) < limit and offset < end:
            data = os.pread(self._fd, min(CHUNK, end - offset), offset)
            at = 0
            while len(out) < limit and at + HEADER.size <= len(data):
                magic, length, crc = HEADER.unpack_from(data, at)
                stop = at + HEADER.size + length
                if magic != MAGIC or offset + stop > end:
                    return out, offset + at
                if stop > len(data):  # a record larger than what this chunk read
                    data = os.pread(self._fd, stop - at, offset + at)
                    offset, at, stop = offset + at, 0, stop - at
                payload = bytes(data[at + HEADER.size : stop])
                if zlib.crc32(payload) != crc:
                    return out, offset + at
                out.append(((offset + stop, 0), payload))
                at = stop
            if at == 0:
                return out, offset
            offset += at
        return out, offset

    def read(self, after: Position, limit: int = 1000, block_s: float = 0.0) -> list[tuple[Position, bytes]]:
        with self._durable:
            if self._end is None:  # a reader before any recovery (export, follower start): trust the file
                end = os.fstat(self._fd).st_size
            else:
                if self._durable_end <= after[0] and block_s > 0:
                    self._durable.wait(block_s)
                end = self._durable_end
        return self._parse(after[0], end, limit)[0]

    def head(self) -> Position:
        if self._end is None:
            return (os.fstat(self._fd).st_size, 0)
        return (self._durable_end, 0)

    def close(self) -> None:
        super().close()
        os.close(self._fd)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
