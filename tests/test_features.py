"""The shared ranking features: known answers on a hand-made log, point-in-time replay, incremental
updates equal to a rebuild, persistence without pickle, and errors that name the feature."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from recsys.data.prepared import PreparedData
from recsys.errors import InputError
from recsys.features import DAY_US, EventBatch, FeatureConfig, FeatureState, SparseMap, to_us

T0 = datetime(2026, 1, 5, tzinfo=timezone.utc)  # a Monday


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def tiny() -> tuple[pl.DataFrame, pl.DataFrame]:
    """4 items (A: 0, 1; B: 2; C: 3), 2 users; user 0 has a served request with a funnel."""
    items = pl.DataFrame(
        {
            "item_idx": pl.Series([0, 1, 2, 3], dtype=pl.Int32),
            "item_id": ["i0", "i1", "i2", "i3"],
            "title": ["a", "b", "c", "d"],
            "tags": ["a|b", "b", "c", "d"],
            "category": ["A", "A", "B", "C"],
            "price": [10.0, 20.0, None, 40.0],
            "created_at": [T0 - timedelta(days=2)] * 4,
        }
    )
    rows = [
        # user, item, type, strength, t (s), request
        (0, 0, "impression", 0.0, 90, "r1"),
        (0, 3, "impression", 0.0, 91, "r1"),
        (0, 0, "click", 2.0, 100, "r1"),
        (1, 1, "click", 2.0, 150, None),
        (0, 1, "click", 2.0, 200, None),
        (1, 0, "click", 2.0, 250, None),
        (0, 2, "impression", 0.0, 290, "r2"),
        (0, 2, "click", 2.0, 295, "r2"),
        (0, 2, "purchase", 4.0, 300, "r2"),  # same interaction as the click: funnel
    ]
    events = pl.DataFrame(
        {
            "user_idx": pl.Series([r[0] for r in rows], dtype=pl.Int32),
            "item_idx": pl.Series([r[1] for r in rows], dtype=pl.Int32),
            "event_type": [r[2] for r in rows],
            "strength": pl.Series([r[3] for r in rows], dtype=pl.Float32),
            "timestamp": [_at(r[4]) for r in rows],
            "request_id": [r[5] for r in rows],
            "device": ["web"] * len(rows),
        }
    )
    return items, events


def _col(features, name: str) -> np.ndarray:
    return features.matrix[:, features.names.index(name)]


def test_known_answers_on_tiny_log(tiny) -> None:
    items, events = tiny
    state = FeatureState.build(items, events, config=FeatureConfig(decay_days=(1.0, 7.0)))
    t = _at(3600)  # Monday 01:00 UTC
    f = state.compute(1, np.array([0, 1, 2, 3]), t, match_scores=np.array([0.1, 0.9, 0.5, 0.5]))

    # Co-visitation (lag 3, symmetric): user 0 sequence 0 -> 1 -> 2 (the purchase merges into the r2
    # click), user 1 sequence 1 -> 0. covis[0,1] = 2, covis[0,2] = covis[1,2] = 1.
    assert state.covis.get(0, 1) == 2 and state.covis.get(1, 0) == 2
    assert state.covis.get(0, 2) == 1 and state.covis.get(2, 1) == 1 and state.covis.get(0, 3) == 0
    # User 1's recent items: 0 (weight 1), then 1 (weight 1/2).
    np.testing.assert_allclose(_col(f, "covis_sum"), [0 + 0.5 * 2, 2 + 0, 1 + 0.5 * 1, 0])
    np.testing.assert_allclose(_col(f, "covis_max"), [2, 2, 1, 0])

    # Match-list features.
    np.testing.assert_allclose(_col(f, "match_rank"), [3, 0, 1, 2])
    np.testing.assert_allclose(_col(f, "match_gap_top"), [0.8, 0.0, 0.4, 0.4], rtol=1e-6)

    # Interactions: item 0 twice, item 1 twice, item 2 once (funnel = one interaction).
    np.testing.assert_allclose(_col(f, "item_pop_all"), [2, 2, 1, 0])
    ages = {0: [100, 250], 1: [150, 200], 2: [295]}
    for item, stamps in ages.items():
        expected = sum(math.exp(-(3600 - s) / 86_400) for s in stamps)
        assert _col(f, "item_pop_1d")[item] == pytest.approx(expected, rel=1e-5)
    # CTR: 3 impressions, 2 served interactions (r1 click, r2 funnel) -> prior 2/3.
    prior, a = 2 / 3, 20.0
    np.testing.assert_allclose(
        _col(f, "item_ctr"),
        [(1 + a * prior) / (1 + a), prior, (1 + a * prior) / (1 + a), (0 + a * prior) / (1 + a)],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        _col(f, "item_age_days"),
        [(3600 - 90) / 86400, (3600 - 150) / 86400, (3600 - 290) / 86400, (3600 - 91) / 86400],
        rtol=1e-5,
    )
    np.testing.assert_allclose(_col(f, "item_catalogue_age_days"), 2 + 3600 / 86400, rtol=1e-6)
    price = _col(f, "item_price")
    assert price[0] == 10 and np.isnan(price[2])

    # User 1: two clicks on category A (strength 2 each), tags a, b, b.
    np.testing.assert_allclose(_col(f, "cat_affinity"), [1, 1, 0, 0])
    np.testing.assert_allclose(_col(f, "cat_weight"), [4, 4, 0, 0])
    np.testing.assert_allclose(_col(f, "tag_affinity"), [(0.5 + 1.0) / 2, 1.0, 0, 0])
    np.testing.assert_allclose(_col(f, "seen"), [1, 1, 0, 0])
    np.testing.assert_allclose(_col(f, "user_interactions"), 2)
    np.testing.assert_allclose(_col(f, "hour_of_day"), 1.0)
    np.testing.assert_allclose(_col(f, "day_of_week"), 0.0)

    # User 0: strengths 2 (A) + 2 (A) + 2 + 4 (B) = 10; tags a 2, b 4, c 6.
    g = state.compute(0, np.array([0, 2, 3]), t, context={"device": "web"})
    np.testing.assert_allclose(_col(g, "cat_affinity"), [0.4, 0.6, 0.0])
    np.testing.assert_allclose(_col(g, "tag_affinity"), [(0.2 + 0.4) / 2, 0.6, 0.0])
    np.testing.assert_allclose(_col(g, "tag_affinity_max"), [0.4, 0.6, 0.0])
    np.testing.assert_allclose(_col(g, "ui_impressions"), [1, 1, 1])
    np.testing.assert_allclose(_col(g, "ctx_device"), 0.0)  # vocabulary ["web"]
    assert "match_score" not in g.names
    # History: newest first, the funnel upgraded to a purchase, ages relative to t.
    hist = state.history(0, t)
    assert hist.item_idx[0, :4].tolist() == [2, 1, 0, -1]
    assert hist.event_code[0, 0] == 6  # purchase
    assert hist.age_s[0, 0] == pytest.approx(3600 - 295)


def test_candidate_features_do_not_depend_on_the_list(tiny) -> None:
    """Apart from the list-relative match features, a candidate's row is the same in any list."""
    items, events = tiny
    state = FeatureState.build(items, events)
    full = state.compute(0, np.array([3, 2, 1, 0]), _at(5000))
    part = state.compute(0, np.array([1, 3]), _at(5000))
    np.testing.assert_array_equal(part.matrix, full.matrix[[2, 0]])


def test_extra_and_context_features_pass_through_and_bad_input_names_the_feature(tiny) -> None:
    items, events = tiny
    state = FeatureState.build(items, events)
    cands = np.array([0, 1, 2])
    f = state.compute(
        0, cands, _at(500), extra={"retrieval_score": [0.3, 0.2, 0.1]}, context={"device": "mobile"}
    )
    assert f.names[-1] == "retrieval_score"
    np.testing.assert_allclose(_col(f, "retrieval_score"), [0.3, 0.2, 0.1], rtol=1e-6)
    assert np.isnan(_col(f, "ctx_device")).all()  # a value never seen in training: missing
    with pytest.raises(InputError, match="retrieval_score"):
        state.compute(0, cands, _at(500), extra={"retrieval_score": ["a", "b", "c"]})  # type: ignore[list-item]
    with pytest.raises(InputError, match="retrieval_score"):
        state.compute(0, cands, _at(500), extra={"retrieval_score": [0.1, 0.2]})
    with pytest.raises(InputError, match="item_pop_all"):
        state.compute(0, cands, _at(500), extra={"item_pop_all": [1, 2, 3]})
    with pytest.raises(InputError, match="match_score"):
        state.compute(0, cands, _at(500), match_scores=["x", "y", "z"])  # type: ignore[list-item]
    with pytest.raises(InputError, match="item_idx 9"):
        state.compute(0, np.array([0, 9]), _at(500))
    with pytest.raises(InputError, match="country"):
        state.compute(0, cands, _at(500), context={"country": "fr"})


def test_streaming_new_users_and_unknown_users(tiny) -> None:
    items, events = tiny
    state = FeatureState.build(items, events)
    f = state.compute(99, np.array([0, 1]), _at(500))  # never seen: user features are zero
    assert _col(f, "user_interactions").tolist() == [0, 0] and _col(f, "seen").tolist() == [0, 0]
    state.apply(
        pl.DataFrame(
            {
                "user_idx": [7],
                "item_idx": [3],
                "timestamp": [_at(600)],
                "strength": [2.0],
                "event_type": ["click"],
            }
        )
    )
    assert state.n_users == 8
    g = state.compute(7, np.array([3, 0]), _at(700))
    assert _col(g, "seen").tolist() == [1, 0] and _col(g, "user_interactions").tolist() == [1, 1]


def _replay_in_batches(items: pl.DataFrame, events: pl.DataFrame, n_batches: int) -> FeatureState:
    ordered = events.sort("timestamp", maintain_order=True)
    batch = EventBatch.from_frame(ordered)
    cuts = np.searchsorted(
        batch.ts_us, np.quantile(batch.ts_us, np.linspace(0, 1, n_batches + 1)[1:-1]), "left"
    )
    state = FeatureState.build(items, events.head(0), n_users=0)
    lo = 0
    for hi in [*np.unique(cuts).tolist(), len(batch)]:  # searchsorted 'left' cuts at strict time boundaries
        state.apply(batch.slice(lo, hi))
        lo = hi
    return state


def _assert_same_state(a: FeatureState, b: FeatureState) -> None:
    left, right = a.arrays(), b.arrays()
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].shape == right[name].shape, name
        if left[name].dtype.kind == "f":
            np.testing.assert_allclose(left[name], right[name], rtol=1e-9, atol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(left[name], right[name], err_msg=name)
    assert (a.global_impr, a.global_clicks, a.as_of_us, a.n_users) == (
        b.global_impr,
        b.global_clicks,
        b.as_of_us,
        b.n_users,
    )


def test_incremental_updates_equal_a_rebuild_and_survive_save_load(
    prepared_dir, tmp_path, monkeypatch
) -> None:
    data = PreparedData.load(prepared_dir)
    events = data.events().collect()
    rebuilt = FeatureState.build(data.items, events)
    streamed = _replay_in_batches(data.items, events, 40)
    _assert_same_state(rebuilt, streamed)
    assert len(rebuilt.covis) > 0 and len(rebuilt.user_tag) > 0

    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = FeatureState.load(streamed.save(tmp_path / "state"))
    _assert_same_state(rebuilt, loaded)
    t = events["timestamp"].max()
    cands = np.arange(0, data.n_items, 3)
    np.testing.assert_array_equal(rebuilt.compute(5, cands, t).matrix, loaded.compute(5, cands, t).matrix)


def test_training_features_are_point_in_time(prepared_dir) -> None:
    """Events at or after a request's time (even a purchase of a candidate at exactly that time)
    never change that request's features; they do change later requests'."""
    from training.ranker import build_group_features, request_groups

    data = PreparedData.load(prepared_dir)
    events = data.events().sort("timestamp", maintain_order=True).collect()
    start = to_us(data.manifest["cutoffs"]["valid_start"])
    groups = request_groups(events, start, ["device"])
    times = groups["time_us"].unique().sort().to_numpy()
    cut = int(times[len(times) // 2])
    first = groups.filter(pl.col("time_us") == cut).row(0, named=True)

    def table(frame: pl.DataFrame):
        state = FeatureState.build(data.items, frame, before=start, n_users=data.users.height)
        return build_group_features(state, EventBatch.from_frame(frame), groups)

    # Inject a purchase of the request's own candidate by its user at exactly t, and a burst after.
    template = events.filter(pl.col("strength") > 0).head(1)
    injected = pl.concat(
        [
            template.with_columns(
                pl.lit(first["user_idx"], pl.Int32).alias("user_idx"),
                pl.lit(first["item_idx"], pl.Int32).alias("item_idx"),
                pl.lit("purchase").alias("event_type"),
                pl.lit(4.0, pl.Float32).alias("strength"),
                pl.lit(None, pl.Utf8).alias("request_id"),
                (pl.lit(cut + k * 1_000_000).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")).alias(
                    "timestamp"
                ),
            )
            for k in range(5)
        ]
    )
    base = table(events)
    changed = table(pl.concat([events, injected]).sort("timestamp", maintain_order=True))
    rows_upto = int(base.sizes[base.time_us <= cut].sum())
    np.testing.assert_array_equal(base.matrix[:rows_upto], changed.matrix[:rows_upto])
    assert not np.array_equal(base.matrix[rows_upto:], changed.matrix[rows_upto:])
    assert base.sizes[base.time_us > cut].sum() > 0


def test_masking_an_item_as_unseen_gives_the_features_of_an_item_without_events(tiny) -> None:
    """mask_unseen_items (ranker training's cold-item dropout, the service's unknown ids) writes what
    the state itself computes for an item whose events it never saw."""
    items, events = tiny
    full = FeatureState.build(items, events)
    without = FeatureState.build(items, events.filter(pl.col("item_idx") != 1))
    t, cand = _at(400), np.array([0, 1, 2, 3])
    masked = full.compute(0, cand, t, match_scores=np.linspace(0.1, 0.4, 4))
    full.mask_unseen_items(masked, np.array([1]))
    fresh = without.compute(0, cand, t, match_scores=np.linspace(0.1, 0.4, 4))
    behaviour = [n for n in masked.names if n.startswith("item_pop_")] + [
        "item_impressions", "item_age_days", "item_days_since_last", "seen", "ui_count", "ui_impressions",
        "covis_sum", "covis_max", "covis_norm",
    ]
    for name in behaviour:
        np.testing.assert_array_equal(_col(masked, name)[1], _col(fresh, name)[1], err_msg=name)
    assert _col(masked, "item_ctr")[1] == np.float32(full.ctr_prior)
    for name in ("item_catalogue_age_days", "item_price", "cat_weight", "tag_affinity"):  # the catalogue still knows it
        assert _col(masked, name)[1] == _col(full.compute(0, cand, t, match_scores=np.linspace(0.1, 0.4, 4)), name)[1]
    np.testing.assert_array_equal(np.delete(masked.matrix, 1, 0), np.delete(full.compute(0, cand, t, match_scores=np.linspace(0.1, 0.4, 4)).matrix, 1, 0))
    full.mask_unseen_items(masked, np.array([2]), in_catalogue=False)  # an id the catalogue does not know
    assert np.isnan(_col(masked, "item_price")[2]) and _col(masked, "cat_weight")[2] == 0


def test_sparse_row_lookup_equals_the_general_lookup() -> None:
    """get_row (the request path: searches one row's slice) == get (one search over all keys)."""
    rng = np.random.default_rng(0)
    sparse = SparseMap()
    assert not sparse.get_row(3, np.arange(5)).any()  # empty map
    sparse.add(rng.integers(0, 50, 5000), rng.integers(0, 400, 5000), rng.random(5000))
    for row in [*range(-1, 52), 2**31 - 1]:
        cols = rng.integers(0, 450, 300)
        np.testing.assert_array_equal(sparse.get_row(row, cols), sparse.get(row, cols))


def test_time_parsing() -> None:
    assert to_us(datetime(1970, 1, 2, tzinfo=timezone.utc)) == DAY_US
    assert to_us("1970-01-02T00:00:00Z") == DAY_US
    assert to_us(np.datetime64("1970-01-02")) == DAY_US
    with pytest.raises(InputError, match="parse"):
        to_us("yesterday")
