"""The features stage of every Rank: FeatureState.compute for one request of 100 candidates, this
tree against another tree (--before, e.g. a checkout of the previous commit) on the same data and
requests, alternating, in one run.

    python bench/features.py [--before TREE] [--requests 3000] [--repeat 5] [--name features]

Each side runs in its own process with its tree's `recsys` first on sys.path, builds its own
FeatureState from bench/serve.py's prepared synthetic data (built if missing, cached under --work)
and times the same requests: warm users (>= 5 positives) at the state's end, 100 random candidates
each (one seed). The sides alternate by repetition; the per-request median and p99 are taken over
all repetitions. Without --before only this tree is measured. Tables and JSON go to
bench/results/<name>.md/.json.

History: this script first measured the transition features (trans_last, trans_last_norm,
trans_recent) with and without, on one state; they were removed (state format 3), and the same
figure is now the before/after of that removal (`--before` a tree that still computes them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def side(tree: Path, data_dir: Path, requests: int, candidates: int) -> dict[str, Any]:
    """In the child process: build the state with `tree`'s code and time the requests (us each)."""
    sys.path.insert(0, str(tree))
    import polars as pl

    import recsys
    from recsys.data.prepared import PreparedData
    from recsys.features import FeatureState

    assert Path(recsys.__file__).resolve().is_relative_to(tree.resolve()), recsys.__file__
    data = PreparedData.load(data_dir)
    state = FeatureState.build(data.items, data.events().collect())
    positives = pl.read_parquet(data_dir / "events.parquet").filter(pl.col("strength") > 0)
    warm = np.sort(positives.group_by("user_idx").len().filter(pl.col("len") >= 5)["user_idx"].to_numpy())
    rng = np.random.default_rng(0)
    users = rng.choice(warm, requests)
    cands = [rng.choice(state.n_items, candidates, replace=False) for _ in range(requests)]
    t_us = int(state.as_of_us) + 1
    out = np.empty(requests)
    for j, (u, c) in enumerate(zip(users, cands, strict=True)):
        start = time.perf_counter()
        state.compute(int(u), c, t_us)
        out[j] = time.perf_counter() - start
    return {"us": (out * 1e6).round(2).tolist(), "columns": len(state.feature_names(match=False)),
            "sparse_entries": {name: len(getattr(state, name)) for name in ("covis", "trans") if hasattr(state, name)}}


def run_side(tree: Path, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--side", str(tree), "--data", str(data_dir),
           "--requests", str(args.requests), "--candidates", str(args.candidates)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{tree}: {' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a tree to compare against (its recsys/ is imported)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsys-bench-serve"))
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="features")
    parser.add_argument("--side", type=Path, help=argparse.SUPPRESS)  # internal: one side's child process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side is not None:
        print(json.dumps(side(args.side, args.data, args.requests, args.candidates)))
        return 0
    if args.before is not None and not (args.before / "recsys" / "features").is_dir():
        parser.error(f"--before {args.before}: not a source tree (no recsys/features/ in it)")
    sys.path.insert(0, str(ROOT))
    from bench.report import write_results
    from bench.serve import build

    data_dir = build(args.work, 3000, seed=0)["data"]
    trees = {"before": args.before, "this tree": ROOT} if args.before is not None else {"this tree": ROOT}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(args.repeat):
        for name, tree in trees.items():
            results[name].append(run_side(tree, data_dir, args))
    rows = []
    for name, parts in results.items():
        us = np.concatenate([p["us"] for p in parts])
        rows.append({"side": name, "tree": str(trees[name]), "columns": parts[0]["columns"],
                     "sparse_entries": parts[0]["sparse_entries"], "p50_us": round(float(np.median(us)), 1),
                     "p99_us": round(float(np.percentile(us, 99)), 1), "mean_us": round(float(us.mean()), 1)})
    ratios = {}
    if len(rows) == 2:
        before, now = rows
        ratios = {"features stage p50, this tree / before": round(now["p50_us"] / before["p50_us"], 2),
                  "features stage p99, this tree / before": round(now["p99_us"] / before["p99_us"], 2),
                  "p50 us per Rank of 100 candidates, this tree - before": round(now["p50_us"] - before["p50_us"], 1)}
    report = {
        "command": "python bench/features.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores (shared), load average at end "
                   + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "requests": args.requests, "candidates": args.candidates, "repeat": args.repeat,
        "rows": rows,
        "ratios": ratios,
    }
    lines = [f"# Features stage of one Rank ({args.candidates} candidates, FeatureState.compute)", "",
             f"{report['machine']}. Command: `{report['command']}`. {args.requests} requests x {args.repeat} "
             "repetitions per side, sides alternating.", "",
             "| side | tree | columns | sparse entries | p50 us | p99 us | mean us |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['side']} | {r['tree']} | {r['columns']} | "
              + ", ".join(f"{k} {v:,}" for k, v in r["sparse_entries"].items())
              + f" | {r['p50_us']} | {r['p99_us']} | {r['mean_us']} |" for r in rows]
    lines += ["", *(f"- {k}: {v}" for k, v in ratios.items()), ""]
    write_results(args.out, args.name, report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
