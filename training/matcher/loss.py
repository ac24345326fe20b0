"""In-batch softmax (InfoNCE) over the unique items of a step, with false-negative masking and logQ."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def in_batch_softmax(
    users: torch.Tensor,
    items: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    false_negatives: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy of each user row against all item columns.

    users [B, D], items [M, D] (L2-normalised; M unique items: targets, hard and cached negatives),
    labels [B] column of each row's target, false_negatives [B, M] bool (True = another positive of
    that user: removed from the softmax), log_q [M] log sampling probability of each column
    (subtracted so the model learns the full-catalogue softmax, popularity included), weights [B].
    """
    logits = users.float() @ items.float().T / temperature  # [B, M]; fp32 even under bf16 autocast
    if log_q is not None:
        logits = logits - log_q.float()[None, :]
    if false_negatives is not None:
        keep_label = F.one_hot(labels, logits.shape[1]).bool()
        logits = logits.masked_fill(false_negatives & ~keep_label, float("-inf"))
    loss = F.cross_entropy(logits, labels, reduction="none")
    if weights is None:
        return loss.mean()
    return (loss * weights).sum() / weights.sum()


def false_negative_mask(
    row_users: np.ndarray, columns: np.ndarray, n_items: int, positives: np.ndarray, hist_items: np.ndarray
) -> np.ndarray:
    """[B, M] bool: column item is a known positive of the row's user (training positives, its history,
    or another row of the same user in this batch). `positives` = sorted user*n_items+item keys."""
    keys = row_users[:, None] * n_items + columns[None, :]
    mask = np.isin(keys, positives, assume_unique=False)
    # History items too: with a per-user split, a history may hold positives outside `positives`.
    hist = (hist_items[:, :, None] == columns[None, None, :]).any(1) if hist_items.size else False
    return mask | hist


def inclusion_log_prob(item_prob: np.ndarray, batch_size: int, uniform_frac: float = 0.0) -> np.ndarray:
    """log P(item appears among a step's columns): a batch of `batch_size` targets drawn with
    per-item probability item_prob, deduplicated, plus a uniform share `uniform_frac` of the catalogue."""
    miss = np.exp(batch_size * np.log1p(-np.clip(item_prob, 0.0, 1.0 - 1e-12))) * (1.0 - uniform_frac)
    return np.log(np.clip(1.0 - miss, 1e-12, 1.0))
