"""`recsys prepare`: read (generic files or a public format), validate, prepare."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from recsys.errors import InputError
from recsys.plots import add_plots_flag

if TYPE_CHECKING:
    from recsys.data.readers import RawTables


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input (either generic files or --format with --input)")
    src.add_argument("--events", type=Path, help="events table (parquet, csv, tsv or jsonl)")
    src.add_argument("--items", type=Path, help="items table (parquet, csv, tsv or jsonl)")
    src.add_argument("--users", type=Path, help="optional users table")
    src.add_argument("--format", choices=["movielens", "recbole", "mind", "auto"], help="public layout of --input")
    src.add_argument("--input", type=Path, help="directory holding a public dataset (with --format)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory for the prepared dataset: new, empty, or a previous prepared dataset "
                             "(anything else needs --overwrite; an input is never replaced)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even when it is a file or a directory that is not a prepared dataset")
    parser.add_argument("--max-history", type=int, default=20, help="history length per target (default 20)")
    parser.add_argument("--valid-frac", type=float, default=0.1, help="global split: validation share (0.1)")
    parser.add_argument("--test-frac", type=float, default=0.1, help="global split: test share (0.1)")
    parser.add_argument("--valid-start", help="global split: explicit validation start (ISO time)")
    parser.add_argument("--test-start", help="global split: explicit test start (ISO time)")
    parser.add_argument("--tail-frac", type=float, default=0.2, help="per-user tail protocol: test share (0.2)")
    parser.add_argument("--text-template", default="{title}. {tags}. {description}", help="item text template")
    parser.add_argument("--max-text-words", type=int, default=64, help="truncate item texts to this many words")
    parser.add_argument(
        "--rating-threshold", type=float, default=0.0,
        help="ratings below this become non-positive (default 0: every rating is an interaction)",
    )
    parser.add_argument(
        "--on-invalid", choices=["error", "drop"], default="error",
        help="bad rows: stop with an error (default) or drop them and report the counts",
    )
    add_plots_flag(parser, "timeline.png (events per day with the split cutoffs)")


def _inputs(args: argparse.Namespace) -> list[Path]:
    """The input paths, after refusing ambiguous or missing combinations (before anything is read)."""
    generic = [p for p in (args.events, args.items, args.users) if p is not None]
    if args.format:
        if generic:
            flags = ", ".join(f for f, p in (("--events", args.events), ("--items", args.items),
                                             ("--users", args.users)) if p is not None)
            raise InputError(f"{flags} cannot be combined with --format {args.format}: the public layout is read from "
                             "--input DIR alone. Fix: pass either --events/--items[/--users] or --format with --input.")
        if args.input is None:
            raise InputError("--format needs --input DIR, the directory that holds the dataset files")
        return [args.input]
    if args.input is not None:
        raise InputError("--input DIR needs --format movielens|recbole|mind|auto; for generic files use --events/--items")
    if not (args.events and args.items):
        raise InputError(
            "no input given: pass --events FILE --items FILE [--users FILE], or --format "
            "movielens|recbole|mind|auto --input DIR"
        )
    return generic


def run(args: argparse.Namespace) -> int:
    from recsys.data.prepare import PrepareConfig, is_prepared, prepare_tables
    from recsys.data.schema import RatingRule, StrengthRule
    from recsys.files import check_output_path, output_lock

    # Flags and the output path are checked before any data is read.
    config = PrepareConfig(
        max_history=args.max_history,
        valid_frac=args.valid_frac,
        test_frac=args.test_frac,
        valid_start=args.valid_start,
        test_start=args.test_start,
        tail_frac=args.tail_frac,
        text_template=args.text_template,
        max_text_words=args.max_text_words,
    )
    rule = StrengthRule(rating=RatingRule(positive_threshold=args.rating_threshold))
    inputs = _inputs(args)
    check_output_path(args.out, ours=is_prepared, kind="prepared dataset", inputs=inputs, overwrite=args.overwrite)
    from recsys.progress import Stages

    with output_lock(args.out, what=f"prepared dataset {args.out}"), Stages("prepare", 3) as stages:
        stages.next("read the inputs")
        raw = _read(args)
        from recsys.data.validate import validate

        stages.next("validate")
        clean, report = validate(raw, rule=rule, on_invalid=args.on_invalid)
        print(report.summary())
        stages.next("split by time, build histories and pairs, write")
        manifest = prepare_tables(
            clean.events, clean.items, clean.users, args.out, config,
            inputs=raw.sources, validation=report.to_dict(), locked=True, plots=not args.no_plots,
        )
    rows = manifest["rows"]
    print(
        f"prepared {args.out}: {rows['events']:,} events, {rows['interactions']:,} interactions, "
        f"{rows['users']:,} users, {rows['items']:,} items; global cutoffs valid>={manifest['cutoffs']['valid_start']} "
        f"test>={manifest['cutoffs']['test_start']}"
    )
    if (args.out / "timeline.png").exists():
        print(f"timeline of events per day with the cutoffs: {args.out / 'timeline.png'}")
    return 0


def _read(args: argparse.Namespace) -> RawTables:
    from recsys.data.importers import load_format
    from recsys.data.readers import load_generic

    if args.format:
        return load_format(args.format, args.input)
    return load_generic(args.events, args.items, args.users)
