"""Leak-proof evaluation: the tie rule, the exact seen items, training windows and their refusals,
the deterministic zero-shot user tower and a reproducible blend."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.cli import main
from recsys.data.prepared import SPLIT_COLUMN, PreparedData
from recsys.data.window import check_window, training_window, window_overlap
from recsys.errors import InputError

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


def _ratings(d: Path, last_two: list[tuple[str, int]]) -> PreparedData:
    """4 users with 10 ratings each, one a day; u0's last two share a second (in the given input order)."""
    rows = []
    for u in range(4):
        for i in range(8):
            rows.append((f"u{u}", f"i{(u + i) % 12}", T0 + (i * 4 + u) * 86_400, 3))
        tie = T0 + 40 * 86_400 + u
        pairs = last_two if u == 0 else [(f"i{(u + 8) % 12}", 4), (f"i{(u + 9) % 12}", 2)]
        rows += [(f"u{u}", item, tie, rating) for item, rating in pairs]
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "value"], orient="row").with_columns(
        pl.lit("rating").alias("event_type")).write_csv(d / "events.csv")
    pl.DataFrame({"item_id": [f"i{j}" for j in range(12)], "title": [f"Item {j}" for j in range(12)]}).write_csv(
        d / "items.csv")
    assert main(["prepare", "--events", str(d / "events.csv"), "--items", str(d / "items.csv"),
                 "--out", str(d / "data"), "--overwrite"]) == 0
    return PreparedData.load(d / "data")


def _target(data: PreparedData, protocol: str, user: str = "u0") -> list[str]:
    frame = data.eval_set(protocol, "test").join(data.users.select("user_idx", "user_id"), on="user_idx")
    idx = frame.filter(pl.col("user_id") == user)["target_item_idx"].item().to_list()
    return data.items.filter(pl.col("item_idx").is_in(idx))["item_id"].to_list()


def test_same_second_ties_follow_input_order_never_the_label(tmp_path: Path) -> None:
    # The leave-last-out target of u0 is the tie that comes last in the input, whatever its rating.
    assert _target(_ratings(tmp_path, [("i10", 5), ("i11", 1)]), "loo") == ["i11"]
    assert _target(_ratings(tmp_path, [("i11", 1), ("i10", 5)]), "loo") == ["i10"]
    assert _target(_ratings(tmp_path, [("i10", 1), ("i11", 5)]), "loo") == ["i11"]


def test_seen_items_are_exactly_the_train_and_valid_interactions_ties_included(tmp_path: Path) -> None:
    data = _ratings(tmp_path, [("i10", 5), ("i11", 1)])
    pairs = pl.read_parquet(data.root / "pairs.parquet")
    for protocol in ("global", "loo", "tail"):
        for split, earlier in (("valid", ["train"]), ("test", ["train", "valid"])):
            frame = data.eval_set(protocol, split)
            seen = data.seen_items(frame, protocol, split)
            for user, got in zip(frame["user_idx"].to_list(), seen, strict=True):
                want = pairs.filter((pl.col("user_idx") == user) & pl.col(SPLIT_COLUMN[protocol]).is_in(earlier))
                assert sorted(got.tolist()) == sorted(set(want["item_idx"].to_list())), (protocol, split, user)
    # u0's valid interaction (LOO) shares the cutoff second of its test target: it is seen, not a target.
    frame = data.eval_set("loo", "test")
    u0 = int(data.users.filter(pl.col("user_id") == "u0")["user_idx"].item())
    row = frame["user_idx"].to_list().index(u0)
    i10 = int(data.items.filter(pl.col("item_id") == "i10")["item_idx"].item())
    assert i10 in data.seen_items(frame, "loo", "test")[row].tolist()
    with pytest.raises(InputError, match="valid and test splits"):
        data.seen_items(frame, "loo", "train")


def _count(data: PreparedData, trained: tuple[str, str], scored: tuple[str, str]) -> int:
    pairs = pl.read_parquet(data.root / "pairs.parquet")
    return pairs.filter((pl.col(SPLIT_COLUMN[trained[0]]) == trained[1])
                        & (pl.col(SPLIT_COLUMN[scored[0]]) == scored[1])).height


def test_window_overlap_is_exact_on_the_same_dataset(prepared_dir: Path) -> None:
    data = PreparedData.load(prepared_dir)
    glob = training_window(data, "global")
    assert glob["protocol"] == "global" and glob["cutoffs"] == data.manifest["cutoffs"]
    assert glob["interactions"] == data.manifest["splits"]["global"]["train"]
    for split in ("valid", "test"):
        assert window_overlap(glob, data, "global", split) == (0, "exact")
    loo = training_window(data, "loo")
    n = _count(data, ("loo", "train"), ("global", "valid"))
    assert n > 0 and window_overlap(loo, data, "global", "valid") == (n, "exact")
    check_window(glob, data, "global", ("valid", "test"), what="m", fix="f")
    check_window(None, data, "tail", ("test",), what="zero-shot", fix="f")  # nothing trained: nothing to refuse
    with pytest.raises(InputError) as err:
        check_window(loo, data, "global", ("valid", "test"), what="the matcher X", fix="retrain it.")
    text = str(err.value)
    assert "the train split of the loo protocol" in text and "the valid split of the global protocol" in text
    assert f"{n:,} of its" in text and "Fix: retrain it." in text
    # A warm-started matcher answers for what it inherited too.
    warm = {**glob, "inherited": [loo]}
    assert window_overlap(warm, data, "global", "valid")[0] == n


def test_window_overlap_across_datasets_by_keys_then_by_time(prepared_dir: Path, tmp_path: Path) -> None:
    from recsys.evaluation.evaluate import write_holdout

    copy = tmp_path / "copy"
    shutil.copytree(prepared_dir, copy)
    source = PreparedData.load(copy)
    other = write_holdout(source, tmp_path / "held", frac=0.1)  # another dataset: different pairs
    loo, glob = training_window(source, "loo"), training_window(source, "global")
    pairs = pl.read_parquet(other.root / "pairs.parquet")
    want = pairs.filter((pl.col("split_loo") == "train") & (pl.col("split_global") == "valid")).height
    assert window_overlap(loo, other, "global", "valid") == (want, "exact, by (user_id, item_id, timestamp)")
    assert window_overlap(glob, other, "global", "test")[0] == 0
    shutil.rmtree(copy)  # the training data is gone: every scored interaction in its time span counts
    n, how = window_overlap(loo, other, "global", "valid")
    assert n >= want and "gone" in how
    assert window_overlap(glob, other, "global", "test")[0] == 0


def test_zero_shot_user_tower_is_the_deterministic_mean_pool(tiny_bert: Path) -> None:
    torch = pytest.importorskip("torch")
    from recsys.features import mean_pool_encoder
    from training.matcher.model import build_model
    from training.zero_shot import make_mean_pool

    towers = []
    for _ in range(2):  # unseeded builds: different random towers, the same zero-shot tower
        model, _tok = build_model(str(tiny_bert), max_history=6)
        towers.append(make_mean_pool(model.user_tower).eval())
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, towers[0].dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    items = rng.integers(0, 20, size=(5, 6))
    items[0] = -1  # an empty history
    items[1, 3:] = -1
    codes = np.where(items >= 0, rng.integers(0, 4, size=items.shape), -1)
    ages = rng.uniform(0, 1e7, size=items.shape).astype(np.float32)
    want = mean_pool_encoder(emb, half_life_s=np.inf)(items, codes, ages)
    for tower in towers:
        with torch.no_grad():
            got = tower(torch.from_numpy(emb[np.maximum(items, 0)]), torch.from_numpy(codes),
                        torch.from_numpy(ages), torch.from_numpy((items >= 0).astype(np.int64))).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.any(want[0])


def test_lambdamart_is_reproducible_across_runs() -> None:
    lgb = pytest.importorskip("lightgbm")
    from recsys.ranker import LambdaMARTParams

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 12))
    y = (x[:, 0] + rng.normal(size=4000) > 1).astype(int) + (x[:, 1] > 1.5)
    groups = [20] * 200
    params = {**LambdaMARTParams(feature_fraction=0.7, threads=2).lgb_params(), "bagging_fraction": 0.7, "bagging_freq": 1}
    models = [lgb.train(params, lgb.Dataset(x, y, group=groups), num_boost_round=30).model_to_string() for _ in range(2)]
    assert models[0] == models[1]
