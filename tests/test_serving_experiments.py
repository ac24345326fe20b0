"""The ranking service with an A/B experiment config (recsys serve --experiments): a real server on a
free port routing a two-variant config (a registry version vs the popularity baseline), simulated
clicks on its exposure log, and `recsys experiment analyze` finding the variant that was made better;
the ExplainAssignment debug RPC, config hot reload (a good edit applied with its new ranker loaded, a
malformed or unloadable edit refused while the old config keeps serving) and the baseline path."""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("lightgbm")
grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")  # only to build the test artifacts

from recsys.experiments.assignment import assign  # noqa: E402
from recsys.experiments.config import parse_config  # noqa: E402
from recsys.serving.proto import ranking_pb2 as pb  # noqa: E402
from tests.artifacts import ServerThread  # noqa: E402

TOKEN = "admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)

AB_CONFIG = textwrap.dedent(
    """
    name: serving-e2e
    default_ranker: blend
    rankers:
      blend: {model: v0001}
      popular: {baseline: popularity}
    layers:
      - name: ranking
        salt: layer-ranking
        experiments:
          - name: pop-test
            salt: exp-pop
            unit: user
            coverage: 1.0
            variants:
              - {name: control, ranker: blend}
              - {name: treatment, ranker: popular}
    """
)

# Hot reload: A routes half the users to the popularity baseline; B (the good edit) drops it for a
# session-randomised experiment against a registry version the service has not loaded yet.
RELOAD_A = textwrap.dedent(
    """
    default_ranker: blend
    rankers:
      blend: {model: v0001, blender: ranker}   # relative: from this file's folder
      popular: {baseline: popularity}
    layers:
      - name: ranking
        salt: layer-a
        experiments:
          - name: exp-a
            salt: exp-a
            coverage: 0.5
            variants:
              - {name: control, ranker: blend}
              - {name: treatment, ranker: popular}
    """
)
RELOAD_B = textwrap.dedent(
    """
    default_ranker: blend
    rankers:
      blend: {model: v0001, blender: ranker}
      fresh: {model: VERSION, blender: ranker}
    layers:
      - name: ranking
        salt: layer-b
        experiments:
          - name: exp-b
            salt: exp-b
            unit: session
            coverage: 1.0
            variants:
              - {name: control, ranker: blend}
              - {name: treatment, ranker: fresh}
    """
)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> dict[str, Any]:
    """A registry with v0001 and a copy registered as a second version, and the ranker directory."""
    from recsys.registry import Registry
    from tests.artifacts import build_scoring_artifacts

    out: dict[str, Any] = build_scoring_artifacts(tmp_path_factory.mktemp("serving-exp"), prepared_dir)
    registry = Registry(out["registry"])
    manifest = registry.manifest("v0001")
    staging = registry.staging_dir()
    shutil.rmtree(staging)
    shutil.copytree(registry.path("v0001"), staging)
    (staging / "manifest.json").unlink()
    fields = {k: v for k, v in manifest.items() if k not in ("files", "version", "created", "format")}
    out["v2"] = registry.register(staging, fields, sorted(manifest["files"]))
    return out




def _serve_config(artifacts: dict[str, Any], experiments: Path, **overrides: Any) -> Any:
    from recsys.serving.config import ServeConfig

    values: dict[str, Any] = {
        "registry": artifacts["registry"], "ranker": artifacts["ranker"], "data": artifacts["data"],
        "experiments": experiments, "host": "127.0.0.1", "port": 0, "workers": 2, "exposure_flush_s": 0.2,
        "auth_token": TOKEN,
    }
    values.update(overrides)
    return ServeConfig(**values)


@pytest.fixture(scope="module")
def ab_server(artifacts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    base = tmp_path_factory.mktemp("ab")
    (base / "experiments.yaml").write_text(AB_CONFIG)
    srv = ServerThread(_serve_config(artifacts, base / "experiments.yaml", exposure_dir=base / "exposures"))
    yield srv
    srv.stop()


def _rank_request(user: str, items: list[str], request_id: str, context: dict[str, str] | None = None, **kw: Any) -> Any:
    request = pb.RankRequest(request_id=request_id, user_id=user, **kw)
    request.candidates.extend(pb.Candidate(item_id=i) for i in items)
    for key, value in (context or {}).items():
        request.context[key].text = value
    return request


def _until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ end to end


def test_two_variant_experiment_end_to_end(ab_server: ServerThread, tmp_path: Path) -> None:
    """Serve a few hundred users, simulate a better click model for the treatment, analyse the
    exposure log with the CLI: treatment better (lift CI above zero), no SRM, latency guardrail run."""
    from recsys.cli import main
    from recsys.experiments.simulate import ClickModel, simulate_clicks
    from recsys.serving.exposure import read_exposures

    config = parse_config(AB_CONFIG)
    catalogue = [f"i{j}" for j in range(200)]
    rng = np.random.default_rng(0)
    jobs = []
    for u in range(300):
        for k in range(2):
            items = [catalogue[j] for j in rng.choice(200, 20, replace=False)]
            jobs.append((f"ab-u{u:04d}", f"ab-r{u:04d}-{k}", f"ab-s{u:04d}", items))

    def send(job: tuple[str, str, str, list[str]]) -> tuple[str, str, Any]:
        user, rid, session, items = job
        return user, rid, ab_server.stub.Rank(_rank_request(user, items, rid, {"session_id": session}, top_k=10), timeout=30)

    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(send, jobs))

    arms: dict[str, str] = {}
    for user, rid, response in served:
        expected = assign(config, user, rid).label
        assert response.variant == expected and re.fullmatch(rf"pop-test/(control|treatment)@{config.version}", expected)
        assert arms.setdefault(user, response.variant) == response.variant  # a user sees one variant
        arm = response.variant.split("/")[1].split("@")[0]
        assert response.model_version == {"control": "v0001", "treatment": "baseline:popularity"}[arm]
        assert len(response.items) == 10
        scores = [i.score for i in response.items]
        assert scores == sorted(scores, reverse=True)
    assert 100 < sum(v.startswith("pop-test/treatment") for v in arms.values()) < 200

    ab_server.app.exposure.flush()
    exposures = read_exposures(ab_server.app.exposure.directory)
    mine = exposures.filter(pl.col("request_id").str.starts_with("ab-r"))
    assert mine.height == 600 * 10
    assert mine["latency_ms"].null_count() == 0 and (mine["latency_ms"] > 0).all()
    sessions = mine.select("user_id", "session_id").unique()
    assert (sessions["session_id"] == sessions["user_id"].str.replace("ab-u", "ab-s")).all()

    events = simulate_clicks(mine, {"control": ClickModel(0.05), "treatment": ClickModel(0.12)}, seed=1)
    mine.write_parquet(tmp_path / "exposures.parquet")
    events.write_parquet(tmp_path / "events.parquet")
    (tmp_path / "experiments.yaml").write_text(AB_CONFIG)
    code = main([
        "experiment", "analyze", "--config", str(tmp_path / "experiments.yaml"),
        "--exposures", str(tmp_path / "exposures.parquet"), "--events", str(tmp_path / "events.parquet"),
        "--out", str(tmp_path / "report"), "--window", "1h",
    ])
    assert code == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (exp,) = report["experiments"]
    assert exp["experiment"] == "pop-test" and not exp["srm"]["mismatch"]
    ctr = next(r for r in exp["results"] if r["metric"] == "ctr" and r["arm"] == "treatment")
    assert ctr["abs_ci"][0] > 0 and ctr["p_value"] < 0.05
    assert exp["verdicts"]["treatment"].startswith("better than control")
    assert [g["name"] for g in exp["guardrails"]] == ["latency_ms"]  # the exposure log carries latency
    assert all(a["latency_p95_ms"] is not None and a["latency_p95_ms"] > 0 for a in exp["arms"])

    # Per-variant latency series are experiment/arm, without the config version.
    text = ab_server.app.metrics.exposition().decode()
    assert 'rpc="Rank",variant="pop-test/treatment"' in text and 'rpc="Rank",variant="pop-test/control"' in text
    assert not re.search(r'recsys_request_seconds_count\{[^}]*variant="[^"]*@', text)


def test_popularity_baseline_is_the_live_popularity_feature(ab_server: ServerThread, artifacts: dict[str, Any]) -> None:
    """Rank under the baseline = the state's item_pop_7d; Recommend = top popular unseen items."""
    from recsys.serving import engine

    app = ab_server.app
    live = app.live
    config = parse_config(AB_CONFIG)
    treated = [u for u in (f"u{k}" for k in range(300)) if assign(config, u, "x").variant == "treatment"]
    treated = [u for u in treated if live.user_idx(u) >= 0]
    user = treated[0]
    items = [f"i{j}" for j in range(0, 200, 3)]
    t = pb.RankRequest().request_time
    t.FromDatetime(datetime(2026, 1, 31, 12, tzinfo=timezone.utc))  # just after the synthetic log
    t_us = t.seconds * 1_000_000
    request = _rank_request(user, [*items, "not-in-catalogue"], "pop-rank", request_time=t)
    response = ab_server.stub.Rank(request)
    assert response.model_version == "baseline:popularity"
    idx = live.catalogue.lookup(items)
    features = live.state.compute(live.user_idx(user), idx, t_us)
    pop = features.matrix[:, features.names.index("item_pop_7d")].astype(np.float64)
    got = {i.item_id: i for i in response.items}
    assert pop.max() > 1.0 and (pop > 0).mean() > 0.5
    np.testing.assert_allclose([got[i].score for i in items], pop, rtol=1e-5, atol=0)
    assert got["not-in-catalogue"].score == 0.0 and got["not-in-catalogue"].source == pb.ITEM_SOURCE_NO_TEXT
    assert engine.popularity_window(live.state) == list(live.state.config.decay_days).index(7.0)

    rec = ab_server.stub.Recommend(
        pb.RecommendRequest(request_id="pop-rec", user_id=user, top_k=10, exclude_item_ids=["i0"], request_time=t)
    )
    assert rec.model_version == "baseline:popularity" and rec.variant.startswith("pop-test/treatment@")
    seen = set(live.state.user_item.row(live.user_idx(user))[0].tolist())
    all_pop = engine.popularity(live.state, np.arange(len(live.catalogue.ids)), t_us)
    allowed = [j for j in np.argsort(-all_pop, kind="stable").tolist() if j not in seen and live.catalogue.ids[j] != "i0"]
    ids = [i.item_id for i in rec.items]
    assert len(ids) == 10 and not ({live.catalogue.index[i] for i in ids} & seen) and "i0" not in ids
    assert ids == [live.catalogue.ids[j] for j in allowed[:10]]
    np.testing.assert_allclose([i.score for i in rec.items], all_pop[allowed[:10]], rtol=1e-12)


# ------------------------------------------------------------------------------------------ admin RPCs


def test_explain_assignment_rpc_and_model_info(ab_server: ServerThread) -> None:
    config = parse_config(AB_CONFIG)
    admin = ab_server.admin
    request = pb.ExplainAssignmentRequest(user_id="ab-u0007", request_id="dbg-1")
    request.context["session_id"].text = "ab-s0007"
    request.context["country"].text = "US"
    with pytest.raises(grpc.RpcError) as info:
        admin.ExplainAssignment(request)  # operator RPC: token required
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    reply = admin.ExplainAssignment(request, metadata=AUTH)
    debug = json.loads(reply.json)
    served = ab_server.stub.Rank(_rank_request("ab-u0007", ["i1", "i2"], "dbg-1", {"session_id": "ab-s0007"}))
    assert reply.label == debug["label"] == served.variant == assign(config, "ab-u0007", "dbg-1").label
    assert reply.config_version == debug["config_version"] == config.version
    assert reply.ranker == debug["ranker"] in ("blend", "popular")
    assert debug["context"] == {"session_id": "ab-s0007", "country": "US"}
    (row,) = debug["experiments"]
    assert row["experiment"] == "pop-test" and row["unit_id"] == "ab-u0007" and row["enrolled"]

    from recsys.serving.client import RankingClient

    with RankingClient(f"127.0.0.1:{ab_server.port}", token=TOKEN) as client:
        again = client.explain_assignment("ab-u0007", "dbg-1", {"session_id": "ab-s0007", "country": "US"})
        assert {**again, "time": None} == {**debug, "time": None}
    with pytest.raises(grpc.RpcError) as info:
        admin.ExplainAssignment(pb.ExplainAssignmentRequest(request_id="x"), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("user_id")

    model_info = admin.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH)
    assert model_info.experiments.config_version == config.version and model_info.experiments.name == "serving-e2e"
    assert not model_info.experiments.last_error and model_info.experiments.refused == 0
    variants = {v.variant: v for v in model_info.variants}
    assert set(variants) == {"blend", "popular"}
    assert variants["blend"].model_version == "v0001" and variants["blend"].feature_names
    assert variants["popular"].baseline == "popularity" and variants["popular"].model_version == "baseline:popularity"
    with pytest.raises(grpc.RpcError) as info:
        admin.Reload(pb.ReloadRequest(variant="popular"), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# ------------------------------------------------------------------------------------------ hot reload


def test_config_hot_reload_applies_good_edits_and_refuses_bad_ones(artifacts: dict[str, Any], tmp_path: Path) -> None:
    shutil.copytree(artifacts["ranker"], tmp_path / "ranker")  # `blender: ranker` is relative to the file
    path = tmp_path / "experiments.yaml"
    path.write_text(RELOAD_A)
    srv = ServerThread(_serve_config(artifacts, path, ranker=None, experiments_poll_s=0.1))
    a, b = parse_config(RELOAD_A), parse_config(RELOAD_B.replace("VERSION", artifacts["v2"]))
    failures: list[str] = []
    labels: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:  # traffic throughout: no request may fail while configs change
        k = 0
        while not stop.is_set():
            k += 1
            try:
                r = srv.stub.Rank(_rank_request(f"h{k % 50}", ["i1", "i2", "i3"], f"h-{k}", {"session_id": f"s{k % 7}"}), timeout=10)
                labels.add(r.variant.split("@")[1])
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    def status() -> Any:
        return srv.admin.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH).experiments

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        assert status().config_version == a.version and set(srv.app.holders) == {"blend", "popular"}
        assert srv.app.ranker_dir("blend") == tmp_path / "ranker"

        # A good edit: the new ranker is loaded, then the config swapped; the unused baseline unloaded.
        _write(path, RELOAD_B.replace("VERSION", artifacts["v2"]))
        _until(lambda: status().config_version == b.version, what="config B")
        assert srv.app.holders["fresh"].current.version == artifacts["v2"]
        _until(lambda: "popular" not in srv.app.holders, what="the unused baseline to be unloaded")
        for k in range(20):
            ctx = {"session_id": f"sess-{k}"}
            r = srv.stub.Rank(_rank_request("some-user", ["i1", "i2"], f"b-{k}", ctx))
            expected = assign(b, "some-user", f"b-{k}", ctx)
            assert r.variant == expected.label and r.variant.startswith("exp-b/")
            assert r.model_version == {"blend": "v0001", "fresh": artifacts["v2"]}[expected.ranker]
        no_session = srv.stub.Rank(_rank_request("some-user", ["i1"], "b-none"))
        assert no_session.variant == f"default/blend@{b.version}"  # session experiments need a session_id

        # Malformed edits are refused; the running config keeps serving.
        bad_edits = [
            ("rankers: [unclosed\n", "not valid YAML"),
            (RELOAD_B.replace("VERSION", artifacts["v2"]).replace("unit: session", "unit: sesion"), "unit"),
            (RELOAD_B.replace("VERSION", "v9999"), "v9999"),  # parses, but its model cannot load
        ]
        for n, (text, message) in enumerate(bad_edits, start=1):
            _write(path, text)
            s = _until(lambda n=n: status().refused == n and status(), what=f"bad edit {n} to be refused")
            assert s.config_version == b.version and message in s.last_error, s.last_error
            assert s.last_error_at.seconds > 0
            r = srv.stub.Rank(_rank_request("some-user", ["i1"], f"bad-{n}", {"session_id": "sess-1"}))
            assert r.variant.endswith(f"@{b.version}")
        assert set(srv.app.holders) == {"blend", "fresh"}  # nothing from the refused edits was installed

        # Fixing the file applies it and clears the error.
        c_text = (
            RELOAD_B.replace("VERSION", artifacts["v2"]).replace("coverage: 1.0", "coverage: 0.9")
            .replace("default_ranker: blend", "default_ranker: twin")
            .replace("rankers:\n", "rankers:\n  twin: {model: v0001, blender: ranker}\n")
        )
        _write(path, c_text)
        c = parse_config(c_text)
        s = _until(lambda: status().config_version == c.version and status(), what="config C")
        assert not s.last_error and s.refused == 3
        assert srv.app.holders["twin"].current is srv.app.holders["blend"].current  # same spec: one model
        assert srv.stub.Rank(_rank_request("x", ["i1"], "c-1")).variant == f"default/twin@{c.version}"
    finally:
        stop.set()
        thread.join()
        srv.stop()
    assert not failures, failures[:3]
    assert {a.version, b.version} <= labels


# ------------------------------------------------------------------------------------------ startup, flags


def test_startup_refuses_bad_experiment_setups(artifacts: dict[str, Any], tmp_path: Path) -> None:
    from recsys.errors import ConfigError, InputError
    from recsys.serving.server import ServingApp

    with pytest.raises(ConfigError, match="does not exist"):
        ServingApp(_serve_config(artifacts, tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text(AB_CONFIG.replace("coverage: 1.0", "coverage: 2"))
    with pytest.raises(ConfigError, match=r"layers\[0\].experiments\[0\].coverage"):
        ServingApp(_serve_config(artifacts, tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="exclude each other"):
        _serve_config(artifacts, tmp_path / "bad.yaml", version="v0001")
    (tmp_path / "unknown.yaml").write_text(AB_CONFIG.replace("model: v0001", "model: v0404"))
    with pytest.raises(InputError, match="v0404"):
        ServingApp(_serve_config(artifacts, tmp_path / "unknown.yaml"))


def test_serve_cli_experiment_flags(tmp_path: Path) -> None:
    import argparse

    from recsys.serving.serve_cli import configure

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--registry", "reg", "--experiments", "exp.yaml", "--experiments-poll-s", "2"])
    assert args.experiments == Path("exp.yaml") and args.experiments_poll_s == 2.0
    defaults = parser.parse_args(["--registry", "reg"])
    assert defaults.experiments is None and defaults.experiments_poll_s == 5.0
