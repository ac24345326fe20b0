"""`recsys export`: checkpoint -> ONNX towers (+ variants, item embeddings) -> a registry version.

Light module: torch, onnx and onnxruntime are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from recsys.compat import require
from recsys.errors import InputError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="matcher checkpoint directory (recsys train matcher)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--registry", type=Path, default=os.environ.get("RECSYS_REGISTRY"),
                        help="model registry directory; a new version is registered (default: $RECSYS_REGISTRY)")
    target.add_argument("--out", type=Path, help="write the exported files to a plain directory instead")
    parser.add_argument("--data", type=Path, help="prepared dataset: embeds its catalogue and measures variant Recall@10")
    parser.add_argument("--int8", action="store_true", help="also build a dynamic-int8 item tower (CPU)")
    parser.add_argument("--fp16", action="store_true", help="also build an fp16 item tower (GPU)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="largest Recall@10 drop a variant may have and still be kept (absolute; default 0.01)")
    parser.add_argument("--cosine-tolerance", type=float, default=0.99,
                        help="without --data: smallest mean cosine to fp32 a variant must keep (default 0.99)")
    parser.add_argument("--protocol", default="global", choices=["global", "loo", "tail"], help="evaluation protocol for --data")
    parser.add_argument("--embeddings-dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime (default: all cores)")
    promote = parser.add_mutually_exclusive_group()
    promote.add_argument("--promote", dest="promote", action="store_true", default=None,
                         help="make the new version current (default: only if the registry has none)")
    promote.add_argument("--no-promote", dest="promote", action="store_false")


def run(args: argparse.Namespace) -> int:
    if args.registry is None and args.out is None:
        raise InputError("recsys export needs --registry DIR (or $RECSYS_REGISTRY) or --out DIR")
    if not args.checkpoint.is_dir():
        raise InputError(f"checkpoint {args.checkpoint} does not exist: pass the directory written by recsys train matcher")
    for module in ("torch", "transformers", "onnx", "onnxruntime", "tokenizers", "safetensors"):
        require(module)
    from training.export import ExportConfig, export_to_dir, export_to_registry

    config = ExportConfig(
        opset=args.opset, int8=args.int8, fp16=args.fp16, recall_tolerance=args.tolerance,
        cosine_tolerance=args.cosine_tolerance, protocol=args.protocol,
        embeddings_dtype=args.embeddings_dtype, threads=args.threads,
    )
    if args.out is not None:
        manifest = export_to_dir(args.checkpoint, args.out, config, args.data)
        where = str(args.out)
    else:
        version, manifest = export_to_registry(args.checkpoint, args.registry, config, args.data, args.promote)
        where = f"{args.registry} as {version}"
    print(summary(manifest, where))
    return 0


def summary(manifest: dict, where: str) -> str:
    metrics = manifest["metrics"]
    lines = [f"exported to {where}"]
    for name, p in metrics["parity"].items():
        lines.append(f"  parity {name:14s} min cosine {p['min_cosine']:.7f}  max |diff| {p['max_abs_diff']:.2e}")
    for key, value in metrics.items():
        if key.startswith("recall@"):
            lines.append(f"  fp32 {key} = {value['value']:.4f} ({value['protocol']}/{value['split']}, {value['users']} users)")
    for name, v in metrics["variants"].items():
        verdict = "accepted" if v["accepted"] else "REJECTED"
        delta = f"Recall@10 delta {v['recall_delta']:+.4f}" if v.get("recall_delta") is not None else "Recall@10 not measured"
        lines.append(f"  {name}: {verdict}; {delta}; cosine to fp32 mean {v['cosine_mean']:.4f} (on {v['provider']})")
        lines.append(f"    criterion: {v['criterion']}")
    if manifest.get("embeddings"):
        lines.append(f"  item embeddings: {manifest['embeddings']['count']} x {manifest['dim']} {manifest['embeddings']['dtype']}")
    lines.append("  models: " + json.dumps(manifest["models"]))
    return "\n".join(lines)
