"""`python bench/serve.py --tail`: Rank tail latency, before and after, beside the bare-gRPC floor.

Four servers in one run, each pinned to core 0 with `taskset` while the load generator runs pinned
to core 1 (so the generator does not steal the server's core; the remaining noise is the machine's):

- RPC floor: the same grpc.aio stack answering a prepared 20-item reply without reading the request;
- before: `recsys serve` from another checkout (`--before DIR`, default /work/base), same artifacts;
- after: `recsys serve` from this tree, as deployed (its stage histograms are always on);
- after + stall monitor: the same with the event-loop stall monitor (`--stall-ms 1 --stall-log`), which
  times every loop callback and so costs something itself: the stall timeline comes from it.

Both servers rank 100 known candidate ids with the exposure log on. For each server and round: closed
loop at concurrency 1, then open loop (Poisson arrivals, no coordinated omission) at 1/4 and 1/2 of
saturation, where saturation is the after server's closed-loop Rank/s at 8 callers measured first in
the same run (the same rates are sent to all three). Rounds alternate the servers, so drift in the
machine's load hits all alike. Client-side p50/p99/p99.9 from the generator, server-side from each
server's own Rank histogram; the after server's stage breakdown comes from its /metrics, the stalls (> 1 ms) of each row from the
monitored copy's stall timeline. Writes serve_tail.{md,json}.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import numpy as np
from report import write_results
from serve import bucket_quantile, client_process, floor_server, server_histogram, wait_ready

SERVER_CPU, CLIENT_CPU = 0, 1
QUANTILES = (0.5, 0.99, 0.999)


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q * 100)), 2) if len(values) else None


def stage_histograms(metrics_url: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of recsys_stage_seconds{rpc="Rank"} per stage (le -> count)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[float, float]] = {}
    text = urlopen(metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "recsys_stage_seconds":
            for s in family.samples:
                if s.name.endswith("_bucket") and s.labels.get("rpc") == "Rank":
                    out.setdefault(s.labels["stage"], {})[float(s.labels["le"])] = s.value
                elif s.name.endswith("_sum") and s.labels.get("rpc") == "Rank":
                    out.setdefault(s.labels["stage"], {})[-1.0] = s.value  # -1: the sum (seconds)
    return out


def stage_summary(before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]) -> dict[str, dict[str, Any]]:
    rows = {}
    for stage, hist in after.items():
        buckets = {k: v for k, v in hist.items() if k >= 0}
        old = before.get(stage, {})
        n = buckets.get(float("inf"), 0.0) - old.get(float("inf"), 0.0)
        if n <= 0:
            continue
        old_buckets = {k: v for k, v in old.items() if k >= 0}
        rows[stage] = {
            "count": int(n),
            "mean_ms": round((hist.get(-1.0, 0.0) - old.get(-1.0, 0.0)) / n * 1000, 3),
            **{f"p{q * 100:g}_ms": bucket_quantile(old_buckets, buckets, q) for q in (0.5, 0.99, 0.999)},
        }
    return rows


def run_row(target: str, mode: str, level: float, duration: float, *, users: list[str], items: list[str],
            metrics_url: str | None, stages: bool = False) -> dict[str, Any]:
    """One load row from one generator process pinned to CLIENT_CPU."""
    before = server_histogram(metrics_url) if metrics_url else {}
    stage_before = stage_histograms(metrics_url) if stages and metrics_url else {}
    load = os.getloadavg()[0]
    wall = time.time()
    job = (target, "warm", mode, level, duration, users, items, 1000 * int(level) + 7, [CLIENT_CPU])
    with mp.get_context("spawn").Pool(1) as pool:
        part = pool.map(client_process, [job])[0]
    ms = np.asarray(part["latencies"]) * 1000
    lag = np.asarray(part["lateness"]) * 1000
    row: dict[str, Any] = {
        "mode": mode, "level": level, "requests": len(ms), "qps": round(len(ms) / duration, 1),
        **{f"p{q * 100:g}_ms": _pct(ms, q) for q in QUANTILES},
        "errors": part["errors"], "load_1min": round(load, 2), "wall_start": wall, "wall_end": time.time(),
    }
    if len(lag):
        row["send_lag_p99_ms"] = _pct(lag, 0.99)
    if metrics_url:
        after = server_histogram(metrics_url)
        row.update({f"server_p{q * 100:g}_ms": bucket_quantile(before, after, q) for q in QUANTILES})
    if stage_before:
        row["stages"] = stage_summary(stage_before, stage_histograms(metrics_url))  # type: ignore[arg-type]
    return row


def start_server(root: Path, paths: dict[str, Path], work: Path, name: str, extra: list[str]) -> tuple[Any, str, str]:
    """`recsys serve` from checkout `root`, pinned to SERVER_CPU -> (process, target, metrics url)."""
    ready = work / f"ready-{name}.json"
    ready.unlink(missing_ok=True)
    exposures = work / f"exposures-{name}"
    subprocess.run(["rm", "-rf", str(exposures)], check=True)
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        ["taskset", "-c", str(SERVER_CPU), sys.executable, "-m", "recsys.cli", "serve", "--registry", str(paths["registry"]),
         "--ranker", str(paths["ranker"]), "--data", str(paths["data"]), "--host", "127.0.0.1", "--port", "0",
         "--ready-file", str(ready), "--max-inflight", "512", "--metrics-port", "0", "--exposure-dir", str(exposures),
         "--drain-seconds", "0", *extra],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"serve-{name}.log", "wb"),  # noqa: SIM115
    )
    ports = wait_ready(proc, ready, f"{name} server", work / f"serve-{name}.log")
    return proc, f"127.0.0.1:{ports['port']}", f"http://127.0.0.1:{ports['metrics_port']}/metrics"


def _floor() -> tuple[Any, str]:
    ctx = mp.get_context("spawn")
    queue: Any = ctx.Queue()
    proc = ctx.Process(target=floor_server, args=(queue,), daemon=True)
    proc.start()
    os.sched_setaffinity(proc.pid, {SERVER_CPU})
    return proc, f"127.0.0.1:{queue.get(timeout=60)}"


def stall_summary(stalls: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any]:
    """The stalls inside one row's time window: count, total, by cause, the five longest."""
    inside = [s for s in stalls if row["wall_start"] <= s["unix_s"] <= row["wall_end"]]
    causes: dict[str, list[float]] = {}
    for s in inside:
        causes.setdefault(s["cause"], []).append(s["ms"])
    return {
        "count": len(inside),
        "total_ms": round(sum(s["ms"] for s in inside), 1),
        "by_cause": {c: {"count": len(v), "max_ms": round(max(v), 2), "total_ms": round(sum(v), 1)} for c, v in sorted(causes.items())},
        "longest": sorted(inside, key=lambda s: -s["ms"])[:5],
    }


MONITORED = "after + stall monitor"


def tail_run(paths: dict[str, Path], work: Path, *, before_root: Path, duration: float, rounds: int,
             users: list[str], items: list[str], out: Path) -> int:
    root = Path(__file__).resolve().parents[1]
    stall_log = work / "stalls-after.json"
    stall_log.unlink(missing_ok=True)
    load_average = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    servers: dict[str, tuple[Any, str, str | None]] = {}
    floor_proc, floor_target = _floor()
    servers["RPC floor"] = (floor_proc, floor_target, None)
    servers["before"] = start_server(before_root, paths, work, "before", [])
    servers["after"] = start_server(root, paths, work, "after", [])
    # The stall monitor times every loop callback, which costs the monitored server: its timeline comes from
    # a second copy of the after server, so the after rows measure the service as deployed.
    servers[MONITORED] = start_server(root, paths, work, "after-monitored", ["--stall-ms", "1", "--stall-log", str(stall_log)])
    rows: list[dict[str, Any]] = []
    try:
        for _, target, _ in servers.values():  # warm every server up (first calls load lazily)
            run_row(target, "concurrency", 1, 1.0, users=users, items=items, metrics_url=None)
        _, after_target, after_metrics = servers["after"]
        sat = run_row(after_target, "concurrency", 8, duration / 2, users=users, items=items, metrics_url=after_metrics)
        saturation = sat["qps"]
        rows.append({"server": "after", "load": "saturation (8 callers)", "round": 0, **sat})
        print(f"saturation {saturation}/s", file=sys.stderr)
        loads = [("c=1", "concurrency", 1.0), ("open loop 1/4 sat.", "rate", saturation / 4), ("open loop 1/2 sat.", "rate", saturation / 2)]
        for rnd in range(rounds):
            order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
            for name in order:
                _, target, metrics = servers[name]
                for label, mode, level in loads:
                    row = run_row(target, mode, level, duration, users=users, items=items, metrics_url=metrics,
                                  stages=name in ("after", MONITORED))
                    rows.append({"server": name, "load": label, "round": rnd, **row})
                    print({k: v for k, v in rows[-1].items() if k != "stages"}, file=sys.stderr)
    finally:
        for name, (proc, _, _) in servers.items():
            if name == "RPC floor":
                proc.kill()
            else:
                proc.terminate()
                proc.wait(60)
    stalls = json.loads(stall_log.read_text())["stalls"] if stall_log.exists() else []
    for row in rows:
        if row["server"] == MONITORED:
            row["stalls"] = stall_summary(stalls, row)
    report = {
        "machine": f"{os.cpu_count()} CPU cores, CPU only",
        "command": f"python bench/serve.py --tail --duration {duration:g} --rounds {rounds} --before {before_root}",
        "before": str(before_root), "load_average": load_average, "duration_s": duration, "rounds": rounds,
        "saturation_qps": saturation, "rows": rows, "summary": summarise_tail(rows),
        "stall_timeline_open_quarter": [s for s in stalls if any(
            r["server"] == MONITORED and r["load"] == "open loop 1/4 sat." and r["wall_start"] <= s["unix_s"] <= r["wall_end"]
            for r in rows)],
    }
    write_results(out, "serve_tail", report, tail_markdown(report))
    return 0


def summarise_tail(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server and load: the median over rounds of each quantile, and the targets."""
    out: dict[str, Any] = {}
    for row in rows:
        if row["load"].startswith("saturation"):
            continue
        key = f"{row['server']} | {row['load']}"
        for q in ("p50_ms", "p99_ms", "p99.9_ms", "server_p50_ms", "server_p99_ms", "server_p99.9_ms"):
            if row.get(q) is not None:
                out.setdefault(key, {}).setdefault(q, []).append(row[q])
    med = {k: {q: round(float(np.median(v)), 2) for q, v in d.items()} for k, d in out.items()}
    targets = {}
    for side in ("before", "after"):
        c1 = med.get(f"{side} | c=1", {}).get("p99_ms")
        quarter = med.get(f"{side} | open loop 1/4 sat.", {}).get("p99_ms")
        floor_q = med.get("RPC floor | open loop 1/4 sat.", {}).get("p99_ms")
        if c1 is not None:
            targets[f"{side}: c=1 p99 <= 8 ms"] = f"{c1} ms: {'met' if c1 <= 8 else 'not met'}"
        if quarter is not None and floor_q is not None:
            bound = max(20.0, 2 * floor_q)
            targets[f"{side}: open loop 1/4 sat. p99 <= max(20 ms, 2x floor p99 {floor_q} ms)"] = (
                f"{quarter} ms: {'met' if quarter <= bound else 'not met'}"
            )
    return {"median_over_rounds": med, "targets": targets}


def tail_markdown(report: dict[str, Any]) -> str:
    def v(x: Any) -> str:
        return "-" if x is None else f"{x:g}"

    lines = [
        "# Rank tail latency: RPC floor, before, after (issue 19)",
        "",
        f"{report['machine']}; servers pinned to core {SERVER_CPU}, the load generator to core {CLIENT_CPU} (`taskset`); "
        f"Rank of 100 known candidate ids, top 20, exposure log on; {report['duration_s']:g} s per row, {report['rounds']} rounds "
        f"alternating the servers; saturation (after server, 8 callers) {report['saturation_qps']} Rank/s; before = "
        f"`{report['before']}`. Load average at the start: {report['load_average']} (each row's 1-minute figure in its column). "
        f"Command: `{report['command']}`.",
        "",
        "| server | load | round | Rank/s | p50 | p99 | p99.9 | server p50 / p99 / p99.9 | send lag p99 | stalls > 1 ms (total ms) | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        st = r.get("stalls")
        stalls = f"{st['count']} ({st['total_ms']})" if st else "-"
        lines.append(
            f"| {r['server']} | {r['load']} | {r['round']} | {r['qps']} | {v(r['p50_ms'])} | {v(r['p99_ms'])} | {v(r['p99.9_ms'])} | "
            f"{v(r.get('server_p50_ms'))} / {v(r.get('server_p99_ms'))} / {v(r.get('server_p99.9_ms'))} | "
            f"{v(r.get('send_lag_p99_ms'))} | {stalls} | {r['load_1min']} |"
        )
    lines += ["", "Median over rounds (ms):", "", "| server / load | p50 | p99 | p99.9 | server p50 | server p99 | server p99.9 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for key, q in report["summary"]["median_over_rounds"].items():
        lines.append(f"| {key} | {v(q.get('p50_ms'))} | {v(q.get('p99_ms'))} | {v(q.get('p99.9_ms'))} | "
                     f"{v(q.get('server_p50_ms'))} | {v(q.get('server_p99_ms'))} | {v(q.get('server_p99.9_ms'))} |")
    lines += ["", "Targets:", ""] + [f"- {k}: {t}" for k, t in report["summary"]["targets"].items()]
    stage_rows = [r for r in report["rows"] if r["server"] == "after" and r.get("stages")]
    if stage_rows:
        lines += ["", "Stage breakdown of the after server (its /metrics, recsys_stage_seconds; mean / p99 ms per row, "
                  "p99 interpolated inside histogram buckets):", ""]
        stages = [s for s in ("parse", "validate", "pool_wait", "user_tower", "features", "lightgbm", "topk", "reply", "exposure",
                              "serialise") if any(s in r["stages"] for r in stage_rows)]
        lines += ["| load | round | " + " | ".join(stages) + " |", "|---|---:|" + "---:|" * len(stages)]
        for r in stage_rows:
            cells = [f"{r['stages'][s]['mean_ms']:.3f} / {v(r['stages'][s]['p99_ms'])}" if s in r["stages"] else "-" for s in stages]
            lines.append(f"| {r['load']} | {r['round']} | " + " | ".join(cells) + " |")
    monitored = [r for r in report["rows"] if r["server"] == MONITORED and r.get("stalls")]
    if monitored:
        lines += ["", "Stalls of the monitored after server's event loop (callbacks > 1 ms) per row, by cause (count, max ms):",
                  ""]
        for r in monitored:
            causes = ", ".join(f"{c} {d['count']} (max {d['max_ms']})" for c, d in r["stalls"]["by_cause"].items()) or "none"
            lines.append(f"- {r['load']}, round {r['round']}: {causes}")
    return "\n".join(lines) + "\n"
