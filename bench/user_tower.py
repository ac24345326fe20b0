"""Latency of one user-tower call, the part of a Rank request the user tower changes: the
attention-pooling tower vs the sequential (causal transformer) tower, side by side in one run.

Every tower is exported by training/export.py's `export_user_tower` at the MiniLM width (384) and run
by the service's own `UserEncoder` (ONNX Runtime, CPU, 1 thread): one user per call (a Rank request
encodes one user, c=1), histories of 20 items (the prepared data's default), plus a batch of 256 users
(the batch scorer's chunked path). Weights are random: latency does not depend on them. The sequential
tower's first layer (a per-item projection to its width) is exported apart and run on the catalogue
once at model load (`user_items.onnx`); the "projection per request" row is the export before that
change (every history item projected in every call), so before/after come from one run. 1-user calls
alternate the towers over --rounds rounds (median of the round p50s).

    python bench/user_tower.py [--calls 2000] [--rounds 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_calls(encoder: Any, batch: int, n: int, dim: int, calls: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((batch, n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    types = rng.integers(0, 4, size=(batch, n))
    ages = np.sort(rng.random((batch, n)) * 1e7, axis=1).astype(np.float32)
    mask = np.ones((batch, n), bool)
    for _ in range(20):  # warm-up
        encoder.encode(emb, types, ages, mask)
    times = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        encoder.encode(emb, types, ages, mask)
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--history", type=int, default=20)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import torch

    from recsys.scoring.encoder import UserEncoder
    from training.export import export_user_tower
    from training.matcher.model import MatcherConfig, make_user_tower

    torch.manual_seed(0)

    def tower(kind: str, blocks: int = 2) -> Any:
        config = MatcherConfig(base_model="-", dim=args.dim, max_history=args.history, user_tower=kind, sequence_blocks=blocks)
        return make_user_tower(config).eval()

    two, one = tower("sequential"), tower("sequential", 1)
    # name -> (tower, history projection exported apart)
    models = {"pooling": (tower("pooling"), False), "sequential, projection per request (before)": (two, False),
              "sequential": (two, True), "sequential, 1 block": (one, True)}
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        encoders = {}
        for i, (name, (model, split)) in enumerate(models.items()):
            path, items = Path(tmp) / f"tower{i}.onnx", Path(tmp) / f"tower{i}_items.onnx"
            export_user_tower(model, path, args.dim, items_path=items if split else None)
            encoders[name] = UserEncoder(path, "cpu", threads=1, items_path=items if split else None)
        # Rounds alternate the towers, so load on the shared machine hits all of them alike.
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in models}
        for r in range(args.rounds):
            for name, encoder in encoders.items():
                rounds[name].append(time_calls(encoder, 1, args.history, encoder.width, args.calls // args.rounds, seed=r))
        for name, (model, _) in models.items():
            encoder = encoders[name]
            rows[name] = {
                "parameters": sum(p.numel() for p in model.parameters()),
                "history_width": encoder.width,
                "c1": {k: float(np.median([x[k] for x in rounds[name]])) for k in rounds[name][0]},
                "batch256": time_calls(encoder, 256, args.history, encoder.width, max(20, args.calls // 50)),
            }
    base = rows["pooling"]
    lines = [
        "# User tower latency (ONNX Runtime CPU, 1 thread)",
        "",
        f"`python bench/user_tower.py --calls {args.calls} --rounds {args.rounds}`: one call of the exported user tower, histories of "
        f"{args.history} items of width {args.dim}; 1 user per call (a Rank request, c=1) and 256 users (the batch "
        "scorer); 1-user figures are medians over rounds alternating the towers. Shared 2-core machine: compare "
        "the ratios.",
        "",
        "| tower | parameters | history row width | 1 user p50 ms | 1 user p99 ms | 256 users mean ms | p50 vs pooling |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, row in rows.items():
        lines.append(
            f"| {kind} | {row['parameters']:,} | {row['history_width']} | {row['c1']['p50_ms']:.3f} | {row['c1']['p99_ms']:.3f} | "
            f"{row['batch256']['mean_ms']:.2f} | {row['c1']['p50_ms'] / base['c1']['p50_ms']:.2f}x |"
        )
    before, after = rows["sequential, projection per request (before)"], rows["sequential"]
    lines += ["", f"sequential, projection at load vs per request: 1 user p50 {after['c1']['p50_ms'] / before['c1']['p50_ms']:.2f}x, "
              f"256 users {after['batch256']['mean_ms'] / before['batch256']['mean_ms']:.2f}x."]
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"platform": platform.platform(), "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "user_tower.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "user_tower.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
