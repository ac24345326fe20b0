"""Before/after table for the one-request-path refactor (issue 14): serve, batch and quality benches
run back to back on the same machine, once on the starting commit and once on the refactor.

    python bench/request_path.py --before DIR --after DIR [--out bench/results]

Each DIR holds the outputs of one side: serve*/serve.json (bench/serve.py --out DIR/serveN, one per
repetition),
batch.log (JSON rows of bench/batch.py's local-engine child, one per repetition: `run_child([...,
"--child", "local", ...])`, the process-tree peak RSS included) and quality2/quality.json
(bench/quality.py --out DIR/quality2). Writes request_path.{md,json}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def serve_figures(paths: list[Path]) -> dict[str, Any]:
    """Rank, 100 candidates, warm: per run (bench/serve.py repetitions, alternating sides)."""
    out: dict[str, list[Any]] = {}
    for path in paths:
        report = json.loads(path.read_text())
        warm = [r for r in report["rows"] if r["scenario"] == "warm" and r["mode"] == "concurrency"]
        one = next(r for r in warm if r["level"] == 1)
        for key, value in (
            ("Rank 100, 1 concurrent: p50 ms", one["p50_ms"]),
            ("Rank 100, 1 concurrent: p99 ms", one["p99_ms"]),
            ("Rank 100, 1 concurrent: server p50 ms", one["server_p50_ms"]),
            ("Rank 100, saturated (16 concurrent): QPS", max(r["qps"] for r in warm)),
            ("load average at the run's start (1 min)", float(str(report["load_average"]).split(",")[0])),
        ):
            out.setdefault(key, []).append(value)
    return out


def batch_figures(path: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    local = [r for r in rows if r["engine"] == "local"]  # one row per repetition
    return {
        "batch: pairs per run": local[0]["pairs"],
        "batch: pairs/s (each run)": [round(r["pairs_per_s"]) for r in local],
        "batch: peak RSS MB, process tree (each run)": [r["peak_rss_mb"] for r in local],
    }


def quality_figures(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for run in json.loads(path.read_text())["runs"]:
        key = f"{run['name']}_{run['protocol']}"
        blend = run["metrics"]["all"]["blend"]
        ci = [round(x, 4) for x in blend["ndcg@10_ci"]]
        out[f"{key}: blend NDCG@10 [95% CI]"] = f"{blend['ndcg@10']:.4f} [{ci[0]}, {ci[1]}]"
        ease = run["paired_bootstrap"]["all"]["ease"]
        out[f"{key}: blend - EASE [paired CI]"] = f"{ease['diff']:+.4f} [{ease['lo']:+.4f}, {ease['hi']:+.4f}]"
        pop = run["metrics"]["all"]["popularity"]["ndcg@10"]
        out[f"{key}: popularity NDCG@10"] = f"{pop:.4f}"
    return out


def side(directory: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    figures.update(serve_figures(sorted(directory.glob("serve*/serve.json"))))
    figures.update(batch_figures(directory / "batch.log"))
    figures.update(quality_figures(directory / "quality2" / "quality.json"))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    before, after = side(args.before), side(args.after)
    payload = {"before": before, "after": after, "note": args.note}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "request_path.json").write_text(json.dumps(payload, indent=1))
    lines = ["# One request path (issue 14): before / after", "", args.note, "",
             "| figure | before (170c560) | after |", "|---|---:|---:|"]
    for key in before:
        lines.append(f"| {key} | {before[key]} | {after.get(key)} |")
    lines.append("")
    (args.out / "request_path.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
