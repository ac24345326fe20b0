"""`recsys experiment validate|assign|analyze`: light module (polars, matplotlib imported in run_*)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from recsys.errors import EXIT_CHECK_FAILED
from recsys.plots import add_plots_flag

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_s(text: str) -> float:
    """'90', '30m', '24h', '7d' -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 3600, 30m, 24h, 7d)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def _context(pairs: list[str]) -> dict[str, str]:
    from recsys.errors import InputError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--context {pair!r}: write KEY=VALUE, e.g. --context country=US")
        out[key] = value
    return out


# --------------------------------------------------------------------------- validate


def configure_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment config (YAML; see docs/experiments.md)")
    parser.add_argument("--json", action="store_true", help="print the normalised config as JSON")
    parser.add_argument("--registry", type=Path,
                        help="also check that every ranker's model version is registered there ('current' resolves)")


def run_validate(args: argparse.Namespace) -> int:
    from recsys.experiments.config import check_models, load_config

    config = load_config(args.config)
    checked = check_models(config, args.registry) if args.registry is not None else []
    if args.json:
        print(json.dumps({"version": config.version, **config.to_dict()}, indent=2))
        return 0
    print(f"{args.config}: valid (config version {config.version})")
    for line in checked:
        print(line)
    print(f"rankers: {', '.join(f'{k} ({_spec(v.to_dict())})' for k, v in config.rankers.items())}; default: {config.default_ranker}")
    for h in config.holdouts:
        print(f"holdout {h.name}: {h.coverage:.2%} of {h.unit}s -> {h.ranker or config.default_ranker}")
    for layer in config.layers:
        print(f"layer {layer.name} (salt {layer.salt}):")
        for e in layer.experiments:
            window = f"{e.start.isoformat() if e.start else '-'} .. {e.end.isoformat() if e.end else '-'}"
            shares = ", ".join(f"{v.name}={s:.1%}->{v.ranker}" for v, s in zip(e.variants, e.expected_shares().values(), strict=True))
            target = f" targeting {dict((k, sorted(v)) for k, v in e.targeting.items())}" if e.targeting else ""
            print(f"  {e.name}: {e.coverage:.2%} of {e.unit}s, buckets {list(e.layer_buckets)}, {window}{target}; {shares}"
                  + (f"; {len(e.force)} forced" if e.force else ""))  # fmt: skip
    return 0


def _spec(d: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


# --------------------------------------------------------------------------- schema


def configure_schema(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Editors validate and complete a config with it, e.g. for the YAML language server, first line: "
                     "# yaml-language-server: $schema=docs/experiments.schema.json")


def run_schema(args: argparse.Namespace) -> int:
    from recsys.experiments.schema import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


# --------------------------------------------------------------------------- assign


def configure_assign(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment config (YAML)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--units", type=Path, help="unit ids: a text file (one per line) or a csv/parquet/jsonl table")
    src.add_argument("--count", type=int, help="preview with this many generated ids (u0000000, u0000001, ...)")
    src.add_argument("--debug", metavar="UNIT_ID", help="explain the assignment of one unit (JSON: buckets and checks)")
    parser.add_argument("--column", default=None, help="column of --units holding the ids (default: user_id or the first)")
    parser.add_argument("--context", action="append", default=[], metavar="KEY=VALUE",
                        help="request context for targeting (repeatable), e.g. --context country=US")
    parser.add_argument("--time", help="request time, ISO-8601 (default: now); decides which experiments run")
    parser.add_argument("--out", type=Path, help="write one row per unit (csv, jsonl or parquet by extension)")


def _units(args: argparse.Namespace) -> list[str]:
    from recsys.errors import InputError

    if args.count is not None:
        if args.count < 1:
            raise InputError("--count must be >= 1")
        return [f"u{i:07d}" for i in range(args.count)]
    path: Path = args.units
    if path.suffix.lower() in (".txt", ""):
        if not path.is_file():
            raise InputError(f"--units {path} does not exist")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    from recsys.experiments.analysis import read_table_any

    table = read_table_any(path, "units file")
    column = args.column or ("user_id" if "user_id" in table.columns else table.columns[0])
    if column not in table.columns:
        raise InputError(f"--units {path} has no column {column!r} (columns: {', '.join(table.columns)})")
    return [str(v) for v in table[column].drop_nulls().to_list()]


def run_assign(args: argparse.Namespace) -> int:
    import polars as pl

    from recsys.experiments.assignment import SESSION_KEY, assign, explain
    from recsys.experiments.config import load_config, parse_time

    config = load_config(args.config)
    context = _context(args.context)
    when = parse_time(args.time, "--time") if args.time else None
    if args.debug is not None:
        ctx = {SESSION_KEY: args.debug, **context}
        print(json.dumps(explain(config, args.debug, args.debug, ctx, when), indent=2))
        return 0
    from recsys.progress import bar

    units = _units(args)
    rows: list[dict[str, Any]] = []
    for uid in bar(units, desc="assign", unit="unit", unit_scale=True):  # the id: user, session and request alike
        a = assign(config, uid, uid, {SESSION_KEY: uid, **context}, when)
        rows.append({"unit_id": uid, "label": a.label, "experiment": a.experiment, "variant": a.variant,
                     "holdout": a.holdout, "ranker": a.ranker, "forced": a.forced})  # fmt: skip
    frame = pl.DataFrame(rows, schema={"unit_id": pl.Utf8, "label": pl.Utf8, "experiment": pl.Utf8, "variant": pl.Utf8,
                                       "holdout": pl.Utf8, "ranker": pl.Utf8, "forced": pl.Boolean})  # fmt: skip
    expected = _expected(config)
    split = frame.group_by("label", "ranker").len().sort("label")
    n = len(units)
    print(f"config version {config.version}: {n} units")
    print(f"{'label':<48} {'ranker':<16} {'units':>8} {'share':>8} {'expected':>9}")
    for row in split.iter_rows(named=True):
        exp_share = expected.get(row["label"].split("@")[0])
        shown = f"{exp_share:>9.2%}" if exp_share is not None else f"{'':>9}"
        print(f"{row['label']:<48} {row['ranker']:<16} {row['len']:>8} {row['len'] / n:>8.2%} {shown}")
    print("(expected shares ignore targeting, time windows and forced units)")
    if args.out is not None:
        _write(frame, args.out)
        print(f"wrote {args.out}")
    return 0


def _expected(config: Any) -> dict[str, float]:
    """Nominal traffic share per label group/arm, assuming every experiment runs and targets everyone."""
    hold = 1.0
    out: dict[str, float] = {}
    for h in config.holdouts:  # independent hashes: shares multiply
        out[f"holdout/{h.name}"] = hold * h.coverage
        hold *= 1 - h.coverage
    left = hold
    for layer in config.layers:
        taken = 0.0
        for e in layer.experiments:
            for v, s in zip(e.variants, e.expected_shares().values(), strict=True):
                out[f"{e.name}/{v.name}"] = left * e.coverage * s
            taken += e.coverage
        left *= 1 - taken
    out[f"default/{config.default_ranker}"] = left
    return out


def _write(frame: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame.write_parquet(path)
    elif suffix in (".jsonl", ".ndjson"):
        frame.write_ndjson(path)
    else:
        frame.write_csv(path)


# --------------------------------------------------------------------------- analyze


def configure_analyze(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="the experiment config the service ran")
    parser.add_argument("--exposures", type=Path, required=True,
                        help="exposure log: the service's --exposure-dir folder, or a parquet/csv/jsonl table")
    parser.add_argument("--events", type=Path,
                        help="later events (clicks, purchases, ...); default: the non-impression rows of --exposures")
    parser.add_argument("--out", type=Path, required=True, help="report folder: report.md, report.json, lift.png")
    parser.add_argument("--experiment", action="append", default=[], help="analyse only this experiment (repeatable)")
    parser.add_argument("--window", type=duration_s, default=duration_s("24h"),
                        help="attribution window after an exposure, e.g. 30m, 24h, 7d (24h)")
    parser.add_argument("--alpha", type=float, default=0.05, help="two-sided significance level (0.05: 95%% intervals)")
    parser.add_argument("--ndcg-k", type=int, default=10, help="NDCG cut-off (10)")
    parser.add_argument("--latency-max-increase", type=float, default=0.10,
                        help="latency guardrail: tolerated relative increase of mean latency (0.10)")
    parser.add_argument("--primary-metric", default="ctr", help="metric the verdict uses (ctr)")
    parser.add_argument("--include-qa", action="store_true", help="keep forced (QA) traffic in the analysis")
    add_plots_flag(parser, "lift.png and lift_over_time.png (cumulative lift with its interval)")


def run_analyze(args: argparse.Namespace) -> int:
    import polars as pl

    from recsys.experiments.analysis import AnalysisConfig, analyze, read_table_any
    from recsys.experiments.config import load_config
    from recsys.experiments.report import write_report

    config = load_config(args.config)
    cfg = AnalysisConfig(
        window_s=args.window, ndcg_k=args.ndcg_k, alpha=args.alpha, latency_max_increase=args.latency_max_increase,
        primary_metric=args.primary_metric, include_forced=args.include_qa,
    )
    exposures = read_table_any(args.exposures, "exposure log")
    if args.events is not None:
        events = read_table_any(args.events, "events file")
    elif "event_type" in exposures.columns:
        events = exposures.filter(pl.col("event_type").cast(pl.Utf8).str.to_lowercase() != "impression")
    else:
        events = pl.DataFrame(schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "event_type": pl.Utf8,
                                      "timestamp": pl.Datetime("us", "UTC")})  # fmt: skip
    if "event_type" in exposures.columns:
        exposures = exposures.filter(pl.col("event_type").cast(pl.Utf8).str.to_lowercase() == "impression")
    result = analyze(config, exposures, events, cfg, args.experiment or None)
    paths = write_report(result, args.out, plots=not args.no_plots)
    for e in result.experiments:
        for w in e.warnings:
            print(f"warning: {e.experiment}: {w}", file=sys.stderr)
        for arm, verdict in e.verdicts().items():
            print(f"{e.experiment}/{arm}: {verdict}")
    print(f"report: {paths['markdown']} ({', '.join(p.name for k, p in paths.items() if k != 'markdown')})")
    mismatched = [e.experiment for e in result.experiments if e.srm.mismatch]
    if mismatched:
        print(f"error: sample-ratio mismatch in {', '.join(mismatched)}: the results are not trustworthy "
              f"(exit code {EXIT_CHECK_FAILED}); see the report", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0
