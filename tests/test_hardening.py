"""Service hardening against a real server: no input or artifact crashes or hijacks it, and shutdown
drops nothing (issue 17). Each case is a row of the bad-input / fault corpus:

* a registry version whose LightGBM model.txt is truncated (manifest re-hashed), through Reload, the
  --watch-registry watcher and `recsys models promote`: refused, the server stays SERVING on the old
  version (standalone, LightGBM kills the process that parses the file);
* Reload with a path instead of a version name;
* timestamps out of the documented range; undecodable request bytes; a whitespace-only user_id;
* reflection v1 and v1alpha, with the repository's proto path;
* a TLS key that does not match the certificate;
* the admin pin rule against the registry watcher;
* a cold-text Rank past its deadline: its texts are dropped, not encoded;
* SIGTERM with requests queued: every admitted request completes, nothing is CANCELLED.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("lightgbm")
grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")  # only to build the test artifacts

from recsys.serving.proto import ranking_pb2 as pb  # noqa: E402
from recsys.serving.proto import ranking_pb2_grpc as pb_grpc  # noqa: E402
from tests.artifacts import ServerThread, build_scoring_artifacts, spawn_serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ fixtures


def _truncate(text: bytes) -> bytes:
    return text[: len(text) // 2]


def _categorical_without_boundaries(text: bytes) -> bytes:
    """Tree 0 claims a categorical split but has no cat_boundaries: well-formed to the structural
    check (sizes, markers, arrays), yet LightGBM's parser aborts the process on it."""
    return text.replace(b"num_cat=0", b"num_cat=1", 1)


def _register(registry_root: Path, ranker: Path | None = None, damage: Callable[[bytes], bytes] | None = None) -> str:
    """Register a copy of v0001 (optionally with `ranker` as its own ranker/, its model.txt passed
    through `damage` BEFORE hashing: a broken file whose manifest is consistent with it)."""
    from recsys.registry import Registry

    registry = Registry(registry_root)
    manifest = registry.manifest("v0001")
    staging = registry.staging_dir()
    shutil.rmtree(staging)
    shutil.copytree(registry.path("v0001"), staging)
    (staging / "manifest.json").unlink()
    hashed = sorted(manifest["files"])
    if ranker is not None:
        shutil.copytree(ranker, staging / "ranker")
        if damage is not None:
            model = staging / "ranker" / "model.txt"
            model.write_bytes(damage(model.read_bytes()))
        hashed += sorted(str(p.relative_to(staging)) for p in (staging / "ranker").rglob("*") if p.is_file())
    fields = {k: v for k, v in manifest.items() if k not in ("files", "version", "created", "format")}
    return registry.register(staging, fields, hashed)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> dict[str, Any]:
    """v0001 (matcher; ranker via --ranker), v0002 = v0001 + its own ranker/, v0003 = the same with
    ranker/model.txt truncated to half and re-hashed, v0004 = another good copy, v0005 = a model.txt
    only LightGBM itself finds bad (by aborting)."""
    out: dict[str, Any] = build_scoring_artifacts(tmp_path_factory.mktemp("hardening"), prepared_dir)
    out["good"] = _register(out["registry"], out["ranker"])
    out["broken"] = _register(out["registry"], out["ranker"], _truncate)
    out["good2"] = _register(out["registry"], out["ranker"])
    out["crashing"] = _register(out["registry"], out["ranker"], _categorical_without_boundaries)
    return out


def _config(artifacts: dict[str, Any], **overrides: Any) -> Any:
    from recsys.serving.config import ServeConfig

    values: dict[str, Any] = {
        "registry": artifacts["registry"], "ranker": artifacts["ranker"], "data": artifacts["data"],
        "version": "v0001", "host": "127.0.0.1", "port": 0, "workers": 2,
    }
    values.update(overrides)
    return ServeConfig(**values)


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Any]) -> Iterator[ServerThread]:
    srv = ServerThread(_config(artifacts, cold_batch=8))
    yield srv
    srv.stop()


def _rank(user: str = "u1", n: int = 20, **kw: Any) -> Any:
    request = pb.RankRequest(request_id=kw.pop("request_id", f"r-{time.monotonic_ns()}"), user_id=user, **kw)
    request.candidates.extend(pb.Candidate(item_id=f"i{j}") for j in range(n))
    return request


def _expect(code: Any, call: Any, field: str | None = None) -> Any:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    if field is not None:
        assert info.value.details().startswith(field), info.value.details()
        assert dict(info.value.trailing_metadata() or ()).get("invalid-field") == field
    return info.value


def _health(target: str) -> Any:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _serving(target: str) -> bool:
    from grpc_health.v1 import health_pb2

    return bool(_health(target) == health_pb2.HealthCheckResponse.SERVING)


# ------------------------------------------------------------------------------------------ broken artifacts


def test_truncated_lightgbm_model_kills_the_process_that_parses_it(artifacts: dict[str, Any], tmp_path: Path) -> None:
    """The fault itself, standalone: LightGBM's parser aborts or segfaults (no Python exception)."""
    from recsys.candidate import check_model_text
    from recsys.errors import ModelError

    text = (artifacts["ranker"] / "model.txt").read_bytes()
    cut = tmp_path / "model.txt"
    cut.write_bytes(text[: len(text) // 2])
    code = "import lightgbm, sys; lightgbm.Booster(model_file=sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(cut)], capture_output=True, timeout=120)
    assert proc.returncode < 0, (proc.returncode, proc.stderr[-500:])  # killed by a signal
    with pytest.raises(ModelError, match="not a complete LightGBM model"):
        check_model_text(cut)  # the pure-Python structural check refuses it
    assert check_model_text(artifacts["ranker"] / "model.txt") > 0
    for end in (b"end of trees", b"end of parameters"):  # cut just before each closing marker
        cut.write_bytes(text[: text.index(end)])
        with pytest.raises(ModelError):
            check_model_text(cut)


def test_truncated_blender_is_refused_by_reload_and_the_server_keeps_serving(
    server: ServerThread, artifacts: dict[str, Any]
) -> None:
    admin, stub = server.admin, server.stub
    err = _expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: admin.Reload(pb.ReloadRequest(version=artifacts["broken"])))
    assert "model.txt" in err.details() and artifacts["broken"] in err.details()
    assert _serving(server.target)
    assert stub.Rank(_rank()).model_version == "v0001"
    # A good version with its own ranker/ passes the same check and is swapped in.
    reply = admin.Reload(pb.ReloadRequest(version=artifacts["good"]))
    assert (reply.previous_version, reply.model_version, reply.pinned) == ("v0001", artifacts["good"], True)
    assert stub.Rank(_rank()).model_version == artifacts["good"]
    admin.Reload(pb.ReloadRequest(version="v0001"))


def test_a_version_that_crashes_its_loader_is_refused_by_signal_name(server: ServerThread, artifacts: dict[str, Any]) -> None:
    """Past the structural check, only loading finds the defect: the child process dies (SIGABRT),
    the server reports it and keeps serving; the same file aborts any process that parses it."""
    from recsys.candidate import check_model_text
    from recsys.registry import Registry

    model = Registry(artifacts["registry"]).path(artifacts["crashing"]) / "ranker" / "model.txt"
    assert check_model_text(model) > 0  # well-formed as far as the cheap check can tell
    code = "import lightgbm, sys; lightgbm.Booster(model_file=sys.argv[1])"
    assert subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, timeout=120).returncode < 0
    err = _expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: server.admin.Reload(pb.ReloadRequest(version=artifacts["crashing"])))
    assert "crashed" in err.details() and "SIGABRT" in err.details(), err.details()
    assert _serving(server.target) and server.stub.Rank(_rank()).model_version == "v0001"


def test_reload_takes_version_names_never_paths(server: ServerThread, artifacts: dict[str, Any]) -> None:
    from recsys.errors import InputError
    from recsys.registry import Registry

    root = artifacts["registry"]
    for bad in ("../versions/v0001", str(root / "versions" / "v0001"), "v0001/..", "v0001\n", "current"):
        _expect(
            grpc.StatusCode.INVALID_ARGUMENT, lambda bad=bad: server.admin.Reload(pb.ReloadRequest(version=bad)), "version"
        )
        with pytest.raises(InputError, match="not a model version name"):
            Registry(root).path(bad)
    assert server.stub.Rank(_rank()).model_version == "v0001"


def test_watcher_and_models_promote_refuse_the_truncated_version(artifacts: dict[str, Any], tmp_path: Path) -> None:
    """`recsys models promote` refuses it (exit 2, pointer unchanged); a pointer moved to it behind
    the CLI's back (an old publisher) is refused by the watcher, which keeps serving."""
    from recsys.registry import Registry

    registry = Registry(artifacts["registry"])
    before = registry.current()
    cmd = [sys.executable, "-m", "recsys.cli", "models", "promote", artifacts["broken"], "--registry", str(registry.root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.txt" in proc.stderr and "Traceback" not in proc.stderr
    assert registry.current() == before
    cmd[4] = "../v0001"
    assert subprocess.run(cmd, capture_output=True, cwd=ROOT, timeout=120).returncode == 2

    srv = ServerThread(_config(artifacts, version=None, watch_s=0.2))
    try:
        start = srv.stub.Rank(_rank()).model_version
        registry.promote(artifacts["broken"], verify=True)  # hashes match: only loading reveals it
        deadline = time.monotonic() + 120
        while 'outcome="refused"' not in srv.app.metrics.exposition().decode():
            assert time.monotonic() < deadline, "the watcher never tried the new pointer"
            time.sleep(0.2)
        assert _serving(srv.target) and srv.stub.Rank(_rank()).model_version == start
    finally:
        srv.stop()
        registry.promote(before or "v0001")


def test_admin_pin_is_respected_by_the_registry_watcher(artifacts: dict[str, Any]) -> None:
    """Reload{version} pins; the watcher leaves a pinned variant alone; Reload{} follows again."""
    from recsys.registry import Registry

    registry = Registry(artifacts["registry"])
    before = registry.current()
    registry.promote("v0001")
    srv = ServerThread(_config(artifacts, version=None, watch_s=0.1))

    def version() -> str:
        return str(srv.stub.Rank(_rank()).model_version)

    def wait_for(expected: str) -> None:
        deadline = time.monotonic() + 120
        while version() != expected:
            assert time.monotonic() < deadline, f"still {version()}, expected {expected}"
            time.sleep(0.1)

    try:
        registry.promote(artifacts["good"])
        wait_for(artifacts["good"])  # following the registry
        pinned = srv.admin.Reload(pb.ReloadRequest(version="v0001"))
        assert pinned.pinned and version() == "v0001"
        registry.promote(artifacts["good2"])
        time.sleep(1.0)  # ten watch periods
        assert version() == "v0001"
        info = srv.admin.GetModelInfo(pb.GetModelInfoRequest()).variants[0]
        assert info.pinned and info.model_version == "v0001"
        follow = srv.admin.Reload(pb.ReloadRequest())  # no version: the registry's current, unpinned
        assert (follow.model_version, follow.pinned) == (artifacts["good2"], False)
        registry.promote(artifacts["good"])
        wait_for(artifacts["good"])  # following again
    finally:
        srv.stop()
        registry.promote(before or "v0001")


# ------------------------------------------------------------------------------------------ bad requests


def _at(seconds: int, nanos: int = 0) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    return Timestamp(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(2**62, 0), (10**12, 0), (-(2**40), 0), (1_767_225_600, -1), (1_767_225_600, 10**9)]
)
def test_timestamps_outside_the_documented_range_name_the_field(server: ServerThread, seconds: int, nanos: int) -> None:
    stub = server.stub
    bad = _at(seconds, nanos)
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Rank(_rank(request_time=bad)), "request_time")
    history = _rank()
    history.history.events.add(item_id="i3", event_type="click", timestamp=bad)
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Rank(history), "history.events[0].timestamp")
    _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.Recommend(pb.RecommendRequest(request_id="r", user_id="u1", top_k=5, request_time=bad)),
        "request_time",
    )
    events = pb.LogEventsRequest()
    events.events.add(user_id="u1", item_id="i1", event_type="click")
    events.events.add(user_id="u1", item_id="i1", event_type="click", timestamp=bad)
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.LogEvents(events), "events[1].timestamp")
    _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.StreamEvents(iter([events])), "events[1].timestamp")
    # The edges of the range are accepted.
    assert stub.Rank(_rank(request_time=_at(631_152_000))).items  # 1990-01-01
    assert stub.Rank(_rank(request_time=_at(4_102_444_799, 999_999_999))).items  # 2099-12-31 23:59:59.999


def test_internal_time_conversion_never_overflows() -> None:
    import numpy as np

    from recsys.errors import InputError
    from recsys.features import to_us

    for value in (2**62, -(2**63), np.int64(2**62), np.datetime64(2**62, "s"), np.datetime64("NaT"), "10000-01-01"):
        with pytest.raises(InputError):
            to_us(value)
    assert to_us("2026-01-31T12:00:00Z") == 1_769_860_800_000_000
    assert to_us(0) == 0  # internal times may be anything a datetime holds; the API range is narrower


def test_undecodable_request_bytes_are_invalid_argument(server: ServerThread) -> None:
    good = _rank(user="ü-user").SerializeToString()
    raw = {
        "truncated": good[:-3],
        "invalid utf-8": pb.RankRequest(request_id="r").SerializeToString() + b"\x12\x02\xff\xfe",
        "garbage": b"\xff\xff\xff\xff",
    }
    with grpc.insecure_channel(server.target) as channel:
        rank = channel.unary_unary("/recsys.v1.RankingService/Rank")
        reload = channel.unary_unary("/recsys.v1.ModelAdmin/Reload")
        stream = channel.stream_unary("/recsys.v1.RankingService/StreamEvents")
        for name, data in raw.items():
            err = _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda data=data: rank(data, timeout=10), "request")
            assert "recsys.v1.RankRequest" in err.details() and "Error" not in err.details(), name
        _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: reload(b"\x0a\x05\xff\xff\xff\xff\xff", timeout=10), "request")
        ok = pb.LogEventsRequest()
        ok.events.add(user_id="u1", item_id="i1", event_type="click")
        err = _expect(
            grpc.StatusCode.INVALID_ARGUMENT, lambda: stream(iter([ok.SerializeToString(), b"\xff\xff"]), timeout=10)
        )
        assert "recsys.v1.LogEventsRequest" in err.details()
        assert pb.RankResponse.FromString(rank(good, timeout=10)).items  # the same channel still works


def test_whitespace_only_ids_are_refused(server: ServerThread) -> None:
    for blank in (" ", "\t\n", "   "):
        _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda blank=blank: server.stub.Rank(_rank(user=blank)), "user_id")
        events = pb.LogEventsRequest()
        events.events.add(user_id=blank, item_id="i1", event_type="click")
        _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda events=events: server.stub.LogEvents(events), "events[0].user_id")


# ------------------------------------------------------------------------------------------ operations


def test_reflection_serves_v1_and_v1alpha_with_the_repository_proto_path(server: ServerThread) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(server.target) as channel:
        for version in ("v1", "v1alpha"):
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            listed, found = call(iter([
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="recsys.v1.RankingService"),
            ]), timeout=10)
            names = {s.name for s in listed.list_services_response.service}
            assert {"recsys.v1.RankingService", "recsys.v1.ModelAdmin", "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"} <= names
            files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                     for b in found.file_descriptor_response.file_descriptor_proto]
            assert "recsys/v1/ranking.proto" in {f.name for f in files}
            assert (ROOT / "protos" / "recsys/v1/ranking.proto").is_file()


def _certs(out: Path) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    for name in ("a", "b"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True, cwd=out,
        )
    return {p.name: p for p in out.iterdir()}


def test_tls_key_that_does_not_match_the_certificate_is_named(artifacts: dict[str, Any], tmp_path: Path) -> None:
    c = _certs(tmp_path)
    cmd = [sys.executable, "-m", "recsys.cli", "serve", "--registry", str(artifacts["registry"]), "--version", "v0001",
           "--ranker", str(artifacts["ranker"]), "--data", str(artifacts["data"]), "--host", "127.0.0.1", "--port", "0",
           "--tls-cert", str(c["a.pem"]), "--tls-key", str(c["b.key"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(c["b.key"]) in proc.stderr and "does not match" in proc.stderr and "Traceback" not in proc.stderr
    cmd[cmd.index(str(c["b.key"]))] = str(c["a.pem"])  # a certificate where the key belongs
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--tls-key" in proc.stderr, proc.stderr[-2000:]


def test_cold_texts_past_their_deadline_are_dropped_not_encoded(server: ServerThread) -> None:
    model = server.app.holders["control"].current
    batcher = server.app.batcher
    before = batcher.dropped
    texts = [f"expired cold text number {k} " + "words " * 40 for k in range(1000)]
    request = _rank(n=0)
    request.candidates.extend(pb.Candidate(item_id=f"cold-{k}", text=t) for k, t in enumerate(texts))
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = pb_grpc.RankingServiceStub(channel)
        _expect(grpc.StatusCode.DEADLINE_EXCEEDED, lambda: stub.Rank(request, timeout=0.1))
    time.sleep(1.0)  # anything still queued for it is dropped at the next pass
    encoded = sum(model.cold_cache.get(t) is not None for t in texts)
    # Passes of cold_batch=8 texts stopped at the deadline: the rest was dropped, never encoded (or the
    # request expired before it reached the handler and nothing was encoded at all).
    assert encoded < len(texts) and (batcher.dropped > before or encoded == 0), (encoded, batcher.dropped)
    one = _rank(n=3)
    one.candidates.add(item_id="fresh-cold", text="a single new item after the expired burst")
    assert len(server.stub.Rank(one, timeout=30).items) == 4

    async def direct() -> tuple[list[int], int, int]:
        loop = asyncio.get_running_loop()
        dropped = batcher.dropped
        with pytest.raises(TimeoutError):  # already past its deadline: nothing is encoded
            await batcher.encode(model, ["never encoded text"], loop.time())
        task = asyncio.ensure_future(batcher.encode(model, ["cancelled before encoding"]))
        await asyncio.sleep(0)
        task.cancel()  # the client went away
        await asyncio.sleep(0.05)
        batcher.batch_sizes.clear()
        await batcher.encode(model, [f"capped text {k}" for k in range(20)])  # over the cap: 3 passes
        return list(batcher.batch_sizes), batcher.dropped - dropped, len(batcher._queues)

    sizes, dropped, queues = server.call(direct())
    assert sizes == [8, 8, 4] and dropped == 2 and queues == 0
    assert model.cold_cache.get("never encoded text") is None and model.cold_cache.get("cancelled before encoding") is None


@pytest.mark.parametrize("inline", ["0", "256"], ids=["pool", "inline"])
def test_sigterm_finishes_every_admitted_request_including_queued_ones(
    artifacts: dict[str, Any], tmp_path: Path, inline: str
) -> None:
    """One worker thread: slow cold-text requests with plain ones queued behind them (on the worker,
    or on the event loop when small Ranks run inline) when SIGTERM arrives. Health turns NOT_SERVING
    at once; during --drain-seconds new requests are still served; every request sent before the
    signal completes OK; after the drain, requests are refused UNAVAILABLE (never CANCELLED); the
    process exits 0."""
    from grpc_health.v1 import health_pb2

    proc, target = spawn_serve(artifacts, tmp_path, "--threads", "1", "--inline-candidates", inline, "--drain-seconds", "1.5")
    results: dict[str, str] = {}
    finished: dict[str, float] = {}
    lock = threading.Lock()

    def send(name: str, request: Any) -> None:
        with grpc.insecure_channel(target) as channel:
            try:
                pb_grpc.RankingServiceStub(channel).Rank(request, timeout=60)
                outcome = "OK"
            except grpc.RpcError as exc:
                outcome = exc.code().name
        with lock:
            results[name], finished[name] = outcome, time.monotonic()

    threads = []
    for k in range(6):  # slow: 400 cold texts each, encoded on the single worker
        slow = _rank(n=0)
        slow.candidates.extend(pb.Candidate(item_id=f"s{k}-{j}", text=f"slow {k} text {j} " * 30) for j in range(400))
        threads.append(threading.Thread(target=send, args=(f"slow{k}", slow)))
    threads += [threading.Thread(target=send, args=(f"plain{k}", _rank(n=200))) for k in range(12)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # all sent and queued
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.2)
    assert _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING
    during = threading.Thread(target=send, args=("during-drain", _rank(n=10)))
    during.start()
    for t in [*threads, during]:
        t.join(120)
    assert results == {name: "OK" for name in results} and len(results) == 19, results
    assert sum(t > signalled for t in finished.values()) >= 5  # they really were queued at the signal
    time.sleep(max(0.0, signalled + 1.8 - time.monotonic()))  # past the drain period
    try:
        with grpc.insecure_channel(target) as channel:
            _expect(grpc.StatusCode.UNAVAILABLE, lambda: pb_grpc.RankingServiceStub(channel).Rank(_rank(), timeout=10))
    finally:
        output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, output[-2000:]


# ------------------------------------------------------------------------------------------ bounded user state


def _events(users: list[str], t_us: int, item: str = "i1") -> Any:
    request = pb.LogEventsRequest()
    for k, user in enumerate(users):
        event = request.events.add(user_id=user, item_id=item, event_type="click")
        event.timestamp.FromMicroseconds(t_us + k)
    return request


def test_user_state_is_bounded_evicting_the_least_recently_active(artifacts: dict[str, Any]) -> None:
    """max_users = known + 10: 25 new users evict the 15 least recently active ones (deterministic in
    event time), who are then served exactly as never-seen users (cold start)."""
    import numpy as np

    from recsys.data.prepared import PreparedData

    n0 = PreparedData.load(artifacts["data"]).users.height
    srv = ServerThread(_config(artifacts, max_users=n0 + 10))
    try:
        live = srv.app.live
        assert len(live.users) == n0
        state = live.state
        order = np.lexsort((np.arange(n0), state.user_last_us[:n0]))
        expected_out = {live.users.ids[r] for r in order[:15].tolist()}  # the 15 least recently active
        t0 = int(state.as_of_us) + 3_600_000_000
        srv.stub.LogEvents(_events([f"new-{k}" for k in range(20)], t0))
        srv.stub.LogEvents(_events([f"new-{k}" for k in range(20, 25)], t0 + 1000))
        assert len(live.users) == n0 + 10 and live.users.evicted == 15
        assert {u for u in expected_out if live.user_idx(u) >= 0} == set()
        assert all(live.user_idx(f"new-{k}") >= 0 for k in range(25))
        assert state.n_users == n0 + 10  # evicted rows are reused: the arrays stopped growing
        srv.app._count_drops()
        text = srv.app.metrics.exposition().decode()
        assert "recsys_users_evicted_total 15.0" in text and f"recsys_users_known {n0 + 10}.0" in text

        evicted = sorted(expected_out)[0]
        when = _at(int(t0 // 1_000_000) + 60)
        stranger = srv.stub.Rank(_rank(user="never-seen-anyone", request_id="a", request_time=when))
        gone = srv.stub.Rank(_rank(user=evicted, request_id="a", request_time=when))
        assert [(i.item_id, i.score) for i in gone.items] == [(i.item_id, i.score) for i in stranger.items]
        row = live.user_idx("new-0")
        assert state.user_count[row] == 1 and int((state.hist_item[row] >= 0).sum()) == 1  # a fresh row
    finally:
        srv.stop()


def test_eviction_is_deterministic_across_replicas(artifacts: dict[str, Any]) -> None:
    """Two replicas folding the same batches from the same saved state evict the same users and end
    with identical user state; a long stream of one-off users keeps memory at the bound."""
    import numpy as np

    from recsys.ranker import Ranker
    from recsys.serving.engine import LiveState
    from recsys.serving.model import ItemCatalogue
    from recsys.serving.validation import EventsInput

    ranker = Ranker.load(artifacts["ranker"])
    catalogue = ItemCatalogue.from_lists([f"i{j}" for j in range(200)], [""] * 200)
    state = ranker.load_state()
    users = [f"u{j}" for j in range(state.n_users)]
    replicas = [LiveState(ranker.load_state(), users, catalogue, max_users=250) for _ in range(2)]
    assert all(len(r.users) == 250 and r.users.evicted == state.n_users - 250 for r in replicas)  # trimmed at start
    rng = np.random.default_rng(0)
    t = int(replicas[0].state.as_of_us)
    for batch in range(12):
        names = [f"one-off-{batch}-{k}" for k in range(40)] + [f"u{j}" for j in rng.integers(0, 250, 10)]
        n = len(names)
        events = EventsInput(names, [f"i{j}" for j in rng.integers(0, 200, n)], ["click"] * n,
                             t + np.arange(n, dtype=np.int64) * 1000, [None] * n, np.full(n, np.nan))
        t += 10**9
        for replica in replicas:
            replica.apply(events)
    a, b = replicas
    assert a.users.rows == b.users.rows and len(a.users) == 250 and a.state.n_users <= state.n_users
    for name in ("user_count", "hist_item", "hist_ts", "user_last_us"):
        np.testing.assert_array_equal(getattr(a.state, name)[:250], getattr(b.state, name)[:250])
    keys = a.state.user_item.arrays()[0]
    np.testing.assert_array_equal(keys, b.state.user_item.arrays()[0])
    assert max(keys >> 32) < a.state.n_users
