"""Benchmark of the shared online state (recsys.state): what durability and sharing cost.

    python bench/state.py [--duration 6] [--startup-events 1000000,10000000]
    python bench/state.py --duration 9 --rank-only --before /work/base --name state_rank   # Rank rows only,
        # with the journal and Redis servers also run from the starting commit's checkout (before/after)

1. LogEvents through a real `recsys serve` (closed loop, 10 events per call) with the event log in
   memory (nothing durable: the old behaviour), the embedded journal (fsync per group commit) and
   Redis Streams (a local redis-server with appendonly yes, appendfsync always): calls/s, events/s,
   p50/p99.
2. Rank p99 at concurrency 1 (100 candidates, the bench/serve.py warm request) on the same servers,
   served lists folded as impressions: shared state vs in-process only, and vs in-process with
   served lists counted (--fold-exposures); plus the CPU per served list of the record before this
   change (impression event rows) and the served-lists record (encode, decode, fold).
3. Start-up: N synthetic events (records of 1,000 events, ids from the bench catalogue) appended to a
   journal; the time to replay all of them into the folded state, to store a snapshot, and to start
   from the snapshot plus a 10,000-event tail.
4. Replica lag: a second process's view, here a follower on its own LiveState reading the Redis
   stream while events are appended at 1,000 events/s: delay from acknowledgement to folded (p50/p99)
   and the lag in records sampled like the server's metric.

Tables and JSON go to bench/results/state.md / state.json. Artifacts come from bench/serve.py's build
(cached under --work).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from report import write_results  # noqa: E402
from serve import build, client_process, summarise, wait_ready  # noqa: E402

LOG_METHOD = "/recsys.v1.RankingService/LogEvents"
KINDS = ("view", "click", "click", "add_to_cart", "purchase")
SERVED_LISTS = 256


def start_redis(work: Path) -> Any:
    from tests.redis_server import RedisServer

    redis = RedisServer(work / "redis")
    shutil.rmtree(redis.dir / "appendonlydir", ignore_errors=True)
    redis.start()
    return redis


def start_server(paths: dict[str, Path], work: Path, state: list[str], *extra: str,
                 root: Path = ROOT) -> tuple[subprocess.Popen[bytes], str]:
    """`recsys serve` from checkout `root` (--before: the starting commit's code on the same artifacts)."""
    ready = work / "ready.json"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "serve", "--registry", str(paths["registry"]), "--ranker", str(paths["ranker"]),
         "--data", str(paths["data"]), "--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready), "--threads", "2",
         "--max-inflight", "512", "--exposure-dir", str(work / "exposures"), *state, *extra],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"),  # noqa: SIM115 (lives with the server)
    )
    return proc, f"127.0.0.1:{wait_ready(proc, ready, 'server', work / 'serve.log')['port']}"


def log_events_load(target: str, concurrency: int, duration: float, *, users: list[str], items: list[str]) -> dict[str, Any]:
    """Closed loop of LogEvents calls of 10 events -> {"latencies", "errors"}."""
    import grpc

    from recsys.serving.proto import ranking_pb2 as pb

    rng = random.Random(concurrency)

    def request() -> bytes:
        user = rng.choice(users)
        events = [pb.Event(user_id=user, item_id=rng.choice(items), event_type=rng.choice(KINDS)) for _ in range(10)]
        return pb.LogEventsRequest(events=events).SerializeToString()

    async def run() -> dict[str, Any]:
        latencies: list[float] = []
        errors: dict[str, int] = {}
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary(LOG_METHOD)
            await call(request(), timeout=30)
            loop = asyncio.get_running_loop()
            end = loop.time() + duration

            async def caller() -> None:
                while loop.time() < end:
                    body = request()
                    sent = loop.time()
                    try:
                        await call(body, timeout=10)
                        latencies.append(loop.time() - sent)
                    except grpc.aio.AioRpcError as exc:
                        errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

            await asyncio.gather(*(caller() for _ in range(concurrency)))
        return {"latencies": latencies, "errors": errors}

    return asyncio.run(run())


def _slug(backend: str) -> str:
    """A backend's work directory: "memory + fold (--fold-exposures)" -> "memory-fold"."""
    return "-".join(backend.split("(")[0].replace("+", " ").split())


def serving_rows(paths: dict[str, Path], work: Path, redis_url: str, args: argparse.Namespace, *,
                 users: list[str], items: list[str]) -> list[dict[str, Any]]:
    """The servers run side by side and are measured in interleaved rounds (--rounds x
    duration/rounds each), so a change in the shared machine's load hits every backend alike; each
    round's Rank p99 is kept, so the ratios also come as the median of per-round ratios."""
    backends = {
        "memory (in-process only)": [],
        # the same in-process server counting served lists as impressions: what folding them costs without a log
        "memory + fold (--fold-exposures)": ["--fold-exposures"],
        "journal (--state-dir)": ["--state-dir", str(work / "journal")],
        "redis (--state)": ["--state", redis_url + "?stream=bench:serve"],
        # the journal's own cost, without folding served lists (which the in-memory server does not do)
        "journal-nofold (--state-dir --no-fold-exposures)": ["--state-dir", str(work / "journal-nofold"), "--no-fold-exposures"],
    }
    roots = dict.fromkeys(backends, ROOT)
    if args.before is not None:  # the same backends on the starting commit's code: before/after in one run
        for name in ("journal (--state-dir)", "redis (--state)"):
            before = f"{_slug(name)}-before ({args.before})"
            backends[before] = [f.replace("journal", "journal-before").replace("bench:serve", "bench:before")
                                for f in backends[name]]
            roots[before] = args.before
    for name in backends:
        shutil.rmtree(work / _slug(name), ignore_errors=True)
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    share = args.duration / args.rounds
    rank: dict[str, list[list[float]]] = {n: [] for n in backends}  # per round
    errors: dict[str, dict[str, int]] = {n: {} for n in backends}
    events: dict[tuple[str, int], list[dict[str, Any]]] = {(n, c): [] for n in backends for c in (1, 16)}
    try:  # servers started before one that fails to start are stopped too
        for name, flags in backends.items():
            (work / _slug(name)).mkdir(exist_ok=True)
            servers[name] = start_server(paths, work / _slug(name), flags, root=roots[name])
        for r in range(args.rounds):
            for name, (_, target) in servers.items():
                out = client_process((target, "warm", "concurrency", 1, share, users, items, r))
                rank[name].append(out["latencies"])
                for code, k in out["errors"].items():
                    errors[name][code] = errors[name].get(code, 0) + k
            for level in () if args.rank_only else (1, 16):
                for name, (_, target) in servers.items():
                    events[name, level].append(log_events_load(target, level, share, users=users, items=items))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(60)
    rows = [{"backend": n, "rpc": "Rank", "concurrency": 1, **summarise([x for part in rank[n] for x in part], args.duration, errors[n]),
             "p99_ms_by_round": [round(float(np.percentile(part, 99)) * 1000, 2) for part in rank[n]]} for n in backends]
    for (name, level), parts in events.items():
        if not parts:  # --rank-only
            continue
        lat = [x for p in parts for x in p["latencies"]]
        failed: dict[str, int] = {}
        for p in parts:
            for code, k in p["errors"].items():
                failed[code] = failed.get(code, 0) + k
        row = {"backend": name, "rpc": "LogEvents x10", "concurrency": level, **summarise(lat, args.duration, failed)}
        row["events_per_s"] = round(row["qps"] * 10, 1)
        rows.append(row)
    for row in rows:
        print(row, file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------------ start-up


def base_live(paths: dict[str, Path]) -> Any:
    import polars as pl

    from recsys.data.prepared import PreparedData
    from recsys.ranker import Ranker
    from recsys.serving.engine import LiveState
    from recsys.serving.model import ItemCatalogue

    data = PreparedData.load(paths["data"])
    items = data.items.sort("item_idx")
    catalogue = ItemCatalogue.from_lists(items["item_id"].cast(pl.Utf8).to_list(), items["text"].cast(pl.Utf8).to_list())
    users = data.users.sort("user_idx")["user_id"].cast(pl.Utf8).to_list()
    return LiveState(Ranker.load(paths["ranker"]).load_state(), users, catalogue)


def synthetic_record(rng: np.random.Generator, items: list[str], *, n_users: int, t_us: int, size: int) -> bytes:
    """`size` events of power-law users (a quarter of them new) on power-law items, one second apart."""
    from recsys.serving.validation import EventsInput
    from recsys.state.codec import encode

    u = np.minimum(rng.zipf(1.3, size), n_users) - 1
    i = np.minimum(rng.zipf(1.2, size), len(items)) - 1
    kinds = rng.choice(len(KINDS) + 2, size)  # two in seven are impressions
    events = EventsInput(
        [f"u{x}" if x % 4 else f"syn{x}" for x in u.tolist()], [items[x] for x in i.tolist()],
        [KINDS[k] if k < len(KINDS) else "impression" for k in kinds.tolist()],
        t_us + np.arange(size, dtype=np.int64) * 1_000_000, [None] * size, np.full(size, np.nan),
    )
    return encode(events)


def served_rows(paths: dict[str, Path], *, lists: int = 256, size: int = 100, repeats: int = 7) -> list[dict[str, Any]]:
    """CPU per served list of `size` items, `lists` lists per record (about what 0.25 s of flushes
    holds at 1,000 Rank/s): the record before this change (every item an impression event row, folded
    by the generic LiveState.apply) vs the served-lists record (LiveState.apply_served). Best of
    `repeats`, process CPU time; each fold on the bench's prepared state."""
    from recsys.serving.validation import ServedLists
    from recsys.state.codec import decode, encode

    live = base_live(paths)
    items = list(live.catalogue.ids)
    rng = np.random.default_rng(0)
    served = ServedLists.from_lists([
        (f"u{rng.integers(3000)}", 1_769_860_800_000_000 + k, f"req-{k}", [items[i] for i in rng.choice(len(items), size, replace=False)])
        for k in range(lists)])

    def cpu_us(work: Any) -> tuple[float, Any]:
        best, out = float("inf"), None
        for _ in range(repeats):
            started = time.process_time()
            out = work()
            best = min(best, time.process_time() - started)
        return best * 1e6 / lists, out

    rows = []
    for name, record, fold in (("impression event rows (before)", served.events(), live.apply),
                               ("served-lists record", served, live.apply_served)):
        encode_us, payload = cpu_us(lambda record=record: encode(record))
        decode_us, (decoded, _) = cpu_us(lambda payload=payload: decode(payload))
        fold_us, _ = cpu_us(lambda fold=fold, decoded=decoded: fold(decoded))
        rows.append({"record": name, "bytes_per_list": round(len(payload) / lists), "encode_us": round(encode_us, 1),
                     "decode_us": round(decode_us, 1), "fold_us": round(fold_us, 1),
                     "total_us": round(encode_us + decode_us + fold_us, 1)})
        print(rows[-1], file=sys.stderr)
    return rows


def startup_rows(paths: dict[str, Path], work: Path, sizes: list[int]) -> list[dict[str, Any]]:
    from recsys.state.follower import Follower
    from recsys.state.journal import Journal
    from recsys.state.snapshot import DirSnapshots

    base = base_live(paths)
    items = list(base.catalogue.ids)
    rows = []
    for n in sizes:
        state_dir = work / f"startup-{n}"
        shutil.rmtree(state_dir, ignore_errors=True)
        rng = np.random.default_rng(n)
        journal = Journal(state_dir)
        t0 = time.perf_counter()
        t_us = 1_769_900_000_000_000
        futures = []
        for k in range(n // 1000):
            futures.append(journal.append(synthetic_record(rng, items, n_users=50_000, t_us=t_us + k * 1_000_000_000, size=1000)))
            if len(futures) >= 256:
                [f.result() for f in futures]
                futures.clear()
        [f.result() for f in futures]
        append_s = time.perf_counter() - t0
        size_mb = journal.head()[0] / 1e6
        journal.close()

        def fresh() -> Any:
            live = copy.copy(base)
            live.state, live.users = copy.deepcopy(base.state), copy.deepcopy(base.users)
            return live

        journal = Journal(state_dir)
        live = fresh()
        follower = Follower(journal, live, snapshots=DirSnapshots(state_dir))
        t0 = time.perf_counter()
        follower.catch_up()
        replay_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        follower.snapshot()
        snapshot_s = time.perf_counter() - t0
        snap_mb = sum(p.stat().st_size for p in (state_dir / "snapshots").glob("snap-*.npz")) / 1e6
        for k in range(10):  # a 10,000-event tail after the snapshot
            journal.append_wait(synthetic_record(rng, items, n_users=50_000, t_us=t_us + (n + k * 1000) * 1_000_000, size=1000))
        journal.close()
        journal = Journal(state_dir)
        again = Follower(journal, fresh(), snapshots=DirSnapshots(state_dir))
        t0 = time.perf_counter()
        again.restore()
        tail = again.catch_up()
        restart_s = time.perf_counter() - t0
        journal.close()
        rows.append({"events": n, "journal_mb": round(size_mb, 1), "append_s": round(append_s, 1),
                     "replay_s": round(replay_s, 2), "replay_events_per_s": round(n / replay_s),
                     "snapshot_store_s": round(snapshot_s, 2), "snapshot_mb": round(snap_mb, 1),
                     "start_from_snapshot_s": round(restart_s, 2), "tail_records": tail,
                     "users_after": len(live.users)})
        print(rows[-1], file=sys.stderr)
        shutil.rmtree(state_dir, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------------------ replica lag


def lag_rows(paths: dict[str, Path], redis_url: str, rate: float, seconds: float) -> dict[str, Any]:
    """Append `rate` events/s (records of 10) to the stream; a follower on its own state folds them.
    Per record: acknowledged -> folded delay; every 0.1 s: the lag in records (count_after)."""
    from recsys.state.follower import Follower
    from recsys.state.redis_log import RedisLog

    url = redis_url + "?stream=bench:lag"
    writer, reader = RedisLog(url), RedisLog(url)
    live = base_live(paths)
    items = list(live.catalogue.ids)
    follower = Follower(reader, live)
    follower.catch_up()
    follower.start()
    acked: list[tuple[Any, float]] = []
    folded: dict[Any, float] = {}
    lags: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        k, next_lag = 0, time.monotonic()
        while not stop.is_set() or k < len(acked):
            now = time.monotonic()
            while k < len(acked) and follower.position >= acked[k][0]:
                folded[acked[k][0]] = now
                k += 1
            if now >= next_lag:
                lags.append(follower.refresh_lag())
                next_lag = now + 0.1
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    rng = np.random.default_rng(0)
    period = 10 / rate
    start = time.monotonic()
    k = 0
    while time.monotonic() - start < seconds:
        due = start + k * period
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        payload = synthetic_record(rng, items, n_users=5000, t_us=1_769_900_000_000_000 + k * 10_000_000, size=10)
        position = writer.append_wait(payload)
        acked.append((position, time.monotonic()))
        k += 1
    stop.set()
    watcher.join(30)
    follower.stop()
    writer.close()
    reader.close()
    delays = np.asarray([folded[p] - t for p, t in acked if p in folded]) * 1000
    return {"events_per_s": rate, "seconds": seconds, "records": len(acked), "folded": len(delays),
            "delay_p50_ms": round(float(np.percentile(delays, 50)), 2), "delay_p99_ms": round(float(np.percentile(delays, 99)), 2),
            "delay_max_ms": round(float(delays.max()), 2), "lag_records_max": int(max(lags)) if lags else 0,
            "lag_records_mean": round(float(np.mean(lags)), 2) if lags else 0.0}


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Shared online state: durability, sharing and start-up costs", "",
             f"{report['machine']}; load average at start {report['load_average']}. Command: `{report['command']}`.", "",
             "## LogEvents and Rank by event-log backend (real `recsys serve`, localhost gRPC)", "",
             "| backend | rpc | concurrency | calls/s | events/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|---|"]
    for r in report["serving"]:
        lines.append(f"| {r['backend']} | {r['rpc']} | {r['concurrency']} | {r['qps']} | {r.get('events_per_s', '')} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['errors'] or ''} |")
    lines += ["", f"## Served lists: CPU per list of 100 items ({SERVED_LISTS} lists per record, best of 7)", "",
              "| record | bytes per list | encode us | decode us | fold us | total us |", "|---|---|---|---|---|---|"]
    for r in report["served_lists"]:
        lines.append(f"| {r['record']} | {r['bytes_per_list']} | {r['encode_us']} | {r['decode_us']} | {r['fold_us']} | "
                     f"{r['total_us']} |")
    lines += ["", "## Start-up: replay vs snapshot (embedded journal, synthetic events)", "",
              "| events | journal MB | replay s | replay events/s | snapshot store s | snapshot MB | start from snapshot + 10k tail s |",
              "|---|---|---|---|---|---|---|"]
    for r in report["startup"]:
        lines.append(f"| {r['events']:,} | {r['journal_mb']} | {r['replay_s']} | {r['replay_events_per_s']:,} | "
                     f"{r['snapshot_store_s']} | {r['snapshot_mb']} | {r['start_from_snapshot_s']} |")
    lag = report["lag"]
    if not lag:
        return "\n".join([*lines, "", "## Ratios", "", *(f"- {k}: {v}" for k, v in report["ratios"].items()), "",
                          report["notes"], ""])
    lines += ["", f"## Replica lag at {lag['events_per_s']:.0f} events/s (Redis stream, records of 10 events)", "",
              f"acknowledged -> folded on the other replica: p50 {lag['delay_p50_ms']} ms, p99 {lag['delay_p99_ms']} ms, "
              f"max {lag['delay_max_ms']} ms over {lag['records']} records; lag sampled every 0.1 s: "
              f"mean {lag['lag_records_mean']} records, max {lag['lag_records_max']}.", "", "## Ratios", ""]
    lines += [f"- {k}: {v}" for k, v in report["ratios"].items()]
    lines += ["", report["notes"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsys-bench-serve"))
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--startup-events", default="1000000,10000000")
    parser.add_argument("--lag-rate", type=float, default=1000.0)
    parser.add_argument("--lag-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="state")
    parser.add_argument("--before", type=Path, help="also run the journal and Redis servers from this checkout")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved measurement rounds; the Rank ratios are also given as the median of per-round ratios")
    parser.add_argument("--rank-only", action="store_true",
                        help="only the Rank rows (shared state vs in-process) and their ratios")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    paths = build(args.work, 3000, seed=0)
    import polars as pl

    from recsys.data.prepared import PreparedData

    data = PreparedData.load(paths["data"])
    warm = (pl.read_parquet(paths["data"] / "events.parquet").filter(pl.col("strength") > 0)
            .group_by("user_id").len().filter(pl.col("len") >= 5)["user_id"].cast(pl.Utf8).to_list())
    items = data.items["item_id"].cast(pl.Utf8).to_list()
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    redis = start_redis(args.work)
    try:
        serving = serving_rows(paths, args.work, redis.url, args, users=warm, items=items)
        lag = {} if args.rank_only else lag_rows(paths, redis.url, args.lag_rate, args.lag_seconds)
        print(lag, file=sys.stderr)
    finally:
        redis.stop()
    sizes = [] if args.rank_only else [int(x) for x in args.startup_events.split(",") if x]
    startup = startup_rows(paths, args.work, sizes)
    served = served_rows(paths, lists=SERVED_LISTS)

    def row(backend: str, rpc: str, level: int) -> dict[str, Any]:
        return next(r for r in serving if r["backend"].startswith(backend) and r["rpc"].startswith(rpc) and r["concurrency"] == level)

    ratios = {}
    memory, folding = row("memory (", "Rank", 1)["p99_ms"], row("memory + fold", "Rank", 1)["p99_ms"]
    names = [r["backend"] for r in serving if r["rpc"] == "Rank" and not r["backend"].startswith("memory (")]
    by_round = row("memory (", "Rank", 1)["p99_ms_by_round"]
    for backend in names:
        per_round = np.asarray(row(backend, "Rank", 1)["p99_ms_by_round"]) / np.asarray(by_round)
        ratios[f"Rank p99 at concurrency 1, {backend} / memory (target <= 1.2x)"] = (
            f"{row(backend, 'Rank', 1)['p99_ms'] / memory:.2f}x pooled; median of {len(per_round)} rounds "
            f"{np.median(per_round):.2f}x (rounds {', '.join(f'{x:.2f}' for x in per_round)})")
    for backend in (n for n in names if not n.startswith(("memory", "journal-nofold"))):
        ratios[f"Rank p99 at concurrency 1, {backend} / memory + fold (the log's own cost)"] = \
            f"{row(backend, 'Rank', 1)['p99_ms'] / folding:.2f}x"
    before, after = served
    ratios[f"CPU per served list (encode + decode + fold), {before['record']} / {after['record']}"] = \
        f"{before['total_us'] / after['total_us']:.1f}x"
    for backend in () if args.rank_only else ("journal (", "redis", "journal-nofold"):
        ratios[f"LogEvents events/s at concurrency 16, {backend.rstrip(' (')} / memory"] = \
            f"{row(backend, 'LogEvents', 16)['events_per_s'] / row('memory (', 'LogEvents', 16)['events_per_s']:.2f}x"
    for r in startup:
        ratios[f"{r['events']:,} events: replay / start from snapshot"] = f"{r['replay_s'] / r['start_from_snapshot_s']:.0f}x"
    report = {
        "machine": f"{os.cpu_count()} CPU cores (shared with other work), CPU only, local SSD",
        "command": "python bench/state.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average": load_average, "serving": serving, "served_lists": served, "startup": startup, "lag": lag,
        "ratios": ratios,
        "notes": ("Memory = events folded in-process only (what every server did before: lost on restart, not seen by "
                  "other replicas). Journal = one fsync per group commit before the reply. Redis = XADD acknowledged "
                  "by a local redis-server with appendonly yes and appendfsync always (fsync before reply). Rank rows: "
                  "with journal and Redis the served lists go to the same log as impressions (--exposure-dir set; "
                  "the in-memory default does not fold them), so the Rank path pays for an append it does not wait "
                  "on and the follower folds them; memory + fold counts them in-process (--fold-exposures, the same "
                  "fold through an in-memory log), which separates what counting served lists costs from what the "
                  "durable, shared log costs. The load generator shares the machine's cores with the server."),
    }
    write_results(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
