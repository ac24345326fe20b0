"""LambdaMART blender: beats its inputs on the test window, saves/loads without pickle, explains
additively, refuses features it was not trained on."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsys.data.prepared import PreparedData
from recsys.errors import InputError, ModelError
from recsys.features import EmbeddingMatcher, Features, mean_pool_encoder
from recsys.ranker import Ranker, grouped_ndcg
from recsys.scoring.request import RequestBatch, RequestScorer


def topic_matcher(synthetic_log, data: PreparedData, noise: float = 0.6) -> EmbeddingMatcher:
    """A deliberately imperfect, text-free matcher: one-hot planted topic + Gaussian noise, L2-normalised
    ([n_items, 16]), pooled over the history. Like a real text matcher it knows topics, not popularity
    or habits; the blender has to add those."""
    rng = np.random.default_rng(0)
    item_no = data.items["item_id"].str.slice(1).cast(int).to_numpy()  # item_idx -> generator item
    emb = np.zeros((data.n_items, 16), np.float32)
    emb[np.arange(data.n_items), synthetic_log.item_topic[item_no]] = 1.0
    emb += rng.normal(0.0, noise, emb.shape).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return EmbeddingMatcher(emb, mean_pool_encoder(emb))


@pytest.fixture(scope="module")
def trained(synthetic_log, prepared_dir, tmp_path_factory):
    from recsys.ranker import LambdaMARTParams
    from training.ranker import RankerConfig, train_ranker

    data = PreparedData.load(prepared_dir)
    matcher = topic_matcher(synthetic_log, data)
    out = tmp_path_factory.mktemp("ranker") / "model"
    result = train_ranker(data, out, matcher, RankerConfig(lambdamart=LambdaMARTParams(threads=2)))
    return result, matcher, data


def test_ranker_beats_match_score_and_popularity_on_the_test_window(trained) -> None:
    result, _, _ = trained
    test = result.metrics["test"]
    ranker, match, pop = test["ndcg@10/ranker"], test["ndcg@10/match_score"], test["ndcg@10/popularity"]
    print(
        f"test NDCG@10 ranker {ranker:.4f} match {match:.4f} popularity {pop:.4f} ({test['groups']} groups)"
    )
    assert test["groups"] >= 100
    assert ranker >= match + 0.015
    assert ranker >= pop + 0.10
    assert match >= pop + 0.05 and pop > test["ndcg@10/random"]  # sanity of the baselines themselves
    assert result.importance and max(result.importance.values()) > 0


def test_saved_model_reproduces_the_metrics_and_loads_without_pickle(trained, monkeypatch) -> None:
    result, matcher, data = trained

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    files = {p.relative_to(result.out_dir).as_posix() for p in result.out_dir.rglob("*") if p.is_file()}
    assert files == {
        "model.txt",
        "ranker.json",
        "importance.json",
        "feature_state/state.npz",
        "feature_state/state.json",
    }
    ranker = Ranker.load(result.out_dir)
    meta = json.loads((result.out_dir / "ranker.json").read_text())
    assert ranker.feature_names == result.feature_names and meta["params"]["objective"] == "lambdarank"
    assert meta["label_gain"] == [0, 1, 3, 7, 15] and meta["best_iteration"] >= 1

    table = result.table
    test = table.select(np.flatnonzero(table.split == "test"))
    scores = ranker.score(test.matrix, test.names)
    ndcg = np.nanmean(grouped_ndcg(scores, test.labels, test.sizes, 10, meta["label_gain"]))
    assert ndcg == pytest.approx(result.metrics["test"]["ndcg@10/ranker"], abs=1e-9)

    # The saved end-of-data state serves a request through the one request path.
    state = ranker.load_state()
    assert state.as_of_us >= int(table.time_us.max())
    cands = np.arange(0, data.n_items, 4)
    scorer = RequestScorer(state, ranker=ranker, matcher=matcher)
    scored = scorer.score(RequestBatch.from_lists([3], [state.as_of_us + 1], [cands], contexts=[{"device": "web", "country": "x"}]))
    served = scored.scores
    assert served.shape == (len(cands),) and np.isfinite(served).all()
    np.testing.assert_allclose(served, ranker.score(scored.features))


def test_explanations_sum_to_the_score(trained) -> None:
    result, _, _ = trained
    ranker = Ranker.load(result.out_dir)
    rows = result.table.matrix[:200]
    explanation = ranker.explain(rows, result.table.names)
    assert explanation.contributions.shape == rows.shape
    np.testing.assert_allclose(
        explanation.contributions.sum(1) + explanation.bias, ranker.score(rows, result.table.names), atol=1e-6
    )
    top = explanation.top(0, 3)
    assert len(top) == 3 and all(name in ranker.feature_names for name, _ in top)


def test_direct_c_predict_equals_booster_predict(trained) -> None:
    """The service's predictor (LightGBM's C entry point without the Python wrapper) gives
    bit-identical scores to Booster.predict, for float32 (kept as is) and float64 rows, with NaNs."""
    result, _, _ = trained
    ranker = Ranker.load(result.out_dir, threads=1)
    rows = np.array(result.table.matrix[:300], np.float64)
    rows[np.random.default_rng(0).random(rows.shape) < 0.1] = np.nan
    names = list(result.table.names)
    expected = ranker.booster.predict(ranker.matrix(rows, names).astype(np.float64))
    np.testing.assert_array_equal(ranker.score(rows, names), expected)
    rows32 = rows.astype(np.float32)
    np.testing.assert_array_equal(ranker.score(rows32, names), ranker.booster.predict(ranker.matrix(rows32, names).astype(np.float64)))
    assert ranker.score(rows[:0], names).shape == (0,)


def test_cold_item_dropout_masks_fit_rows_only(trained, tmp_path) -> None:
    """cold_item_dropout shows a share of the fit candidates as items without behaviour: the model
    changes, the table and the holdout/test metrics stay on the real features. (Its effect on cold
    and warm targets is measured in bench/cold_items.py.)"""
    from recsys.errors import ConfigError
    from recsys.ranker import LambdaMARTParams
    from training.ranker import RankerConfig, train_ranker

    result, matcher, data = trained
    with pytest.raises(ConfigError, match="cold_item_dropout"):
        RankerConfig(cold_item_dropout=1.0)
    dropped = train_ranker(data, tmp_path / "dropout", matcher, RankerConfig(lambdamart=LambdaMARTParams(threads=2), cold_item_dropout=0.3))
    meta = json.loads((tmp_path / "dropout" / "ranker.json").read_text())
    assert meta["config"]["cold_item_dropout"] == 0.3
    np.testing.assert_array_equal(dropped.table.matrix, result.table.matrix)  # same features, unmasked
    test = dropped.table.select(np.flatnonzero(dropped.table.split == "test"))
    ranker = Ranker.load(dropped.out_dir)
    ndcg = np.nanmean(grouped_ndcg(ranker.score(test.matrix, test.names), test.labels, test.sizes, 10, meta["label_gain"]))
    assert ndcg == pytest.approx(dropped.metrics["test"]["ndcg@10/ranker"], abs=1e-9)
    new_items = Features(test.matrix.copy(), test.names)
    ranker.load_state().mask_unseen_items(new_items, np.arange(len(test.labels)))
    assert not np.allclose(ranker.score(new_items), Ranker.load(result.out_dir).score(new_items))


def test_feature_name_mismatch_is_refused_with_the_feature_named(trained) -> None:
    result, _, _ = trained
    ranker = Ranker.load(result.out_dir)
    names = list(result.table.names)
    x = result.table.matrix[:20]
    expected = ranker.score(x, names)

    with pytest.raises(ModelError, match=r"missing feature.*'covis_sum'"):
        keep = [j for j, n in enumerate(names) if n != "covis_sum"]
        ranker.score(x[:, keep], [names[j] for j in keep])
    with pytest.raises(ModelError, match=r"unexpected feature.*'retrieval_score'"):
        ranker.score(np.column_stack([x, np.ones(len(x))]), [*names, "retrieval_score"])
    with pytest.raises(ModelError, match="pass feature names"):
        ranker.score(x[:, :-1])
    # Same features in another order: matched by name.
    order = np.random.default_rng(0).permutation(len(names))
    np.testing.assert_allclose(ranker.score(x[:, order], [names[j] for j in order]), expected)
    # Named columns; a text column is refused by name.
    columns = {n: x[:, j] for j, n in enumerate(names)}
    np.testing.assert_allclose(ranker.score(columns), expected)
    columns["item_price"] = np.array(["cheap"] * len(x))
    with pytest.raises(InputError, match="item_price"):
        ranker.score(columns)
    # A ranker trained with match scores needs a matcher at request time.
    with pytest.raises(ModelError, match="match_score"):
        RequestScorer(ranker.load_state(), ranker=ranker)


def test_grouped_ndcg_known_answer() -> None:
    # Group 1: labels [0, 2, 1] scored [3, 2, 1] -> ranks 0, 1, 2; group 2 has no positive (NaN).
    gain = [0, 1, 3]
    ndcg = grouped_ndcg(
        np.array([3.0, 2.0, 1.0, 1.0, 0.0]), np.array([0, 2, 1, 0, 0]), np.array([3, 2]), 10, gain
    )
    dcg = 3 / np.log2(3) + 1 / np.log2(4)
    idcg = 3 / np.log2(2) + 1 / np.log2(3)
    assert ndcg[0] == pytest.approx(dcg / idcg) and np.isnan(ndcg[1])
    assert grouped_ndcg(np.array([1.0, 0.0]), np.array([2, 0]), np.array([2]), 1, gain)[0] == 1.0


def test_cli_trains_a_ranker_without_a_matcher(prepared_dir, tmp_path) -> None:
    out = tmp_path / "ranker"
    cmd = [
        sys.executable,
        "-m",
        "recsys.cli",
        "train",
        "ranker",
        "--data",
        str(prepared_dir),
        "--out",
        str(out),
        "--threads",
        "2",
        "--num-rounds",
        "30",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "NDCG@10" in proc.stdout and "top features by gain" in proc.stdout
    ranker = Ranker.load(out)
    assert not ranker.uses_match and "item_pop_all" in ranker.feature_names

    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys.cli",
            "train",
            "ranker",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        missing.returncode == 2
        and "not a prepared dataset" in missing.stderr
        and "Traceback" not in missing.stderr
    )


def test_help_does_not_import_lightgbm() -> None:
    code = (
        "import sys; from recsys.cli import build_parser; build_parser(); "
        "assert 'lightgbm' not in sys.modules and 'recsys.features' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"ranker\.json is missing"):
        Ranker.load(tmp_path)
    (tmp_path / "ranker.json").write_text("{}")
    (tmp_path / "model.txt").write_text("not a model")
    with pytest.raises(ModelError, match="format"):
        Ranker.load(tmp_path)


def as_older_state_format(meta: dict, arrays: dict[str, np.ndarray], fmt: int) -> None:
    """Make a saved feature state (state.json, state.npz's arrays; in place) what an older writer left:
    format 2 also kept the directed transition map (`trans.*` arrays) and a `missing` list in its
    meta; format 1 had neither."""
    meta["format"] = fmt
    if fmt == 2:  # a map of the shape format 2 wrote
        meta["missing"] = []
        arrays["trans.keys"], arrays["trans.values"] = arrays["covis.keys"][::2], arrays["covis.values"][::2]


def _as_older_format(state_dir: Path, fmt: int) -> None:
    meta = json.loads((state_dir / "state.json").read_text())
    with np.load(state_dir / "state.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    as_older_state_format(meta, arrays, fmt)
    (state_dir / "state.json").write_text(json.dumps(meta))
    np.savez(state_dir / "state.npz", **arrays)


@pytest.mark.parametrize("fmt", [1, 2])
def test_an_older_format_state_still_serves_the_rankers_saved_with_it(trained, tmp_path, fmt) -> None:
    """Upgrading must not strand published models: a state of format 1 (before the transition map)
    or 2 (with it) loads with exactly this format's maps (format 2's `trans.*` arrays ignored),
    computes the same features as today's state, and re-saves as today's format; a state with an
    unknown format is refused with the fix."""
    import shutil

    from recsys.features import FeatureState
    from recsys.features.state import STATE_FORMAT

    result, _, _ = trained
    directory = tmp_path / "model"
    shutil.copytree(result.out_dir, directory)
    state_dir = directory / "feature_state"
    current = FeatureState.load(state_dir)
    _as_older_format(state_dir, fmt)
    old = Ranker.load(directory).load_state()
    for name, array in current.arrays().items():
        np.testing.assert_array_equal(old.arrays()[name], array, err_msg=name)
    t, cands = int(current.as_of_us) + 1, np.arange(0, current.n_items, 7)
    now, before = current.compute(3, cands, t), old.compute(3, cands, t)
    assert before.names == now.names and not any(n.startswith("trans_") for n in now.names)
    np.testing.assert_array_equal(before.matrix, now.matrix)
    resaved = old.save(tmp_path / "resaved")
    assert json.loads((resaved / "state.json").read_text())["format"] == STATE_FORMAT == 3
    with np.load(resaved / "state.npz") as npz:
        assert not [k for k in npz.files if k.startswith("trans.")]

    meta = json.loads((state_dir / "state.json").read_text())
    meta["format"] = 99
    (state_dir / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"format 99.*reads formats \[1, 2, 3\].*recsys train ranker"):
        FeatureState.load(state_dir)


def test_a_ranker_trained_on_the_retired_transition_features_is_refused_at_load(
    trained, prepared_dir, tmp_path, capsys
) -> None:
    """A ranker saved by the version that computed trans_last, trans_last_norm and trans_recent would
    fail every request on columns that no longer exist: it is refused at load by name with the fix,
    and a command given it exits 2 with that paragraph and writes nothing."""
    import re
    import shutil

    from recsys.cli import main

    result, _, _ = trained
    directory = tmp_path / "model"
    shutil.copytree(result.out_dir, directory)
    # The ranker that version trained: the same model with three of its columns being the transition features.
    meta = json.loads((directory / "ranker.json").read_text())
    renamed = dict(zip(("covis_sum", "covis_max", "covis_norm"), ("trans_last", "trans_last_norm", "trans_recent"),
                       strict=True))
    assert set(renamed) <= set(meta["feature_names"])
    meta["feature_names"] = [renamed.get(n, n) for n in meta["feature_names"]]
    (directory / "ranker.json").write_text(json.dumps(meta))
    text = (directory / "model.txt").read_text()
    (directory / "model.txt").write_text(re.sub(r"\b(covis_sum|covis_max|covis_norm)\b", lambda m: renamed[m[1]], text))

    fix = r"reads trans_last, trans_last_norm, trans_recent, which this version no longer computes.*recsys train ranker"
    with pytest.raises(ModelError, match=fix):
        Ranker.load(directory)
    code = main(["evaluate", "--data", str(prepared_dir), "--ranker", str(directory), "--out", str(tmp_path / "eval")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and re.search(fix, err) and "Traceback" not in err, err
    assert not (tmp_path / "eval").exists()
