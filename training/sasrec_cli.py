"""`recsys train sasrec`: the SASRec baseline (training/sasrec.py). Light at import: no torch here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset directory (recsys prepare --out)")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write (recsys evaluate --sasrec DIR)")
    parser.add_argument("--protocol", choices=["global", "loo", "tail"], default="tail",
                        help="train on this protocol's train split, early-stop on its valid window (tail)")
    parser.add_argument("--dim", type=int, default=64, help="hidden size (64)")
    parser.add_argument("--blocks", type=int, default=2, help="self-attention blocks (2)")
    parser.add_argument("--heads", type=int, default=1, help="attention heads (1)")
    parser.add_argument("--max-length", type=int, default=200, help="sequence length (200)")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout (0.2)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per step (128)")
    parser.add_argument("--epochs", type=int, default=200, help="most epochs (200)")
    parser.add_argument("--patience", type=int, default=20, help="epochs without a better valid NDCG@10 (20)")
    parser.add_argument("--budget-minutes", type=float, default=0.0,
                        help="start no epoch after this many minutes of training; the best epoch is kept (0: no limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def run(args: argparse.Namespace) -> int:
    from recsys.compat import require

    require("torch")
    from training.sasrec import SASRecConfig, train_sasrec

    config = SASRecConfig(
        protocol=args.protocol, dim=args.dim, blocks=args.blocks, heads=args.heads, max_length=args.max_length,
        dropout=args.dropout, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
        budget_minutes=args.budget_minutes, seed=args.seed, threads=args.threads,
    )
    report = train_sasrec(args.data, args.out, config)
    print(json.dumps({"out": str(args.out), **report}, indent=2))
    return 0
