from __future__ import annotations

import numpy as np
import polars as pl

from recsys.data.synthetic import TOPICS, generate


def test_same_seed_same_tables_and_other_seed_differs():
    a = generate(n_users=100, n_items=80, n_events=5_000, seed=3)
    b = generate(n_users=100, n_items=80, n_events=5_000, seed=3)
    c = generate(n_users=100, n_items=80, n_events=5_000, seed=4)
    assert a.events.equals(b.events) and a.items.equals(b.items)
    assert not a.events.equals(c.events)


def test_event_count_mix_and_slates(synthetic_log):
    events = synthetic_log.events
    assert 30_000 < events.height < 50_000
    counts = dict(events.group_by("event_type").len().iter_rows())
    ctr = counts["click"] / counts["impression"]
    assert 0.05 < ctr < 0.3
    assert counts["purchase"] < counts["add_to_cart"] < counts["click"]
    # A slate shows an item once, and positions are 0..k-1 without gaps.
    shown = events.filter(pl.col("event_type") == "impression")
    assert shown.select("request_id", "item_id").is_unique().all()
    gaps = shown.group_by("request_id").agg((pl.col("position").max() + 1 - pl.len()).alias("gap"))
    assert gaps["gap"].max() == 0
    assert events["timestamp"].is_sorted()


def test_planted_preferences_drive_clicks(synthetic_log):
    """Clicked items' topics follow each user's planted preference far above chance."""
    log = synthetic_log
    clicks = log.events.filter(pl.col("event_type") == "click")
    users = clicks["user_id"].str.slice(1).cast(pl.Int64).to_numpy()
    items = clicks["item_id"].str.slice(1).cast(pl.Int64).to_numpy()
    affinity = log.user_topic_pref[users, log.item_topic[items]]
    impressions = log.events.filter(pl.col("event_type") == "impression")
    iu = impressions["user_id"].str.slice(1).cast(pl.Int64).to_numpy()
    ii = impressions["item_id"].str.slice(1).cast(pl.Int64).to_numpy()
    baseline = log.user_topic_pref[iu, log.item_topic[ii]]
    assert affinity.mean() > 1.5 * baseline.mean()
    assert baseline.mean() > 1.0 / len(TOPICS)  # slates are already targeted


def test_item_text_reflects_topic_and_items_arrive_over_time(synthetic_log):
    items = synthetic_log.items
    for row in items.head(50).iter_rows(named=True):
        words = set((row["title"] + " " + row["description"]).lower().split())
        assert len(words & set(TOPICS[row["category"]])) >= 3
    created = items["created_at"]
    assert created.min() < created.max()
    first_click = synthetic_log.events.group_by("item_id").agg(pl.col("timestamp").min())
    joined = first_click.join(items.select("item_id", "created_at"), on="item_id")
    assert (joined["timestamp"] >= joined["created_at"]).all()


def test_popularity_is_skewed(synthetic_log):
    counts = synthetic_log.events.filter(pl.col("event_type") == "impression").group_by("item_id").len()["len"]
    counts = np.sort(counts.to_numpy())[::-1]
    top_decile = counts[: max(1, len(counts) // 10)].sum() / counts.sum()
    assert top_decile > 0.25


def test_simulated_responses_follow_planted_preferences(synthetic_log):
    from recsys.data.synthetic import simulate_responses

    shown = synthetic_log.events.filter(pl.col("event_type") == "impression").head(20_000)
    shown = shown.vstack(shown.head(50).with_columns(pl.lit("unknown-user").alias("user_id")))
    responses = simulate_responses(synthetic_log, shown, seed=1)
    assert set(responses["event_type"].unique()) == {"click", "add_to_cart", "purchase"}
    assert "unknown-user" not in responses["user_id"].to_list()
    clicks = responses.filter(pl.col("event_type") == "click")
    assert 0.05 < clicks.height / shown.height < 0.3
    pref = synthetic_log.user_topic_pref
    def mean_affinity(frame):
        u = frame["user_id"].str.slice(1).cast(pl.Int64).to_numpy()
        i = frame["item_id"].str.slice(1).cast(pl.Int64).to_numpy()
        return pref[u, synthetic_log.item_topic[i]].mean()
    assert mean_affinity(clicks) > 1.5 * mean_affinity(shown.head(20_000))
    assert (clicks["timestamp"] > shown.join(clicks.select("request_id", "item_id"), on=["request_id", "item_id"])["timestamp"].min()).all()
    # Same seed, same responses.
    assert responses.equals(simulate_responses(synthetic_log, shown, seed=1))
