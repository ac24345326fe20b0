"""`recsys evaluate`: metric known answers, the cold-start hold-out, the two-stage blend beating
popularity, report files, clear errors (one feature path for every caller: tests/test_request_path.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data.prepared import PreparedData
from recsys.errors import ConfigError, InputError, ModelError
from recsys.evaluation.evaluate import (
    BlendConfig,
    EvalConfig,
    auc_per_user,
    drop_from_histories,
    evaluate,
    held_out_items,
    paired_bootstrap,
    slice_targets,
    system_metrics,
    write_holdout,
    write_scores,
)
from recsys.features import EmbeddingMatcher, FeatureConfig, FeatureState, mean_pool_encoder
from recsys.scoring.request import RequestBatch, RequestScorer


def topic_matcher(synthetic_log, data: PreparedData, noise: float = 0.6, dim: int = 16) -> EmbeddingMatcher:
    """Real normalised embeddings without a transformer: planted topic one-hot + noise. Like a text
    matcher it knows what an item is about (cold items included), not how popular it is."""
    rng = np.random.default_rng(0)
    item_no = data.items["item_id"].str.slice(1).cast(int).to_numpy()
    emb = np.zeros((data.n_items, dim), np.float32)
    emb[np.arange(data.n_items), synthetic_log.item_topic[item_no]] = 1.0
    emb += rng.normal(0.0, noise, emb.shape).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return EmbeddingMatcher(emb, mean_pool_encoder(emb))


# ------------------------------------------------------------------------------- known answers


def test_metrics_known_answer() -> None:
    # 2 users, 5 items; user 0 has seen item 4; targets {1} and {0, 3}.
    scores = np.array([[0.1, 0.9, 0.2, 0.3, 5.0], [0.8, 0.1, 0.7, 0.2, 0.0]], np.float32)
    seen = [np.array([4]), np.array([], np.int64)]
    targets = [np.array([1]), np.array([0, 3])]
    m = system_metrics(scores, seen, np.arange(2), targets, (1, 2), 2, 100, 0, None, None).metrics
    # user 0: rank 1 hit (seen item 4 excluded); user 1: ranks [0, 2] -> hit at 1 only.
    ndcg_u1 = 1.0 / (1.0 + 1.0 / np.log2(3))
    assert m["ndcg@2"] == pytest.approx((1.0 + ndcg_u1) / 2)
    assert m["recall@1"] == pytest.approx(1.0) and m["recall@2"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["hit@2"] == 1.0 and m["mrr@2"] == 1.0
    assert m["coverage@2"] == pytest.approx(4 / 5)  # top-2 lists {1, 3} and {0, 2}
    # Blend-style -inf scores are never recommended (and never count towards coverage).
    blend = np.full_like(scores, -np.inf)
    blend[0, 1] = 1.0
    mb = system_metrics(blend, seen, np.arange(2), targets, (2,), 2, 100, 0, None, None).metrics
    assert mb["coverage@2"] == pytest.approx(1 / 5) and mb["hit@2"] == 0.5


def test_auc_and_paired_bootstrap_known_answers() -> None:
    scores = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 1.0, 3.0]])
    cands = [np.array([0, 1, 2, 3]), np.array([0, 1, 2])]
    auc = auc_per_user(scores, cands, [np.array([0, 2]), np.array([1])])
    assert auc[0] == pytest.approx(0.75)  # pairs (0>1, 0>3, 2<1, 2>3)
    assert auc[1] == pytest.approx(0.75)  # 1 > 0, 1 == 2 (half)
    a, b = np.array([1.0, 1.0, 1.0, 1.0]), np.array([0.0, 0.5, 0.0, 0.5])
    r = paired_bootstrap(a, b, n_boot=500)
    assert r["diff"] == pytest.approx(0.75) and r["lo"] >= 0.5 and r["hi"] <= 1.0 and r["users"] == 4
    same = paired_bootstrap(a, a)
    assert same["lo"] == same["hi"] == 0.0  # identical systems: the paired interval collapses


def test_cold_start_slice_on_a_hand_made_case() -> None:
    targets = [np.array([1, 7]), np.array([2]), np.array([7, 8]), np.array([3])]
    users = np.array([10, 11, 12, 13])
    slices = slice_targets(targets, users, cold=np.array([7, 8]), new_users=np.array([13, 99]))
    rows, cold = slices["cold_items"]
    assert rows.tolist() == [0, 2] and [c.tolist() for c in cold] == [[7], [7, 8]]
    rows, warm = slices["warm"]
    assert rows.tolist() == [0, 1, 3] and [w.tolist() for w in warm] == [[1], [2], [3]]
    rows, new = slices["new_users"]
    assert rows.tolist() == [3] and new[0].tolist() == [3]
    assert slices["all"][0].tolist() == [0, 1, 2, 3]


def test_drop_from_histories_compacts_most_recent_first() -> None:
    frame = pl.DataFrame(
        {
            "hist_item_idx": pl.Series([[5, 7, 6, -1]], dtype=pl.Array(pl.Int32, 4)),
            "hist_event_code": pl.Series([[1, 2, 3, -1]], dtype=pl.Array(pl.Int8, 4)),
            "hist_age_s": pl.Series([[1.0, 2.0, 3.0, 0.0]], dtype=pl.Array(pl.Float32, 4)),
            "hist_len": pl.Series([3], dtype=pl.Int16),
        }
    )
    out = drop_from_histories(frame, np.array([7]))
    assert out["hist_item_idx"].to_list() == [[5, 6, -1, -1]]
    assert out["hist_event_code"].to_list() == [[1, 3, -1, -1]]
    assert out["hist_age_s"].to_list() == [[1.0, 3.0, 0.0, 0.0]]
    assert out["hist_len"].to_list() == [2]


# ------------------------------------------------------------------------------- hold-out + run


@pytest.fixture(scope="module")
def holdout(prepared_dir, tmp_path_factory) -> PreparedData:
    return write_holdout(PreparedData.load(prepared_dir), tmp_path_factory.mktemp("hold") / "data", 0.1, 0)


def test_holdout_removes_items_from_every_training_input(prepared_dir, holdout) -> None:
    cold = held_out_items(holdout)
    assert len(cold) == round(0.1 * holdout.n_items)
    lookup = pl.Series(cold.astype(np.int32))
    events = pl.read_parquet(holdout.root / "events.parquet")
    assert not events.filter(pl.col("item_idx").is_in(lookup)).height
    pairs = pl.read_parquet(holdout.root / "pairs.parquet")
    assert not pairs.filter(pl.col("item_idx").is_in(lookup)).height
    assert not np.isin(pairs["hist_item_idx"].to_numpy(), cold).any()
    negatives = [np.asarray(n, np.int64) for n in pairs["neg_item_idx"].to_list()]
    assert not np.isin(np.concatenate([np.zeros(0, np.int64), *negatives]), cold).any()
    valid = holdout.eval_set("tail", "valid")
    assert not np.isin(np.concatenate(valid["target_item_idx"].to_list()), cold).any()
    test, original = holdout.eval_set("tail", "test"), PreparedData.load(prepared_dir).eval_set("tail", "test")
    assert test["target_item_idx"].to_list() == original["target_item_idx"].to_list()  # test keeps them
    assert np.isin(np.concatenate(test["target_item_idx"].to_list()), cold).any()
    assert not np.isin(test["hist_item_idx"].to_numpy(), cold).any()


@pytest.fixture(scope="module")
def run(synthetic_log, holdout):
    config = EvalConfig(
        protocol="tail", n_boot=200, sampled_negatives=50, als_iterations=5,
        blend_config=BlendConfig(lambdamart=replace(BlendConfig().lambdamart, num_rounds=120), cold_slots=3,
                                 cold_prior="topic_exact"),
    )
    # The blend uses "topic"; the reserved cold places are chosen by another text system's score.
    matchers = {"topic": topic_matcher(synthetic_log, holdout), "topic_exact": topic_matcher(synthetic_log, holdout, noise=0.05)}
    return evaluate(holdout, config, matchers)


def test_blend_beats_popularity_and_text_beats_cf_on_cold_items(run) -> None:
    k = "ndcg@10"
    allm = run.metrics["all"]
    assert set(run.systems) == {"popularity", "itemknn", "als", "ease", "topic", "topic_exact", "blend", "blend_explore"}
    assert allm["blend"][k] > allm["popularity"][k] + 0.05
    assert run.paired["all"]["popularity"]["lo"] > 0  # blend - popularity, paired 95% interval above 0
    assert allm["blend"][k] > max(allm[s][k] for s in ("itemknn", "als", "ease"))
    cold = run.metrics["cold_items"]
    assert cold["blend"]["users"] > 20
    for cf in ("popularity", "itemknn", "als", "ease"):
        assert cold[cf][k] == 0.0  # no training interaction: CF cannot place them
    assert cold["topic"][k] > 0.2
    assert 0.5 < allm["blend"]["auc"] <= 1.0 and 0.0 < allm["blend"]["coverage@10"] <= 1.0
    assert 0.0 < run.blend["test_candidate_recall"] <= 1.0


def test_report_and_scores_are_written(run, holdout, tmp_path) -> None:
    from recsys.evaluation.report import main_table, write_report

    paths = write_report(run, tmp_path, prefix="quality")
    for role in ("markdown", "json", "ndcg_by_slice", "ndcg_at_k", "paired_diff"):
        assert paths[role].exists() and paths[role].stat().st_size > 0
    payload = json.loads(paths["json"].read_text())
    assert {"config", "dataset", "systems", "metrics", "paired_bootstrap", "blend", "timings_s", "plots"} <= set(payload)
    assert set(payload["metrics"]) == {"all", "warm", "cold_items", "new_users"}
    assert {"ndcg@10", "recall@10", "hit@10", "mrr@10", "coverage@10", "auc", "ndcg@10_ci"} <= set(payload["metrics"]["all"]["blend"])
    text = paths["markdown"].read_text()
    assert "| **blend** |" in text and "paired bootstrap" in text.lower() and "quality_ndcg.png" in text
    assert main_table(run).count("\n") == len(run.systems) + 1
    written = write_scores(run, holdout, tmp_path, top=20)
    frame = pl.read_parquet(written["blend"])
    assert frame.columns == ["user_id", "item_id", "rank", "score"]
    assert frame.group_by("user_id").len()["len"].to_numpy().max() <= 20
    assert frame["user_id"].n_unique() == len(run.users)


# ------------------------------------------------------------------------------- one feature path


@pytest.fixture(scope="module")
def ranker_run(synthetic_log, prepared_dir, tmp_path_factory):
    """A ranker trained by `recsys train ranker`'s code (global window, no context columns)."""
    from recsys.ranker import LambdaMARTParams
    from training.ranker import RankerConfig, train_ranker

    data = PreparedData.load(prepared_dir)
    matcher = topic_matcher(synthetic_log, data)
    out = tmp_path_factory.mktemp("eval_ranker") / "model"
    config = RankerConfig(lambdamart=LambdaMARTParams(threads=1, num_rounds=60), features=FeatureConfig(max_history=10, context_columns=()))
    result = train_ranker(data, out, matcher, config)
    from recsys.ranker import Ranker

    return Ranker.load(out), matcher, data, result


def test_evaluate_with_a_given_ranker_and_clear_errors(ranker_run) -> None:
    ranker, matcher, data, _ = ranker_run
    light = BlendConfig(itemknn_top=0, features_from=("ease",))  # only what the given ranker needs
    config = EvalConfig(protocol="global", systems=("popularity",), n_boot=50, sampled_negatives=20, blend_config=light)
    result = evaluate(data, config, {"topic": matcher}, ranker=ranker)
    assert result.metrics["all"]["blend"]["ndcg@10"] > result.metrics["all"]["popularity"]["ndcg@10"]
    assert "blend_explore" not in result.systems
    # A ranker trained with --cold-slots is evaluated as it serves: with its reserved cold-item places.
    exploring = type(ranker)(ranker.booster, {**ranker.meta, "config": {**(ranker.meta.get("config") or {}), "cold_slots": 2}})
    explored = evaluate(data, config, {"topic": matcher}, ranker=exploring)
    assert "blend_explore" in explored.systems and any("2 recorded cold-item place" in n for n in explored.notes)
    # The ranker was trained with match scores: evaluating without a matcher names the feature.
    with pytest.raises(ModelError, match="match_score"):
        evaluate(data, config, {}, ranker=ranker)
    # Wrong type for a caller-supplied feature: named.
    state = FeatureState.build(data.items, data.events().collect(), config=ranker.feature_config)
    batch = RequestBatch.from_lists([0], [state.as_of_us + 1], [np.array([1, 2])], extra={"ret_ease": np.array(["a", "b"])})
    with pytest.raises(InputError, match="ret_ease"):
        RequestScorer(state, matcher=matcher).features(batch)
    # A model trained on other features (a retriever feature this run cannot compute): named.
    renamed = type(ranker)(ranker.booster, {**ranker.meta, "feature_names": [*ranker.feature_names[:-1], "ret_bm25"]}, ranker.path)
    with pytest.raises(ModelError, match=r"missing feature.*'ret_bm25'"):
        evaluate(data, config, {"topic": matcher}, ranker=renamed)


def test_cli_help_is_light_and_cli_runs(prepared_dir, tmp_path: Path) -> None:
    code = (
        "import sys; from recsys.cli import main\n"
        "try:\n    main(['evaluate', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'lightgbm' not in sys.modules and 'torch' not in sys.modules and 'onnxruntime' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    from recsys.cli import main

    hold = tmp_path / "hold"
    assert main(["evaluate", "--data", str(prepared_dir), "--write-holdout", str(hold), "--holdout-frac", "0.2"]) == 0
    assert len(PreparedData.load(hold).manifest["holdout"]["items"]) == 40
    out = tmp_path / "report"
    args = ["evaluate", "--data", str(hold), "--out", str(out), "--protocol", "loo", "--systems", "popularity,ease"]
    assert main([*args, "--no-blend", "--n-boot", "50", "--scores-top", "10"]) == 0
    assert (out / "evaluation.md").exists() and (out / "scores_ease.parquet").exists()
    assert main(["evaluate", "--data", str(hold), "--out", str(out), "--systems", "knn"]) == 2  # bad config: exit 2


def test_cold_slots_give_cold_items_a_measured_share_of_the_top_10(run, holdout) -> None:
    allm, cold = run.metrics["all"], run.metrics["cold_items"]
    cold_items = held_out_items(holdout)  # items without behaviour (the reserved places' pool holds them all)
    assert allm["blend_explore"]["cold_share@10"] == pytest.approx(0.3, abs=0.02)  # 3 of 10 places
    assert allm["blend"]["cold_share@10"] < allm["blend_explore"]["cold_share@10"]
    assert allm["popularity"]["cold_share@10"] == 0.0
    assert cold["blend_explore"]["ndcg@10"] > cold["blend"]["ndcg@10"]
    # The first 7 places keep the blend's order; the reserved 3 are the matcher's best cold items.
    blend, explore = run.scores["blend"], run.scores["blend_explore"]
    for u in range(0, len(blend), 37):
        seen = run.seen[u]
        b, e = blend[u].copy(), explore[u].copy()
        b[seen] = e[seen] = -np.inf
        head = np.argsort(-e, kind="stable")[:7]
        assert np.isfinite(b[head]).all() and (np.diff(b[head]) <= 0).all()  # the blend's candidates, its order
        reserved = np.argsort(-e, kind="stable")[7:10]  # the --cold-prior system's best cold items, in its order
        prior = run.scores["topic_exact"][u]
        assert (np.diff(prior[reserved]) <= 0).all()
        others = np.setdiff1d(np.setdiff1d(cold_items, reserved), seen)
        assert prior[reserved].min() >= prior[others].max()


def test_cold_prior_must_name_a_matcher(holdout) -> None:
    config = EvalConfig(protocol="tail", blend_config=BlendConfig(cold_slots=2, cold_prior="zero_shot"))
    emb = np.eye(holdout.n_items, 4, dtype=np.float32)
    with pytest.raises(ConfigError, match="--cold-prior 'zero_shot' is not a matcher of this evaluation"):
        evaluate(holdout, config, {"topic": EmbeddingMatcher(emb, mean_pool_encoder(emb))})



def test_the_blend_ablation_drops_the_named_features_and_names_an_unknown_one(ranker_run) -> None:
    _, matcher, data, _ = ranker_run
    drop = ("covis_sum", "covis_max", "covis_norm")
    blend = BlendConfig(itemknn_top=0, features_from=("ease",), drop_features=drop,
                        lambdamart=replace(BlendConfig().lambdamart, num_rounds=40))
    config = EvalConfig(protocol="global", systems=("popularity",), n_boot=50, sampled_negatives=20, blend_config=blend)
    result = evaluate(data, config, {"topic": matcher})
    features = result.blend["features"]
    assert "match_score" in features and not set(drop) & set(features)
    assert result.metrics["all"]["blend"]["ndcg@10"] > 0
    bad = replace(config, blend_config=replace(blend, drop_features=("covis_typo",)))
    with pytest.raises(ConfigError, match="covis_typo"):
        evaluate(data, bad, {"topic": matcher})


def test_the_blend_averages_its_bagged_models_each_early_stopped_on_other_users() -> None:
    from recsys.evaluation.evaluate import RankerBag, train_blend
    from recsys.features import Features
    from recsys.ranker import Ranker

    rng = np.random.default_rng(0)
    names = ("signal", "noise")
    blocks, cands, targets = [], [], []
    for _ in range(120):  # 120 users, 12 candidates each, one target that the signal feature points at
        target = int(rng.integers(12))
        x = rng.standard_normal((12, 2)).astype(np.float32)
        x[target, 0] += 1.5
        blocks.append(x)
        cands.append(np.arange(12))
        targets.append(np.array([target]))
    config = BlendConfig(bags=3, lambdamart=replace(BlendConfig().lambdamart, num_rounds=30, early_stopping_rounds=5))
    trained = train_blend(blocks, names, cands, targets, config)
    assert len(trained.boosters) == 3 and len(trained.best_iteration) == 3
    assert trained.importance["signal"] > trained.importance["noise"]
    meta = {"feature_names": list(names), "feature_config": FeatureConfig().to_dict()}
    rankers = [Ranker(b, meta) for b in trained.boosters]
    x = Features(np.concatenate(blocks[:5]), names)
    per_model = np.stack([r.score(x) for r in rankers])
    assert not np.allclose(per_model[0], per_model[1])  # other early-stopping users, other models
    assert np.allclose(RankerBag(rankers).score(x), per_model.mean(0))
    with pytest.raises(ConfigError, match="bags"):
        BlendConfig(bags=0)
