"""Two-tower matching model.

Item tower: a Hugging Face BERT-family encoder over item text, mean pooling over real tokens, L2 norm.
User tower: attention pooling over the embeddings of the user's most recent interactions, with learned
event-type and log-recency information, followed by a residual projection and L2 norm.
Score(user, item) = cosine(user, item); training divides it by a temperature.

Checkpoint layout (a directory), read by training, export and warm start:
    item_encoder/            save_pretrained() of the encoder + tokenizer files
    user_tower.safetensors   user tower weights
    matcher_config.json      MatcherConfig fields
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from recsys.data.schema import EVENT_CODES

N_EVENT_TYPES = len(EVENT_CODES)
# Recency buckets: log2 of age in hours, clipped; bucket 0 = under an hour.
N_AGE_BUCKETS = 24


@dataclass(frozen=True)
class MatcherConfig:
    base_model: str
    dim: int
    max_history: int = 20
    max_text_tokens: int = 64
    temperature: float = 0.05
    user_heads: int = 4
    dropout: float = 0.1

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> MatcherConfig:
        return cls(**json.loads(path.read_text()))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, D], [B, T] -> [B, D] mean over real tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)


class ItemTower(nn.Module):
    """Encoder + mean pooling + L2 norm: (input_ids [B,T], attention_mask [B,T]) -> [B, D]."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(mean_pool(hidden, attention_mask), dim=-1)


def age_bucket(age_seconds: torch.Tensor) -> torch.Tensor:
    """Seconds before the target -> integer recency bucket in [0, N_AGE_BUCKETS)."""
    hours = age_seconds.clamp(min=0) / 3600.0
    return torch.log2(hours + 1.0).floor().clamp(0, N_AGE_BUCKETS - 1).long()


class UserTower(nn.Module):
    """Attention pooling over history item embeddings.

    Inputs: hist_emb [B, N, D] (L2-normalised item embeddings), hist_type [B, N] (event codes, -1 pad),
    hist_age [B, N] (seconds before the request), hist_mask [B, N] (1 = real). Output: [B, D], L2 norm.
    A user with an empty history gets the learned `empty` vector (cold-start users).
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.type_emb = nn.Embedding(N_EVENT_TYPES + 1, dim)  # last index = padding
        self.age_emb = nn.Embedding(N_AGE_BUCKETS, dim)
        nn.init.normal_(self.type_emb.weight, std=0.02)
        nn.init.normal_(self.age_emb.weight, std=0.02)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.empty = nn.Parameter(torch.randn(dim) * 0.02)
        self.heads = heads if dim % heads == 0 else 1
        self.key = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        hist_emb: torch.Tensor,
        hist_type: torch.Tensor,
        hist_age: torch.Tensor,
        hist_mask: torch.Tensor,
    ) -> torch.Tensor:
        b, n, d = hist_emb.shape
        h = self.heads
        types = torch.where(hist_type < 0, torch.full_like(hist_type, N_EVENT_TYPES), hist_type).long()
        x = hist_emb + self.type_emb(types) + self.age_emb(age_bucket(hist_age))
        keys = self.key(self.dropout(x)).view(b, n, h, d // h)
        q = self.query.view(1, 1, h, d // h)
        logits = (keys * q).sum(-1) / math.sqrt(d // h)  # [B, N, H]
        mask = hist_mask.bool().unsqueeze(-1)
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=1) * mask  # all-pad rows -> zeros
        pooled = (weights.unsqueeze(-1) * hist_emb.view(b, n, h, d // h)).sum(1).reshape(b, d)
        pooled = pooled + self.out(pooled)  # residual: starts as plain attention pooling
        has_history = hist_mask.bool().any(1, keepdim=True)
        pooled = torch.where(has_history, pooled, self.empty.expand(b, d))
        return F.normalize(pooled, dim=-1)
