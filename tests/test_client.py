"""The Python client's channel policy against a real gRPC server that fails its first calls.

The retry policy is a property of the client's channel (gRPC service config), so a small real server
speaking the recsys.v1 contract, answering UNAVAILABLE to the first N calls of each method, shows it:
idempotent calls succeed on a later attempt, LogEvents (no idempotency key) is sent exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")

from recsys.serving.client import RankingClient, service_config  # noqa: E402
from recsys.serving.proto import ranking_pb2 as pb  # noqa: E402
from recsys.serving.proto import ranking_pb2_grpc as pb_grpc  # noqa: E402


class _Flaky(pb_grpc.RankingServiceServicer, pb_grpc.ModelAdminServicer):  # type: ignore[misc]
    """Answers UNAVAILABLE to the first `failures` calls of each method, then a real reply."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: Counter[str] = Counter()
        self.sleep_s = 0.0

    def _attempt(self, method: str, context: Any) -> None:
        self.calls[method] += 1
        if self.calls[method] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "replica restarting")
        time.sleep(self.sleep_s)

    def Rank(self, request: Any, context: Any) -> Any:
        self._attempt("Rank", context)
        return pb.RankResponse(request_id=request.request_id, model_version="v0001",
                               items=[pb.ScoredItem(item_id=i, position=n) for n, i in enumerate(request.candidate_ids)])

    def Recommend(self, request: Any, context: Any) -> Any:
        self._attempt("Recommend", context)
        return pb.RecommendResponse(request_id=request.request_id, model_version="v0001")

    def LogEvents(self, request: Any, context: Any) -> Any:
        self._attempt("LogEvents", context)
        return pb.LogEventsResponse(accepted=len(request.events))

    def GetModelInfo(self, request: Any, context: Any) -> Any:
        self._attempt("GetModelInfo", context)
        return pb.GetModelInfoResponse()


@pytest.fixture()
def flaky() -> Iterator[tuple[_Flaky, str]]:
    servicer = _Flaky(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_RankingServiceServicer_to_server(servicer, server)
    pb_grpc.add_ModelAdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_idempotent_calls_are_retried_on_unavailable(flaky: tuple[_Flaky, str]) -> None:
    servicer, target = flaky
    with RankingClient(target) as client:
        response = client.rank("u1", ["i1", "i2"])
        assert [i.item_id for i in response.items] == ["i1", "i2"]
        assert client.recommend("u1").model_version == "v0001"
        client.model_info()
    assert servicer.calls == Counter({"Rank": 3, "Recommend": 3, "GetModelInfo": 3})  # two refusals, then served


def test_log_events_is_retried_only_with_an_idempotency_key(flaky: tuple[_Flaky, str]) -> None:
    servicer, target = flaky
    events = [{"user_id": "u1", "item_id": "i1", "event_type": "click"}]
    with RankingClient(target) as client, pytest.raises(grpc.RpcError) as caught:
        client.log_events(events)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls["LogEvents"] == 1  # no key: a retry after a lost reply could record the events twice
    servicer.calls.clear()
    with RankingClient(target) as client:
        assert client.log_events(events, idempotency_key="batch-7").accepted == 1
    assert servicer.calls["LogEvents"] == 3  # two refusals, then folded once under its key


def test_retries_run_out_and_can_be_disabled(flaky: tuple[_Flaky, str]) -> None:
    servicer, target = flaky
    with RankingClient(target, retries=0) as client, pytest.raises(grpc.RpcError) as caught:
        client.rank("u1", ["i1"])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls["Rank"] == 1
    servicer.failures = 10
    with RankingClient(target, retries=1) as client, pytest.raises(grpc.RpcError) as caught:
        client.rank("u1", ["i1"])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls["Rank"] == 3  # 1 + 2 attempts


def test_every_call_has_a_default_deadline(flaky: tuple[_Flaky, str]) -> None:
    servicer, target = flaky
    servicer.failures, servicer.sleep_s = 0, 1.0
    started = time.monotonic()
    with RankingClient(target, timeout=0.2) as client, pytest.raises(grpc.RpcError) as caught:
        client.rank("u1", ["i1"])
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.9


def test_service_config_names_only_the_idempotent_methods() -> None:
    import json

    (method,) = json.loads(service_config())["methodConfig"]
    assert {n["method"] for n in method["name"]} == {"Rank", "Recommend", "GetModelInfo", "ExplainAssignment"}
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    with pytest.raises(ValueError, match="retries"):
        RankingClient("127.0.0.1:1", retries=-1)
