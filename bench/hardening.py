"""Before/after cost of the service hardening (issue 17) on the request path: `bench/serve.py` run
from two source trees, alternately (before, after, before, after, ...), so drifting machine load hits
both sides alike; the table reports each key row's median and spread over the rounds.

    python bench/hardening.py --before /work/base --rounds 3     # writes bench/results/hardening.{md,json}

The hardening adds per request: a deserializer wrapper and one coroutine frame (undecodable bytes ->
INVALID_ARGUMENT), a timestamp range check, a whitespace check on ids, and for cold texts a deadline
per batcher entry. Everything else it adds (child-process vetting, drain, eviction) is off the
request path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEY_ROWS = [("warm", 1), ("warm", 16), ("cold", 1), ("cold", 4), ("RPC floor", 1)]
FIELDS = ("qps", "p50_ms", "p99_ms", "server_p50_ms", "server_p99_ms")


def run_serve(tree: Path, name: str, out: Path, serve_args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(tree / "bench" / "serve.py"), "--out", str(out), "--name", name, *serve_args]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    return result


def key_rows(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows = {}
    for row in result["rows"]:
        key = (row["scenario"], int(row["level"]))
        if row["mode"] == "concurrency" and key in KEY_ROWS:
            rows[f"{key[0]} {key[1]}-concurrent"] = {f: row[f] for f in FIELDS if row.get(f) is not None}
    return rows


def summarise(runs: dict[str, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], str]:
    table = []
    lines = [
        "| row | metric | before median (min-max) | after median (min-max) | after / before |",
        "|---|---|---:|---:|---:|",
    ]
    names = [f"{s} {n}-concurrent" for s, n in KEY_ROWS]
    for name in names:
        for field in FIELDS:
            sides = {}
            for side, results in runs.items():
                values = [key_rows(r).get(name, {}).get(field) for r in results]
                sides[side] = [v for v in values if v is not None]
            if not all(sides.values()):
                continue
            before, after = statistics.median(sides["before"]), statistics.median(sides["after"])
            table.append({"row": name, "metric": field, "before": sides["before"], "after": sides["after"],
                          "before_median": before, "after_median": after, "ratio": after / before if before else None})
            lines.append(
                f"| {name} | {field} | {before:g} ({min(sides['before']):g}-{max(sides['before']):g}) | "
                f"{after:g} ({min(sides['after']):g}-{max(sides['after']):g}) | {after / before:.2f} |"
            )
    return table, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="source tree of the 'before' side")
    parser.add_argument("--after", type=Path, default=ROOT, help="source tree of the 'after' side (this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsys-bench-hardening"))
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/recsys-bench-hardening/runs"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--serve-args", default="--levels 1,16 --rates= --message-levels= --cold-levels 1,4 "
                        "--floor-levels 1 --duration 5 --naive-requests 1",
                        help="flags passed to bench/serve.py on both sides (a shorter run than its default)")
    args = parser.parse_args(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    serve_args = ["--work", str(args.work), *args.serve_args.split()]
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for k in range(args.rounds):
        for side, tree in (("before", args.before), ("after", args.after)):
            result = run_serve(tree.resolve(), f"{side}{k}", args.scratch, serve_args)
            runs[side].append(result)
            print(f"round {k} {side}: load {result['load_average']}, {key_rows(result)}", file=sys.stderr)
    table, markdown = summarise(runs)
    loads = {side: [r["load_average"] for r in results] for side, results in runs.items()}
    head = (
        "# Hardening: bench/serve.py before / after (issue 17)\n\n"
        f"`python bench/hardening.py --before {args.before} --rounds {args.rounds}`: bench/serve.py "
        f"({args.serve_args}) from each tree, alternating, {args.rounds} rounds each, on the shared 2-core "
        "machine (other jobs running: see the load averages). Medians with min-max over the rounds.\n\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hardening.md").write_text(head + markdown + f"\n\nLoad averages at each run's start: {loads}\n")
    payload = {"before": str(args.before), "after": str(args.after), "rounds": args.rounds,
               "serve_args": args.serve_args, "load_average": loads, "rows": table}
    (args.out / "hardening.json").write_text(json.dumps(payload, indent=1))
    print(head + markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
