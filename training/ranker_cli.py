"""`recsys train ranker`: light CLI module (LightGBM and the feature code are imported in `run`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, required=True, help="prepared dataset directory (recsys prepare --out)"
    )
    parser.add_argument("--out", type=Path, required=True, help="ranker directory to write")
    parser.add_argument(
        "--matcher",
        type=Path,
        help="registry version directory of the exported matcher (adds match-score features); "
        "without it the ranker blends behavioural features only",
    )
    parser.add_argument("--num-rounds", type=int, default=500, help="maximum boosting rounds (500)")
    parser.add_argument("--learning-rate", type=float, default=0.05, help="(0.05)")
    parser.add_argument("--num-leaves", type=int, default=7, help="(7)")
    parser.add_argument("--min-data-in-leaf", type=int, default=50, help="(50)")
    parser.add_argument(
        "--early-stopping-rounds", type=int, default=50, help="rounds without NDCG@10 gain (50)"
    )
    parser.add_argument(
        "--holdout-frac",
        type=float,
        default=0.2,
        help="last share of the valid window for early stopping (0.2)",
    )
    parser.add_argument(
        "--negatives",
        type=int,
        default=20,
        help="sampled negatives per positive when logs have no impressions (20)",
    )
    parser.add_argument(
        "--max-history", type=int, default=20, help="interactions kept per user for features (20)"
    )
    parser.add_argument(
        "--refresh-s",
        type=float,
        default=0.0,
        help="0 (default): exact point-in-time features per request; N: refresh the feature state at most "
        "every N seconds while replaying (faster on huge logs, features up to N s stale, never leaky)",
    )
    parser.add_argument(
        "--cold-item-dropout",
        type=float,
        default=0.0,
        help="share of training candidates shown as items without behaviour, so new items are ranked by "
        "their text match (0 = off; a cold/warm trade-off, see bench/results/cold_items.md)",
    )
    parser.add_argument(
        "--cold-slots",
        type=int,
        default=0,
        metavar="N",
        help="served exploration: the last N of every ranked list's first 10 places go to the candidates "
        "without behaviour that the matcher scores highest (0 = off; recorded in the ranker, applied by "
        "serve and score; measured by recsys evaluate --cold-slots N)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="LightGBM threads (0 = all cores)")


def run(args: argparse.Namespace) -> int:
    from recsys.data.prepared import PreparedData
    from recsys.data.window import check_window, version_window
    from recsys.features import FeatureConfig
    from recsys.ranker import LambdaMARTParams
    from recsys.scoring.registry_matcher import registry_matcher
    from training.ranker import RankerConfig, train_ranker

    lambdamart = LambdaMARTParams(
        num_rounds=args.num_rounds,
        learning_rate=args.learning_rate,
        num_leaves=args.num_leaves,
        min_data_in_leaf=args.min_data_in_leaf,
        early_stopping_rounds=args.early_stopping_rounds,
        seed=args.seed,
        threads=args.threads,
    )
    config = RankerConfig(
        lambdamart=lambdamart,
        holdout_frac=args.holdout_frac,
        negatives=args.negatives,
        refresh_s=args.refresh_s,
        cold_item_dropout=args.cold_item_dropout,
        cold_slots=args.cold_slots,
        features=FeatureConfig(max_history=args.max_history),
    )
    data = PreparedData.load(args.data)
    if args.matcher:
        check_window(version_window(args.matcher), data, "global", ("valid", "test"), what=f"--matcher {args.matcher}",
                     fix="train the matcher on this dataset with --protocol global, so the ranker's valid/test "
                     "windows come after everything it learnt from.")
    matcher = registry_matcher(args.matcher, data) if args.matcher else None
    result = train_ranker(data, args.out, matcher, config, str(args.matcher) if args.matcher else None)
    print(
        f"ranker written to {result.out_dir} (best iteration {result.best_iteration}, {len(result.feature_names)} features)"
    )
    for split, metrics in result.metrics.items():
        values = ", ".join(
            f"{k.split('/', 1)[1]} {v:.4f}" for k, v in metrics.items() if k.startswith("ndcg")
        )
        print(f"  {split} ({metrics['groups']} groups) NDCG@{lambdamart.eval_at}: {values}")
    top = ", ".join(f"{name} {gain:.0f}" for name, gain in list(result.importance.items())[:8])
    print(f"  top features by gain: {top}")
    return 0
