"""What the transition features (issue 20: trans_last, trans_last_norm, trans_recent) add to the
features stage of every Rank: FeatureState.compute for one request of 100 candidates, with and
without them, on the same state in one run.

    python bench/features.py [--requests 3000] [--repeat 5] [--name features]

The state is built by this tree from bench/serve.py's prepared synthetic data (built if missing, cached
under --work). "without" is the same state read as a format-1 state reads (`FeatureState.missing =
("trans",)`: the layout leaves the three columns out and compute skips their lookups), which is also
exactly what every ranker published before them computes after an upgrade. Requests: warm users (>= 5
positives) at the state's end, 100 random candidates each; the two sides alternate by repetition and
the per-request median and p99 are taken over all repetitions. Tables and JSON go to
bench/results/<name>.md/.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_results  # noqa: E402
from bench.serve import build  # noqa: E402


def timings(state: Any, users: np.ndarray, cands: np.ndarray, t_us: int) -> np.ndarray:
    out = np.empty(len(users))
    for j, (u, c) in enumerate(zip(users, cands, strict=True)):
        start = time.perf_counter()
        state.compute(int(u), c, t_us)
        out[j] = time.perf_counter() - start
    return out * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsys-bench-serve"))
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="features")
    args = parser.parse_args(argv)
    import polars as pl

    from recsys.data.prepared import PreparedData
    from recsys.features import FeatureState

    paths = build(args.work, 3000, seed=0)
    data = PreparedData.load(paths["data"])
    state = FeatureState.build(data.items, data.events().collect())
    positives = pl.read_parquet(paths["data"] / "events.parquet").filter(pl.col("strength") > 0)
    warm = positives.group_by("user_idx").len().filter(pl.col("len") >= 5)["user_idx"].to_numpy()
    rng = np.random.default_rng(0)
    users = rng.choice(warm, args.requests)
    cands = [rng.choice(state.n_items, args.candidates, replace=False) for _ in range(args.requests)]
    t_us = int(state.as_of_us) + 1
    sides: dict[str, list[np.ndarray]] = {"without transition features": [], "with transition features": []}
    for _ in range(args.repeat):
        for side, missing in (("without transition features", ("trans",)), ("with transition features", ())):
            state.missing = missing
            sides[side].append(timings(state, users, cands, t_us))
    rows = []
    for side, parts in sides.items():
        us = np.concatenate(parts)
        rows.append({"side": side, "columns": len(state.feature_names(match=False)) if side.startswith("with ") else
                     len(state.feature_names(match=False)) - 3,
                     "p50_us": round(float(np.median(us)), 1), "p99_us": round(float(np.percentile(us, 99)), 1),
                     "mean_us": round(float(us.mean()), 1)})
    without, with_ = rows
    report = {
        "command": "python bench/features.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores (shared), load average at end "
                   + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "state": {"items": state.n_items, "users": state.n_users, "trans_entries": len(state.trans),
                  "covis_entries": len(state.covis)},
        "rows": rows,
        "ratios": {"features stage p50, with / without": round(with_["p50_us"] / without["p50_us"], 2),
                   "added p50 us per Rank of 100 candidates": round(with_["p50_us"] - without["p50_us"], 1)},
    }
    lines = ["# Transition features: cost in the features stage of one Rank", "",
             f"{report['machine']}. Command: `{report['command']}`. State: {report['state']}.", "",
             "| side | columns | p50 us | p99 us | mean us |", "|---|---|---|---|---|"]
    lines += [f"| {r['side']} | {r['columns']} | {r['p50_us']} | {r['p99_us']} | {r['mean_us']} |" for r in rows]
    lines += ["", *(f"- {k}: {v}" for k, v in report["ratios"].items()), ""]
    write_results(args.out, args.name, report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
