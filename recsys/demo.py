"""`recsys demo`: the whole pipeline on embedded defaults (generated data), with progress output.

Each stage is the same code the CLI subcommands run; stages whose optional dependencies are not
installed are reported and skipped, never faked.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="working directory")
    parser.add_argument("--events", type=int, default=120_000, help="approximate generated events")
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--items", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)


def _stage(title: str, fn: Callable[[], object]) -> object:
    print(f"\n== {title}", flush=True)
    started = time.perf_counter()
    result = fn()
    print(f"   done in {time.perf_counter() - started:.1f}s", flush=True)
    return result


def run(args: argparse.Namespace) -> int:
    from recsys.data.prepare import PrepareConfig, prepare_tables
    from recsys.data.readers import load_generic
    from recsys.data.synthetic import SyntheticConfig, generate
    from recsys.data.validate import validate

    out: Path = args.out
    started = time.perf_counter()
    raw_dir, prepared_dir = out / "raw", out / "prepared"

    def generate_step() -> None:
        log = generate(SyntheticConfig(n_users=args.users, n_items=args.items, n_events=args.events, seed=args.seed))
        paths = log.write(raw_dir)
        print(f"   {log.events.height:,} events, {log.items.height:,} items, {log.users.height:,} users -> {raw_dir}")
        del paths

    def prepare_step() -> None:
        raw = load_generic(raw_dir / "events.parquet", raw_dir / "items.parquet", raw_dir / "users.parquet")
        clean, report = validate(raw)
        print("   " + report.summary().replace("\n", "\n   "))
        manifest = prepare_tables(clean.events, clean.items, clean.users, prepared_dir, PrepareConfig(),
                                  inputs=raw.sources, validation=report.to_dict())
        print(f"   rows: {manifest['rows']}")
        print(f"   global cutoffs: {manifest['cutoffs']}")

    _stage("1/2 generate a behaviour log with planted preferences", generate_step)
    _stage("2/2 prepare: validate, split by time, build histories and training pairs", prepare_step)
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s; artifacts in {out}")
    return 0
