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


def test_cold_slot_order_fills_from_the_rest_when_a_side_runs_short() -> None:
    from recsys.scoring.explore import cold_slot_order

    scores = np.array([3.0, 2.0, 1.0, 0.5, -np.inf])
    prior = np.array([0.0, 0.0, 0.0, 0.9, 0.8])  # item 4 is cold but not rankable: still eligible by prior
    cold = np.array([False, False, False, True, True])
    assert cold_slot_order(scores, prior, cold, k=4, slots=2).tolist() == [0, 1, 3, 4]
    only_warm = np.zeros(5, bool)
    assert cold_slot_order(scores, prior, only_warm, k=4, slots=2).tolist() == [0, 1, 2, 3]  # no cold: ranker order
    assert cold_slot_order(scores[:2], prior[:2], cold[:2], k=2, slots=1).tolist() == [0, 1]


def test_ranker_cold_slots_are_validated() -> None:
    pytest.importorskip("lightgbm")
    from training.ranker import RankerConfig

    assert RankerConfig(cold_slots=2).cold_slots == 2
    with pytest.raises(ConfigError, match="--cold-slots must be in \\[0, 10\\]"):
        RankerConfig(cold_slots=11)
