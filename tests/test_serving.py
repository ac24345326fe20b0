"""The gRPC ranking service end to end: a real server on a free port with tiny ONNX towers and a real
LightGBM ranker; every RPC, every validation error, hot reload under load, auth/TLS, the exposure
log (read back by `recsys prepare`), graceful shutdown and kill -9 in a real `recsys serve` process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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

from recsys.serving.proto import ranking_pb2 as pb  # noqa: E402
from recsys.serving.proto import ranking_pb2_grpc as pb_grpc  # noqa: E402
from tests.artifacts import ServerThread, spawn_serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 1, 31, 12, 0, tzinfo=timezone.utc)  # after the synthetic log (Jan 2026)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> dict[str, Path]:
    """Registry with one exported tiny matcher (+ catalogue embeddings) and a LightGBM ranker."""
    from recsys.data.prepared import PreparedData
    from recsys.features import EmbeddingMatcher, mean_pool_encoder
    from recsys.ranker import LambdaMARTParams
    from recsys.scoring.store import EmbeddingStore
    from tests.test_export import make_tiny_checkpoint
    from training.export import ExportConfig, export_to_registry
    from training.ranker import RankerConfig, train_ranker

    base = tmp_path_factory.mktemp("serving")
    ckpt = make_tiny_checkpoint(base / "ckpt", seed=3)
    version, _ = export_to_registry(ckpt, base / "reg", ExportConfig(), data=prepared_dir)
    data = PreparedData.load(prepared_dir)
    store = EmbeddingStore.load(base / "reg" / "versions" / version / "embeddings")
    emb = np.asarray(store.matrix[store.positions(data.items["item_id"].cast(pl.Utf8).to_list())])
    # The ranker learns from match scores of a cheap stand-in user tower; serving feeds it the ONNX
    # tower's. Same feature names, so it is a valid (if slightly mismatched) tiny model.
    train_ranker(data, base / "ranker", EmbeddingMatcher(emb, mean_pool_encoder(emb)), RankerConfig(lambdamart=LambdaMARTParams(threads=2, num_rounds=40)))
    return {"registry": base / "reg", "ranker": base / "ranker", "data": prepared_dir, "base": base}




def _config(artifacts: dict[str, Path], **overrides: Any) -> Any:
    from recsys.serving.config import ServeConfig

    values: dict[str, Any] = {
        "registry": artifacts["registry"], "ranker": artifacts["ranker"], "data": artifacts["data"],
        "host": "127.0.0.1", "port": 0, "workers": 2, "exposure_flush_s": 0.2,
        # Served lists not folded as impressions: these tests compare scores with the batch scorer's
        # state, which has not seen them (tests/test_state_serving.py covers folding).
        "fold_exposures": False,
    }
    values.update(overrides)
    return ServeConfig(**values)


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(_config(artifacts, exposure_dir=tmp_path_factory.mktemp("exposures"), max_candidates=300))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[Any]:
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.RankingServiceStub(channel)
    channel.close()


def _rank_request(user: str, items: list[str], **kw: Any) -> Any:
    request = pb.RankRequest(request_id=kw.pop("request_id", f"r-{time.monotonic_ns()}"), user_id=user, **kw)
    request.candidates.extend(pb.Candidate(item_id=i) for i in items)
    return request


def _items(n: int, start: int = 0) -> list[str]:
    return [f"i{j}" for j in range(start, start + n)]


# ------------------------------------------------------------------------------------------ contract


def test_checked_in_stubs_match_the_proto(tmp_path: Path) -> None:
    from recsys.serving.protogen import generate

    for fresh in generate(tmp_path):
        checked_in = ROOT / "recsys/serving/proto" / fresh.name
        assert fresh.read_bytes() == checked_in.read_bytes(), f"{checked_in} is stale: run `make protos`"


def test_serving_code_never_imports_torch() -> None:
    code = (
        "import sys, recsys.serving.server, recsys.serving.client, recsys.serving.serve_cli; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------------------------------ Rank


def test_rank_replies_every_candidate_best_first_inline_packed_and_explained(server: ServerThread, stub: Any) -> None:
    """The reply's shape; its scores are the shared request path's (tests/test_request_path.py)."""
    items = _items(100)
    request = _rank_request("u5", items, top_k=100, explain=True)
    request.request_time.FromDatetime(T0)
    request.context["device"].text = "mobile"
    response = stub.Rank(request)
    assert response.model_version == "v0001" and response.variant == "control"
    assert [i.position for i in response.items] == list(range(100))
    assert all(i.source == pb.ITEM_SOURCE_CATALOGUE for i in response.items)
    expected = {i.item_id: i.score for i in response.items}
    request.explain = False  # explain runs on the worker pool, a plain Rank inline on the event loop
    assert {i.item_id: i.score for i in stub.Rank(request).items} == expected
    del request.candidates[:]
    request.candidate_ids.extend(items)  # the packed form of the same list
    assert {i.item_id: i.score for i in stub.Rank(request).items} == expected
    scores = [i.score for i in response.items]
    assert scores == sorted(scores, reverse=True)
    names = set(server.app.holders["control"].current.ranker.feature_names)
    for item in response.items[:5]:  # TreeSHAP: additive
        assert item.bias + sum(c.contribution for c in item.contributions) == pytest.approx(item.score, abs=1e-6)
        assert {c.name for c in item.contributions} == names


def test_rank_cold_items_unknown_users_and_history_override(server: ServerThread, stub: Any) -> None:
    request = _rank_request("never-seen-user", _items(10), top_k=0)
    request.candidates.add(item_id="brand-new", text="alpine trail backpack with compass")
    request.candidates.add(item_id="no-text-item")
    response = stub.Rank(request)
    by_id = {i.item_id: i for i in response.items}
    assert len(by_id) == 12
    assert by_id["brand-new"].source == pb.ITEM_SOURCE_ENCODED and by_id["brand-new"].match_score != 0.0
    assert by_id["no-text-item"].source == pb.ITEM_SOURCE_NO_TEXT and by_id["no-text-item"].match_score == 0.0
    assert all(np.isfinite(i.score) for i in response.items)

    # The encoding of a cold item is the item tower's, whichever request batch it went in.
    model = server.app.holders["control"].current
    expected = model.encode_texts(["alpine trail backpack with compass"])[0]
    assert np.allclose(model.cold_cache.get("alpine trail backpack with compass"), expected, atol=1e-5)

    plain = stub.Rank(_rank_request("u7", _items(30), request_time=None))
    override = _rank_request("u7", _items(30))
    for j in (40, 41, 42):
        override.history.events.add(item_id=f"i{j}", event_type="purchase")
    changed = stub.Rank(override)
    assert [i.match_score for i in plain.items] != [i.match_score for i in changed.items]
    empty = _rank_request("u7", _items(30))
    empty.history.SetInParent()  # an explicitly empty history: treated as a user without history
    assert len(stub.Rank(empty).items) == 30


def test_cold_texts_from_concurrent_requests_share_one_encoder_pass(server: ServerThread) -> None:
    model = server.app.holders["control"].current
    batcher = server.app.batcher
    texts = [f"vintage camera lens kit {k}" for k in range(8)]
    batcher.batch_sizes.clear()

    async def burst() -> list[np.ndarray]:
        return list(await asyncio.gather(*(batcher.encode(model, [t, "shared text for all"]) for t in texts)))

    results = server.call(burst())
    assert batcher.batch_sizes[:1] == [9]  # 8 distinct + 1 shared text, one pass
    direct = model.encode_texts([*texts, "shared text for all"])
    for k, vectors in enumerate(results):
        np.testing.assert_allclose(vectors, direct[[k, 8]], atol=1e-5)


# ------------------------------------------------------------------------------------------ validation


def _expect(code: Any, call: Any, *, field: str | None = None) -> Any:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    if field is not None:
        assert info.value.details().startswith(field), info.value.details()
        trailing = dict(info.value.trailing_metadata() or ())
        assert trailing.get("invalid-field") == field
    return info.value


def _bad_requests() -> list[tuple[str, Any, str]]:
    long_id = "x" * 300
    cases: list[tuple[str, Any, str]] = [
        ("empty candidates", _rank_request("u1", []), "candidates"),
        ("too many candidates", _rank_request("u1", _items(301)), "candidates"),
        ("duplicate ids", _rank_request("u1", ["i1", "i2", "i1"]), "candidates[2].item_id"),
        ("missing request id", _rank_request("u1", ["i1"], request_id=""), "request_id"),
        ("missing user id", _rank_request("", ["i1"]), "user_id"),
        ("missing item id", _rank_request("u1", ["i1", ""]), "candidates[1].item_id"),
        ("oversized id", _rank_request(long_id, ["i1"]), "user_id"),
        ("negative top_k", _rank_request("u1", ["i1"], top_k=-1), "top_k"),
        ("huge top_k", _rank_request("u1", ["i1"], top_k=5000), "top_k"),
    ]
    text = _rank_request("u1", ["i1"])
    text.candidates.add(item_id="new", text="y" * 9000)
    cases.append(("oversized text", text, "candidates[1].text"))
    history = _rank_request("u1", ["i1"])
    history.history.events.add(item_id="i2", event_type="teleport")
    cases.append(("bad history event", history, "history.events[0].event_type"))
    feature = _rank_request("u1", ["i1"])
    feature.candidates[0].features["not_a_feature"] = 1.0
    cases.append(("unknown feature", feature, "candidates.features"))
    context = _rank_request("u1", ["i1"])
    context.context["device"].SetInParent()
    cases.append(("empty context value", context, "context[device]"))
    both = _rank_request("u1", ["i1"], candidate_ids=["i2"])
    cases.append(("candidates and candidate_ids", both, "candidate_ids"))
    cases.append(("packed duplicate", pb.RankRequest(request_id="r", user_id="u1", candidate_ids=["i1", "i1"]), "candidate_ids[1]"))
    cases.append(("packed empty id", pb.RankRequest(request_id="r", user_id="u1", candidate_ids=["i1", ""]), "candidate_ids[1]"))
    cases.append(("packed too many", pb.RankRequest(request_id="r", user_id="u1", candidate_ids=_items(301)), "candidate_ids"))
    return cases


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_invalid_rank_requests_name_the_field(stub: Any, case: tuple[str, Any, str]) -> None:
    _, request, field = case
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Rank(request), field=field)


def test_invalid_recommend_and_event_requests(stub: Any) -> None:
    bad_k = pb.RecommendRequest(request_id="r", user_id="u1", top_k=0)
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Recommend(bad_k), field="top_k")
    bad_retrieve = pb.RecommendRequest(request_id="r", user_id="u1", top_k=10, retrieve_k=5)
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Recommend(bad_retrieve), field="retrieve_k")
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.LogEvents(pb.LogEventsRequest()), field="events")
    events = pb.LogEventsRequest()
    events.events.add(user_id="u1", item_id="i1", event_type="click")
    events.events.add(user_id="u1", item_id="i1", event_type="rating")
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.LogEvents(events), field="events[1].value")
    events = pb.LogEventsRequest()
    events.events.add(user_id="u1", event_type="click")
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.LogEvents(events), field="events[0].item_id")


def test_serve_config_refuses_bad_values_naming_them(artifacts: dict[str, Path]) -> None:
    from recsys.errors import ConfigError

    for field, value, message in (
        ("inline_candidates", -1, "inline_candidates"), ("max_inflight", 0, "max_inflight"), ("port", 70000, "port"),
        ("state", "localhost:6379", "redis://HOST:PORT/DB"), ("consistency_wait_ms", -1, "consistency_wait_ms"),
        ("snapshot_events", 0, "snapshot_events"),
    ):
        with pytest.raises(ConfigError, match=message):
            _config(artifacts, **{field: value})
    assert _config(artifacts, inline_candidates=0).inline_candidates == 0  # 0 = every request on the pool


def test_load_shedding_and_deadlines(server: ServerThread, stub: Any) -> None:
    app = server.app

    async def shift(delta: int) -> None:  # on the server's loop: no lost update against its own counting
        app.inflight += delta

    server.call(shift(app.config.max_inflight))  # as if the server were full
    try:
        _expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: stub.Rank(_rank_request("u1", _items(5))))
    finally:
        server.call(shift(-app.config.max_inflight))
    # gRPC rounds deadlines to the millisecond: an inline 100-item Rank (~1 ms) could beat it, so the
    # request is one that cannot (explain over 300 items, on the worker pool).
    slow = _rank_request("u1", _items(300), explain=True)
    _expect(grpc.StatusCode.DEADLINE_EXCEEDED, lambda: stub.Rank(slow, timeout=1e-5))
    assert len(stub.Rank(_rank_request("u1", _items(5)), timeout=5).items) == 5


# ------------------------------------------------------------------------------------------ Recommend, events


def test_recommend_excludes_seen_and_given_items(server: ServerThread, stub: Any) -> None:
    live = server.app.live
    user = live.user_idx("u3")
    seen = {live.catalogue.ids[i] for i in live.state.user_item.row(user)[0].tolist()}
    assert seen
    response = stub.Recommend(pb.RecommendRequest(request_id="rec-1", user_id="u3", top_k=20, exclude_item_ids=["i0", "i1"]))
    got = [i.item_id for i in response.items]
    assert len(got) == 20 and len(set(got)) == 20
    assert not (set(got) & seen) and not ({"i0", "i1"} & set(got))
    scores = [i.score for i in response.items]
    assert scores == sorted(scores, reverse=True)
    with_seen = stub.Recommend(pb.RecommendRequest(request_id="rec-2", user_id="u3", top_k=200, include_seen=True))
    assert seen <= {i.item_id for i in with_seen.items}
    cold_user = stub.Recommend(pb.RecommendRequest(request_id="rec-3", user_id="nobody", top_k=5, explain=True))
    assert len(cold_user.items) == 5 and cold_user.items[0].contributions


def test_events_update_histories_in_real_time(server: ServerThread, stub: Any) -> None:
    live = server.app.live
    before = live.events_applied
    events = pb.LogEventsRequest()
    for j in (11, 12):
        events.events.add(user_id="fresh-user", item_id=f"i{j}", event_type="purchase", request_id="x1")
    events.events.add(user_id="fresh-user", item_id="not-in-catalogue", event_type="click")
    response = stub.LogEvents(events)
    assert (response.accepted, response.unknown_items, response.new_users) == (2, 1, 1)
    user = live.user_idx("fresh-user")
    assert sorted(live.state.history(user, T0).item_idx[0][:2].tolist()) == [11, 12]

    def stream() -> Iterator[Any]:
        for j in (13, 14, 15):
            batch = pb.LogEventsRequest()
            batch.events.add(user_id="fresh-user", item_id=f"i{j}", event_type="Click")
            yield batch

    assert stub.StreamEvents(stream()).accepted == 3
    assert live.events_applied == before + 5
    rec = stub.Recommend(pb.RecommendRequest(request_id="rec-4", user_id="fresh-user", top_k=50))
    assert not {f"i{j}" for j in range(11, 16)} & {i.item_id for i in rec.items}  # now seen
    ranked = stub.Rank(_rank_request("fresh-user", _items(20, 10), explain=True, top_k=1))
    hist_len = {c.name: c.value for c in ranked.items[0].contributions}["user_hist_len"]
    assert hist_len == 5


def test_inline_rank_waits_for_event_writes_on_the_pool_not_the_event_loop(server: ServerThread, stub: Any) -> None:
    """Small Rank requests run on the event loop; while events hold the feature state's write lock
    such a request moves to a worker thread, so the loop keeps answering other RPCs meanwhile."""
    live = server.app.live
    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with live.lock.write():
            held.set()
            release.wait(20)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert held.wait(5)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(stub.Rank, _rank_request("u5", _items(50)), timeout=30)
            time.sleep(0.3)
            assert not pending.done()  # it waits for the writer ...
            info = server.admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)  # ... off the loop
            assert info.variants
            release.set()
            response = pending.result(30)
    finally:
        release.set()
        thread.join(10)
    assert len(response.items) == 50


# ------------------------------------------------------------------------------------------ operators


def test_health_reflection_model_info_and_metrics(server: ServerThread) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "recsys.v1.RankingService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(iter(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
        names = {s.name for s in answer.list_services_response.service}
        assert {"recsys.v1.RankingService", "recsys.v1.ModelAdmin", "grpc.health.v1.Health"} <= names
        info = pb_grpc.ModelAdminStub(channel).GetModelInfo(pb.GetModelInfoRequest())
        assert info.variants[0].variant == "control" and info.variants[0].catalogue_items == 200
        assert "CPUExecutionProvider" in info.variants[0].providers
        assert info.known_users == len(server.app.live.users) and info.events_applied >= 5
        assert not info.HasField("experiments")  # served without --experiments
        _expect(  # the assignment debug call needs an experiment config
            grpc.StatusCode.FAILED_PRECONDITION,
            lambda: pb_grpc.ModelAdminStub(channel).ExplainAssignment(pb.ExplainAssignmentRequest(user_id="u1")),
        )
    text = server.app.metrics.exposition().decode()
    assert 'recsys_request_seconds_bucket{le="0.01",rpc="Rank",variant="control"}' in text
    assert 'recsys_request_errors_total{code="INVALID_ARGUMENT",rpc="Rank"}' in text
    assert 'recsys_model_info{variant="control",version="v0001"} 1.0' in text
    assert 'recsys_items_scored_total{source="encoded"}' in text


def _clone_version(registry_root: Path, corrupt: str | None = None, garbage: str | None = None) -> str:
    """Register a copy of v0001; `corrupt` damages a file after hashing, `garbage` before."""
    from recsys.registry import Registry

    registry = Registry(registry_root)
    src = registry.path("v0001")
    manifest = registry.manifest("v0001")
    staging = registry.staging_dir()
    shutil.rmtree(staging)
    shutil.copytree(src, staging)
    (staging / "manifest.json").unlink()
    if garbage:
        (staging / garbage).write_bytes(b"not an onnx model")
    fields = {k: v for k, v in manifest.items() if k not in ("files", "version", "created", "format")}
    version = registry.register(staging, fields, sorted(manifest["files"]))
    if corrupt:
        path = registry.path(version) / corrupt
        path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    return version


def test_hot_reload_under_load_and_broken_versions_are_refused(server: ServerThread, artifacts: dict[str, Path]) -> None:
    from recsys.registry import Registry

    registry = Registry(artifacts["registry"])
    good = _clone_version(artifacts["registry"])
    registry.promote(good)
    failures: list[str] = []
    versions: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        with grpc.insecure_channel(server.target) as channel:
            s = pb_grpc.RankingServiceStub(channel)
            while not stop.is_set():
                try:
                    versions.add(s.Rank(_rank_request("u9", _items(100), top_k=10), timeout=10).model_version)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            admin = pb_grpc.ModelAdminStub(channel)
            time.sleep(0.3)
            reply = admin.Reload(pb.ReloadRequest())
            assert (reply.previous_version, reply.model_version) == ("v0001", good)
            time.sleep(0.3)
            corrupt = _clone_version(artifacts["registry"], corrupt="user.onnx")
            err = _expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: admin.Reload(pb.ReloadRequest(version=corrupt)))
            assert "user.onnx" in err.details()
            garbage = _clone_version(artifacts["registry"], garbage="item.opt.onnx")
            err = _expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: admin.Reload(pb.ReloadRequest(version=garbage)))
            assert "item.opt.onnx" in err.details()
            _expect(grpc.StatusCode.NOT_FOUND, lambda: admin.Reload(pb.ReloadRequest(version="v9999")))
            _expect(grpc.StatusCode.NOT_FOUND, lambda: admin.Reload(pb.ReloadRequest(variant="treatment")))
            time.sleep(0.2)
            assert admin.GetModelInfo(pb.GetModelInfoRequest()).variants[0].model_version == good
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert versions == {"v0001", good}
    text = server.app.metrics.exposition().decode()
    assert 'recsys_reloads_total{outcome="refused",variant="control"} 3.0' in text


# ------------------------------------------------------------------------------------------ exposure log


def test_exposure_log_reads_back_through_recsys_prepare(server: ServerThread, stub: Any, tmp_path: Path, artifacts: dict[str, Path]) -> None:
    from recsys.cli import main
    from recsys.data.prepared import PreparedData
    from recsys.serving.exposure import read_exposures

    request = _rank_request("u2", _items(12), top_k=5, request_id="exp-check")
    request.context["session_id"].text = "sess-42"
    response = stub.Rank(request)
    server.app.exposure.flush()
    log = read_exposures(server.app.exposure.directory)
    rows = log.filter(pl.col("request_id") == "exp-check").sort("position")
    assert rows["item_id"].to_list() == [i.item_id for i in response.items]
    assert rows["position"].to_list() == list(range(5)) and set(rows["event_type"]) == {"impression"}
    assert rows["model_version"].to_list() == [response.model_version] * 5 and rows["variant"][0] == "control"
    np.testing.assert_allclose(rows["score"].to_numpy(), [i.score for i in response.items])
    assert set(rows["session_id"]) == {"sess-42"} and rows["latency_ms"].n_unique() == 1 and rows["latency_ms"][0] > 0

    # Served impressions + what users did next -> prepare (catalogue items; the clicks follow exposures).
    data = PreparedData.load(artifacts["data"])
    shown = log.filter(pl.col("source") == "catalogue")
    clicks = shown.filter(pl.col("position") == 0).with_columns(
        pl.lit("click").alias("event_type"), (pl.col("timestamp") + pl.duration(seconds=5)).alias("timestamp")
    )
    past = data.events().select("user_id", "item_id", "event_type", "timestamp", "request_id", "position").collect()
    events = pl.concat([past, shown.select(past.columns), clicks.select(past.columns)], how="vertical_relaxed")
    events.write_parquet(tmp_path / "events.parquet")
    data.items.select("item_id", "title", "description", "tags", "category").write_parquet(tmp_path / "items.parquet")
    code = main(["prepare", "--events", str(tmp_path / "events.parquet"), "--items", str(tmp_path / "items.parquet"), "--out", str(tmp_path / "prep")])
    assert code == 0
    prepared = pl.read_parquet(tmp_path / "prep" / "events.parquet").filter(pl.col("request_id") == "exp-check")
    assert prepared.filter(pl.col("event_type") == "impression").height == 5


# ------------------------------------------------------------------------------------------ security


def _certs(out: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate (openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=out)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    (out / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        extra = ["-extfile", "san.cnf"] if name == "server" else []
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *extra)
    return {p.stem + p.suffix.replace(".", "_"): p for p in out.iterdir()}


def test_mutual_tls_and_token_auth(artifacts: dict[str, Path], tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from recsys.serving.client import RankingClient

    c = _certs(tmp_path)
    srv = ServerThread(_config(
        artifacts, tls_cert=c["server_pem"], tls_key=c["server_key"], tls_client_ca=c["ca_pem"], auth_token="s3cret", auth_all=True,
    ))
    try:
        target = f"localhost:{srv.port}"
        tls: dict[str, Any] = {"tls_ca": c["ca_pem"], "client_cert": c["client_pem"], "client_key": c["client_key"]}
        with RankingClient(target, token="s3cret", **tls) as client:
            assert len(client.rank("u1", ["i1", "i2"]).items) == 2
            assert client.model_info().variants[0].variant == "control"
        with RankingClient(target, **tls) as anonymous:
            _expect(grpc.StatusCode.UNAUTHENTICATED, lambda: anonymous.model_info())
            _expect(grpc.StatusCode.UNAUTHENTICATED, lambda: anonymous.rank("u1", ["i1"]))
            health = health_pb2_grpc.HealthStub(anonymous.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
        with RankingClient(target, token="wrong", **tls) as wrong:
            _expect(grpc.StatusCode.UNAUTHENTICATED, lambda: wrong.reload())
        with RankingClient(target, token="s3cret", tls_ca=c["ca_pem"]) as no_client_cert:
            _expect(grpc.StatusCode.UNAVAILABLE, lambda: no_client_cert.rank("u1", ["i1"]))
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ process lifecycle


def _spawn(artifacts: dict[str, Path], tmp: Path, *extra: str, ready_name: str = "ready.json") -> tuple[subprocess.Popen[bytes], str]:
    return spawn_serve(  # type: ignore[no-any-return]
        artifacts, tmp, "--exposure-dir", str(tmp / "exposures"), "--threads", "2", *extra, ready_name=ready_name
    )


def _load(target: str, served: list[str], failed: list[str], stop: threading.Event, tag: str) -> None:
    with grpc.insecure_channel(target) as channel:
        s = pb_grpc.RankingServiceStub(channel)
        k = 0
        while not stop.is_set():
            rid = f"{tag}-{threading.get_ident()}-{k}"
            k += 1
            try:
                s.Rank(_rank_request("u4", _items(50), top_k=10, request_id=rid), timeout=10)
                served.append(rid)
            except grpc.RpcError as exc:
                failed.append(exc.code().name)
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    return


def test_sigterm_drains_and_loses_no_exposure(artifacts: dict[str, Path], tmp_path: Path) -> None:
    from recsys.serving.exposure import read_exposures

    proc, target = _spawn(
        artifacts, tmp_path, "--exposure-flush-records", "100000", "--exposure-flush-s", "60", "--drain-seconds", "0.5"
    )
    served: list[str] = []
    failed: list[str] = []
    stop = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(_load, target, served, failed, stop, "term")
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
        stop.set()
    assert proc.returncode == 0, output[-2000:]
    assert len(served) > 20 and set(failed) <= {"UNAVAILABLE"}  # refused after the drain: retryable, never CANCELLED
    log = read_exposures(tmp_path / "exposures")
    counts = log.group_by("request_id").len()
    assert set(served) <= set(counts["request_id"].to_list())  # every answered request was logged
    assert set(counts["len"].to_list()) == {10}


def test_kill_9_keeps_every_flushed_part_readable(artifacts: dict[str, Path], tmp_path: Path) -> None:
    from recsys.serving.exposure import read_exposures

    proc, target = _spawn(artifacts, tmp_path, "--exposure-flush-records", "30", "--exposure-flush-s", "0.1")
    served: list[str] = []
    failed: list[str] = []
    stop = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(_load, target, served, failed, stop, "kill")
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stop.set()
    parts = sorted((tmp_path / "exposures").iterdir())
    assert parts and all(p.suffix == ".parquet" or p.name.endswith(".tmp") for p in parts)
    log = read_exposures(tmp_path / "exposures")  # every .parquet part is complete and readable
    counts = log.group_by("request_id").len()
    assert log.height > 0 and set(counts["len"].to_list()) == {10}  # whole lists only
    assert all(rid.startswith("kill-") for rid in counts["request_id"].to_list())
