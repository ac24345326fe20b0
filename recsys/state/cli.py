"""`recsys state export`: the event log as the data contract's events table (parquet), for
`recsys prepare --events` and `recsys retrain --events`. Reads beside a running server (the journal
read-only, Redis with XRANGE-like reads); the file is written to a temp path and renamed."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def configure_export(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--state", metavar="URL", help="redis://HOST:PORT/DB[?stream=NAME], as given to recsys serve")
    src.add_argument("--state-dir", type=Path, metavar="DIR", help="the embedded journal's directory, as given to recsys serve")
    parser.add_argument("--out", type=Path, required=True, help="events table to write (.parquet)")
    parser.add_argument("--events-only", action="store_true",
                        help="leave out served lists (impressions): use it when retrain also reads the parquet exposure log")


def run_export(args: argparse.Namespace) -> int:
    import logging

    import polars as pl

    from recsys.errors import InputError
    from recsys.state.codec import to_frame
    from recsys.state.log import START, EventLog

    if args.out.suffix != ".parquet":
        raise InputError(f"--out {args.out}: write a .parquet file (recsys prepare and retrain read it)")
    log: EventLog
    if args.state:
        from recsys.state.redis_log import RedisLog

        log = RedisLog(args.state)
    else:
        from recsys.state.journal import Journal

        log = Journal(args.state_dir, readonly=True)
    try:
        payloads: list[bytes] = []
        position = START
        while True:
            chunk = log.read(position, 10_000)
            if not chunk:
                break
            payloads.extend(p for _, p in chunk)
            position = chunk[-1][0]
    finally:
        log.close()
    frame = to_frame(payloads)
    if args.events_only:
        frame = frame.filter(pl.col("event_type") != "impression")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, args.out)
    logging.getLogger("recsys.state").info("%d events from %d records -> %s", frame.height, len(payloads), args.out)
    print(f"{frame.height} events ({len(payloads)} log records) -> {args.out}")
    return 0
