"""`python bench/serve.py --compare-workers 2`: `recsys serve --workers 1` vs `--workers N` in one run.

Both servers fold the same Redis event log (--state, a local redis-server; --workers N > 1 needs it),
so the only difference is the number of processes sharing the port with SO_REUSEPORT. The kernel
balances connections, not requests: each load-generator process opens several channels (distinct
TCP connections) and its callers take them in turn. The load generator runs on the same cores as the
server (counted in, as a real single-machine deployment would not be). Rows: saturated Rank/s
(closed loop, 32 callers), p99 at concurrency 1, and p99 at half of that saturation (open loop).
Results: bench/results/serve_workers.md / .json.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from serve import RANK_METHOD, _requests, summarise

CHANNELS = 4  # connections per load-generator process
ROUNDS = 2


def _client(args: tuple[str, str, float, float, list[str], list[str], int]) -> dict[str, Any]:
    target, mode, level, duration, users, items, seed = args
    import grpc

    async def run() -> dict[str, Any]:
        latencies: list[float] = []
        errors: dict[str, int] = {}
        gen = _requests("warm", users, items, seed)
        channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNELS)]
        calls = [ch.unary_unary(RANK_METHOD) for ch in channels]
        for call in calls:
            await call(next(gen), timeout=30)
        loop = asyncio.get_running_loop()
        end = loop.time() + duration
        k = 0

        async def one() -> None:
            nonlocal k
            k += 1
            sent = loop.time()
            try:
                await calls[k % len(calls)](next(gen), timeout=10)
                latencies.append(loop.time() - sent)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

        if mode == "concurrency":
            async def caller() -> None:
                while loop.time() < end:
                    await one()

            await asyncio.gather(*(caller() for _ in range(int(level))))
        else:
            rng, tasks, due = random.Random(seed), [], loop.time()
            while True:
                due += rng.expovariate(level)
                if due >= end:
                    break
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)
        for ch in channels:
            await ch.close()
        return {"latencies": latencies, "errors": errors}

    return asyncio.run(run())


def _level(target: str, mode: str, level: float, *, duration: float, clients: int, users: list[str], items: list[str]) -> dict[str, Any]:
    procs = max(1, min(clients, int(level))) if mode == "concurrency" else clients
    share = [level / procs] * procs if mode == "rate" else [level // procs + (1 if i < level % procs else 0) for i in range(procs)]
    jobs = [(target, mode, s, duration, users, items, 7000 + 100 * int(level) + i) for i, s in enumerate(share)]
    with mp.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(_client, jobs)
    errors: dict[str, int] = {}
    for p in parts:
        for code, n in p["errors"].items():
            errors[code] = errors.get(code, 0) + n
    return {"mode": mode, "level": level, **summarise([x for p in parts for x in p["latencies"]], duration, errors)}


def _start(paths: dict[str, Path], work: Path, workers: int, redis_url: str) -> tuple[Any, str]:
    import subprocess

    ready = work / f"ready-workers{workers}.json"
    ready.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "serve", "--registry", str(paths["registry"]), "--ranker", str(paths["ranker"]),
         "--data", str(paths["data"]), "--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready),
         "--workers", str(workers), "--threads", "2", "--max-inflight", "512", "--state",
         f"{redis_url}?stream=bench:workers{workers}", "--exposure-dir", str(work / f"exposures-w{workers}")],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    while not ready.exists():
        if server.poll() is not None:
            raise SystemExit(f"server --workers {workers} failed to start")
        time.sleep(0.1)
    return server, f"127.0.0.1:{json.loads(ready.read_text())['port']}"


def compare_workers(paths: dict[str, Path], work: Path, n: int, *, duration: float, clients: int,
                    users: list[str], items: list[str], out: Path) -> int:
    """Both servers run side by side; each load is measured for --workers 1 then N, in ROUNDS
    alternating rounds, so a change in the shared machine's load hits both alike."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.redis_server import RedisServer

    redis = RedisServer(work / "redis-workers")
    redis.start()
    rows: list[dict[str, Any]] = []
    servers: dict[int, tuple[Any, str]] = {}
    load = {"duration": duration / ROUNDS, "users": users, "items": items}
    try:
        for workers in (1, n):
            servers[workers] = _start(paths, work, workers, redis.url)
        sat: dict[int, list[float]] = {1: [], n: []}
        for name, mode, level in (("saturated (32 callers)", "concurrency", 32), ("concurrency 1", "concurrency", 1),
                                  ("half saturation (open loop)", "rate", 0)):
            for r in range(ROUNDS):
                for workers, (_, target) in servers.items():
                    rate = round(float(np.mean(sat[workers])) / 2, 1) if mode == "rate" else level
                    row = _level(target, mode, rate, clients=1 if level == 1 else clients, **load)
                    if level == 32:
                        sat[workers].append(row["qps"])
                    rows.append({"workers": workers, "load": name, "round": r, **row})
                    print(rows[-1], file=sys.stderr)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(90)
        redis.stop()
    return _report(rows, n, duration=duration, clients=clients, out=out)


def _report(rows: list[dict[str, Any]], n: int, *, duration: float, clients: int, out: Path) -> int:
    def mean(workers: int, load: str, key: str) -> float:
        return float(np.mean([r[key] for r in rows if r["workers"] == workers and r["load"].startswith(load)]))

    ratios = {
        f"saturated Rank/s, --workers {n} / --workers 1 (target >= 1.7x)": f"{mean(n, 'saturated', 'qps') / mean(1, 'saturated', 'qps'):.2f}x",
        f"p99 at concurrency 1 (mean of rounds), --workers {n} / 1": f"{mean(n, 'concurrency 1', 'p99_ms') / mean(1, 'concurrency 1', 'p99_ms'):.2f}x",
        f"p99 at half saturation (mean of rounds), --workers {n} / 1": f"{mean(n, 'half', 'p99_ms') / mean(1, 'half', 'p99_ms'):.2f}x",
    }
    report = {"machine": f"{os.cpu_count()} CPU cores shared by the servers and the load generator", "duration_s": duration,
              "client_processes": clients, "channels_per_client": CHANNELS, "load_average": os.getloadavg(), "rows": rows,
              "ratios": ratios}
    lines = ["# recsys serve --workers: processes sharing the port (SO_REUSEPORT)", "",
             f"{report['machine']}; {clients} load-generator processes x {CHANNELS} connections; {duration:.0f} s per row; "
             "both servers fold a local Redis stream (--state). Command: `python bench/serve.py --compare-workers "
             f"{n} --clients {clients}`.", "",
             "| workers | load | round | requests/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['load']} | {r['round']} | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors'] or ''} |"
              for r in rows]
    lines += ["", *[f"- {k}: {v}" for k, v in ratios.items()], ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_workers.json").write_text(json.dumps(report, indent=1))
    (out / "serve_workers.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0
