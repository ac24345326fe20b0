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
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F


class CausalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.dim = dim
        self.heads = heads if dim % heads == 0 else 1
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], allowed [B, 1, N, N] bool (query, key) -> [B, N, D]."""
        d, h = self.dim, self.heads
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, h, d // h)).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, dk]
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        attn = self.dropout(torch.softmax(logits, dim=-1))
        return self._finish(x, (attn @ v).transpose(1, 2).flatten(2))

    def newest(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """forward(x, allowed)[:, :1] for position 0 (the newest: every real key is older, so only the key
        mask `key_mask` [B, 1, 1, N] applies), without keys or values. With the head-h query q, a key is
        Wk x + bk and a value Wv x + bv: q . key = (Wk^T q) . x + q . bk, where q . bk is the same for
        every key (softmax ignores it), and sum_n a_n value_n = Wv (sum_n a_n x_n) + bv, as the weights
        sum to 1. So attention runs on the normed inputs directly: O(N D H) instead of O(N D^2).
        Heads are the weights' leading axis ([H, D, dk], broadcast over the batch) rather than reshapes
        of activations, and every weight-only term folds into a constant at export: a 1-user call of
        the served tower is mostly ONNX Runtime's per-node cost. The per-head products W_q W_k^T and
        W_v W_o are not multiplied out: in a server, where the call runs with cold caches, they read
        twice the bytes and cost 1.07x per Rank (bench/results/serve_towers_unfold.md)."""
        d, h = self.dim, self.heads
        dk = d // h
        weight, bias = self.qkv.weight.unflatten(0, (3, h, dk)), self.qkv.bias.unflatten(0, (3, h, dk))  # [3, H, dk, D]
        heads = self.norm1(x).unsqueeze(1)  # [B, 1, N, D]
        query = heads[:, :, :1] @ (weight[0].transpose(1, 2) / math.sqrt(dk)) + bias[0].unsqueeze(1) / math.sqrt(dk)
        logits = (query @ weight[1]) @ heads.transpose(2, 3)  # [B, H, 1, N]
        logits = logits.masked_fill(~key_mask, torch.finfo(logits.dtype).min)
        attn = self.dropout(torch.softmax(logits, dim=-1))
        values = (attn @ heads) @ weight[2].transpose(1, 2)  # [B, H, 1, dk]: inputs pooled, then projected
        return self._finish(x[:, :1], values.transpose(1, 2).reshape(-1, 1, d) + bias[2].flatten())

    def _finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.proj(attended))
        return x + self.dropout(self.ff(self.norm2(x)))


class CausalEncoder(nn.Module):
    """inputs [B, N, D] (item + side embeddings), mask [B, N] bool (True = real, a prefix) ->
    states [B, N, D]; state j summarises history positions j.. (older ones), never newer ones."""

    older: torch.Tensor

    def __init__(self, dim: int, *, blocks: int = 2, heads: int = 1, max_len: int = 200, dropout: float = 0.2) -> None:
        super().__init__()
        self.max_len = max_len
        self.position = nn.Embedding(max_len, dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        # older[j, k]: key k is no newer than query j. A constant (not saved in checkpoints), sliced to
        # the history length, so the export builds no mask from shapes at run time.
        self.register_buffer("older", torch.ones(max_len, max_len, dtype=torch.bool).triu(), persistent=False)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor, *, newest_only: bool = False) -> torch.Tensor:
        """-> states [B, N, D]; `newest_only` -> [B, D], position 0's state alone (what serving reads),
        equal to states[:, 0] at a fraction of the cost: the last block runs only position 0's query."""
        inputs, mask = inputs[:, : self.max_len], mask[:, : self.max_len]
        n = inputs.shape[1]
        real = mask.unsqueeze(-1).to(inputs.dtype)
        x = self.dropout(inputs + self.position.weight[:n]) * real
        # Query j sees key k when k is real and no newer than j (k >= j). A padded query sees nothing
        # and softmaxes uniformly over finfo.min (no NaN); its row is zeroed and never read.
        allowed = (self.older[:n, :n] & mask.unsqueeze(1)).unsqueeze(1)  # [B, 1, Nq, Nk]
        blocks = cast("list[CausalBlock]", list(self.blocks))
        last = blocks.pop() if newest_only and blocks else None
        for block in blocks:
            x = block(x, allowed) * real
        if not newest_only:
            return self.norm(x)
        if last is not None:
            x = last.newest(x, mask[:, None, None, :]) * real[:, :1]
        return self.norm(x[:, 0])


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
