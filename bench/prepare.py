"""Benchmark `recsys prepare` (read + validate + split + histories + write) on generated logs.

For each size, one subprocess generates the log to parquet (not timed), then another runs the
prepare pipeline and reports wall time, events/s and peak RSS (ru_maxrss of that child). The naive
baseline builds the same histories with a per-user Python loop, on the smallest size only.

    python bench/prepare.py [--sizes 1000000 10000000] [--work /tmp/recsys-bench-prepare]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

GENERATE = """
import sys
from pathlib import Path
from recsys.data.synthetic import generate
n = int(sys.argv[1])
log = generate(n_events=n, n_users=max(2000, n // 50), n_items=max(1000, n // 500), days=90, seed=1)
log.write(Path(sys.argv[2]))
print(log.events.height)
"""

PREPARE = """
import json, resource, sys, time
from pathlib import Path
from recsys.data.prepare import prepare_tables
from recsys.data.readers import load_generic
from recsys.data.validate import validate
src = Path(sys.argv[1])
t = time.perf_counter()
raw = load_generic(src / "events.parquet", src / "items.parquet", src / "users.parquet")
clean, report = validate(raw)
t_valid = time.perf_counter() - t
manifest = prepare_tables(clean.events, clean.items, clean.users, Path(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - t, "validate_seconds": t_valid,
    "rows": manifest["rows"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

NAIVE = """
import json, resource, sys, time
import polars as pl
src = sys.argv[1]
events = pl.read_parquet(src + "/events.parquet").filter(pl.col("event_type") != "impression")
t = time.perf_counter()
rows = events.sort("user_id", "timestamp").iter_rows(named=True)
histories, last_user, past = [], None, []
for row in rows:  # the per-row loop a first version would write
    if row["user_id"] != last_user:
        last_user, past = row["user_id"], []
    earlier = [item for item, ts in past if ts < row["timestamp"]][-20:][::-1]
    histories.append(earlier)
    past.append((row["item_id"], row["timestamp"]))
print(json.dumps({"seconds": time.perf_counter() - t, "rows": len(histories),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsys-bench-prepare"))
    args = parser.parse_args()
    results = []
    for size in args.sizes:
        src = args.work / f"raw_{size}"
        if not (src / "events.parquet").exists():
            _run(GENERATE, str(size), str(src))
        measured = json.loads(_run(PREPARE, str(src), str(args.work / f"prepared_{size}")))
        events = measured["rows"]["events"]
        results.append(
            {
                "engine": "recsys prepare",
                "target_events": size,
                "events": events,
                "interactions": measured["rows"]["interactions"],
                "seconds": round(measured["seconds"], 2),
                "validate_seconds": round(measured["validate_seconds"], 2),
                "events_per_s": round(events / measured["seconds"]),
                "peak_rss_mb": round(measured["peak_rss_mb"]),
            }
        )
        print(results[-1], flush=True)
    smallest = min(args.sizes)
    naive = json.loads(_run(NAIVE, str(args.work / f"raw_{smallest}")))
    fast = next(r for r in results if r["target_events"] == smallest)
    naive_row = {
        "engine": "naive per-row Python histories only",
        "target_events": smallest,
        "events": fast["events"],
        "interactions": naive["rows"],
        "seconds": round(naive["seconds"], 2),
        "validate_seconds": None,
        "events_per_s": round(fast["events"] / naive["seconds"]),
        "peak_rss_mb": round(naive["peak_rss_mb"]),
    }
    results.append(naive_row)
    speedup = round(naive["seconds"] / fast["seconds"], 1)
    header = "| engine | events | interactions | seconds | events/s | peak RSS (MB) |\n|---|---:|---:|---:|---:|---:|\n"
    table = header + "".join(
        f"| {r['engine']} | {r['events']:,} | {r['interactions']:,} | {r['seconds']} | {r['events_per_s']:,} | {r['peak_rss_mb']:,} |\n"
        for r in results
    )
    note = (
        f"\nFull prepare at {smallest:,} events is {speedup}x faster than the naive loop that builds only "
        f"the histories. Machine: {platform.processor() or platform.machine()}, {platform.python_version()}, "
        f"measured {time.strftime('%Y-%m-%d')}.\n"
    )
    print(table + note)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prepare.json").write_text(json.dumps({"results": results, "naive_speedup": speedup}, indent=2))
    (RESULTS / "prepare.md").write_text("# bench/prepare.py\n\n" + table + note)



if __name__ == "__main__":
    main()
