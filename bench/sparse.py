"""Folding served lists into SparseMap: one sorted array (np.insert per fold, the old map) vs two levels.

    python bench/sparse.py [--sizes 100000,1000000,10000000] [--repeat 2] [--name sparse]

Workload, as the server's follower sees it: every fold is one EXPOSURE_FLUSH_S (0.25 s) worth of
served lists, --lists lists of --k items (default 128 x 10 = 1,280 impressions: ~500 Rank/s) for users
drawn from --active-users of the map's users, items from a --items catalogue, folded into
`user_item_impr` (mostly new (user, item) keys, the case that grows the map). The map starts with N
random entries (as after a long run, compacted, as a snapshot loads it).

- two-level: `recsys.features.SparseMap`, folded until it has merged its delta into the base twice
  (so amortised throughput and the tail include the merges), at least --min-folds;
- naive: the single sorted array (`NaiveMap`, the old SparseMap.add: np.insert of the new keys into
  the whole map every fold), the same fold sequence, stopped after --naive-s seconds when it has not
  finished it (10M entries: its per-fold cost is steady, ~1% growth over the folds it does).

Per fold, as the server's follower folds (defer_merges: a due delta merge is built outside the
state's write lock by prepare_merge and swapped in by install_merge): impressions/s (impressions /
time under the lock), p50 / p99 / max ms under the lock, and the longest merge built outside it. Then the read
side at the end of the run (the delta well filled): `get_row` of 100 candidates for an active user
(its row in both levels), median and p99 over many calls, naive vs two-level. Tables and JSON go to
bench/results/<name>.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.features import SparseMap  # noqa: E402


class NaiveMap:
    """The old one-level map's update and request-path read, verbatim: the 'before' side."""

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys, self.values = keys, values

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray | float = 1.0) -> None:
        keys = SparseMap.key(rows, cols).ravel()
        weights = np.broadcast_to(np.asarray(values, np.float64), keys.shape)
        uniq, inverse = np.unique(keys, return_inverse=True)
        sums = np.bincount(inverse, weights=weights, minlength=len(uniq))
        pos = np.searchsorted(self.keys, uniq)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == uniq[found]
        self.values[pos[found]] += sums[found]
        new = ~found
        if new.any():
            self.keys = np.insert(self.keys, pos[new], uniq[new])
            self.values = np.insert(self.values, pos[new], sums[new])

    def get_row(self, row: int, cols: np.ndarray) -> np.ndarray:
        base = int(row) << 32
        lo, hi = self.keys.searchsorted(base), self.keys.searchsorted(base + (1 << 32))
        if lo == hi:
            return np.zeros(len(cols), np.float64)
        keys = self.keys[lo:hi]
        want = np.asarray(cols, np.int64) | base
        pos = keys.searchsorted(want)
        np.minimum(pos, hi - lo - 1, out=pos)
        out = self.values[lo:hi][pos]
        out[keys[pos] != want] = 0.0
        return out


class Map(Protocol):
    def __len__(self) -> int: ...
    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray | float = 1.0) -> None: ...
    def get_row(self, row: int, cols: np.ndarray) -> np.ndarray: ...


def initial(n: int, n_users: int, n_items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = np.unique(SparseMap.key(rng.integers(0, n_users, int(n * 1.02)), rng.integers(0, n_items, int(n * 1.02))))
    keys = np.sort(rng.choice(keys, n, replace=False))
    return keys, np.ones(n, np.float64)


def fold(target: Map, rng: np.random.Generator, users: np.ndarray, args: argparse.Namespace) -> tuple[float, float]:
    """One flush of served lists folded as the server's follower does -> (seconds under the state's
    write lock, seconds of a delta merge built outside it: two-level only)."""
    rows = np.repeat(rng.choice(users, args.lists), args.k)
    cols = rng.integers(0, args.items, args.lists * args.k)
    started = time.perf_counter()
    target.add(rows, cols)
    locked = time.perf_counter() - started
    if not isinstance(target, SparseMap):
        return locked, 0.0
    started = time.perf_counter()
    merge = target.prepare_merge()  # Follower._merge_sparse: a read, requests go on
    aside = time.perf_counter() - started
    started = time.perf_counter()
    if merge is not None:
        target.install_merge(merge)  # the swap under the lock
    return locked + time.perf_counter() - started, aside


def run_folds(target: Map, *, seconds: float, max_folds: int, merges: int, seed: int,
              users: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Fold until `merges` delta merges (two-level) and --min-folds, or `max_folds` / `seconds` (naive)."""
    rng = np.random.default_rng(seed)
    if isinstance(target, SparseMap):
        target.defer_merges = True
    times: list[float] = []
    aside: list[float] = []
    merged, start_len, wall = 0, len(target), time.perf_counter()
    while len(times) < max_folds:
        before = len(target._dkeys) if isinstance(target, SparseMap) else 0
        locked, merge_s = fold(target, rng, users, args)
        times.append(locked)
        aside.append(merge_s)
        if isinstance(target, SparseMap) and len(target._dkeys) < before:
            merged += 1
        if merges and merged >= merges and len(times) >= args.min_folds:
            break
        if seconds and time.perf_counter() - wall >= seconds and len(times) >= 5:
            break
    t = np.array(times) * 1e3
    return {
        "folds": len(times), "merges": merged, "entries_start": start_len, "entries_end": len(target),
        "impressions_per_s": round(len(times) * args.lists * args.k / (t.sum() / 1e3)),
        "fold_mean_ms": round(float(t.mean()), 3), "fold_p50_ms": round(float(np.percentile(t, 50)), 3),
        "fold_p99_ms": round(float(np.percentile(t, 99)), 3), "fold_max_ms": round(float(t.max()), 3),
        "merge_aside_max_ms": round(max(aside) * 1e3, 3),
    }


def read_latency(target: Map, users: np.ndarray, args: argparse.Namespace, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    cands = [rng.integers(0, args.items, 100) for _ in range(64)]
    who = rng.choice(users, args.reads)
    times = np.empty(args.reads)
    for j in range(args.reads):
        cols = cands[j % 64]
        started = time.perf_counter()
        target.get_row(int(who[j]), cols)
        times[j] = time.perf_counter() - started
    return {"get_row_p50_us": round(float(np.median(times)) * 1e6, 2), "get_row_p99_us": round(float(np.percentile(times, 99)) * 1e6, 2)}


def one_size(n: int, rep: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    keys, values = initial(n, args.users, args.items, seed=n + rep)
    users = np.unique(keys[np.random.default_rng(rep).integers(0, n, args.active_users)] >> 32)
    ours = SparseMap(keys.copy(), values.copy())
    two = run_folds(ours, seconds=0.0, max_folds=10**9, merges=2, seed=rep, users=users, args=args)
    two.update(delta_limit=ours.delta_limit, delta_at_reads=len(ours._dkeys), **read_latency(ours, users, args, seed=rep))
    del ours
    naive = NaiveMap(keys, values)  # the same fold sequence (seed), stopped after --naive-s seconds
    one = run_folds(naive, seconds=args.naive_s, max_folds=two["folds"], merges=0, seed=rep, users=users, args=args)
    one.update(read_latency(naive, users, args, seed=rep))
    rows = [{"entries": n, "repeat": rep, "map": "naive", **one}, {"entries": n, "repeat": rep, "map": "two-level", **two}]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| entries | run | map | folds (merges) | entries at end | impressions/s | fold p50 ms | fold p99 ms | fold max ms | merge outside the lock, max ms | get_row p50 us | get_row p99 us |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['entries']:,} | {r['repeat'] + 1} | {r['map']} | {r['folds']} ({r['merges']}) | {r['entries_end']:,} | "
                   f"{r['impressions_per_s']:,} | {r['fold_p50_ms']} | {r['fold_p99_ms']} | {r['fold_max_ms']} | {r['merge_aside_max_ms'] or ''} | "
                   f"{r['get_row_p50_us']} | {r['get_row_p99_us']} |")
    return out


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for n in sorted({r["entries"] for r in rows}):
        for rep in sorted({r["repeat"] for r in rows}):
            naive = next(r for r in rows if r["entries"] == n and r["repeat"] == rep and r["map"] == "naive")
            ours = next(r for r in rows if r["entries"] == n and r["repeat"] == rep and r["map"] == "two-level")
            out.append(
                f"- {n:,} entries, run {rep + 1}: fold throughput two-level / naive "
                f"{ours['impressions_per_s'] / naive['impressions_per_s']:.1f}x; fold p99 naive / two-level "
                f"{naive['fold_p99_ms'] / ours['fold_p99_ms']:.1f}x; get_row p50 two-level / naive "
                f"{ours['get_row_p50_us'] / naive['get_row_p50_us']:.2f}x")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--lists", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--active-users", type=int, default=20_000)
    parser.add_argument("--naive-s", type=float, default=3.0)
    parser.add_argument("--min-folds", type=int, default=200)
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--name", default="sparse")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    load = os.getloadavg()
    rows = [r for rep in range(args.repeat) for n in map(int, args.sizes.split(",")) for r in one_size(n, rep, args)]
    command = "python bench/sparse.py " + " ".join(sys.argv[1:])
    md = [
        "# SparseMap folds: one sorted array (np.insert per fold) vs two levels (base + delta)", "",
        f"{os.cpu_count()} CPU cores (shared with other work), {platform.processor() or platform.machine()}; load average at "
        f"start {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}. Command: `{command.strip()}`. One fold = {args.lists} served "
        f"lists x {args.k} items = {args.lists * args.k:,} impressions into user_item_impr ({args.active_users:,} active "
        f"users, {args.items:,} items); two-level folded as the follower folds (fold times: under the state's "
        f"write lock; delta merges built outside it, then swapped in) until it merged its delta twice, naive the same fold sequence or its first {args.naive_s} s. get_row: 100 candidates, an active user, after the folds.", "",
        *table(rows), "", "## Ratios", "", *ratios(rows), "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(md))
    payload = {"command": command.strip(), "load_average": list(load), "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
