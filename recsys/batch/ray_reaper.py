"""Stops what a local Ray instance left behind when its driver died without cleaning up.

`ray.shutdown()` (run by `ray_session` on return, errors, SIGTERM and SIGINT) stops a local instance.
A driver killed outright (SIGKILL, the OOM killer) runs no cleanup: GCS and raylet follow it, but
Ray's dashboard agent keeps running for good. So `ray_session` starts this small process first, in its
own session (a Ctrl-C to the terminal does not reach it), with a pipe from the driver on its stdin:

    python -m recsys.batch.ray_reaper DRIVER_PID SINCE

While the pipe is open it records the driver's descendants that belong to Ray (name or command line
mentions ray) and started after SINCE (the session's start, so nothing older is ever touched). When
the pipe closes (the session ended normally, or the driver died, however it died) it terminates the
recorded processes still alive (same pid and start time), waits 3 s, kills what is left, and exits.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys

import psutil

POLL_S = 0.3


def _is_ray(proc: psutil.Process) -> bool:
    try:
        return "ray" in proc.name().lower() or any("ray" in part.lower() for part in proc.cmdline())
    except psutil.Error:
        return False


def record(driver: psutil.Process, since: float, seen: dict[int, float]) -> None:
    """Add the driver's Ray descendants started after `since`: pid -> start time."""
    try:
        children = driver.children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        if child.pid in seen or child.pid == os.getpid():  # never itself (its command line names ray_reaper)
            continue
        try:
            started = child.create_time()
        except psutil.Error:
            continue
        if started >= since and _is_ray(child):
            seen[child.pid] = started


def sweep(seen: dict[int, float], grace_s: float = 3.0) -> list[int]:
    """Terminate, then kill, the recorded processes still running; -> the pids it signalled."""
    alive = []
    for pid, started in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                proc.terminate()
                alive.append(proc)
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [p.pid for p in alive]


def main(argv: list[str]) -> int:
    driver = psutil.Process(int(argv[0]))
    since = float(argv[1])
    seen: dict[int, float] = {}
    while True:
        record(driver, since, seen)
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 1 << 10):  # EOF: the driver closed the pipe or died
            break
    record(driver, since, seen)  # a driver that closed the pipe normally is still there to ask
    sweep(seen)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
