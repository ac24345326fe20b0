"""A causal transformer over a user's history, shared by SASRec (training/sasrec.py) and the
sequential user tower of the text matcher (training/matcher/model.py, `--user-tower sequential`).

Layout: histories arrive as the whole request path holds them, most recent first and right-padded
(position 0 = the newest item). Position j may attend to positions k >= j (itself and everything
older), so one pass yields, at every position j, the state after the first n - j items: training
predicts the next item at every position at once, serving reads position 0. Position embeddings are
indexed by recency (j), which is SASRec's left-padded absolute position L - 1 - j.
Blocks are pre-LN (attention then a GELU MLP, both residual), with a final LayerNorm.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class CausalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads if dim % heads == 0 else 1
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], allowed [B, 1, N, N] bool (query, key) -> [B, N, D]."""
        b, n, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, dk]
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        attn = self.dropout(torch.softmax(logits, dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.dropout(self.proj(out))
        return x + self.dropout(self.ff(self.norm2(x)))


class CausalEncoder(nn.Module):
    """inputs [B, N, D] (item + side embeddings), mask [B, N] bool (True = real, a prefix) ->
    states [B, N, D]; state j summarises history positions j.. (older ones), never newer ones."""

    def __init__(self, dim: int, *, blocks: int = 2, heads: int = 1, max_len: int = 200, dropout: float = 0.2) -> None:
        super().__init__()
        self.max_len = max_len
        self.position = nn.Embedding(max_len, dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        inputs, mask = inputs[:, : self.max_len], mask[:, : self.max_len]
        # Positions from the mask's shape (traced as ops, so ONNX keeps the history axis dynamic).
        pos = torch.ones_like(mask, dtype=torch.long).cumsum(1) - 1  # [B, N]: 0 .. N-1
        x = self.dropout(inputs + self.position(pos)) * mask.unsqueeze(-1).to(inputs.dtype)
        # Query j sees key k when k is real and no newer than j (k >= j); always itself, so padded
        # rows never softmax over nothing (they are never read).
        older = pos.unsqueeze(2) <= pos.unsqueeze(1)  # [B, Nq, Nk]
        allowed = ((older & mask.unsqueeze(1)) | (pos.unsqueeze(2) == pos.unsqueeze(1))).unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed) * mask.unsqueeze(-1).to(x.dtype)
        return self.norm(x)


def next_item_loss(states: torch.Tensor, targets: torch.Tensor, table: torch.Tensor, *, scale: float = 1.0,
                   log_q: torch.Tensor | None = None, exclude: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Full softmax over `table` [M, D] at every real position: states [B, N, D], targets [B, N]
    (column of the next item, -1 = no target). log_q [M] is subtracted from the logits (popularity
    correction); exclude [B, N, M] bool removes columns (other positives of the user) except the
    target; weights [B, N] weight each position's cross-entropy (default: equal)."""
    keep = targets >= 0
    logits = states[keep].float() @ table.float().T * scale  # [P, M]
    labels = targets[keep]
    if log_q is not None:
        logits = logits - log_q.float()[None, :]
    if exclude is not None:
        drop = exclude[keep] & ~F.one_hot(labels, logits.shape[1]).bool()
        logits = logits.masked_fill(drop, float("-inf"))
    if weights is None:
        return F.cross_entropy(logits, labels)
    w = weights[keep].float()
    return (F.cross_entropy(logits, labels, reduction="none") * w).sum() / w.sum().clamp(min=1e-12)
