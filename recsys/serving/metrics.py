"""Prometheus metrics of the service, on a registry of its own (several servers in one test process
must not collide on the global one)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from recsys.compat import require
from recsys.experiments.assignment import parse_label
from recsys.serving.latency import STAGE_BUCKETS, STAGES

# 0.25 ms .. 2.5 s: the interesting part for a 10 ms p99 target is below 50 ms.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@functools.lru_cache(maxsize=4096)
def variant_series(label: str) -> str:
    """The `variant` label value of a served variant: `group/arm` for experiment labels (the config
    version and the #qa mark would start a new series at every config edit), else the label itself."""
    parsed = parse_label(label)
    return label if parsed is None else f"{parsed.group}/{parsed.arm}"


class ServingMetrics:
    def __init__(self) -> None:
        prom = require("prometheus_client")
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.latency = prom.Histogram(
            "recsys_request_seconds", "RPC latency by method and variant (experiment/arm)", ["rpc", "variant"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.errors = prom.Counter("recsys_request_errors_total", "Failed RPCs by method and status code", ["rpc", "code"], registry=r)
        self.shed = prom.Counter("recsys_shed_total", "RPCs refused with RESOURCE_EXHAUSTED (load shedding)", ["rpc"], registry=r)
        self.inflight = prom.Gauge("recsys_inflight_requests", "Requests being processed", registry=r)
        self.model = prom.Gauge("recsys_model_info", "1 for the model version each variant serves", ["variant", "version"], registry=r)
        self.items = prom.Counter("recsys_items_scored_total", "Candidates scored by source", ["source"], registry=r)
        self.cold_batches = prom.Histogram(
            "recsys_cold_batch_size", "Texts per on-the-fly encoding batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.events = prom.Counter("recsys_events_total", "Events received by outcome", ["outcome"], registry=r)
        self.exposures = prom.Counter("recsys_exposures_total", "Served items appended to the exposure log", registry=r)
        self.state_lag = prom.Gauge("recsys_state_lag_records", "Event-log records not folded into this process's state yet (counted up to 1000)", registry=r)
        self.state_degraded = prom.Gauge("recsys_state_degraded", "1 while the event log is unreachable (Rank serves, LogEvents refused)", registry=r)
        self.consistency_timeouts = prom.Counter(
            "recsys_consistency_wait_timeouts_total", "Requests scored before the state reached their consistency token", registry=r
        )
        self.reloads = prom.Counter("recsys_reloads_total", "Model reloads by outcome", ["variant", "outcome"], registry=r)
        self.users = prom.Gauge("recsys_users_known", "Users with live feature state (bounded by --max-users)", registry=r)
        self.users_evicted = prom.Counter(
            "recsys_users_evicted_total", "Least recently active users evicted from the live state (--max-users)", registry=r
        )
        self.cold_dropped = prom.Counter(
            "recsys_cold_dropped_total", "Cold-text encodings dropped unencoded: request cancelled or past its deadline",
            registry=r,
        )

        self.stage = prom.Histogram(
            "recsys_stage_seconds", "Time per request stage (recsys.serving.latency.STAGES)", ["rpc", "stage"],
            buckets=STAGE_BUCKETS, registry=r,
        )
        # Bound children per RPC: a lap is one dict lookup and one observe, no label resolution.
        self.stages = {rpc: {s: self.stage.labels(rpc, s) for s in STAGES} for rpc in ("Rank", "Recommend")}
        self.stalls = prom.Histogram(
            "recsys_loop_stall_seconds", "Event-loop callbacks longer than --stall-ms, by cause (gc, gil:<work>, preempted, rpc, callback)",
            ["cause"], buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r,
        )

        self.gc_frozen = prom.Gauge(
            "recsys_gc_frozen_objects", "Objects moved to the permanent generation after start-up (gc.freeze)", registry=r
        )

    def stall(self, record: dict[str, Any]) -> None:
        self.stalls.labels(record["cause"]).observe(record["ms"] / 1000)

    def set_model(self, variant: str, version: str, previous: str | None = None) -> None:
        if previous is not None and previous != version:
            with contextlib.suppress(KeyError):
                self.model.remove(variant, previous)
        self.model.labels(variant, version).set(1)

    def exposition(self) -> bytes:
        prom: Any = require("prometheus_client")
        return bytes(prom.generate_latest(self.registry))

    def start_http(self, port: int, host: str = "0.0.0.0") -> tuple[Any, int]:
        """Serve /metrics on its own port; returns (http server, bound port)."""
        prom: Any = require("prometheus_client")
        httpd, _ = prom.start_http_server(port, addr=host, registry=self.registry)
        return httpd, int(httpd.server_port)
