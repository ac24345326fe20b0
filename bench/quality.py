"""Ranking quality, every system side by side: popularity, item-kNN, ALS, EASE, zero-shot MiniLM,
fine-tuned MiniLM, SASRec (training/sasrec.py, trained per protocol) and the two-stage blend, on
generated data and MovieLens-100K.

Per dataset: prepare, hold 10% of the items out of every training input (`write_holdout`: the
cold-start slice), then per protocol (tail, loo): fine-tune the matcher on that protocol's train split
of the hold-out dataset, and run `recsys.evaluation.evaluate` (CF fit on train for the blend's valid
window, refit on train + valid for the test window; ranker trained on the valid window).

    python bench/quality.py [--datasets generated,ml100k] [--protocols tail,loo] [--out bench/results]
                            [--cache /tmp/recsys-quality] [--matcher-epochs 5] [--item-head 512]

Writes bench/results/quality.{json,md} (+ PNG plots per run), each system's top-100 test scores as
bench/results/quality_<dataset>_<protocol>_<system>.parquet (gitignored), and prints the README table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ML100K = Path.home() / ".cache/recsys-data/recbole/dataset_example/ml-100k"
log = logging.getLogger("bench.quality")


# ------------------------------------------------------------------------------- data


def prepare_generated(out: Path, seed: int) -> Path:
    from recsys.data.prepare import PrepareConfig, prepare_tables
    from recsys.data.schema import StrengthRule
    from recsys.data.synthetic import generate

    if not (out / "manifest.json").exists():
        synthetic = generate(n_users=1000, n_items=500, n_events=100_000, days=60, seed=seed)
        events = synthetic.events.with_columns(StrengthRule().expr())
        prepare_tables(events, synthetic.items, synthetic.users, out, PrepareConfig())
    return out


def prepare_ml100k(out: Path, source: Path) -> Path:
    from recsys.cli import main

    if not (out / "manifest.json").exists():
        code = main(["prepare", "--format", "recbole", "--input", str(source), "--out", str(out)])
        if code:
            raise SystemExit(f"recsys prepare failed for {source} (exit {code})")
    return out


# ------------------------------------------------------------------------------- matchers (torch)


def torch_matcher(model: Any, data: Any, threads: int) -> Any:
    """EmbeddingMatcher from a TwoTower: item embeddings encoded once; the user tower in torch."""
    import torch

    from recsys.features import EmbeddingMatcher
    from training.matcher.data import ItemTokens, item_texts
    from training.matcher.evaluate import encode_items

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model.eval()
    tokens = ItemTokens.build(item_texts(data), model_tokenizer(model), model.config.max_text_tokens)
    emb = encode_items(model, tokens, np.arange(data.n_items), device).cpu()
    padded = torch.cat([emb, emb.new_zeros(1, emb.shape[1])])

    @torch.no_grad()
    def user_encoder(items: np.ndarray, codes: np.ndarray, ages: np.ndarray) -> np.ndarray:
        items = np.asarray(items, np.int64)
        idx = torch.from_numpy(np.where(items < 0, len(emb), items))
        mask = torch.from_numpy(items >= 0)
        out = model.user_tower(
            padded[idx], torch.from_numpy(np.asarray(codes, np.int64)), torch.from_numpy(np.asarray(ages, np.float32)), mask
        )
        return out.numpy().astype(np.float32)

    return EmbeddingMatcher(emb.numpy().astype(np.float32), user_encoder)


_TOKENIZERS: dict[int, Any] = {}
TOWER_SYSTEMS = {"pooling": ("fine_tuned", ""), "sequential": ("fine_tuned_seq", "_seq")}  # -> (system, cache suffix)


def model_tokenizer(model: Any) -> Any:
    return _TOKENIZERS[id(model)]


def zero_shot_matcher(data: Any, threads: int) -> Any:
    """Pretrained MiniLM item embeddings, the plain mean over the history: exactly the user tower that
    `recsys publish --base-model` exports (training/zero_shot.py), so bench and service agree."""
    from recsys.features import EmbeddingMatcher, mean_pool_encoder
    from training.matcher.model import build_model

    model, tokenizer = build_model(None, max_history=data.max_history)
    _TOKENIZERS[id(model)] = tokenizer
    item_emb = torch_matcher(model, data, threads).item_embeddings
    return EmbeddingMatcher(item_emb, mean_pool_encoder(item_emb, half_life_s=math.inf))


def fine_tuned_matcher(data: Any, protocol: str, out: Path, args: argparse.Namespace,
                       user_tower: str = "pooling", warm_start: Path | None = None) -> tuple[Any, dict[str, Any]]:
    from training.matcher.checkpoint import load_checkpoint
    from training.matcher.config import MatcherModelConfig, RunConfig, TrainConfig
    from training.matcher.train import train

    report_path = out / "training_report.json"
    if not report_path.exists():
        model = MatcherModelConfig(
            protocol=protocol, train_layers=args.train_layers, item_head=args.item_head, head_dropout=args.head_dropout,
            freeze_encoder=args.freeze_encoder, cache_negatives=args.cache_negatives, max_text_tokens=48,
            max_history=data.max_history, user_tower=user_tower, logq=user_tower == "sequential",
            sequence_blocks=args.seq_blocks,
            warm_start=str(warm_start) if warm_start else None,
            item_ids=args.seq_item_ids and user_tower == "sequential",
            id_dropout=args.seq_id_dropout if args.seq_item_ids and user_tower == "sequential" else 0.0,
        )
        sequential = user_tower == "sequential"
        run = RunConfig(
            epochs=args.seq_epochs if sequential else args.matcher_epochs, max_steps=args.matcher_steps,
            batch_size=args.seq_batch_size if sequential else args.batch_size, lr=args.lr,
            head_lr=args.head_lr, id_lr=args.seq_id_lr, cache_refresh=20, threads=args.threads, progress=False, zero_shot=False,
            eval_test=False, patience=args.seq_patience if sequential else 2, seed=args.seed,
        )
        config = TrainConfig(data=str(data.root), out=str(out), model=model, run=run)
        train(config)
    report = json.loads(report_path.read_text())
    model, tokenizer = load_checkpoint(out)
    _TOKENIZERS[id(model)] = tokenizer
    keep = ("best_epoch", "steps", "train_pairs", "pairs_per_second", "train_seconds", "fine_tuned")
    mode = {"user_tower": user_tower, "warm_start": str(warm_start) if warm_start else None, "item_head": args.item_head, "head_dropout": args.head_dropout, "freeze_encoder": args.freeze_encoder, "train_layers": args.train_layers,
                                     "sequence_blocks": model.config.sequence_blocks if user_tower == "sequential" else None,
                                     "item_ids": model.item_ids is not None, "id_dropout": args.seq_id_dropout if model.item_ids is not None else 0.0,
                                     "id_lr": args.seq_id_lr if model.item_ids is not None else 0.0}
    return torch_matcher(model, data, args.threads), {k: report.get(k) for k in keep} | mode


def blend_seed_spread(data: Any, config: Any, matchers: dict[str, Any], blend_matcher: str | None,
                      sequences: dict[str, Any], seeds: int) -> dict[str, Any]:
    """The blend re-trained with seeds 0, bags, 2 bags, .. (`seeds` times; each model's early-stopping users
    and trees), everything else fixed: how much of a blend difference is the ranker's own noise."""
    from dataclasses import replace

    from recsys.evaluation.evaluate import evaluate

    rows = []
    for seed in range(seeds):
        lambdamart = replace(config.blend_config.lambdamart, seed=seed * config.blend_config.bags)
        blend = replace(config.blend_config, lambdamart=lambdamart)
        result = evaluate(data, replace(config, blend_config=blend, n_boot=200), matchers, blend_matcher, sequences=sequences)
        row = {"seed": seed, "ndcg@10": result.metrics["all"]["blend"]["ndcg@10"]}
        for other in ("sasrec", blend_matcher):
            if other in result.paired.get("all", {}):
                row[f"minus_{other}"] = result.paired["all"][other]["diff"]
        rows.append(row)
    values = np.array([r["ndcg@10"] for r in rows])
    return {"rows": rows, "mean": float(values.mean()), "sd": float(values.std(ddof=1)), "min": float(values.min()),
            "max": float(values.max())}


def seed_line(spread: dict[str, Any]) -> str:
    minus = [k for k in spread["rows"][0] if k.startswith("minus_")]
    parts = [f"mean {spread['mean']:.4f}, sd {spread['sd']:.4f}, range [{spread['min']:.4f}, {spread['max']:.4f}]"]
    parts += [f"blend − {k[6:]} mean {np.mean([r[k] for r in spread['rows']]):+.4f} "
              f"(range {min(r[k] for r in spread['rows']):+.4f} to {max(r[k] for r in spread['rows']):+.4f})" for k in minus]
    return f"Blend re-trained with {len(spread['rows'])} seeds (`--blend-seeds`): NDCG@10 " + "; ".join(parts) + "."


def sasrec_system(data: Any, protocol: str, out: Path, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """SASRec trained on `protocol`'s train split (early stopping on its valid window), exported and
    loaded back as `recsys evaluate --sasrec` does (ONNX Runtime)."""
    from recsys.evaluation.sequence import load_sequence_system
    from training.sasrec import SASRecConfig, train_sasrec

    if not (out / "manifest.json").exists():
        config = SASRecConfig(protocol=protocol, max_length=args.sasrec_length, epochs=args.sasrec_epochs,
                              patience=args.sasrec_patience, budget_minutes=args.sasrec_budget, seed=args.seed,
                              threads=args.threads)
        train_sasrec(data.root, out, config)
    system = load_sequence_system(out, data)
    return system, dict(system.manifest["training"]) | {"max_length": system.max_length}


def tail_train_is_safe(data: Any, protocol: str) -> bool:
    """Can the matcher fine-tuned on the tail protocol's train split serve `protocol` without leakage?
    Yes when none of `protocol`'s valid/test positives is in tail's train split (true for ML-100K, where
    every user has >= 20 ratings; users with < min_tail_positives would break it)."""
    import polars as pl

    column = {"global": "split_global", "loo": "split_loo"}[protocol]
    leaks = data.events().filter(
        (pl.col("strength") > 0) & pl.col(column).is_in(["valid", "test"]) & (pl.col("split_tail") == "train")
    ).select(pl.len()).collect().item()
    return int(leaks) == 0


# ------------------------------------------------------------------------------- run


def readme_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | protocol | system | NDCG@10 (all) [95% CI] | Recall@10 | NDCG@10 cold items | blend − system, ΔNDCG@10 [paired 95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        m, paired = run["metrics"], run["paired_bootstrap"]
        for system in run["systems"]:
            a = m["all"][system]
            cold = m.get("cold_items", {}).get(system, {})
            ci = a.get("ndcg@10_ci", [float("nan")] * 2)
            p = paired.get("all", {}).get(system)
            delta = f"{p['diff']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]" if p else "–"
            name = f"**{system}**" if system == "blend" else system
            cold_v = f"{cold['ndcg@10']:.4f}" if cold.get("users") else "–"
            lines.append(
                f"| {run['name']} | {run['protocol']} | {name} | {a['ndcg@10']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | "
                f"{a['recall@10']:.4f} | {cold_v} | {delta} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="generated,ml100k")
    parser.add_argument("--protocols", default="tail,loo")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/recsys-quality"))
    parser.add_argument("--ml100k", type=Path, default=ML100K)
    parser.add_argument("--holdout", type=float, default=0.1, help="share of items held out of training (cold start)")
    # The matcher as bench/matcher.py trains it: a residual item head over the frozen encoder's cached
    # output, softmax over every trained item (the CPU mode; --no-freeze-encoder --train-layers N for the rest).
    parser.add_argument("--matcher-epochs", type=int, default=5)
    parser.add_argument("--matcher-steps", type=int, default=0, help="cap on fine-tuning steps (0: whole epochs)")
    parser.add_argument("--item-head", type=int, default=512, help="item tower residual MLP head width (0: none)")
    parser.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cold-slots", type=int, default=0, help="also report blend_explore: N top-10 places for cold items")
    parser.add_argument("--head-dropout", type=float, default=0.0, help="share of items per step skipping the item head")
    parser.add_argument("--cold-prior", default="", help="with --cold-slots: the matcher picking the cold items (zero_shot, fine_tuned)")
    parser.add_argument("--train-layers", type=int, default=0, help="with --no-freeze-encoder: top N layers (0: all)")
    parser.add_argument("--cache-negatives", type=int, default=100_000, help=">= n_items: every item with a training positive")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=3e-3, help="user tower and item head learning rate")
    parser.add_argument("--no-matcher", action="store_true", help="CF systems and the blend only (no torch)")
    parser.add_argument("--user-towers", default="pooling,sequential",
                        help="fine-tuned matchers to train: pooling (system fine_tuned), sequential (fine_tuned_seq)")
    parser.add_argument("--blend-matcher", default="fine_tuned_seq",
                        help="the matcher feeding the blend's candidates and match features (the served one)")
    parser.add_argument("--blend-extra", default="fine_tuned",
                        help="other matchers whose scores are extra blend features (comma list; those trained)")
    parser.add_argument("--blend-bags", type=int, default=5, metavar="N", help="LambdaMART models the blend averages")
    parser.add_argument("--blend-seeds", type=int, default=1, metavar="K",
                        help="also re-train the blend with seeds 0, N, 2N, .. (K times) and report the spread")
    parser.add_argument("--blend-drop", default="", metavar="F,G",
                        help="ablation: feature columns the blend is trained and scored without")
    parser.add_argument("--reuse-tail-matcher", action=argparse.BooleanOptionalAction, default=False,
                        help="score the other protocols with the matchers trained on tail's train split when that "
                             "leaks nothing (saves training; default: each protocol's own train split, as SASRec)")
    parser.add_argument("--seq-epochs", type=int, default=40, help="sequential tower epochs (at most)")
    parser.add_argument("--seq-patience", type=int, default=4, help="sequential tower: epochs without a better valid NDCG@10")
    parser.add_argument("--seq-warm-start", action=argparse.BooleanOptionalAction, default=True,
                        help="start the sequential tower's item tower from the pooling matcher's")
    parser.add_argument("--seq-blocks", type=int, default=1, help="sequential tower transformer blocks")
    parser.add_argument("--seq-item-ids", action=argparse.BooleanOptionalAction, default=True,
                        help="sequential tower with a learned per-item ID residual (recsys train matcher --item-ids)")
    parser.add_argument("--seq-id-dropout", type=float, default=0.2, help="with --seq-item-ids: --id-dropout")
    parser.add_argument("--seq-id-lr", type=float, default=3e-4, help="with --seq-item-ids: --id-lr (0: --head-lr)")
    parser.add_argument("--seq-batch-size", type=int, default=128, help="sequential tower windows per step")
    parser.add_argument("--sasrec", action=argparse.BooleanOptionalAction, default=True, help="SASRec baseline (torch)")
    parser.add_argument("--sasrec-length", type=int, default=200)
    parser.add_argument("--sasrec-epochs", type=int, default=200)
    parser.add_argument("--sasrec-patience", type=int, default=20, help="epochs without a better valid NDCG@10")
    parser.add_argument("--sasrec-budget", type=float, default=0.0, help="SASRec training minutes (0: no limit)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("recsys.features").setLevel(logging.WARNING)

    from recsys.data.prepared import PreparedData
    from recsys.evaluation.evaluate import BlendConfig, EvalConfig, evaluate, write_holdout, write_scores
    from recsys.evaluation.report import markdown, write_report

    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    sections: list[str] = []
    started = time.perf_counter()
    for name in [d for d in args.datasets.split(",") if d]:
        t0 = time.perf_counter()
        if name == "generated":
            base = prepare_generated(args.cache / "generated", args.seed)
        elif name == "ml100k":
            base = prepare_ml100k(args.cache / "ml100k", args.ml100k)
        else:
            raise SystemExit(f"unknown dataset {name!r}: generated or ml100k")
        hold_dir = args.cache / f"{name}_holdout"
        data = (
            PreparedData.load(hold_dir)
            if (hold_dir / "manifest.json").exists()
            else write_holdout(PreparedData.load(base), hold_dir, args.holdout, args.seed)
        )
        zero = None if args.no_matcher else zero_shot_matcher(data, args.threads)
        prep_s = time.perf_counter() - t0
        fine_cache: dict[str, tuple[Any, dict[str, Any]]] = {}
        for protocol in [p for p in args.protocols.split(",") if p]:
            t1 = time.perf_counter()
            matchers: dict[str, Any] = {}
            matcher_info: dict[str, Any] = {}
            if zero is not None:
                matchers["zero_shot"] = zero
                reuse_tail = args.reuse_tail_matcher and protocol != "tail" and tail_train_is_safe(data, protocol)
                train_protocol = "tail" if reuse_tail else protocol
                for tower in [t for t in args.user_towers.split(",") if t]:
                    system, suffix = TOWER_SYSTEMS[tower]
                    if tower == "sequential" and args.seq_blocks != 2:  # its own cached checkpoint
                        suffix += f"_b{args.seq_blocks}"
                    if tower == "sequential" and args.seq_item_ids:
                        suffix += f"_ids{args.seq_id_dropout:g}" + (f"_lr{args.seq_id_lr:g}" if args.seq_id_lr else "")
                    key = f"{train_protocol}{suffix}"
                    if key not in fine_cache:
                        # The sequential tower starts from the pooling matcher's trained item tower (a fresh
                        # user tower; training/matcher/train.py `_initial_model`) when that one is trained.
                        pooled = args.cache / f"{name}_{train_protocol}_matcher"
                        warm = pooled if tower == "sequential" and args.seq_warm_start and (pooled / "training_report.json").exists() else None
                        fine_cache[key] = fine_tuned_matcher(
                            data, train_protocol, args.cache / f"{name}_{key}_matcher", args, tower, warm
                        )
                    matchers[system], info = fine_cache[key]
                    matcher_info[system] = {**info, "trained_on": f"{train_protocol} train split"}
            sequences: dict[str, Any] = {}
            sasrec_info: dict[str, Any] = {}
            if args.sasrec:
                sequences["sasrec"], sasrec_info = sasrec_system(data, protocol, args.cache / f"{name}_{protocol}_sasrec", args)
            matcher_s = time.perf_counter() - t1
            extra = tuple(m for m in args.blend_extra.split(",") if m in matchers and m != args.blend_matcher)
            config = EvalConfig(protocol=protocol, n_boot=args.n_boot, seed=args.seed,
                                blend_config=BlendConfig(cold_slots=args.cold_slots, cold_prior=args.cold_prior,
                                                         matchers_from=extra, bags=args.blend_bags,
                                                         drop_features=tuple(f for f in args.blend_drop.split(",") if f)))
            blend_matcher = args.blend_matcher if args.blend_matcher in matchers else None
            result = evaluate(data, config, matchers, blend_matcher, sequences=sequences)
            prefix = f"quality_{name}_{protocol}"
            title = f"{name}, {protocol} protocol"
            plots = write_report(result, args.out / "quality_runs", prefix=prefix, title=title)
            write_scores(result, data, args.out, top=100, prefix=prefix)
            sections.append(markdown(result, title, {k: f"quality_runs/{p.name}" for k, p in plots.items() if p.suffix == ".png"}))
            payload = result.to_dict()
            if args.blend_seeds > 1:
                payload["blend_seeds"] = blend_seed_spread(data, config, matchers, blend_matcher, sequences, args.blend_seeds)
                sections[-1] += "\n\n" + seed_line(payload["blend_seeds"])
            payload.update({"name": name, "protocol": protocol, "matcher": matcher_info, "sasrec": sasrec_info,
                            "seconds": {"prepare_and_zero_shot": round(prep_s, 1), "matcher": round(matcher_s, 1),
                                        "evaluate": result.timings["total"]}})
            runs.append(payload)
            print(readme_table([payload]), flush=True)

    table = readme_table(runs)
    meta: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "quality.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2, default=float))
    header = (
        "# Ranking quality\n\n`python bench/quality.py` on "
        f"{meta['machine']['cpus']} CPU cores, {meta['seconds']:.0f} s in total. Full ranking over every item the "
        f"user had not interacted with before the test window; {args.holdout:.0%} of the items held out of every "
        "training input (cold-start slice). Matchers: MiniLM-L6 (`all-MiniLM-L6-v2`) zero-shot (mean of history "
        f"embeddings) and fine-tuned (up to {args.matcher_epochs} epochs, "
        + (f"residual item head of width {args.item_head} over the frozen encoder" if args.freeze_encoder
           else f"top {args.train_layers or 'all'} layers")
        + ", softmax over every item with a training positive; trained on "
        + ("tail's train split for every protocol where that leaks nothing" if args.reuse_tail_matcher
           else "each protocol's train split")
        + "). `fine_tuned` has the attention-pooling "
        f"user tower, `fine_tuned_seq` the sequential one (`--user-tower sequential`: a causal transformer of "
        f"{args.seq_blocks} block{'s' if args.seq_blocks != 1 else ''} trained "
        f"on the next item at every history position, up to {args.seq_epochs} epochs of {args.seq_batch_size} "
        f"windows per step"
        + (f"; with a learned ID residual per trained item, `--item-ids --id-dropout {args.seq_id_dropout:g}"
           + (f" --id-lr {args.seq_id_lr:g}" if args.seq_id_lr else "") + "`" if args.seq_item_ids else "")
        + f"); the blend ({args.blend_bags} LambdaMART model{'s' if args.blend_bags != 1 else ''} averaged, each "
        "early-stopped on another share of the valid users) has the matcher "
        f"`{args.blend_matcher}`, with `{args.blend_extra}`'s score and rank "
        "as extra blend features when trained"
        + (f", and without the features {', '.join(f'`{f}`' for f in args.blend_drop.split(',') if f)} (ablation)" if args.blend_drop else "")
        + ". `sasrec`: SASRec "
        f"(training/sasrec.py; 2 blocks, width 64, length {args.sasrec_length}, full-softmax cross-entropy, early "
        f"stopping on the valid window, patience {args.sasrec_patience}) trained on each protocol's train split and "
        "scored from its ONNX export over each user's ordered interactions before the window.\n\n"
    )
    (args.out / "quality.md").write_text(header + table + "\n\n" + "\n\n".join(sections))
    print()
    print(table)
    print(f"\nwrote {args.out / 'quality.md'} and {args.out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
