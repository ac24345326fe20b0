"""File utilities shared by every command that writes: hashing, atomic JSON writes, timestamps.

Also the one output-safety mechanism: an exclusive lock file next to every output (`output_lock`),
cleanup of what killed runs left (`recover_output`), moving a finished temp into place (`replace_path`),
refusing output paths that hold something we did not write (`check_output_path`), and named fault
points for the kill -9 tests (`fault_point`). Imports only recsys.errors (a leaf), so the registry,
the embedding store and the batch manifest can all use it without importing each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from recsys.errors import InputError


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write to a temp file in the same directory, fsync, then os.replace (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as fh:
        json.dump(payload, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------
# Output safety: one lock mechanism, stale temp cleanup, "replace only what we wrote", fault points
# --------------------------------------------------------------------------------------------------


def lock_path_for(path: Path) -> Path:
    """The lock file of an output: `.NAME.lock` next to it (so it survives the output's replacement)."""
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def file_lock(lock_file: Path, *, what: str, wait: bool = False, command: str | None = None) -> Iterator[None]:
    """Hold an exclusive fcntl lock on `lock_file` for the block; the file exists only while held.

    The holder writes its pid, host, command and start time into the file, so a second writer that
    does not `wait` fails at once with an InputError naming the holder (exit 2). The kernel drops the
    lock when the holder dies (kill -9 included), so a lock is never stale. The holder unlinks the file
    before unlocking; a waiter that then wins the lock on the unlinked file sees that its inode is no
    longer the path's and retries on a fresh file (the usual lock-file protocol).
    """
    fd = _acquire(lock_file, what, wait)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now(),
                "command": command or " ".join(sys.argv[:6])}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_file)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire(lock_file: Path, what: str, wait: bool) -> int:
    while True:
        try:
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            blocker = next((p for p in lock_file.parents if p.exists()), None)
            why = f"{blocker} is a file, not a directory" if blocker and not blocker.is_dir() else exc.strerror or exc
            raise InputError(
                f"cannot write {what}: creating the lock file {lock_file} failed ({why}). "
                "Fix: choose an output path in a writable directory."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that is starting"
            os.close(fd)
            raise InputError(
                f"{what} is locked by another run ({holder}; lock file {lock_file}). Fix: wait for that run to "
                "finish, or write to another path."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)  # the previous holder removed this file as we got it: lock the new one


@contextlib.contextmanager
def output_lock(path: Path, *, what: str | None = None, wait: bool = False) -> Iterator[None]:
    """Exclusive writer lock on an output path (file or directory), then clean up after killed runs:
    a `.NAME.old` left between the two renames of `replace_path` is moved back when NAME is missing
    (else removed), and stale `.NAME.tmp*` / `.NAME.*.tmp` are removed. Never read as data."""
    path = Path(path)
    with file_lock(lock_path_for(path), what=what or f"output {path}", wait=wait):
        recover_output(path)
        yield


def _temps(path: Path) -> list[Path]:
    if not path.parent.is_dir():
        return []
    name = path.name
    return [p for p in path.parent.iterdir()
            if p.name.startswith(f".{name}.tmp") or (p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_output(path: Path) -> list[str]:
    """Undo what a killed writer of `path` left behind (call with the output's lock held)."""
    actions = []
    old = path.parent / f".{path.name}.old"
    if old.exists() and not path.exists():
        os.rename(old, path)
        actions.append(f"restored {path} from {old.name}")
    elif old.exists():
        _remove(old)
        actions.append(f"removed {old.name}")
    for stale in _temps(path):
        _remove(stale)
        actions.append(f"removed {stale.name}")
    return actions


def temp_path(path: Path) -> Path:
    """Where to build `path` before `replace_path` moves it in (same directory: renames stay atomic)."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def replace_path(tmp: Path, path: Path) -> None:
    """Move the finished `tmp` over `path` (call with the output's lock held). A file is replaced
    atomically; a directory is moved aside to `.NAME.old` first, so a kill between the two renames
    leaves the previous output in `.NAME.old`, which the next `output_lock` moves back."""
    if path.is_dir() and not path.is_symlink():
        old = path.parent / f".{path.name}.old"
        _remove(old)
        os.rename(path, old)
        fault_point("replace:aside")
        os.rename(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_path(
    path: Path, *, ours: Callable[[Path], bool], kind: str, inputs: Sequence[Path] = (), overwrite: bool = False
) -> None:
    """Refuse (InputError, exit 2) an output path that would destroy something we did not write.

    `path` may be missing, an empty directory, or a previous output recognised by `ours`; anything
    else (a file, another directory) needs `overwrite`. An input path, or a directory holding one, is
    never an output, whatever the flags. A path whose parent cannot hold it is refused up front.
    """
    path = Path(path)
    resolved = path.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if _inside(source, resolved):
            rel = "is" if source == resolved else "contains"
            raise InputError(
                f"--out {path} {rel} the input {given}: writing the {kind} there would delete the input. "
                f"Fix: choose an output path outside the inputs (e.g. {resolved.parent / (resolved.name + '_out')})."
            )
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"--out {path}: {parent} is a file, not a directory. Fix: choose an output path in a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {path}: the directory {parent} is not writable. Fix: choose a writable output path.")
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and (not any(path.iterdir()) or ours(path)):
        return
    if overwrite:
        return
    what = "a file" if path.is_file() else "a directory that is not a previous " + kind
    raise InputError(
        f"--out {path} is {what}; refusing to replace it. Fix: pass an empty or new path, or --overwrite to "
        f"replace it (inputs are never replaced)."
    )


def fault_point(name: str) -> None:
    """Fault injection for tests: `RECSYS_FAULT_AT=name` makes the process SIGKILL itself here."""
    if os.environ.get("RECSYS_FAULT_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
