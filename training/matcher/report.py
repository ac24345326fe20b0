"""Training report figure: loss per step and validation metric per epoch, with baselines as lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_curves(report: dict[str, Any], losses: list[tuple[int, float]], path: Path, k: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    if losses:
        steps = np.array([s for s, _ in losses])
        values = np.array([v for _, v in losses])
        ax_loss.plot(steps, values, alpha=0.35, label="step loss")
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax_loss.plot(steps[window - 1 :], smooth, label=f"mean of {window}")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("in-batch softmax loss")
    ax_loss.legend()

    key = f"valid_ndcg@{k}"
    rows = [r for r in report.get("history", []) if key in r]
    if rows:
        ax_metric.plot([r["step"] for r in rows], [r[key] for r in rows], "o-", label=f"fine-tuned NDCG@{k}")
        ax_metric.plot([r["step"] for r in rows], [r[f"valid_recall@{k}"] for r in rows], "s-", label=f"fine-tuned Recall@{k}")
    for name, style in (("zero_shot", "--"), ("popularity", ":")):
        value = report.get(name, {}).get("valid", {}).get(f"ndcg@{k}")
        if value is not None:
            ax_metric.axhline(value, linestyle=style, color="gray", label=f"{name} NDCG@{k}")
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel("validation metric")
    ax_metric.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
