"""Full-ranking evaluation of the two-tower model: encode every item once, score every user against all.

One eval-set type (`EvalSet`) and one evaluator (`RankingEvaluator`) serve validation during training
(its primary metric picks the checkpoint), the zero-shot and popularity baselines, the benchmark and
`recsys export`'s check that an ONNX variant keeps Recall@k (scores from ONNX Runtime towers, via
`RankingEvaluator.per_user`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.data.prepared import PreparedData
from recsys.errors import InputError
from recsys.evaluation.metrics import PerUser, bootstrap_ci, per_user_metrics, top_k
from training.matcher.data import ItemTokens, _history
from training.matcher.model import TwoTower


@dataclass
class EvalSet:
    """One evaluation window: per user the history as of the cutoff, targets and seen items."""

    protocol: str
    split: str
    user: np.ndarray  # [U] user_idx
    hist_item: np.ndarray  # [U, N]
    hist_type: np.ndarray  # [U, N]
    hist_age: np.ndarray  # [U, N]
    targets: list[np.ndarray]
    seen: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.user)

    @property
    def hist_mask(self) -> np.ndarray:
        """[U, N] true for real history entries."""
        return self.hist_item >= 0

    @classmethod
    def load(cls, data: PreparedData, protocol: str, split: str, max_history: int, *, limit: int | None = None,
             seed: int = 0) -> EvalSet:
        """The window's users; with `limit`, a seeded sample of at most that many."""
        frame = data.eval_set(protocol, split)
        if limit is not None and frame.height > limit:
            frame = frame.sample(limit, seed=seed)
        return cls(
            protocol=protocol,
            split=split,
            user=frame["user_idx"].to_numpy().astype(np.int64),
            hist_item=_history(frame, "hist_item_idx", np.int64, max_history),
            hist_type=_history(frame, "hist_event_code", np.int64, max_history),
            hist_age=_history(frame, "hist_age_s", np.float32, max_history),
            targets=[np.asarray(t, dtype=np.int64) for t in frame["target_item_idx"].to_list()],
            seen=data.seen_items(frame, protocol, split) if frame.height else [],
        )


def autocast(device: torch.device, bf16: bool) -> Any:
    """bf16 autocast on CUDA (matmuls in bf16, reductions fp32); a no-op elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def encode_items(
    model: TwoTower,
    tokens: ItemTokens,
    items: np.ndarray,
    device: torch.device,
    chunk: int = 256,
    bf16: bool = False,
    lower: torch.Tensor | None = None,
) -> torch.Tensor:
    """[len(items), D] float32 embeddings in eval mode (no dropout), length-bucketed.

    With `lower` ([n_items, T_max, D] cached outputs of the frozen layers), only the top layers run.
    """
    was_training = model.training
    model.eval()
    out = torch.empty(len(items), model.config.dim, device=device)
    with autocast(device, bf16):
        for pos, x, mask in model_chunks(tokens.chunks(items, chunk, bucket=True), items, device, lower):
            out[torch.from_numpy(pos).to(device)] = model.encode_chunk(x, mask).float()
        out = model.with_ids(out, torch.from_numpy(np.asarray(items, np.int64)))
    model.train(was_training)
    return out


def model_chunks(
    chunks: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]],
    items: np.ndarray,
    device: torch.device,
    lower: torch.Tensor | None = None,
) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Token chunks -> model inputs on `device`: token ids, cached lower-layer states [c, T, D], or
    cached pooled outputs of a frozen encoder [c, D] (when `lower` is [n_items, D])."""
    out = []
    for pos, ids, mask in chunks:
        if lower is None:
            out.append((pos, ids.to(device), mask.to(device)))
        else:
            rows = torch.from_numpy(items[pos]).to(lower.device)
            x = lower[rows] if lower.ndim == 2 else lower[rows, : ids.shape[1]]
            out.append((pos, x.to(device), mask.to(device)))
    return out


def history_tensors(
    cache: torch.Tensor, hist_item: np.ndarray, hist_type: np.ndarray, hist_age: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached embeddings of history items: ([B, N, D], type [B, N], age [B, N], mask [B, N]).

    `cache` is [n_items + 1, D]; its last row (zeros) stands in for padding (-1).
    """
    idx = torch.from_numpy(np.where(hist_item < 0, cache.shape[0] - 1, hist_item)).to(device)
    return (
        cache[idx],
        torch.from_numpy(hist_type).to(device),
        torch.from_numpy(hist_age).to(device),
        torch.from_numpy(hist_item >= 0).to(device),
    )


@torch.no_grad()
def encode_users(
    user_tower: nn.Module, cache: torch.Tensor, ev: EvalSet, device: torch.device, chunk: int = 1024
) -> torch.Tensor:
    """[U, D] user embeddings from cached history embeddings (eval mode)."""
    was_training = user_tower.training
    user_tower.eval()
    parts = []
    for s in range(0, len(ev), chunk):
        sl = slice(s, s + chunk)
        parts.append(user_tower(*history_tensors(cache, ev.hist_item[sl], ev.hist_type[sl], ev.hist_age[sl], device)))
    user_tower.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, cache.shape[1], device=device)


def per_user(scores: np.ndarray, ev: EvalSet, k: int) -> PerUser:
    """Per-user NDCG@k / Recall@k of [U, n_items] scores over all unseen items (seen excluded)."""
    return per_user_metrics(top_k(scores, k, exclude=ev.seen), ev.targets, k)


def ranking_metrics(
    scores: np.ndarray, ev: EvalSet, k: int = 10, ci: bool = False, n_boot: int = 1000
) -> dict[str, Any]:
    """Mean NDCG@k / Recall@k (see `per_user`); optional bootstrap 95% intervals."""
    if len(ev) == 0:
        return {"users": 0}
    pu = per_user(scores, ev, k)
    out: dict[str, Any] = {"users": len(ev), f"ndcg@{k}": float(pu.ndcg.mean()), f"recall@{k}": float(pu.recall.mean())}
    if ci:
        out[f"ndcg@{k}_ci"] = list(bootstrap_ci(pu.ndcg, n_boot=n_boot))
        out[f"recall@{k}_ci"] = list(bootstrap_ci(pu.recall, n_boot=n_boot))
    return out


def model_scores(model: TwoTower, item_emb: torch.Tensor, ev: EvalSet, device: torch.device) -> np.ndarray:
    """[U, n_items] cosine scores; item_emb is [n_items, D] (padding row appended here)."""
    cache = torch.cat([item_emb, item_emb.new_zeros(1, item_emb.shape[1])])
    users = encode_users(model.user_tower, cache, ev, device)
    return (users @ item_emb.T).float().cpu().numpy()


class RankingEvaluator:
    """The matcher's one evaluator (the shape of sentence-transformers' `SentenceEvaluator`): full-
    ranking NDCG@k / Recall@k on one EvalSet; `primary` names the metric that picks the checkpoint.
    An evaluator without an EvalSet returns {} (no such split in the dataset)."""

    def __init__(self, ev: EvalSet | None, k: int, device: torch.device | None = None) -> None:
        self.ev, self.k, self.device = ev, k, device or torch.device("cpu")
        self.primary = f"ndcg@{k}"

    def __call__(self, model: TwoTower, item_emb: torch.Tensor, ci: bool = False) -> dict[str, Any]:
        """Metrics of `model` with the catalogue encoded as item_emb [n_items, D]."""
        if self.ev is None:
            return {}
        return ranking_metrics(model_scores(model, item_emb, self.ev, self.device), self.ev, self.k, ci=ci)

    def per_user(self, scores: np.ndarray) -> PerUser:
        """Per-user metrics of [U, n_items] scores from any scorer (paired comparisons need them)."""
        if self.ev is None:
            raise InputError("this evaluator has no evaluation set (the dataset has no such split)")
        return per_user(scores, self.ev, self.k)

    def of_scores(self, scores: Callable[[int], np.ndarray], ci: bool = False) -> dict[str, Any]:
        """Metrics of a model-free scorer (users -> [U, n_items] scores), e.g. popularity."""
        if self.ev is None:
            return {}
        return ranking_metrics(scores(len(self.ev)), self.ev, self.k, ci=ci)
