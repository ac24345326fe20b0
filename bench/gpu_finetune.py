"""Fine-tuning step of `bench/gpu_check.sh`: full fine-tuning and LoRA of the matcher on one device.

For each mode (full: every encoder weight; lora: adapters on every layer), a few hundred training
steps of the production trainer (`training.matcher.train.train`, in-batch softmax, bf16 autocast
on CUDA) on a prepared dataset: the MovieLens-100K copy in the bench cache when present, else a
generated log (recsys.data.synthetic, no network needed). Prints and writes, per mode, the device
and its name (the "provider" of a torch run), bf16 on/off, pairs/s, train seconds, peak GPU memory
and the validation NDCG@10 after the steps.

    python bench/gpu_finetune.py [--steps 300] [--batch-size 256] [--modes full,lora] [--device auto]
    python bench/gpu_finetune.py --dry-run     # CPU, tiny random BERT, 2 steps: checks the script runs

Writes bench/results/finetune_gpu.{json,md} (with --dry-run: under --out only, default a temp dir).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from report import write_results  # noqa: E402

ML100K = Path.home() / ".cache/recsys-data/recbole/dataset_example/ml-100k"


def dataset(work: Path, small: bool) -> Path:
    """A prepared dataset: ML-100K when its files are here (and not --dry-run), else generated."""
    from recsys.cli import main

    out = work / "data"
    if (out / "manifest.json").exists():
        return out
    if not small and (ML100K / "ml-100k.inter").exists():
        code = main(["prepare", "--format", "recbole", "--input", str(ML100K), "--out", str(out)])
        if code:
            raise SystemExit(f"recsys prepare failed for {ML100K} (exit {code})")
        return out
    from recsys.data.prepare import PrepareConfig, prepare_tables
    from recsys.data.schema import StrengthRule
    from recsys.data.synthetic import generate

    sizes = dict(n_users=60, n_items=80, n_events=3_000) if small else dict(n_users=2_000, n_items=1_000, n_events=200_000)
    log = generate(days=60, seed=0, **sizes)
    prepare_tables(log.events.with_columns(StrengthRule().expr()), log.items, log.users, out, PrepareConfig())
    return out


def run_mode(mode: str, data: Path, base_model: str | None, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from training.matcher.config import MatcherModelConfig, RunConfig, TrainConfig
    from training.matcher.train import train

    model = MatcherModelConfig(base_model=base_model, protocol="tail", lora=mode == "lora", max_text_tokens=64)
    # Epochs only bound the run: max_steps ends it; validation (NDCG@10) runs at each epoch end and at the stop.
    run = RunConfig(epochs=1_000, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr * (20 if mode == "lora" else 1),
                    device=args.device, patience=1_000, zero_shot=False, eval_test=False, progress=False,
                    threads=args.threads)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = train(TrainConfig(data=str(data), out=str(work / f"ckpt_{mode}"), model=model, run=run))
    device = report["device"]
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    row = {
        "mode": mode, "device": device, "device_name": name, "bf16": report["bf16"], "steps": report["steps"],
        "batch_size": args.batch_size, "pairs_per_second": report["pairs_per_second"],
        "train_seconds": report["train_seconds"], "wall_seconds": time.perf_counter() - t0,
        "trainable_parameters": report["trainable_parameters"],
        "valid_ndcg@10": report["fine_tuned"]["valid"].get("ndcg@10"),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
    }
    print(f"{mode:5s} on {device} ({name}, bf16 {row['bf16']}): {row['pairs_per_second']:.0f} pairs/s, "
          f"{row['steps']} steps in {row['train_seconds']:.1f} s, valid NDCG@10 {row['valid_ndcg@10']}", flush=True)
    return row


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Matcher fine-tuning on the device (bench/gpu_finetune.py)", "",
             f"Data: {report['data']}; base model: {report['base_model']}; torch {report['torch']}.", "",
             "| mode | device | bf16 | steps x batch | pairs/s | train s | trainable params | peak GPU MiB | valid NDCG@10 |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        peak = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['device']} ({r['device_name']}) | {r['bf16']} | {r['steps']} x {r['batch_size']} | "
                     f"{r['pairs_per_second']:.0f} | {r['train_seconds']:.1f} | {r['trainable_parameters']:,} | {peak} | "
                     f"{r['valid_ndcg@10']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate (LoRA: x20)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--base-model", default=None, help="default: all-MiniLM-L6-v2 (offline package)")
    parser.add_argument("--work", type=Path, default=None, help="data and checkpoints (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny random BERT, tiny data, 2 steps")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-finetune-"))
    base_model = args.base_model
    if args.dry_run:
        from tests.tiny_models import build_tiny_bert

        args.device, args.steps, args.batch_size, args.threads = "cpu", 2, 32, 1
        base_model = str(build_tiny_bert(work / "tiny"))
        if args.out == REPO / "bench" / "results":
            args.out = work / "results"
    import torch

    data = dataset(work, small=args.dry_run)
    report: dict[str, Any] = {"data": str(data), "base_model": base_model or "all-MiniLM-L6-v2", "torch": torch.__version__,
                              "cuda_available": torch.cuda.is_available(), "rows": []}
    for mode in [m for m in args.modes.split(",") if m]:
        if mode not in ("full", "lora"):
            raise SystemExit(f"--modes: unknown mode {mode!r} (full, lora)")
        report["rows"].append(run_mode(mode, data, base_model, work, args))
    write_results(args.out, "finetune_gpu", report, markdown(report))
    ok = all(r["steps"] == args.steps for r in report["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
