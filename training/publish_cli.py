"""`recsys publish`: a matcher -> ONNX towers + item embeddings + LightGBM blender -> one registry version.

`--checkpoint` publishes a fine-tuned matcher; `--base-model` publishes the pretrained encoder as a
zero-shot matcher (its user tower the deterministic mean of the history's item embeddings:
training/zero_shot.py), the baseline every fine-tune is compared against.
Light module: torch, onnx, onnxruntime and lightgbm load only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from recsys.compat import require
from recsys.errors import InputError


def configure(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="matcher checkpoint directory (recsys train matcher)")
    source.add_argument("--base-model", help="publish this pretrained encoder (HF name or path) as a zero-shot matcher")
    parser.add_argument("--registry", type=Path, default=os.environ.get("RECSYS_REGISTRY"),
                        help="model registry directory (default: $RECSYS_REGISTRY)")
    parser.add_argument("--data", type=Path, required=True,
                        help="the prepared dataset the matcher was trained on (the blender learns on its later window)")
    parser.add_argument("--int8", action="store_true", help="also build a dynamic-int8 item tower (CPU)")
    parser.add_argument("--promote", action="store_true", help="make the new version current")
    parser.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime and LightGBM")


def run(args: argparse.Namespace) -> int:
    if args.registry is None:
        raise InputError("recsys publish needs --registry DIR (or $RECSYS_REGISTRY)")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise InputError(f"checkpoint {args.checkpoint} does not exist: pass the directory written by recsys train matcher")
    for module in ("torch", "transformers", "onnx", "onnxruntime", "lightgbm"):
        require(module)
    from recsys.data.prepared import PreparedData
    from recsys.registry import Registry
    from training.export import ExportConfig
    from training.pipeline import publish_version
    from training.zero_shot import zero_shot_checkpoint

    data = PreparedData.load(args.data)
    export_config = ExportConfig(int8=args.int8, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="recsys-zero-shot-") as scratch:
        checkpoint = args.checkpoint or zero_shot_checkpoint(args.base_model, data.max_history, Path(scratch) / "checkpoint")
        version = publish_version(
            checkpoint, args.registry, data, export_config=export_config, promote=args.promote,
            extra={"source": "zero-shot " + args.base_model if args.base_model else str(args.checkpoint)},
        )
    manifest = Registry(args.registry).manifest(version)
    ranker = manifest.get("ranker", {})
    print(f"published {version} in {args.registry}{' (current)' if args.promote else ''}")
    for name, parity in manifest.get("metrics", {}).get("parity", {}).items():
        print(f"  parity {name}: min cosine {parity['min_cosine']:.7f}, max |diff| {parity['max_abs_diff']:.1e}")
    holdout = ranker.get("metrics", {}).get("holdout", {})
    if holdout:
        compared = ", ".join(
            f"{key.split('/', 1)[1]} {value:.3f}" for key, value in holdout.items() if key.startswith("ndcg@10/")
        )
        print(f"  blender NDCG@10 on its held-out request groups: {compared}")
    for warning in manifest.get("warnings", []):
        print(f"WARNING: {version}: {warning}", file=sys.stderr)
    return 0
