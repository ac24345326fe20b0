"""`recsys evaluate`: light CLI module (NumPy/LightGBM/ONNX code is imported in `run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from recsys.cli_config import Typed, flags_of


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _matcher(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--matcher takes NAME=VERSION_DIR (e.g. fine_tuned=models/v3), got {text!r}")
    return name, Path(path)


MATCHER = Typed(_matcher, lambda v: f"{v[0]}={v[1].absolute()}")
INTS = Typed(_ints, lambda values: ",".join(map(str, values)))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset directory (recsys prepare --out)")
    parser.add_argument("--out", type=Path, help="report directory (evaluation.md/.json/.png); required unless --write-holdout")
    parser.add_argument("--protocol", choices=["global", "loo", "tail"], default="tail", help="time split to evaluate (tail)")
    parser.add_argument(
        "--matcher", type=MATCHER, action="append", default=[], metavar="NAME=DIR",
        help="a text system: registry version directory of an exported matcher (repeatable, e.g. "
        "zero_shot=DIR fine_tuned=DIR)",
    )
    parser.add_argument(
        "--sasrec", type=Path, metavar="DIR",
        help="also compare the SASRec sequential baseline trained by recsys train sasrec --out DIR (on this "
        "dataset's train split of --protocol)",
    )
    parser.add_argument("--blend-matcher", help="which --matcher feeds the blend (default fine_tuned, else the first)")
    parser.add_argument(
        "--ranker", type=Path,
        help="use this trained ranker (recsys train ranker) as the blend's re-ranker instead of training one "
        "on the valid window; it must use features computable here",
    )
    parser.add_argument("--systems", default="popularity,itemknn,als,ease", help="collaborative baselines (all four)")
    parser.add_argument("--no-blend", action="store_true", help="skip the two-stage blend")
    parser.add_argument("--no-refit", action="store_true", help="test window: fit CF on train only (default: train + valid)")
    parser.add_argument("--ks", type=INTS, default=(5, 10, 20, 50), help="cut-offs (5,10,20,50)")
    parser.add_argument("--k", type=int, default=10, help="headline cut-off for tables and bootstrap (10)")
    parser.add_argument("--negatives", type=int, default=100, help="sampled negatives of the candidate protocol (100)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (1000)")
    parser.add_argument("--scores-top", type=int, default=100, help="also write each system's top-N test scores as parquet (100; 0 writes none)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the bootstrap and the baselines (0)")
    parser.add_argument(
        "--cold-slots", type=int, default=0, metavar="N",
        help="cold-item exploration: also report blend_explore, the blend with the last N of the top --k places "
        "given to the items without behaviour that the matcher scores highest, and every system's cold share (0)",
    )
    parser.add_argument(
        "--cold-prior", default="", metavar="NAME",
        help="with --cold-slots: the --matcher whose score picks the cold items for those places (default: the "
        "blend's matcher; e.g. zero_shot, whose untrained text match ranks never-seen items best on ML-100K)",
    )
    parser.add_argument(
        "--blend-bags", type=int, default=5, metavar="N",
        help="the blend averages N LambdaMART models, each early-stopped on another share of the valid users "
        "(one model's score moves by ~0.01 NDCG@10 between seeds on ML-100K leave-last-out) (5)",
    )
    hold = parser.add_argument_group("cold-start hold-out")
    hold.add_argument(
        "--write-holdout", type=Path, metavar="DIR",
        help="write a copy of --data with --holdout-frac of the items removed from every training input, then "
        "exit; train the matcher on DIR and evaluate DIR for the cold-start slice",
    )
    hold.add_argument("--holdout-frac", type=float, default=0.1, help="share of items to hold out (0.1)")


def run(args: argparse.Namespace) -> int:
    from recsys.data.prepared import PreparedData
    from recsys.data.window import check_window, version_window
    from recsys.errors import ConfigError
    from recsys.evaluation.evaluate import BlendConfig, EvalConfig, evaluate, write_holdout, write_scores
    from recsys.evaluation.report import main_table, paired_table, write_report
    from recsys.scoring.registry_matcher import registry_matcher

    data = PreparedData.load(args.data)
    if args.write_holdout:
        held = write_holdout(data, args.write_holdout, args.holdout_frac, args.seed)
        n = len(held.manifest["holdout"]["items"])
        print(f"wrote {args.write_holdout}: {n} of {data.n_items} items held out of every training input")
        return 0
    if args.out is None:
        raise ConfigError("--out is required (the report directory)")
    config = EvalConfig(
        protocol=args.protocol,
        ks=tuple(args.ks),
        k=args.k,
        systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
        blend=not args.no_blend,
        refit_on_valid=not args.no_refit,
        sampled_negatives=args.negatives,
        n_boot=args.n_boot,
        seed=args.seed,
        blend_config=BlendConfig(cold_slots=args.cold_slots, cold_prior=args.cold_prior, bags=args.blend_bags),
    )
    splits = ("test", "valid") if config.blend else ("test",)  # the blend learns from valid's match scores
    for name, path in args.matcher:
        check_window(version_window(path), data, args.protocol, splits, what=f"--matcher {name}={path}",
                     fix=f"train the matcher on {data.root} with --protocol {args.protocol} (recsys train matcher "
                     f"--protocol {args.protocol}), export it, and evaluate that.")
    matchers = {name: registry_matcher(path, data) for name, path in args.matcher}
    sequences = {}
    if args.sasrec:
        from recsys.evaluation.sequence import load_sequence_system

        sasrec = load_sequence_system(args.sasrec, data)
        check_window(sasrec.window, data, args.protocol, ("test",), what=f"--sasrec {args.sasrec}",
                     fix=f"train it on {data.root} with recsys train sasrec --protocol {args.protocol} and evaluate that.")
        sequences["sasrec"] = sasrec
    ranker = None
    if args.ranker:
        from recsys.ranker import Ranker

        ranker = Ranker.load(args.ranker)
    result = evaluate(data, config, matchers, args.blend_matcher, ranker, sequences)
    paths = write_report(result, args.out, title=f"{data.root.name}, {args.protocol} protocol",
                         extra={"command": "evaluate", "flags": flags_of(args)})  # --config reads these back
    if args.scores_top > 0:
        write_scores(result, data, args.out, args.scores_top)
    print(main_table(result))
    if result.paired:
        print()
        print(paired_table(result))
    print(f"\nreport: {paths['markdown']} and {paths['json']}")
    return 0
