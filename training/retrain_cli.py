"""`recsys retrain`: new events + exposure logs -> warm-started candidate -> compare -> promote or not.

Light module: torch, LightGBM and ONNX Runtime are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from recsys.cli_config import flags_of
from recsys.compat import require
from recsys.errors import InputError
from recsys.plots import add_plots_flag

_METRICS = ("ndcg@10", "recall@10", "matcher_ndcg@10")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", type=Path, default=os.environ.get("RECSYS_REGISTRY"),
                        help="model registry; its current version is the one to beat (default: $RECSYS_REGISTRY)")
    parser.add_argument("--data", type=Path,
                        help="base prepared dataset (default: the one the current version was trained on)")
    parser.add_argument("--out", type=Path, required=True,
                        help="work directory: data/, matcher/, retrain_report.json and retrain_report.md")
    parser.add_argument("--events", type=Path, action="append", default=[],
                        help="new events since the current version was trained (repeatable; any table format)")
    parser.add_argument("--exposures", type=Path, action="append", default=[],
                        help="exposure log directory written by recsys serve (repeatable): served lists = impressions")
    parser.add_argument("--items", type=Path,
                        help="catalogue update: new and changed items (any table format, item_id + any item "
                             "columns), merged over the base catalogue by item_id; new ids are appended")
    parser.add_argument("--holdout-start", metavar="ISO",
                        help="pin the comparison holdout to events from this time on (default: the newest "
                             "share of the new events, in the base's valid:test proportion; the new events "
                             "before it train the blender)")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="largest absolute drop of a gated metric that still promotes (default 0.005)")
    parser.add_argument("--promote-metric", choices=_METRICS, default="ndcg@10",
                        help="primary metric: blend NDCG@10 over holdout request groups (default)")
    parser.add_argument("--guard", choices=_METRICS, action="append",
                        help="also gate on this metric (repeatable; default: recall@10, the matcher's full ranking)")
    parser.add_argument("--no-guard", action="store_true", help="gate on --promote-metric only")
    parser.add_argument("--no-promote", action="store_true", help="evaluate and report, never move the pointer")
    parser.add_argument("--warm-start", type=Path, help="checkpoint to start from (default: <current version>/checkpoint)")
    parser.add_argument("--epochs", type=int, help="matcher epochs (default: the production run's)")
    parser.add_argument("--batch-size", type=int, help="matcher batch size (default: the production run's)")
    parser.add_argument("--lr", type=float, help="encoder learning rate (default: the production run's)")
    parser.add_argument("--head-lr", type=float, help="user tower learning rate (default: the production run's)")
    parser.add_argument("--max-steps", type=int, help="stop matcher training after this many steps")
    parser.add_argument("--threads", type=int, help="torch and LightGBM threads (default: all cores)")
    parser.add_argument("--fresh-ranker", action="store_true",
                        help="train the blender from scratch only (default: a fresh blender, the current one "
                             "continued on the new window, and the current one as it is compete on the "
                             "blender's early-stopping holdout)")
    parser.add_argument("--ranker-rounds", type=int, default=500, help="LightGBM boosting rounds (early-stopped)")
    parser.add_argument("--on-invalid", choices=["error", "drop"], default="drop",
                        help="bad rows in the merged logs: drop and count them (default) or stop")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (0: none)")
    parser.add_argument("--skip-data-check", action="append", default=[], metavar="CHECK",
                        help="skip one of the data checks run before training (repeatable): exposure_coverage, "
                             "item_overlap, user_overlap, concentration, event_mix, volume, or all. Use only when "
                             "the change they flag is real (see the README)")
    parser.add_argument("--keep-refused", action="store_true",
                        help="keep a candidate that is not promoted in the registry (default: remove it)")
    parser.add_argument("--seed", type=int, default=0)
    add_plots_flag(parser, "metrics.png (current vs candidate with intervals) and the new data's timeline.png")


def run(args: argparse.Namespace) -> int:
    if args.registry is None:
        raise InputError("pass --registry DIR (or set RECSYS_REGISTRY): the registry whose current version to retrain")
    if not Path(args.registry).is_dir():
        raise InputError(f"model registry {args.registry} does not exist: publish a first version into it")
    for path in args.events:
        if not path.exists():
            raise InputError(f"--events {path} does not exist")
    if args.items is not None and not args.items.exists():
        raise InputError(f"--items {args.items} does not exist")
    for path in args.exposures:
        if not path.is_dir():
            raise InputError(f"--exposures {path} is not a directory: pass the server's --exposure-dir")
    for module in ("torch", "transformers", "onnxruntime", "lightgbm"):
        require(module)
    from recsys.ranker import LambdaMARTParams
    from training.ranker import RankerConfig
    from training.retrain import RetrainConfig, markdown, retrain

    overrides: dict[str, Any] = {
        name: value for name, value in (
            ("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr), ("head_lr", args.head_lr),
            ("max_steps", args.max_steps), ("threads", args.threads),
        ) if value is not None
    }
    ranker = None
    if args.ranker_rounds != 500 or args.threads is not None:
        ranker = RankerConfig(lambdamart=LambdaMARTParams(num_rounds=args.ranker_rounds, threads=args.threads or 0, seed=args.seed))
    config = RetrainConfig(
        registry=args.registry, out=args.out, data=args.data, events=tuple(args.events),
        exposures=tuple(args.exposures), items=args.items, holdout_start=args.holdout_start, tolerance=args.tolerance, promote_metric=args.promote_metric,
        guard_metrics=() if args.no_guard else tuple(args.guard or ("recall@10",)), promote=not args.no_promote,
        on_invalid=args.on_invalid, warm_start=args.warm_start, ranker_warm_start=not args.fresh_ranker, matcher_overrides=overrides, ranker=ranker,
        bootstrap=args.bootstrap, seed=args.seed, skip_checks=tuple(args.skip_data_check),
        keep_refused=args.keep_refused, plots=not args.no_plots, flags=flags_of(args),
    )
    report = retrain(config)
    print(markdown(report))
    for warning in report.get("warnings", []):
        print(f"WARNING: {report['candidate']}: {warning}", file=sys.stderr)
    print(f"report: {args.out / 'retrain_report.json'}")
    return 0
