"""`recsys train matcher`: fine-tune the two-tower text matcher. Light at import: no torch here."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset directory (recsys prepare --out)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--base-model", default=None,
        help="Hugging Face name or local path of a BERT-family encoder (default: all-MiniLM-L6-v2, offline)",
    )
    parser.add_argument("--protocol", choices=["global", "loo", "tail"], default="global", help="train/valid/test split")
    model = parser.add_argument_group("model and loss")
    model.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the whole encoder")
    model.add_argument("--lora-r", type=int, default=8)
    model.add_argument("--lora-alpha", type=int, default=16)
    model.add_argument("--temperature", type=float, default=0.05, help="softmax temperature (0.05)")
    model.add_argument("--max-history", type=int, default=20, help="history items per user (20)")
    model.add_argument("--max-text-tokens", type=int, default=64, help="item text truncation (64)")
    model.add_argument("--dropout", type=float, default=0.1, help="user tower dropout (0.1)")
    model.add_argument("--hard-negatives", type=int, default=0, metavar="N",
                       help="per pair, N shown-but-not-clicked items as extra negatives (0: off)")
    model.add_argument("--logq", action="store_true", help="logQ correction by each item's sampling probability")
    model.add_argument("--cache-negatives", type=int, default=0, metavar="N",
                       help="N extra catalogue negatives per step, encoded with gradient like the targets "
                       "(>= n_items: all)")
    model.add_argument("--train-layers", type=int, default=0, metavar="N",
                       help="full fine-tuning of only the top N transformer layers (0: all)")
    model.add_argument("--item-head", type=int, default=0, metavar="H",
                       help="residual MLP head of hidden width H after the item tower's pooling (0: none)")
    model.add_argument("--head-dropout", type=float, default=0.0, metavar="P",
                       help="share of items per step that skip the item head, so the text-only embedding "
                       "(what a cold item starts from) stays matched by the user tower (0)")
    model.add_argument("--user-tower", choices=["pooling", "sequential"], default="pooling",
                       help="pooling: attention pooling over the history; sequential: a causal transformer "
                       "trained on the next item at every history position (needs --freeze-encoder) (pooling)")
    model.add_argument("--sequence-blocks", type=int, default=1, metavar="N",
                       help="with --user-tower sequential: transformer blocks; each costs serving time (1)")
    model.add_argument("--item-ids", action="store_true",
                       help="learn an ID vector per trained item, added to its text embedding (sequential tower); "
                       "`recsys export` bakes it into the embedding store, new items stay text-only")
    model.add_argument("--id-dropout", type=float, default=0.0, metavar="P",
                       help="with --item-ids: share of items per step whose vector skips the ID part (0)")
    model.add_argument("--freeze-encoder", action="store_true",
                       help="train only the item head (needs --item-head) and the user tower; encoder outputs cached")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=3)
    opt.add_argument("--batch-size", type=int, default=256, help="pairs per step (per process under torchrun)")
    opt.add_argument("--lr", type=float, default=5e-5, help="encoder / adapter learning rate")
    opt.add_argument("--head-lr", type=float, default=1e-3, help="user tower learning rate")
    opt.add_argument("--id-lr", type=float, default=0.0, help="with --item-ids: its learning rate (0: --head-lr)")
    opt.add_argument("--weight-decay", type=float, default=0.01)
    opt.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of all steps")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    opt.add_argument("--patience", type=int, default=2, help="early stopping: epochs without improvement")
    opt.add_argument("--cache-refresh", type=int, default=200, help="steps between item-cache refreshes")
    opt.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (resumable)")
    opt.add_argument("--save-every", type=int, default=0, help="save resume state every N steps (0: per epoch)")
    opt.add_argument("--seed", type=int, default=0)
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--warm-start", type=Path, default=None, help="continue from an earlier checkpoint")
    run_group.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    run_group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    run_group.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on GPU")
    run_group.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    run_group.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot baseline evaluation")


def run(args: argparse.Namespace) -> int:
    from recsys.compat import require

    for module in ("torch", "transformers", "safetensors"):
        require(module)
    if args.lora:
        require("peft")
    from recsys.progress import enabled as progress_enabled
    from training.matcher.config import MatcherModelConfig, RunConfig, TrainConfig
    from training.matcher.train import train

    model = MatcherModelConfig(
        base_model=args.base_model, warm_start=str(args.warm_start) if args.warm_start else None,
        protocol=args.protocol, max_history=args.max_history, max_text_tokens=args.max_text_tokens,
        lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha, train_layers=args.train_layers,
        freeze_encoder=args.freeze_encoder, item_head=args.item_head, head_dropout=args.head_dropout, dropout=args.dropout,
        temperature=args.temperature, hard_negatives=args.hard_negatives, logq=args.logq,
        cache_negatives=args.cache_negatives, user_tower=args.user_tower, sequence_blocks=args.sequence_blocks,
        item_ids=args.item_ids,
        id_dropout=args.id_dropout,
    )
    run_config = RunConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, id_lr=args.id_lr,
        weight_decay=args.weight_decay, warmup=args.warmup, max_grad_norm=args.max_grad_norm,
        cache_refresh=args.cache_refresh, seed=args.seed, device=args.device, bf16=not args.no_bf16,
        threads=args.threads, resume=args.resume, max_steps=args.max_steps, save_every=args.save_every,
        patience=args.patience, zero_shot=not args.no_zero_shot, progress=progress_enabled(),
    )
    config = TrainConfig(data=str(args.data), out=str(args.out), model=model, run=run_config)
    report = train(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process writes
        _save_flags(args)
    summary = {name: report.get(name, {}).get("test") for name in ("popularity", "zero_shot", "fine_tuned")}
    print(json.dumps({"out": str(args.out), "steps": report.get("steps"), "test": summary}, indent=2))
    return 0


def _save_flags(args: argparse.Namespace) -> None:
    """The flags of this run into the checkpoint's matcher_config.json (beside the model's own settings,
    which loading reads), so `recsys train matcher --config OUT/matcher_config.json --out NEW` reruns it."""
    from recsys.cli_config import flags_of
    from recsys.files import write_json_atomic
    from training.matcher.checkpoint import CONFIG_FILE

    path = args.out / CONFIG_FILE
    saved = json.loads(path.read_text())
    write_json_atomic(path, {**saved, "command": "train matcher", "flags": flags_of(args)})
