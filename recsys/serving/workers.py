"""`recsys serve --workers N`: N server processes on one port (SO_REUSEPORT), the pattern of grpc's
multiprocessing example. The kernel spreads incoming connections over the processes; each runs the
whole server (its own event loop, models and FeatureState) and folds the same Redis event log, so a
machine is a small replica set. The embedded journal has one writer, hence N > 1 needs --state redis.

The parent reserves the port (bound with SO_REUSEPORT, never listening), starts the children
(multiprocessing spawn: no state shared by fork), writes the ready file once every child serves
({"port", "pids", "metrics_ports"}), restarts a child that dies (it replays from the log), and on
SIGTERM/SIGINT passes the signal on and waits for every child's graceful drain. With --exposure-dir
DIR, worker i owns DIR/worker-<i> (an exposure directory has one writer): pass each to `recsys
retrain --exposures`; a served list is written once, by the worker that served it.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from recsys.errors import ConfigError
from recsys.files import write_json_atomic
from recsys.serving.config import ServeConfig

log = logging.getLogger("recsys.serving")
READY_TIMEOUT_S = 300.0


def _reserve_port(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot reserve {host}:{port} for the workers: {exc}") from exc
    return sock


def _child(config: ServeConfig, index: int, queue: Any) -> None:
    import asyncio

    from recsys.serving.server import serve

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s")

    def ready(port: int, metrics_port: int | None) -> None:
        queue.put((index, port, metrics_port))

    asyncio.run(serve(config, ready))


def serve_workers(config: ServeConfig, workers: int, ready_file: Path | None) -> int:
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if config.state is None:
        raise ConfigError(
            f"--workers {workers} needs a shared event log: pass --state redis://HOST:PORT/DB. The embedded "
            "journal (--state-dir) has one writer process, and without either flag each process would keep "
            "its own events"
        )
    reserved = _reserve_port(config.host, config.port)
    port = int(reserved.getsockname()[1])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    configs = [
        dataclasses.replace(
            config, port=port, reuse_port=True,
            metrics_port=None if config.metrics_port is None else (config.metrics_port + i if config.metrics_port else 0),
            exposure_dir=None if config.exposure_dir is None else config.exposure_dir / f"worker-{i}",
        )
        for i in range(workers)
    ]
    procs = [ctx.Process(target=_child, args=(c, i, queue), name=f"recsys-serve-{i}") for i, c in enumerate(configs)]
    for p in procs:
        p.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        _await_ready(procs, queue, ready_file=ready_file, port=port, stop=stop)
        _supervise(procs, configs, queue, ctx=ctx, stop=stop)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each child drains gracefully
        for p in procs:
            p.join(config.grace_s + 30)
        reserved.close()
    return 0


def _await_ready(procs: list[Any], queue: Any, *, ready_file: Path | None, port: int, stop: threading.Event) -> None:
    metrics: dict[int, int | None] = {}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(metrics) < len(procs):
        if stop.is_set():
            return
        dead = [p.name for p in procs if p.exitcode is not None]
        if dead or time.monotonic() > deadline:
            raise ConfigError(f"worker(s) {', '.join(dead) or 'all'} did not start; see the log above")
        try:
            index, _, metrics_port = queue.get(timeout=0.2)
        except Exception:
            continue
        metrics[index] = metrics_port
    log.info("%d workers serving on port %d", len(procs), port)
    if ready_file is not None:
        write_json_atomic(ready_file, {"port": port, "pids": [p.pid for p in procs],
                                 "metrics_ports": [metrics[i] for i in range(len(procs))], "pid": procs[0].pid})


def _supervise(procs: list[Any], configs: list[ServeConfig], queue: Any, *, ctx: Any, stop: threading.Event) -> None:
    """Restart a worker that died (kill -9, OOM): it replays the log and rejoins the port."""
    while not stop.wait(0.5):
        for i, p in enumerate(procs):
            if p.exitcode is not None:
                log.error("worker %d (pid %s) exited with %s; restarting it", i, p.pid, p.exitcode)
                procs[i] = ctx.Process(target=_child, args=(configs[i], i, queue), name=f"recsys-serve-{i}")
                procs[i].start()
