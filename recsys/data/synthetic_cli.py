"""`recsys generate`: write a synthetic behaviour log (the embedded default dataset)."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="directory for events/items/users files")
    parser.add_argument("--events", type=int, default=200_000, help="approximate number of events (200000)")
    parser.add_argument("--users", type=int, default=2000, help="number of users (2000)")
    parser.add_argument("--items", type=int, default=1000, help="number of items, each with a title, description and tags (1000)")
    parser.add_argument("--days", type=int, default=60, help="days of activity the log spans (60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same log (0)")
    parser.add_argument("--file-format", choices=["parquet", "csv", "jsonl"], default="parquet",
                        help="format of the written files (parquet)")
    parser.add_argument("--no-impressions", action="store_true", help="only interactions, no exposure events")

def run(args: argparse.Namespace) -> int:
    from recsys.data.synthetic import SyntheticConfig, generate
    from recsys.progress import Stages

    config = SyntheticConfig(
        n_users=args.users, n_items=args.items, n_events=args.events, days=args.days,
        seed=args.seed, impressions=not args.no_impressions,
    )
    with Stages("generate", 2) as stages:
        stages.next("simulate users, items and events")
        log = generate(config)
        stages.next(f"write {args.file_format} files")
        paths = log.write(args.out, args.file_format)
    print(f"wrote {log.events.height:,} events, {log.items.height:,} items, {log.users.height:,} users:")
    for role, path in paths.items():
        print(f"  {role}: {path}")
    return 0
