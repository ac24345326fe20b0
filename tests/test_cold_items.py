"""Cold items: the exploration policy's known answers and item-head dropout."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.errors import ConfigError
from recsys.scoring.explore import cold_share, reserve_cold_slots


def test_reserved_cold_slots_known_answer() -> None:
    inf = -np.inf
    scores = np.array([[9.0, 8.0, 7.0, 6.0, inf, inf, 5.0]])  # ranker: cold items 4, 5 are not candidates
    prior = np.array([[0.0, 0.0, 0.0, 0.0, 0.2, 0.9, 0.5]])
    cold = np.array([False, False, False, False, True, True, True])
    out = reserve_cold_slots(scores, prior, cold, [np.array([1])], k=4, slots=2)  # item 1 was seen
    order = np.argsort(-out[0], kind="stable")
    assert order[:4].tolist() == [0, 2, 5, 6]  # warm top 2 (seen item 1 skipped), then cold by prior
    assert cold_share(out, cold, [np.array([1])], k=4) == 0.5
    assert cold_share(scores, cold, [np.array([1])], k=4) == 0.25  # item 6 was ranked 4th (of 0, 2, 3, 6)
    np.testing.assert_array_equal(reserve_cold_slots(scores, prior, cold, [np.array([1])], k=4, slots=0), scores)
    with pytest.raises(ConfigError, match="cold slots"):
        reserve_cold_slots(scores, prior, cold, [np.array([1])], k=4, slots=5)


def test_item_head_dropout_trains_the_text_only_path() -> None:
    torch = pytest.importorskip("torch")
    from training.matcher.model import ItemHead, ItemTower

    tower = ItemTower(torch.nn.Identity(), ItemHead(8, 16))
    torch.nn.init.normal_(tower.head.fc2.weight)  # a head that moves embeddings
    pooled = torch.randn(64, 8)
    plain = torch.nn.functional.normalize(pooled, dim=-1)
    tower.eval()
    with_head = tower.finish(pooled)
    tower.head_dropout = 0.5
    assert torch.equal(tower.finish(pooled), with_head)  # inference always uses the head
    tower.train()
    torch.manual_seed(0)
    mixed = tower.finish(pooled)
    skipped = torch.isclose(mixed, plain).all(1)
    kept = torch.isclose(mixed, with_head).all(1)
    assert bool((skipped | kept).all()) and 16 < int(skipped.sum()) < 48
    mixed.sum().backward()  # the kept rows train the head
    assert tower.head.fc1.weight.grad is not None
