"""Serving configuration: one frozen dataclass validated at construction (flags map onto it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from recsys.errors import ConfigError


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ServeConfig:
    registry: Path
    version: str | None = None  # None: the registry's current version
    ranker: Path | None = None  # used when the version directory has no ranker/ subdirectory
    data: Path | None = None  # prepared dataset (id maps, item texts); default: the ranker's "data"
    host: str = "[::]"
    port: int = 50051  # 0 = any free port (tests)
    workers: int = 0  # request threads; 0 = usable CPUs
    ort_threads: int = 1  # intra-op threads per ONNX session: concurrency comes from requests
    provider: str = "auto"
    precision: str = "fp32"
    max_inflight: int = 64  # requests beyond this are shed with RESOURCE_EXHAUSTED
    # Validation limits (INVALID_ARGUMENT beyond them).
    max_candidates: int = 1000
    max_top_k: int = 1000
    max_id_chars: int = 256
    max_text_chars: int = 8192
    max_history: int = 200
    max_events: int = 10_000
    max_features: int = 64
    # Live user state: at most this many users; the least recently active are evicted (cold start again).
    max_users: int = 1_000_000
    retrieve_k: int = 200  # Recommend: embedding-search candidates blended by the ranker
    # Rank requests with at most this many candidates (and no explain) run on the event loop: ~1 ms of
    # vectorised work, cheaper than the hop to a worker thread. Cold text is still encoded on the pool;
    # larger requests, explain, Recommend and events always go to the pool. 0 = everything on the pool.
    inline_candidates: int = 256
    # Cold-start item encoding, batched across concurrent requests.
    cold_batch: int = 64
    cold_wait_ms: float = 2.0
    cold_cache: int = 10_000
    # Exposure log.
    exposure_dir: Path | None = None
    # A flush is a few ms of Python and Polars work beside the event loop: the time bound sets the pace
    # (at most flush_s of rows is lost to a kill -9); the record bound only caps memory.
    exposure_flush_records: int = 50_000
    exposure_flush_s: float = 1.0
    # Operations.
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: clients must present a certificate signed by it
    auth_token: str | None = None  # required on ModelAdmin RPCs (and all RPCs with auth_all)
    auth_all: bool = False
    drain_s: float = 5.0  # SIGTERM: NOT_SERVING but still serving this long, so load balancers move away
    grace_s: float = 10.0  # SIGTERM: then the time admitted requests get to finish
    watch_s: float = 0.0  # > 0: poll the registry pointer and hot-reload when it moves
    # A/B experiments: the config routing requests to rankers (docs/experiments.md), re-read every
    # experiments_poll_s seconds (a malformed edit is refused and the running config keeps serving).
    experiments: Path | None = None
    experiments_poll_s: float = 5.0
    # Shared online state (recsys.state): every event and served list goes through one event log that
    # each server process folds. state: redis://HOST:PORT/DB (shared by replicas); state_dir: the
    # embedded journal (one process) and/or local snapshots; neither: in memory, lost on restart.
    state: str | None = None
    state_dir: Path | None = None
    consistency_wait_ms: float = 50.0  # Rank/Recommend with a consistency token wait at most this long
    snapshot_events: int = 100_000  # store a snapshot of the folded state after this many events ...
    snapshot_s: float = 300.0  # ... or this many seconds with new events
    # Served lists logged as exposures (--exposure-dir) also go through the event log as impressions, so
    # every replica's impression/CTR features count them (as `recsys prepare` does with the parquet log).
    # None: on when an event log is configured (state or state_dir), off for the in-memory default.
    fold_exposures: bool | None = None
    reuse_port: bool = False  # SO_REUSEPORT: several processes share the port (recsys serve --workers N)
    # Event-loop stall monitor (recsys.serving.latency): callbacks longer than stall_ms are recorded with
    # their cause (0 = off); stall_log: the timeline written as JSON at shutdown.
    stall_ms: float = 0.0
    stall_log: Path | None = None

    def __post_init__(self) -> None:
        positive = {
            "max_inflight": self.max_inflight,
            "max_candidates": self.max_candidates,
            "max_top_k": self.max_top_k,
            "max_id_chars": self.max_id_chars,
            "max_text_chars": self.max_text_chars,
            "max_history": self.max_history,
            "max_events": self.max_events,
            "max_users": self.max_users,
            "retrieve_k": self.retrieve_k,
            "cold_batch": self.cold_batch,
            "exposure_flush_records": self.exposure_flush_records,
            "ort_threads": self.ort_threads,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"serve config {name} must be >= 1, got {value}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if min(self.workers, self.cold_wait_ms, self.cold_cache, self.max_features, self.inline_candidates) < 0:
            raise ConfigError("workers, cold_wait_ms, cold_cache, max_features and inline_candidates must be >= 0")
        if self.exposure_flush_s <= 0 or self.grace_s < 0 or self.watch_s < 0 or self.drain_s < 0:
            raise ConfigError("exposure_flush_s must be > 0; drain_s, grace_s and watch_s >= 0")
        if self.experiments is not None and self.version is not None:
            raise ConfigError(
                "--version and --experiments exclude each other: the experiment config names each ranker's "
                "version (model: VERSION or current)"
            )
        if self.experiments_poll_s < 0:
            raise ConfigError("experiments_poll_s must be >= 0 (0 = never re-read the experiment config)")
        if self.state is not None and not self.state.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"--state {self.state!r}: expected redis://HOST:PORT/DB (or rediss://, unix://)")
        if self.consistency_wait_ms < 0 or self.snapshot_events < 1 or self.snapshot_s <= 0:
            raise ConfigError("consistency_wait_ms must be >= 0, snapshot_events >= 1 and snapshot_s > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.stall_ms < 0 or (self.stall_log is not None and not self.stall_ms):
            raise ConfigError("--stall-ms must be >= 0, and --stall-log needs --stall-ms > 0 (the stall threshold)")
        if self.auth_all and not self.auth_token:
            raise ConfigError("--auth-all needs a token (--auth-token-file or RECSYS_SERVE_TOKEN)")

    @property
    def folds_exposures(self) -> bool:
        if self.fold_exposures is not None:
            return self.fold_exposures
        return self.state is not None or self.state_dir is not None

    @property
    def threads(self) -> int:
        return self.workers or _cpus()
