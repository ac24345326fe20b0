"""The continual-learning loop end to end: publish -> serve (real gRPC, exposure log) -> simulated clicks
-> `recsys retrain` -> promoted -> hot reload without failed requests; and a retrain on a corrupted
catalogue update (texts joined to the wrong items) that is genuinely worse on the clean, pinned holdout
and is not promoted."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from recsys.cli import main
from tests.artifacts import ServerThread

T0 = datetime(2026, 1, 31, 12, 0, tzinfo=timezone.utc)  # just after the synthetic log (30 days of Jan 2026)
FAST = ["--epochs", "3", "--batch-size", "128", "--lr", "1e-3", "--threads", "1", "--ranker-rounds", "40",
        "--bootstrap", "200"]


# ------------------------------------------------------------------------------------------ fast checks


def _scores(version: str, groups: np.ndarray, users: np.ndarray) -> Any:
    from training.retrain import VersionScores

    return VersionScores(version, groups, users, users)


def test_decision_gates_every_metric_with_the_tolerance() -> None:
    pytest.importorskip("torch")  # training.retrain imports the export module
    from training.retrain import compare

    rng = np.random.default_rng(0)
    g, u = rng.random(200), rng.random(100)
    same = compare(_scores("v1", g, u), _scores("v2", g - 0.004, u), ("ndcg@10", "recall@10"), 0.005)
    assert same["promote"] and same["metrics"]["ndcg@10"]["delta"] == pytest.approx(-0.004)
    ci = same["metrics"]["ndcg@10"]["bootstrap95"]
    assert ci["lo"] == pytest.approx(-0.004) and ci["hi"] == pytest.approx(-0.004)  # constant paired shift
    worse = compare(_scores("v1", g, u), _scores("v2", g, u - 0.05), ("ndcg@10", "recall@10"), 0.005)
    assert not worse["promote"] and any("recall@10 dropped by 0.0500" in r for r in worse["reasons"])
    for who, values in (("current", g), ("candidate", g - 0.004)):  # per-version intervals, for metrics.png
        lo, hi = same["metrics"]["ndcg@10"][f"{who}95"]
        assert lo < values.mean() < hi and hi - lo < 0.2
    # A guard that is off does not block; a version without a ranker is not compared blind.
    assert compare(_scores("v1", g, u), _scores("v2", g, u - 0.05), ("ndcg@10",), 0.005)["promote"]
    blind = compare(_scores("v1", None, u), _scores("v2", g, u), ("ndcg@10",), 0.005)  # type: ignore[arg-type]
    assert not blind["promote"] and "not promoting blind" in blind["reasons"][-1]
    # A guard that is 0 for both versions is "not measurable", not "passed".
    zero = compare(_scores("v1", g, 0 * u), _scores("v2", g - 0.01, 0 * u), ("ndcg@10", "recall@10"), 0.005)
    assert "recall@10: not comparable (0 for both versions: not measurable" in " ".join(zero["reasons"])
    only_zero = compare(_scores("v1", g, 0 * u), _scores("v2", g, 0 * u), ("recall@10",), 0.005)
    assert not only_zero["promote"] and "not promoting blind" in only_zero["reasons"][-1]


def test_metrics_plot_draws_both_holdouts(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from training.retrain import compare, plot_metrics

    rng = np.random.default_rng(1)
    g, u = rng.random(200), rng.random(100)
    verdict = compare(_scores("v1", g, u), _scores("v2", g + 0.01, u), ("ndcg@10",), 0.005)
    report = {"current": "v1", "candidate": "v2", "promoted": True, "metrics": verdict["metrics"],
              "holdout": {"from": "2026-02-01T00:00:00+00:00"},
              "fixed_holdout": {"window_from": "2026-01-20T00:00:00+00:00", "metrics": verdict["metrics"]}}
    assert plot_metrics(report, tmp_path / "metrics.png") == "metrics.png"
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))  # written via a temp file, renamed


def test_exposures_merge_as_impressions_without_serving_columns(prepared_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from recsys.data.prepared import PreparedData
    from recsys.data.validate import validate
    from recsys.serving.exposure import ExposureLog
    from training.retrain import merge_tables

    exposure = ExposureLog(tmp_path / "exp")
    t_us = int(T0.timestamp() * 1e6)
    exposure.append("req-1", "u1", t_us, "v0001", "control", ["i1", "i2", "nope"], np.ones(3), np.ones(3), np.array([1, 1, 2]))
    exposure.close()
    base = PreparedData.load(prepared_dir)
    raw, counts = merge_tables(base, [], [tmp_path / "exp"], ["device"])
    assert counts["exposures:exp"] == 3 and not {"model_version", "variant", "score", "source"} & set(raw.events.columns)
    clean, report = validate(raw, on_invalid="drop")
    assert report.dropped == {"unknown_item": 1}  # the cold item the server encoded from text
    served = clean.events.filter(pl.col("request_id") == "req-1")
    assert served["event_type"].cast(pl.Utf8).to_list() == ["impression"] * 2 and served["strength"].sum() == 0
    assert clean.events.height == base.events().collect().height + 2


def test_cli_errors_name_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.registry import Registry

    assert main(["retrain", "--registry", str(tmp_path / "none"), "--out", str(tmp_path / "w")]) == 2
    assert "does not exist" in capsys.readouterr().err
    pytest.importorskip("torch")
    pytest.importorskip("lightgbm")
    reg = Registry(tmp_path / "reg")  # a version exported without the pipeline: nothing to warm-start from
    (reg.versions_dir / "v0001").mkdir(parents=True)
    (reg.versions_dir / "v0001" / "manifest.json").write_text(json.dumps({"files": {}}))
    reg.promote("v0001", verify=False)
    code = main(["retrain", "--registry", str(reg.root), "--out", str(tmp_path / "w")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "has no checkpoint/ to warm-start from" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ the loop




@pytest.fixture(scope="module")
def loop(prepared_dir: Path, synthetic_log: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """v1 (a day-one model: untrained tiny BERT towers + a ranker) published and served with an
    exposure log and registry watching; one round of traffic; clicks simulated from planted preferences."""
    pytest.importorskip("torch")
    pytest.importorskip("lightgbm")
    grpc = pytest.importorskip("grpc")
    from recsys.ranker import LambdaMARTParams
    from recsys.registry import Registry
    from recsys.serving.config import ServeConfig
    from recsys.serving.exposure import read_exposures
    from recsys.serving.proto import ranking_pb2 as pb
    from recsys.serving.proto import ranking_pb2_grpc as pb_grpc
    from tests.test_export import make_tiny_checkpoint
    from training.export import ExportConfig
    from training.pipeline import publish_version
    from training.ranker import RankerConfig

    base = tmp_path_factory.mktemp("retrain")
    registry = Registry(base / "reg")
    ckpt = make_tiny_checkpoint(base / "ckpt", seed=3)
    v1 = publish_version(ckpt, registry, prepared_dir, ranker_config=RankerConfig(lambdamart=LambdaMARTParams(threads=2, num_rounds=40)),
                         export_config=ExportConfig(), promote=True)
    config = ServeConfig(registry=registry.root, data=prepared_dir, host="127.0.0.1", port=0, workers=2,
                         exposure_dir=base / "exposures", exposure_flush_s=0.2, watch_s=0.2)
    server = ServerThread(config)

    # Traffic: slates like the generator's (half from the user's favourite topics, half popular-random).
    pref, topic = synthetic_log.user_topic_pref, synthetic_log.item_topic
    rng = np.random.default_rng(11)
    n_items = len(topic)
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.RankingServiceStub(channel)
    for r in range(400):
        user = int(rng.integers(0, len(pref)))
        liked = np.flatnonzero(pref[user, topic] > 0.2)
        pool = rng.choice(liked, size=min(10, len(liked)), replace=False) if len(liked) else np.zeros(0, int)
        others = rng.choice(np.setdiff1d(np.arange(n_items), pool), size=20 - len(pool), replace=False)
        request = pb.RankRequest(request_id=f"traffic-{r}", user_id=f"u{user}")  # the whole slate is shown
        request.candidates.extend(pb.Candidate(item_id=f"i{i}") for i in np.concatenate([pool, others]))
        request.request_time.FromDatetime(T0 + timedelta(seconds=60 * r))
        assert stub.Rank(request, timeout=10).model_version == v1
    server.app.exposure.flush()  # the served lists are durable before anyone reads them
    exposures = base / "exposures_snapshot"  # what a log shipper would hand to retraining
    shutil.copytree(base / "exposures", exposures)

    # What users did next: clicks on served items by the generator's click model, without its position
    # bias (which would credit the serving model's own order on the holdout).
    shown = read_exposures(exposures)
    u = shown["user_id"].str.slice(1).cast(pl.Int64).to_numpy()
    i = shown["item_id"].str.slice(1).cast(pl.Int64).to_numpy()
    logit = -4.5 + 7.0 * pref[u, topic[i]]
    clicked = rng.random(len(u)) < 1.0 / (1.0 + np.exp(-logit))
    clicks = shown.filter(pl.Series(clicked)).select(
        "user_id", "item_id", pl.lit("click").alias("event_type"),
        pl.col("timestamp") + pl.duration(seconds=5), "request_id", "position",
    )
    clicks.write_parquet(base / "clicks.parquet")
    yield {"base": base, "registry": registry, "v1": v1, "server": server, "stub": stub, "pb": pb,
           "grpc": grpc, "exposures": exposures, "clicks": base / "clicks.parquet", "n_clicks": clicks.height}
    channel.close()
    server.stop()


def _retrain(env: dict[str, Any], out: Path, *events: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    args = ["retrain", "--registry", str(env["registry"].root), "--out", str(out), "--exposures", str(env["exposures"])]
    for path in events:
        args += ["--events", str(path)]
    assert main([*args, *FAST, *extra]) == 0
    report: dict[str, Any] = json.loads((out / "retrain_report.json").read_text())
    assert (out / "retrain_report.md").read_text().startswith(f"# Retrain: {report['candidate']}")
    return report


def test_served_traffic_retrains_promotes_and_hot_reloads(loop: dict[str, Any]) -> None:
    pb, grpc, registry = loop["pb"], loop["grpc"], loop["registry"]
    assert loop["n_clicks"] > 300  # enough fresh positives to be the holdout window
    failures: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def hammer() -> None:  # live traffic during retraining and the swap
        from recsys.serving.proto import ranking_pb2_grpc as pb_grpc

        with grpc.insecure_channel(loop["server"].target) as channel:
            stub = pb_grpc.RankingServiceStub(channel)
            n = 0
            while not stop.is_set():
                request = pb.RankRequest(request_id=f"live-{n}", user_id=f"u{n % 300}", top_k=5)
                request.candidates.extend(pb.Candidate(item_id=f"i{j}") for j in range(n % 50, n % 50 + 30))
                try:
                    versions.append(stub.Rank(request, timeout=10).model_version)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")
                n += 1
                time.sleep(0.02)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        # Gate on the matcher (day-one -> trained). The blend is not gated here: on these slates the
        # day-one blender's category/tag affinity already captures the planted topic preference, and no
        # blender retrained on the ~170 fresh request groups beats it on the holdout (measured: 0.60-0.65
        # vs 0.65 over LightGBM settings, feature subsets and continued boosting), so the default gate
        # rightly refuses a blend that is not better; both blends are still scored and reported.
        report = _retrain(loop, loop["base"] / "work_good", loop["clicks"],
                          extra=("--promote-metric", "recall@10", "--no-guard"))
        assert report["current"] == loop["v1"] and report["promoted"], report["decision"]
        v2 = report["candidate"]
        assert registry.current() == v2 and registry.history()[-1] == loop["v1"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not versions or versions[-1] != v2):
            time.sleep(0.1)
        time.sleep(0.3)  # some requests on the new version too
    finally:
        stop.set()
        thread.join()
    assert not failures, failures[:3]
    assert versions[0] == loop["v1"] and versions[-1] == v2
    assert set(versions) == {loop["v1"], v2}
    # The candidate learned the planted preferences: better than the day-one model on the fresh holdout.
    metrics = report["metrics"]
    assert metrics["recall@10"]["candidate"] > metrics["recall@10"]["current"] + 0.02, metrics
    assert not metrics["ndcg@10"]["gated"] and report["holdout"]["request_groups"] > 50
    assert metrics["ndcg@10"]["current"] > 0.5 and metrics["ndcg@10"]["candidate"] > 0.5  # both blends scored
    manifest = registry.manifest(v2)
    assert manifest["lineage"]["parent"] == loop["v1"]
    assert {"ranker/model.txt", "checkpoint/user_tower.safetensors"} <= set(manifest["files"])
    registry.verify(v2)


def test_corrupted_catalogue_makes_a_worse_candidate_that_is_not_promoted(loop: dict[str, Any], synthetic_log: Any) -> None:
    """A catalogue update from a broken join (texts attached to the item one row down): the candidate's
    item embeddings lose the topic signal, while the current version is scored with its own stored
    embeddings on the same, clean, pinned holdout. Not promoted; the report says why."""
    from recsys.data.prepared import PreparedData

    registry = loop["registry"]
    keep = registry.current()
    assert keep != loop["v1"]  # the previous test promoted a trained model
    holdout = registry.manifest(keep)["data"]["cutoffs"]["test_start"]  # the holdout keep was promoted on
    items = synthetic_log.items
    text = ("title", "description", "tags")
    broken = items.select("item_id", *[pl.col(c).shift(-1).fill_null(pl.col(c).first()) for c in text])
    assert (broken["title"] != items["title"]).all()
    broken.write_parquet(loop["base"] / "items_update.parquet")

    out = loop["base"] / "work_bad"
    report = _retrain(loop, out, extra=("--items", str(loop["base"] / "items_update.parquet"),
                                        "--holdout-start", holdout))
    assert report["current"] == keep and not report["promoted"], report["decision"]
    assert registry.current() == keep
    assert report["data"]["input_rows"]["items:items_update.parquet:changed"] == items.height
    assert report["holdout"]["from"] == holdout  # pinned: the same clean window keep was judged on
    recall = report["metrics"]["recall@10"]
    assert recall["candidate"] < recall["current"] - 0.05, recall  # genuinely worse, not a coin flip
    assert recall["bootstrap95"]["hi"] < 0
    assert any("recall@10 dropped by" in r for r in report["decision"]["reasons"]), report["decision"]
    assert report["candidate_removed"] and report["candidate"] not in registry.versions()  # refused: disk freed
    assert "recall@10 dropped by" in (out / "retrain_report.md").read_text()
    fresh = PreparedData.load(out / "data")  # the update was applied: the candidate read the broken texts
    assert fresh.items["text"].to_list() != PreparedData.load(registry.manifest(keep)["data"]["path"]).items["text"].to_list()
    pb = loop["pb"]
    request = pb.RankRequest(request_id="after-bad", user_id="u1", top_k=3)
    request.candidates.extend(pb.Candidate(item_id=f"i{j}") for j in range(10))
    assert loop["stub"].Rank(request, timeout=10).model_version == keep


# ------------------------------------------------------------------------------------------ damaged data


def _corrupt(env: dict[str, Any], kind: str) -> tuple[Path, Path]:
    """(events file, exposure dir) damaged the three ways the issue tried: every new click on one item,
    item ids shuffled in the clicks, a catalogue id remap in both clicks and exposures."""
    from recsys.serving.exposure import read_exposures

    clicks = pl.read_parquet(env["clicks"])
    exposures = env["exposures"]
    if kind == "one_item":
        clicks = clicks.with_columns(pl.lit("i7").alias("item_id"))
    elif kind == "shuffled":
        clicks = clicks.with_columns(pl.Series("item_id", clicks["item_id"].shuffle(seed=5)))
    else:  # remap: "i12" -> "sku-12" everywhere in the new logs
        remap = pl.col("item_id").str.replace("^i", "sku-")
        clicks = clicks.with_columns(remap)
        exposures = env["base"] / f"exposures_{kind}"
        exposures.mkdir(exist_ok=True)
        read_exposures(env["exposures"]).with_columns(remap).write_parquet(exposures / "part-remapped.parquet")
    path = env["base"] / f"clicks_{kind}.parquet"
    clicks.write_parquet(path)
    return path, exposures


@pytest.mark.parametrize(("kind", "check"), [("one_item", "concentration"), ("shuffled", "exposure_coverage"),
                                             ("remap", "item_overlap")])
def test_damaged_new_data_is_refused_before_training(loop: dict[str, Any], kind: str, check: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    registry = loop["registry"]
    before = (registry.versions(), registry.current(), registry.history())
    events, exposures = _corrupt(loop, kind)
    out = loop["base"] / f"work_{kind}"
    code = main(["retrain", "--registry", str(registry.root), "--out", str(out), "--exposures", str(exposures),
                 "--events", str(events), *FAST])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "retrain refused before training" in err and check in err, err
    assert f"--skip-data-check {check}" in err or "--skip-data-check" in err
    assert (registry.versions(), registry.current(), registry.history()) == before  # nothing trained or registered
    report = json.loads((out / "retrain_report.json").read_text())
    assert report["refused"] and check in report["failed_checks"]
    assert f"| {check} | FAILED |" in (out / "retrain_report.md").read_text()
    assert not (out / "matcher").exists() and not (out / "data").exists()


def test_killed_retrain_leaves_the_registry_serving_and_the_next_run_succeeds(loop: dict[str, Any]) -> None:
    """SIGKILL after the fresh data is prepared, and after the candidate is registered but before the
    comparison: the current version and the rollback history are untouched; the next run completes."""
    import os
    import signal
    import subprocess
    import sys

    registry = loop["registry"]
    current, history = registry.current(), registry.history()
    out = loop["base"] / "work_killed"
    argv = ["retrain", "--registry", str(registry.root), "--out", str(out), "--exposures", str(loop["exposures"]),
            "--events", str(loop["clicks"]), *FAST, "--keep-refused"]
    root = Path(__file__).resolve().parents[1]
    for point in ("retrain:prepared", "retrain:published"):
        env = {**os.environ, "RECSYS_FAULT_AT": point, "PYTHONPATH": str(root)}
        proc = subprocess.run([sys.executable, "-m", "recsys.cli", *argv], env=env, capture_output=True, text=True,
                              timeout=600, cwd=root)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert (registry.current(), registry.history()) == (current, history), point
        registry.verify(current)
    orphan = registry.versions()[-1]  # registered by the run killed after publishing, never promoted
    assert orphan != current and registry.manifest(orphan)["lineage"]["retrain_out"] == str(out)
    assert main(argv) == 0
    report = json.loads((out / "retrain_report.json").read_text())
    assert report["current"] == current and report["candidate"] not in (orphan, current)
    assert report["fixed_holdout"]["metrics"] and report["data"]["data_checks"]["failed"] == []
    assert main(["models", "gc", "--registry", str(registry.root), "--keep", "1"]) == 0  # the orphan goes
    assert orphan not in registry.versions() and registry.current() in registry.versions()
