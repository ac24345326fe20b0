"""`python bench/serve.py --compare-workers 2`: `recsys serve --workers 1` vs `--workers N` in one run.

Both servers fold the same Redis event log (--state, a local redis-server; --workers N > 1 needs it),
so the only difference is the number of processes sharing the port with SO_REUSEPORT. The kernel
balances connections, not requests: each load-generator process opens several channels (distinct
TCP connections) and its callers take them in turn. The load generator runs on the same cores as the
server (counted in, as a real single-machine deployment would not be). Rows: saturated Rank/s
(closed loop, 32 callers), p99 at concurrency 1, and p99 at half of that saturation (open loop).
With --before DIR the same two servers also run from that checkout, interleaved with these (before/after
in one run). Results: bench/results/serve_workers.md / .json.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from report import write_results
from serve import RANK_METHOD, _requests, summarise, wait_ready
from serve import process_cpu as _proc_cpu

CHANNELS = 4  # connections per load-generator process
ROUNDS = 2
H2LOAD_CONNECTIONS = 16  # SO_REUSEPORT hashes connections to processes: enough of them to even out
THIS = "this tree"


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


TICK = os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> list[int]:
    """root and every descendant process (a --workers N server is a parent and N spawned children)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        out += frontier
    return out


def _machine_cpu() -> float:
    """CPU seconds spent by everything on the machine (/proc/stat: all but idle and iowait)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / TICK


class CpuMeter:
    """CPU time of one load row split by who spent it: the load generator (this script's reaped
    children), the server process tree, redis-server, and everything else on the machine."""

    def __init__(self, server: int, redis: int) -> None:
        self.server, self.redis = server, redis

    def __enter__(self) -> CpuMeter:
        import resource

        self._pids = _tree(self.server)
        self._start = (resource.getrusage(resource.RUSAGE_CHILDREN), sum(map(_proc_cpu, self._pids)),
                       _proc_cpu(self.redis), _machine_cpu())
        return self

    def __exit__(self, *exc: object) -> None:
        import resource

        kids, server, redis, machine = self._start
        now = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.generator = now.ru_utime + now.ru_stime - kids.ru_utime - kids.ru_stime
        self.server_s = sum(map(_proc_cpu, self._pids)) - server
        self.redis_s = _proc_cpu(self.redis) - redis
        self.other = max(_machine_cpu() - machine - self.generator - self.server_s - self.redis_s, 0.0)

    def per_request(self, requests: int) -> dict[str, float]:
        n = max(requests, 1)
        return {"cpu_ms_generator": round(self.generator / n * 1000, 3), "cpu_ms_server": round(self.server_s / n * 1000, 3),
                "cpu_ms_redis": round(self.redis_s / n * 1000, 3), "cpu_ms_other": round(self.other / n * 1000, 3)}


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


def _h2load(target: str, work: Path, *, duration: float, users: list[str], items: list[str]) -> dict[str, Any]:
    """Saturated Rank/s from a C load generator (nghttp2's h2load, one thread, 16 connections x 2 streams).
    The Python generator above spends about as much CPU per call as the server's own gRPC layer, so on a
    2-core machine it takes the core a second worker would use; h2load spends tens of microseconds a call.
    It sends one fixed, gRPC-framed RankRequest and cannot read trailers, so every reply's size is checked
    against a real reply to the same request: an error status would come back with no message bytes."""
    import re
    import struct
    import subprocess

    import grpc

    body = next(_requests("warm", users, items, 4242))
    with grpc.insecure_channel(target) as channel:
        reply = channel.unary_unary(RANK_METHOD)(body, timeout=30)
    framed = work / "h2load-rank.bin"
    framed.write_bytes(b"\x00" + struct.pack(">I", len(body)) + body)
    cmd = ["h2load", "-D", str(int(duration)), "-c", str(H2LOAD_CONNECTIONS), "-m", "2", "-t", "1",
           "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(framed), f"http://{target}{RANK_METHOD}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    qps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    data = re.search(r"traffic: .*?\(\d+\) total, .*?\(\d+\) headers .*?, .*?\((\d+)\) data", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if not (done and qps and data and mean):
        raise SystemExit(f"h2load output not understood:\n{out}")
    succeeded = int(done.group(2))
    per_reply = int(data.group(1)) / max(succeeded, 1) - 5  # minus the 5-byte gRPC frame header
    to_ms = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    unit = re.match(r"([\d.]+)(\w+)", mean.group(1))
    return {"mode": "h2load", "level": H2LOAD_CONNECTIONS * 2, "requests": succeeded, "qps": float(qps.group(1)),
            "mean_ms": round(float(unit.group(1)) * to_ms[unit.group(2)], 2) if unit else None,
            "reply_bytes": round(per_reply, 1), "expected_reply_bytes": len(reply),
            "errors": {k: int(v) for k, v in (("failed", done.group(3)), ("errored", done.group(4))) if int(v)}}


def _start(paths: dict[str, Path], work: Path, workers: int, redis_url: str, *, root: Path, tag: str) -> tuple[Any, str]:
    """`recsys serve --workers N` from checkout `root` (--before: the starting commit's code on the same artifacts)."""
    import subprocess

    ready = work / f"ready-workers{workers}-{tag}.json"
    ready.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "serve", "--registry", str(paths["registry"]), "--ranker", str(paths["ranker"]),
         "--data", str(paths["data"]), "--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready),
         "--workers", str(workers), "--threads", "2", "--max-inflight", "512", "--state",
         f"{redis_url}?stream=bench:workers{workers}-{tag}", "--exposure-dir", str(work / f"exposures-w{workers}-{tag}")],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return server, f"127.0.0.1:{wait_ready(server, ready, f'server --workers {workers} ({root})')['port']}"


def compare_workers(paths: dict[str, Path], work: Path, n: int, *, duration: float, clients: int,
                    users: list[str], items: list[str], out: Path, before: Path | None = None) -> int:
    """Both servers (and with `before`, the same two from that checkout) run side by side; each load
    is measured for every server in turn, in ROUNDS alternating rounds, so a change in the shared
    machine's load hits all alike."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from tests.redis_server import RedisServer

    redis = RedisServer(work / "redis-workers")
    shutil.rmtree(redis.dir / "appendonlydir", ignore_errors=True)
    redis.start()
    codes = {THIS: root, **({f"before ({before})": before} if before is not None else {})}
    rows: list[dict[str, Any]] = []
    servers: dict[tuple[str, int], tuple[Any, str]] = {}
    load = {"duration": duration / ROUNDS, "users": users, "items": items}
    try:
        for k, (code, code_root) in enumerate(codes.items()):
            for workers in (1, n):
                servers[code, workers] = _start(paths, work, workers, redis.url, root=code_root, tag=str(k))
        sat: dict[tuple[str, int], list[float]] = {key: [] for key in servers}
        assert redis.proc is not None
        for name, mode, level in (("saturated (32 callers)", "concurrency", 32), ("concurrency 1", "concurrency", 1),
                                  ("half saturation (open loop)", "rate", 0)):
            for r in range(ROUNDS):
                for (code, workers), (proc, target) in servers.items():
                    rate = round(float(np.mean(sat[code, workers])) / 2, 1) if mode == "rate" else level
                    with CpuMeter(proc.pid, redis.proc.pid) as cpu:
                        row = _level(target, mode, rate, clients=1 if level == 1 else clients, **load)
                    if level == 32:
                        sat[code, workers].append(row["qps"])
                    rows.append({"code": code, "workers": workers, "load": name, "round": r, **row,
                                 **cpu.per_request(row["requests"])})
                    print(rows[-1], file=sys.stderr)
        if shutil.which("h2load"):
            for r in range(ROUNDS):
                for (code, workers), (proc, target) in servers.items():
                    with CpuMeter(proc.pid, redis.proc.pid) as cpu:
                        row = _h2load(target, work, duration=duration / ROUNDS, users=users, items=items)
                    rows.append({"code": code, "workers": workers, "load": "saturated, C load generator (h2load)", "round": r,
                                 **row, **cpu.per_request(row["requests"])})
                    print(rows[-1], file=sys.stderr)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(90)
        redis.stop()
    return _report(rows, n, duration=duration, clients=clients, out=out, codes=list(codes))


def cpu_bound(rows: list[dict[str, Any]], n: int, code: str) -> list[str]:
    """What the cores allow: per saturated load, the CPU a request costs each party, and the Rank/s
    the N-worker server could reach at best on otherwise idle cores (cores / the generator's, the
    servers' and Redis's CPU per request), against the 1-worker server's measured rate."""
    cores = os.cpu_count() or 1
    out = [f"CPU per saturated request, {code} (mean of rounds; 'other' = the rest of the machine: other users' jobs):", ""]
    for load in ("saturated (", "saturated, C"):
        picked = {w: [r for r in rows if r["code"] == code and r["workers"] == w and r["load"].startswith(load)] for w in (1, n)}
        if not picked[1] or not picked[n]:
            continue
        cost = {w: {k: float(np.mean([r[k] for r in picked[w]])) for k in
                    ("cpu_ms_generator", "cpu_ms_server", "cpu_ms_redis", "cpu_ms_other", "qps")} for w in (1, n)}
        for w in (1, n):
            c = cost[w]
            out.append(f"- {picked[w][0]['load']}, --workers {w}: generator {c['cpu_ms_generator']:.2f} + server "
                       f"{c['cpu_ms_server']:.2f} + redis {c['cpu_ms_redis']:.2f} ms (+ other {c['cpu_ms_other']:.2f} ms) "
                       f"at {c['qps']:.0f} Rank/s")
        c, one = cost[n], cost[1]
        ours = c["cpu_ms_generator"] + c["cpu_ms_server"] + c["cpu_ms_redis"]
        bound = cores * 1000 / ours
        out.append(f"- the 1-worker server keeps {one['qps'] * one['cpu_ms_server'] / 1000:.2f} cores busy (its "
                   f"poller, fold and log threads beside the loop), and {n} workers cost "
                   f"{c['cpu_ms_server'] / one['cpu_ms_server']:.2f}x its CPU per request (each folds every served list); "
                   f"so {cores} quiet cores give at most {bound:.0f} Rank/s with this generator ({cores} x 1000 ms / "
                   f"{ours:.2f} ms), {bound / one['qps']:.2f}x the 1-worker rate measured here")
    return [*out, ""]


def _ratios(rows: list[dict[str, Any]], n: int, code: str) -> dict[str, str]:
    def mean(workers: int, load: str, key: str) -> float:
        return float(np.mean([r[key] for r in rows if r["code"] == code and r["workers"] == workers and r["load"].startswith(load)]))

    ratios = {
        f"{code}: saturated Rank/s, Python load generator, --workers {n} / --workers 1 (target >= 1.7x)":
            f"{mean(n, 'saturated (', 'qps') / mean(1, 'saturated (', 'qps'):.2f}x",
        f"{code}: p99 at concurrency 1 (mean of rounds), --workers {n} / 1":
            f"{mean(n, 'concurrency 1', 'p99_ms') / mean(1, 'concurrency 1', 'p99_ms'):.2f}x",
        f"{code}: p99 at half saturation (mean of rounds), --workers {n} / 1": f"{mean(n, 'half', 'p99_ms') / mean(1, 'half', 'p99_ms'):.2f}x",
    }
    if any(r["load"].startswith("saturated, C") for r in rows):
        ratios[f"{code}: saturated Rank/s, C load generator (h2load), --workers {n} / --workers 1 (target >= 1.7x)"] = (
            f"{mean(n, 'saturated, C', 'qps') / mean(1, 'saturated, C', 'qps'):.2f}x")
    return ratios


def _report(rows: list[dict[str, Any]], n: int, *, duration: float, clients: int, out: Path, codes: list[str]) -> int:
    ratios = {k: v for code in codes for k, v in _ratios(rows, n, code).items()}
    report = {"machine": f"{os.cpu_count()} CPU cores shared by the servers and the load generator", "duration_s": duration,
              "client_processes": clients, "channels_per_client": CHANNELS, "load_average": os.getloadavg(), "rows": rows,
              "ratios": ratios}
    before = next((c for c in codes if c != THIS), None)
    lines = ["# recsys serve --workers: processes sharing the port (SO_REUSEPORT)", "",
             f"{report['machine']}; {clients} load-generator processes x {CHANNELS} connections; {duration:.0f} s per row; "
             "every server folds a local Redis stream (--state). Command: `python bench/serve.py --compare-workers "
             f"{n} --clients {clients}" + (f" --before {before.split('(')[1].rstrip(')')}" if before else "") + "`.", "",
             "| code | workers | load | round | requests/s | p50 ms | p99 ms | CPU ms per request: generator / server / redis / other | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['code']} | {r['workers']} | {r['load']} | {r['round']} | {r['qps']} | {r.get('p50_ms', '')} | "
              f"{r.get('p99_ms', '')} | {r['cpu_ms_generator']} / {r['cpu_ms_server']} / {r['cpu_ms_redis']} / "
              f"{r['cpu_ms_other']} | {r['errors'] or ''} |" for r in rows]
    h2 = [r for r in rows if r["mode"] == "h2load"]
    if h2:
        lines += ["", "h2load rows: mean latency (h2load reports no percentiles) and the mean reply size against a real reply "
                  "to the same request (an error status carries no message): "
                  + "; ".join(f"{r['code']} workers {r['workers']} round {r['round']}: {r['mean_ms']} ms, {r['reply_bytes']} "
                              f"of {r['expected_reply_bytes']} bytes" for r in h2)]
    lines += ["", *[f"- {k}: {v}" for k, v in ratios.items()], ""]
    for code in codes:
        lines += cpu_bound(rows, n, code)
    write_results(out, "serve_workers", report, "\n".join(lines))
    return 0
