"""A small synchronous client for the ranking service (grpcio only; no model code).

    from recsys.serving.client import RankingClient

    with RankingClient("localhost:50051") as client:
        response = client.rank("u42", ["i1", "i2", ("new-item", "Trail running shoes, light")], top_k=2)
        for item in response.items:
            print(item.position, item.item_id, round(item.score, 3))
        print(response.model_version, response.variant)

Every call has a deadline (`timeout`, 2 s by default; `reload` 120 s). The read-only calls (Rank,
Recommend, GetModelInfo, ExplainAssignment) are retried by the channel on UNAVAILABLE (a replica
restarting or draining) with exponential backoff, per gRPC's service-config retry policy. LogEvents is
retried the same way only when the call carries an idempotency_key (the server folds a repeated key
once); without one a retry after a lost reply could record the events twice, so it is sent once.
Reload is never retried.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from recsys.serving.proto import ranking_pb2 as pb
from recsys.serving.proto import ranking_pb2_grpc as pb_grpc

# A candidate: "item_id", (item_id, text) for items the catalogue may not know, or a dict with
# item_id, text, features.
CandidateLike = str | tuple[str, str] | Mapping[str, Any]


# The read-only calls: safe to send again when the first attempt may or may not have reached a server.
IDEMPOTENT_METHODS = (
    ("recsys.v1.RankingService", "Rank"), ("recsys.v1.RankingService", "Recommend"),
    ("recsys.v1.ModelAdmin", "GetModelInfo"), ("recsys.v1.ModelAdmin", "ExplainAssignment"),
)


def service_config(max_attempts: int = 4) -> str:
    """gRPC service config (JSON): retry UNAVAILABLE on the idempotent calls, 50 ms backoff doubling to 1 s
    (max_attempts counts the first call: 2..5).

    The call's own deadline still bounds the attempts together."""
    policy = {
        "maxAttempts": max_attempts, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": service, "method": method} for service, method in IDEMPOTENT_METHODS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def _candidate(c: CandidateLike) -> Any:
    if isinstance(c, str):
        return pb.Candidate(item_id=c)
    if isinstance(c, tuple):
        return pb.Candidate(item_id=c[0], text=c[1])
    return pb.Candidate(item_id=c["item_id"], text=c.get("text", ""), features=c.get("features", {}))


def _context(values: Mapping[str, str | float] | None) -> dict[str, Any]:
    out = {}
    for key, value in (values or {}).items():
        out[key] = pb.ContextValue(text=value) if isinstance(value, str) else pb.ContextValue(number=float(value))
    return out


def _history(events: Sequence[tuple[str, str] | tuple[str, str, datetime]] | None) -> Any:
    if events is None:
        return None
    history = pb.History()
    for event in events:
        h = history.events.add(item_id=event[0], event_type=event[1])
        if len(event) > 2:
            h.timestamp.FromDatetime(event[2])
    return history


class RankingClient:
    """Rank, Recommend, events and operator calls with a default deadline and optional TLS/token."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout: float = 2.0,
        tls_ca: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        server_name: str | None = None,
        retries: int = 3,
        round_robin: bool = False,
    ) -> None:
        """timeout: default deadline of every call but `reload` (seconds); retries: extra attempts of the
        idempotent calls after UNAVAILABLE (0 disables retrying; gRPC caps attempts at 5); round_robin:
        spread calls over every address the target resolves to (several replicas:
        "ipv4:10.0.0.1:50051,10.0.0.2:50051" or a DNS name with several records)."""
        if retries < 0 or timeout <= 0:
            raise ValueError("RankingClient: retries must be >= 0 and timeout > 0")
        options: list[tuple[str, Any]] = [("grpc.enable_retries", 0)]
        if retries:
            options = [("grpc.enable_retries", 1), ("grpc.service_config", service_config(min(retries, 4) + 1))]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if round_robin:
            options.append(("grpc.lb_policy_name", "round_robin"))
        if tls_ca is not None or client_cert is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=tls_ca.read_bytes() if tls_ca else None,
                private_key=client_key.read_bytes() if client_key else None,
                certificate_chain=client_cert.read_bytes() if client_cert else None,
            )
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.retries = min(retries, 4)
        # Read-your-writes for this client: the token of its last LogEvents goes with its next Rank /
        # Recommend, so whichever replica answers waits (bounded) until it folded those events.
        self.token = ""
        self.ranking = pb_grpc.RankingServiceStub(self.channel)
        self.admin = pb_grpc.ModelAdminStub(self.channel)

    def __enter__(self) -> RankingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def rank(
        self,
        user_id: str,
        candidates: Iterable[CandidateLike],
        top_k: int = 0,
        explain: bool = False,
        context: Mapping[str, str | float] | None = None,
        history: Sequence[tuple[str, str] | tuple[str, str, datetime]] | None = None,
        request_id: str | None = None,
        request_time: datetime | None = None,
    ) -> Any:
        items = list(candidates)
        request = pb.RankRequest(
            request_id=request_id or uuid.uuid4().hex, user_id=user_id, top_k=top_k, explain=explain,
            context=_context(context), consistency_token=self.token,
        )
        if all(isinstance(c, str) for c in items):
            request.candidate_ids.extend(items)  # the packed form: cheaper on both ends
        else:
            request.candidates.extend(_candidate(c) for c in items)
        if history is not None:
            request.history.CopyFrom(_history(history))
        if request_time is not None:
            request.request_time.FromDatetime(request_time)
        return self.ranking.Rank(request, timeout=self.timeout, metadata=self.metadata)

    def recommend(
        self,
        user_id: str,
        top_k: int = 10,
        exclude: Sequence[str] = (),
        include_seen: bool = False,
        context: Mapping[str, str | float] | None = None,
        history: Sequence[tuple[str, str] | tuple[str, str, datetime]] | None = None,
        explain: bool = False,
        request_id: str | None = None,
    ) -> Any:
        request = pb.RecommendRequest(
            request_id=request_id or uuid.uuid4().hex, user_id=user_id, top_k=top_k, exclude_item_ids=list(exclude),
            include_seen=include_seen, context=_context(context), explain=explain, consistency_token=self.token,
        )
        if history is not None:
            request.history.CopyFrom(_history(history))
        return self.ranking.Recommend(request, timeout=self.timeout, metadata=self.metadata)

    def log_events(self, events: Iterable[Mapping[str, Any]], idempotency_key: str = "") -> Any:
        """events: dicts with user_id, item_id, event_type [, timestamp (datetime), request_id, value].
        idempotency_key: a retry of this call with the same key is folded once."""
        batch = pb.LogEventsRequest(idempotency_key=idempotency_key)
        for e in events:
            event = batch.events.add(
                user_id=e["user_id"], item_id=e["item_id"], event_type=e["event_type"],
                request_id=e.get("request_id", ""), value=float(e.get("value", 0.0)),
            )
            if e.get("timestamp") is not None:
                event.timestamp.FromDatetime(e["timestamp"])
        reply = self._log_events(batch, attempts=self.retries + 1 if idempotency_key else 1)
        self.token = reply.consistency_token
        return reply

    def _log_events(self, batch: Any, attempts: int) -> Any:
        """LogEvents is retried on UNAVAILABLE only with an idempotency key (the server folds a repeated
        key once); the channel's retry policy cannot see the key, so this loop does it, inside one deadline."""
        deadline = time.monotonic() + self.timeout
        for attempt in range(attempts):
            try:
                return self.ranking.LogEvents(batch, timeout=max(deadline - time.monotonic(), 0.001),
                                              metadata=self.metadata)
            except grpc.RpcError as exc:
                pause = min(0.05 * 2**attempt, 1.0)
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 == attempts or \
                        time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")

    def model_info(self) -> Any:
        return self.admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def reload(self, version: str | None = None, variant: str | None = None, timeout: float = 120.0) -> Any:
        return self.admin.Reload(
            pb.ReloadRequest(version=version or "", variant=variant or ""), timeout=timeout, metadata=self.metadata
        )

    def explain_assignment(
        self, user_id: str, request_id: str = "", context: Mapping[str, str | float] | None = None
    ) -> dict[str, Any]:
        """The experiment assignment of (user, request, context) on the server: buckets, checks, label."""
        request = pb.ExplainAssignmentRequest(user_id=user_id, request_id=request_id, context=_context(context))
        reply = self.admin.ExplainAssignment(request, timeout=self.timeout, metadata=self.metadata)
        return dict(json.loads(reply.json))
