"""Shared online state through real servers: two replicas on one Redis stream (read-your-writes with
the consistency token), kill -9 of a replica and of the embedded-journal server (every acknowledged
event comes back), Redis stopped mid-load (nothing acknowledged is lost, Rank keeps answering),
StreamEvents retries, served lists folded as impressions, and `recsys serve --workers 2`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("lightgbm")
grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")  # only to build the test artifacts

from recsys.serving.proto import ranking_pb2 as pb  # noqa: E402
from recsys.serving.proto import ranking_pb2_grpc as pb_grpc  # noqa: E402
from tests import test_serving  # noqa: E402
from tests.artifacts import ServerThread  # noqa: E402
from tests.test_serving import _config, _items, _rank_request  # noqa: E402

artifacts = test_serving.artifacts  # the same module-scoped fixture (registry, tiny towers, ranker)

ROOT = Path(__file__).resolve().parents[1]


def _events(user: str, items: list[str], kind: str = "purchase", **kw: Any) -> Any:
    return pb.LogEventsRequest(events=[pb.Event(user_id=user, item_id=i, event_type=kind) for i in items], **kw)


def _scores(stub: Any, user: str, items: list[str], **kw: Any) -> dict[str, float]:
    return {i.item_id: i.score for i in stub.Rank(_rank_request(user, items, **kw), timeout=10).items}


def _info(admin: Any) -> Any:
    return admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)


def _stream_events(redis_url: str) -> list[dict[str, Any]]:
    from recsys.state import open_log
    from recsys.state.codec import to_frame
    from recsys.state.log import START

    log = open_log(redis_url, None)
    try:
        return to_frame(p for _, p in log.read(START, 1_000_000)).to_dicts()
    finally:
        log.close()


# ------------------------------------------------------------------------------------------ replicas


def test_events_sent_to_replica_a_change_replica_b_within_the_consistency_wait(
    artifacts: dict[str, Path], redis_server: Any
) -> None:
    url = redis_server.url + "?stream=test:replicas"
    a = ServerThread(_config(artifacts, state=url, consistency_wait_ms=2000))
    b = ServerThread(_config(artifacts, state=url, consistency_wait_ms=2000))
    try:
        items = _items(40)
        before = _scores(b.stub, "fresh-user", items)
        reply = a.stub.LogEvents(_events("fresh-user", items[:5]), timeout=10)
        assert reply.accepted == 5 and reply.consistency_token
        after = _scores(b.stub, "fresh-user", items, consistency_token=reply.consistency_token)
        assert after != before  # B folded A's events before scoring
        on_a = _scores(a.stub, "fresh-user", items)  # both replicas compute the same scores
        assert after.keys() == on_a.keys() and all(abs(after[i] - on_a[i]) < 1e-9 for i in items)
        state = _info(b.admin).state
        assert state.backend.startswith("redis") and state.error == "" and state.records_folded >= 1
        _round_robin_client_reads_its_writes(a, b, items)
        with pytest.raises(grpc.RpcError) as err:
            b.stub.Rank(_rank_request("u1", items, consistency_token="not-a-token"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "consistency_token" in err.value.details()
    finally:
        a.stop()
        b.stop()


def _round_robin_client_reads_its_writes(a: ServerThread, b: ServerThread, items: list[str]) -> None:
    """The README's client: round_robin over both replicas; each Rank carries the last LogEvents token."""
    from recsys.serving.client import RankingClient

    with RankingClient(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", round_robin=True, timeout=10) as client:
        cold = {i.item_id: i.score for i in client.rank("rr-user", items).items}
        for k in range(4):  # calls alternate between the replicas
            client.log_events([{"user_id": "rr-user", "item_id": items[10 + k], "event_type": "purchase"}])
            assert client.token
            seen = {i.item_id: i.score for i in client.rank("rr-user", items).items}
            assert seen != cold
            cold = seen


def test_served_lists_are_impressions_on_every_replica(artifacts: dict[str, Path], redis_server: Any, tmp_path: Path) -> None:
    url = redis_server.url + "?stream=test:exposures"
    from recsys.serving.config import ServeConfig

    reg = artifacts["registry"]
    assert ServeConfig(registry=reg, state_dir=tmp_path).folds_exposures and not ServeConfig(registry=reg).folds_exposures
    a = ServerThread(_config(artifacts, state=url, exposure_dir=tmp_path / "exp", fold_exposures=None))  # default: on
    b = ServerThread(_config(artifacts, state=url))
    try:
        pair = b.app.live.catalogue.lookup(["i7", "i8"])
        impr = b.app.live.state.item_impr[pair].sum()
        a.stub.Rank(_rank_request("u3", ["i7", "i8"], top_k=1), timeout=10)
        deadline = time.monotonic() + 5  # served lists are appended in batches (every 0.1 s)
        while time.monotonic() < deadline:
            served = b.app.live.state.item_impr[pair].sum()
            if served >= impr + 1:
                break
            time.sleep(0.05)
        assert served == impr + 1  # one of the two was served to u3 on A and counted on B
    finally:
        a.stop()
        b.stop()


def test_stream_events_retry_is_folded_once_and_a_broken_stream_appends_nothing(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    srv = ServerThread(_config(artifacts, state_dir=tmp_path / "state"))
    try:
        applied = _info(srv.admin).events_applied
        batches = [_events("stream-user", _items(3), "click", idempotency_key="batch-7"), _events("stream-user", _items(2, 3), "click")]
        for _ in range(2):  # the client retries the whole stream after losing the reply
            reply = srv.stub.StreamEvents(iter(batches), timeout=10)
            assert reply.accepted == 5
        assert _info(srv.admin).events_applied == applied + 5
        assert _info(srv.admin).state.duplicates_skipped == 1

        def broken() -> Any:
            yield _events("broken-user", _items(3), "click")
            raise RuntimeError("client died mid-stream")

        with pytest.raises(grpc.RpcError):
            srv.stub.StreamEvents(broken(), timeout=10)
        time.sleep(0.2)
        assert _info(srv.admin).events_applied == applied + 5 and srv.app.live.users.get("broken-user") < 0
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ crashes


def _spawn(artifacts: dict[str, Path], tmp: Path, *extra: str, name: str = "ready.json") -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    """`recsys serve` in a child process (test_serving's), with what its ready file says (port, pids)."""
    proc, target = test_serving._spawn(artifacts, tmp, *extra, ready_name=name)
    return proc, target, json.loads((tmp / name).read_text())


def _log_events_until(target: str, stop: threading.Event, *, acked: list[str], refused: list[str], tag: str) -> None:
    """Each LogEvents makes one new user: acknowledged users must all come back."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RankingServiceStub(channel)
        k = 0
        while not stop.is_set():
            user = f"{tag}-{threading.get_ident()}-{k}"
            k += 1
            try:
                stub.LogEvents(_events(user, ["i1", "i2"], "click"), timeout=5)
                acked.append(user)
            except grpc.RpcError as exc:
                refused.append(exc.code().name)
                if exc.code() != grpc.StatusCode.UNAVAILABLE or "connect" in (exc.details() or "").lower():
                    time.sleep(0.05)


def _load_and_kill(proc: subprocess.Popen[bytes], target: str, tag: str) -> list[str]:
    acked: list[str] = []
    refused: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_log_events_until, args=(target, stop), kwargs={"acked": acked, "refused": refused, "tag": tag}) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(20)
    assert len(acked) > 10, refused[:5]
    return acked


def test_kill_9_of_the_journal_server_replays_every_acknowledged_event(artifacts: dict[str, Path], tmp_path: Path) -> None:
    from recsys.state.journal import Journal
    from recsys.state.log import START

    state = str(tmp_path / "state")
    proc, target, _ = _spawn(artifacts, tmp_path, "--state-dir", state, "--snapshot-events", "200")
    acked = _load_and_kill(proc, target, "j")
    proc2, target2, _ = _spawn(artifacts, tmp_path, "--state-dir", state, name="ready2.json")
    try:
        with grpc.insecure_channel(target2) as channel:
            info = _info(pb_grpc.ModelAdminStub(channel))
        proc2.send_signal(signal.SIGTERM)
        proc2.communicate(timeout=30)
        journal = Journal(state)
        from recsys.state.codec import to_frame

        logged = to_frame(p for _, p in journal.read(START, 10_000_000))
        journal.close()
        assert set(acked) <= set(logged["user_id"].to_list())  # every acknowledged event is in the journal
        assert info.events_applied == logged.height  # ... and the restarted server folded all of it
        assert info.state.backend.startswith("journal")
        assert any((tmp_path / "state" / "snapshots").glob("snap-*.npz"))  # start-up used a snapshot
        _export_feeds_retrain(artifacts, ["--state-dir", state], tmp_path, acked)
    finally:
        if proc2.poll() is None:
            proc2.kill()


def test_kill_9_of_a_redis_replica_restarts_with_every_acknowledged_event(
    artifacts: dict[str, Path], redis_server: Any, tmp_path: Path
) -> None:
    url = redis_server.url + "?stream=test:kill9"
    proc, target, _ = _spawn(artifacts, tmp_path, "--state", url)
    acked = _load_and_kill(proc, target, "r")
    proc2, target2, _ = _spawn(artifacts, tmp_path, "--state", url, name="ready2.json")
    try:
        logged = _stream_events(url)
        assert set(acked) <= {e["user_id"] for e in logged}
        with grpc.insecure_channel(target2) as channel:
            info = _info(pb_grpc.ModelAdminStub(channel))
        assert info.events_applied == len(logged)
        _export_feeds_retrain(artifacts, ["--state", url], tmp_path, acked)
    finally:
        proc2.kill()
        proc2.wait(10)


def test_redis_stopped_mid_load_loses_nothing_acknowledged_and_rank_keeps_answering(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.redis_server import RedisServer

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    srv = ServerThread(_config(artifacts, state=redis.url))
    acked: list[str] = []
    refused: list[str] = []
    ranked: list[int] = []
    stop = threading.Event()

    def rank_loop() -> None:
        while not stop.is_set():
            srv.stub.Rank(_rank_request("u2", _items(20)), timeout=5)  # must never fail
            ranked.append(1)

    threads = [threading.Thread(target=_log_events_until, args=(srv.target, stop), kwargs={"acked": acked, "refused": refused, "tag": "d"}) for _ in range(2)]
    threads.append(threading.Thread(target=rank_loop))
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        redis.stop(kill=True)
        time.sleep(1.5)
        during = len(ranked)
        time.sleep(1.0)
        assert len(ranked) > during  # Rank keeps answering from the in-memory state
        health = health_pb2_grpc.HealthStub(srv.channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="recsys.state"), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert _info(srv.admin).state.error
        assert "UNAVAILABLE" in refused
        redis.start()  # same directory: the AOF holds every acknowledged entry
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(20)
        logged = _stream_events(redis.url)
        assert set(acked) <= {e["user_id"] for e in logged}
        deadline = time.monotonic() + 10
        while _info(srv.admin).events_applied < len(logged) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _info(srv.admin).events_applied == len(logged)  # the replica caught up
        assert _info(srv.admin).state.error == ""
    finally:
        stop.set()
        srv.stop()
        redis.stop()


def test_serve_workers_share_the_port_and_the_stream(artifacts: dict[str, Path], redis_server: Any, tmp_path: Path) -> None:
    url = redis_server.url + "?stream=test:workers"
    proc, target, info = _spawn(artifacts, tmp_path, "--state", url, "--workers", "2")
    try:
        assert len(set(info["pids"])) == 2
        items = _items(30)
        for k in range(6):  # each new channel is a new connection: the kernel picks a worker
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                stub = pb_grpc.RankingServiceStub(ch)
                token = stub.LogEvents(_events(f"w-user-{k}", items[:4]), timeout=10).consistency_token
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                stub = pb_grpc.RankingServiceStub(ch)
                with_token = _scores(stub, f"w-user-{k}", items, consistency_token=token)
                assert with_token != _scores(stub, "never-seen-user", items)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 0
        from recsys.serving.exposure import read_exposures

        parts = [read_exposures(tmp_path / "exposures" / f"worker-{i}") for i in range(2)]
        assert sum(p.height for p in parts) > 0  # each worker owns its exposure folder
    finally:
        if proc.poll() is None:
            proc.kill()


def test_workers_without_a_shared_log_is_refused(artifacts: dict[str, Path], tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "serve", "--registry", str(artifacts["registry"]), "--workers", "2",
         "--state-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "--state redis://" in out.stderr and "Traceback" not in out.stderr


def _export_feeds_retrain(artifacts: dict[str, Path], source: list[str], tmp: Path, acked: list[str]) -> None:
    """`recsys state export` -> an events table that retrain's merge + validation take as --events."""
    import polars as pl

    from recsys.data.prepared import PreparedData
    from recsys.data.validate import validate
    from training.retrain import merge_tables

    out = tmp / "export" / "events.parquet"
    done = subprocess.run([sys.executable, "-m", "recsys.cli", "state", "export", *source, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    exported = pl.read_parquet(out)
    assert set(acked) <= set(exported["user_id"].to_list())
    base = PreparedData.load(artifacts["data"])
    raw, counts = merge_tables(base, [out], [], ())
    clean, _ = validate(raw, on_invalid="drop")
    assert counts["events:events.parquet"] == exported.height
    assert set(acked) <= set(clean.events["user_id"].cast(pl.Utf8).to_list())
