"""The zero-shot matcher: a pretrained encoder with no training, as a checkpoint `publish` can export.

Its user tower is the deterministic mean of the history's item embeddings (L2-normalised; an empty
history scores 0), exactly `recsys.features.mean_pool_encoder(item_emb, half_life_s=inf)`, the
zero-shot system of `recsys evaluate` and bench/quality.py. A freshly built tower would instead be
an unseeded random attention pooling: a different system every time it is published.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.matcher.checkpoint import save_checkpoint
from training.matcher.model import UserTower, build_model


@torch.no_grad()
def make_mean_pool(tower: UserTower) -> UserTower:
    """Zero the query and key (uniform attention over real history items: the mean), the residual
    projection (nothing added to it) and the empty-history vector (normalises to 0)."""
    for param in (tower.query, tower.empty, tower.key.weight, tower.key.bias, tower.out.weight, tower.out.bias):
        param.zero_()
    return tower


def zero_shot_checkpoint(base_model: str, max_history: int, out: Path) -> Path:
    """Write the zero-shot checkpoint of `base_model` (HF name or path) to `out`; -> out."""
    model, tokenizer = build_model(base_model, max_history=max_history)
    assert isinstance(model.user_tower, UserTower)
    make_mean_pool(model.user_tower)
    save_checkpoint(model.eval(), tokenizer, out)
    return out
