from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from recsys.data.prepare import PrepareConfig, build_item_text, prepare_tables
from recsys.data.prepared import PreparedData
from recsys.data.schema import EVENT_CODES, StrengthRule
from recsys.errors import ConfigError, InputError

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _events(rows):
    """rows: (user, item, event_type, minutes after T0[, request_id])."""
    frame = pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": [r[2] for r in rows],
            "timestamp": [T0 + timedelta(minutes=r[3]) for r in rows],
            "value": [None] * len(rows),
            "request_id": [r[4] if len(r) > 4 else None for r in rows],
        },
        schema_overrides={"value": pl.Float64, "request_id": pl.Utf8},
    )
    return frame.with_columns(pl.col("timestamp").dt.cast_time_unit("us")).with_columns(StrengthRule().expr())


ITEMS = pl.DataFrame(
    {
        "item_id": ["a", "b", "c", "d", "e"],
        "title": ["Alpha", "Beta", "Gamma", "Delta", "Eps"],
        "tags": ["x|y", "", "z", "", ""],
        "description": ["first item", "", "third", "", ""],
    }
)


def test_known_answer_histories_ties_and_funnel(tmp_path):
    rows = [
        ("u1", "a", "click", 0),
        ("u1", "b", "click", 10),
        ("u1", "c", "click", 10),  # tie with b: neither sees the other
        ("u1", "d", "impression", 15, "r1"),
        ("u1", "e", "impression", 15, "r1"),
        ("u1", "e", "click", 16, "r1"),
        ("u1", "e", "purchase", 20, "r1"),  # same request: one interaction, strength of purchase
        ("u2", "a", "view", 5),
    ]
    prepare_tables(_events(rows), ITEMS, None, tmp_path / "p", PrepareConfig(max_history=3))
    data = PreparedData.load(tmp_path / "p")
    pairs = pl.read_parquet(tmp_path / "p" / "pairs.parquet").sort("user_idx", "timestamp", "item_idx")
    item_idx = dict(zip(data.items["item_id"], data.items["item_idx"], strict=True))
    u1 = pairs.filter(pl.col("user_idx") == 0)
    assert u1["item_idx"].to_list() == [item_idx[i] for i in "abce"]
    hist = u1["hist_item_idx"].to_numpy()
    assert hist[0].tolist() == [-1, -1, -1]
    assert hist[1].tolist() == [item_idx["a"], -1, -1]  # b at t=10 sees only a
    assert hist[2].tolist() == [item_idx["a"], -1, -1]  # c (tie with b) also sees only a
    assert sorted(hist[3][:2].tolist()) == sorted([item_idx["b"], item_idx["c"]])
    assert hist[3][2] == item_idx["a"]
    assert u1["hist_len"].to_list() == [0, 1, 1, 3]
    assert u1["event_type"].to_list()[-1] == "purchase"
    assert u1["strength"].to_list()[-1] == pytest.approx(4.0)
    # The e interaction's age to b/c is 6 minutes (first timestamp of the funnel: 16).
    assert u1["hist_age_s"].to_numpy()[3][0] == pytest.approx(360.0)
    assert u1["hist_event_code"].to_numpy()[3][0] == EVENT_CODES["click"]
    # Hard negatives: d was shown in r1 and not acted on; e was.
    assert u1["neg_item_idx"].to_list()[-1] == [item_idx["d"]]
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["rows"] == {
        "events": 8, "positive_events": 6, "interactions": 5, "items": 5, "users": 2,
        "pairs_with_hard_negatives": 1,
    }


def test_no_history_event_at_or_after_its_target(prepared_dir):
    """Leakage check on the synthetic set: every history item precedes the target strictly."""
    data = PreparedData.load(prepared_dir)
    pairs = pl.read_parquet(prepared_dir / "pairs.parquet")
    positives = (
        data.events().filter(pl.col("strength") > 0)
        .group_by("user_idx", "item_idx").agg(pl.col("timestamp").min().alias("first_ts")).collect()
    )
    exploded = (
        pairs.select("user_idx", "timestamp", "hist_item_idx", "hist_age_s")
        .with_columns(pl.col("hist_item_idx").arr.to_list(), pl.col("hist_age_s").arr.to_list())
        .explode("hist_item_idx", "hist_age_s")
        .filter(pl.col("hist_item_idx") >= 0)
    )
    assert exploded.height > 10_000
    assert (exploded["hist_age_s"] > 0).all()
    joined = exploded.join(positives, left_on=["user_idx", "hist_item_idx"], right_on=["user_idx", "item_idx"])
    assert joined.height == exploded.height
    assert (joined["first_ts"] < joined["timestamp"]).all()


def test_splits_are_chronological(prepared_dir):
    data = PreparedData.load(prepared_dir)
    pairs = pl.read_parquet(prepared_dir / "pairs.parquet")
    by_split = pairs.group_by("split_global").agg(pl.col("timestamp").min().alias("lo"), pl.col("timestamp").max().alias("hi"))
    span = {row["split_global"]: (row["lo"], row["hi"]) for row in by_split.iter_rows(named=True)}
    assert span["train"][1] < span["valid"][0] <= span["valid"][1] < span["test"][0]
    total = pairs.height
    assert abs(pairs.filter(pl.col("split_global") == "test").height / total - 0.1) < 0.02
    # Leave-last-out: one test and one valid interaction per user with >= 3, and test is the last.
    loo = pairs.filter(pl.col("split_loo") != "train")
    per_user = loo.group_by("user_idx", "split_loo").len()
    assert (per_user["len"] == 1).all()
    last = pairs.sort("timestamp").group_by("user_idx").agg(pl.col("split_loo").last(), pl.len())
    assert (last.filter(pl.col("len") >= 3)["split_loo"] == "test").all()
    # Tail: about 20% of each eligible user's interactions are test.
    tail = pairs.group_by("user_idx").agg((pl.col("split_tail") == "test").mean().alias("share"), pl.len())
    eligible = tail.filter(pl.col("len") >= 10)
    assert eligible.height > 50
    assert ((eligible["share"] >= 0.2) & (eligible["share"] < 0.35)).all()
    assert data.manifest["splits"]["global"]["train"] > data.manifest["splits"]["global"]["test"]


def test_eval_sets_targets_history_and_seen(prepared_dir):
    data = PreparedData.load(prepared_dir)
    pairs = pl.read_parquet(prepared_dir / "pairs.parquet")
    for protocol, column in (("global", "split_global"), ("loo", "split_loo"), ("tail", "split_tail")):
        ev = data.eval_set(protocol, "test")
        window = pairs.filter(pl.col(column) == "test")
        assert ev.height == window["user_idx"].n_unique()
        assert ev["target_item_idx"].list.len().sum() == window.select("user_idx", "item_idx").unique().height
        first = window.group_by("user_idx").agg(pl.col("timestamp").min())
        check = ev.join(first, on="user_idx")
        assert (check["cutoff"] == check["timestamp"]).all()
    ev = data.eval_set("loo", "test")
    seen = data.seen_items(ev, "loo", "test")
    hist = ev["hist_item_idx"].to_numpy()
    for row in range(50):
        assert set(hist[row][hist[row] >= 0].tolist()) <= set(seen[row].tolist())


def test_item_text_template_and_truncation():
    text = build_item_text(ITEMS, "{title}. {tags}. {description}", max_words=4)
    assert text.to_list()[0] == "Alpha. x, y. first"
    assert text.to_list()[1] == "Beta"
    assert build_item_text(ITEMS, "{title} ({category})", 10).to_list()[0] == "Alpha ()"


def test_rewrite_is_atomic_and_keeps_old_dataset_on_failure(tmp_path):
    out = tmp_path / "p"
    prepare_tables(_events([("u1", "a", "click", 0), ("u1", "b", "click", 1)]), ITEMS, None, out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(InputError, match="no positive events"):
        prepare_tables(_events([("u1", "a", "impression", 0)]), ITEMS, None, out)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_config_is_validated():
    with pytest.raises(ConfigError, match="valid_frac"):
        PrepareConfig(valid_frac=0.6, test_frac=0.5)
    with pytest.raises(ConfigError, match="max_history"):
        PrepareConfig(max_history=0)
    with pytest.raises(ConfigError, match="title"):
        PrepareConfig(text_template="{description}")


def test_explicit_cutoffs(tmp_path):
    rows = [("u1", "a", "click", 0), ("u1", "b", "click", 60), ("u1", "c", "click", 120)]
    cfg = PrepareConfig(valid_start="2026-01-01T00:30:00Z", test_start="2026-01-01T01:30:00Z")
    prepare_tables(_events(rows), ITEMS, None, tmp_path / "p", cfg)
    pairs = pl.read_parquet(tmp_path / "p" / "pairs.parquet").sort("timestamp")
    assert pairs["split_global"].to_list() == ["train", "valid", "test"]
    assert np.array_equal(pairs["hist_len"].to_numpy(), [0, 1, 2])


def test_a_request_is_never_cut_by_a_split_boundary(tmp_path):
    """Impressions and the clicks that followed them land in the same split (ranker groups stay whole)."""
    rows = []
    for r in range(30):
        rows.append((f"u{r}", "a", "impression", r * 10, f"r{r}"))
        rows.append((f"u{r}", "b", "impression", r * 10, f"r{r}"))
        rows.append((f"u{r}", "a", "click", r * 10 + 15, f"r{r}"))  # after the next request starts
    prepare_tables(_events(rows), ITEMS, None, tmp_path / "p", PrepareConfig(valid_frac=0.3, test_frac=0.3))
    events = pl.read_parquet(tmp_path / "p" / "events.parquet")
    per_request = events.group_by("request_id").agg(pl.col("split_global").n_unique().alias("splits"))
    assert (per_request["splits"] == 1).all()
    assert set(events["split_global"]) == {"train", "valid", "test"}


def test_parquet_bytes_do_not_depend_on_how_the_frame_is_chunked(tmp_path):
    """A join or sort splits its output by thread; the row groups written must not follow those chunks."""
    from recsys.data.prepare import write_table

    frame = pl.DataFrame({"x": np.arange(120_000, dtype=np.int64), "s": np.arange(120_000) % 7})
    chunked = pl.concat([frame.slice(0, 88_752), frame.slice(88_752)], rechunk=False)
    assert chunked.n_chunks() == 2
    write_table(frame, tmp_path / "one.parquet")
    write_table(chunked, tmp_path / "two.parquet")
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()


def test_prepare_twice_writes_the_same_bytes(synthetic_log, tmp_path):
    """Two `recsys prepare` runs on the same input (one with 1 thread, one with 4) write identical files.

    The one exception is the manifest's `run` field (creation time, seconds taken), left out here.
    """
    import os
    import subprocess
    import sys

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("events", "items", "users"):
        getattr(synthetic_log, name).write_parquet(raw / f"{name}.parquet")
    outs = []
    for threads in (1, 4):
        out = tmp_path / f"prepared-{threads}"
        env = {**os.environ, "POLARS_MAX_THREADS": str(threads)}
        subprocess.run(
            [sys.executable, "-m", "recsys.cli", "prepare", "--events", str(raw / "events.parquet"),
             "--items", str(raw / "items.parquet"), "--users", str(raw / "users.parquet"), "--out", str(out)],
            check=True, capture_output=True, env=env,
        )
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert {p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file()} == set(files)
    assert len(files) == 13  # items, users, events, pairs, 6 eval sets, manifest, timeline.png/.json
    for name in files:
        first, second = (out / name for out in outs)
        if name.name == "manifest.json":
            one, two = (json.loads(p.read_text()) for p in (first, second))
            assert set(one.pop("run")) == set(two.pop("run")) == {"created_at", "seconds"}
            assert one == two
        else:
            assert first.read_bytes() == second.read_bytes(), name


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_timeline_counts_events_per_day_and_marks_the_cutoffs(tmp_path):
    pytest.importorskip("matplotlib")
    day = 24 * 60
    rows = [("u1", "a", "click", 0), ("u1", "b", "impression", 1), ("u2", "c", "purchase", 2),
            ("u1", "c", "click", 2 * day), ("u2", "a", "view", 3 * day + 5), ("u2", "b", "click", 3 * day + 9)]
    config = PrepareConfig(valid_start="2026-01-02T12:00:00Z", test_start="2026-01-04T00:00:00Z")
    prepare_tables(_events(rows), ITEMS, None, tmp_path / "p", config)
    series = json.loads((tmp_path / "p" / "timeline.json").read_text())
    assert series["day"] == ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]  # the empty day included
    assert series["positive_events"] == [2, 0, 1, 2]
    assert series["other_events"] == [1, 0, 0, 0]
    assert series["valid_start"].startswith("2026-01-02T12:00") and series["test_start"].startswith("2026-01-04T00:00")
    assert (tmp_path / "p" / "timeline.png").read_bytes()[:8] == PNG_MAGIC

    prepare_tables(_events(rows), ITEMS, None, tmp_path / "q", config, plots=False)
    assert not list((tmp_path / "q").glob("timeline.*"))


def test_without_matplotlib_prepare_still_writes_the_dataset(tmp_path, monkeypatch, caplog):
    """matplotlib comes with the train extra; a runtime-only install prepares data and says why no picture."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rows = [("u1", "a", "click", 0), ("u1", "b", "click", 60), ("u2", "c", "click", 120), ("u2", "a", "click", 180)]
    with caplog.at_level("WARNING", logger="recsys.plots"):
        prepare_tables(_events(rows), ITEMS, None, tmp_path / "p", PrepareConfig(valid_frac=0.25, test_frac=0.25))
    assert (tmp_path / "p" / "manifest.json").exists() and not (tmp_path / "p" / "timeline.png").exists()
    assert "timeline.png not drawn" in caplog.text and "pip install" in caplog.text and "--no-plots" in caplog.text
