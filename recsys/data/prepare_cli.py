"""`recsys prepare`: read (generic files or a public format), validate, prepare."""

from __future__ import annotations

import argparse
from pathlib import Path

from recsys.errors import InputError


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input (either generic files or --format with --input)")
    src.add_argument("--events", type=Path, help="events table (parquet, csv, tsv or jsonl)")
    src.add_argument("--items", type=Path, help="items table (parquet, csv, tsv or jsonl)")
    src.add_argument("--users", type=Path, help="optional users table")
    src.add_argument("--format", choices=["movielens", "recbole", "mind", "auto"], help="public layout of --input")
    src.add_argument("--input", type=Path, help="directory holding a public dataset (with --format)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the prepared dataset")
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


def run(args: argparse.Namespace) -> int:
    from recsys.data.importers import load_format
    from recsys.data.prepare import PrepareConfig, prepare_tables
    from recsys.data.readers import load_generic
    from recsys.data.schema import RatingRule, StrengthRule
    from recsys.data.validate import validate

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
    if args.format:
        if args.input is None:
            raise InputError("--format needs --input DIR, the directory that holds the dataset files")
        raw = load_format(args.format, args.input)
    elif args.events and args.items:
        raw = load_generic(args.events, args.items, args.users)
    else:
        raise InputError(
            "no input given: pass --events FILE --items FILE [--users FILE], or --format "
            "movielens|recbole|mind|auto --input DIR"
        )
    rule = StrengthRule(rating=RatingRule(positive_threshold=args.rating_threshold))
    clean, report = validate(raw, rule=rule, on_invalid=args.on_invalid)
    print(report.summary())
    manifest = prepare_tables(
        clean.events, clean.items, clean.users, args.out, config,
        inputs=raw.sources, validation=report.to_dict(),
    )
    rows = manifest["rows"]
    print(
        f"prepared {args.out}: {rows['events']:,} events, {rows['interactions']:,} interactions, "
        f"{rows['users']:,} users, {rows['items']:,} items; global cutoffs valid>={manifest['cutoffs']['valid_start']} "
        f"test>={manifest['cutoffs']['test_start']}"
    )
    return 0
