"""`recsys serve`: light CLI module (grpc, onnxruntime and LightGBM are imported in `run`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

TOKEN_ENV = "RECSYS_SERVE_TOKEN"


def configure(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--registry", type=Path, required=True, help="model registry root (recsys export --registry)")
    model.add_argument("--version", help="registry version to serve (default: the current one)")
    model.add_argument("--ranker", type=Path, help="ranker directory, when the version has no ranker/ subdirectory")
    model.add_argument("--data", type=Path, help="prepared dataset of the ranker (default: the one in ranker.json)")
    model.add_argument("--provider", default="auto", help="ONNX Runtime provider: auto, cpu, cuda, tensorrt (auto)")
    model.add_argument("--precision", default="fp32", help="item tower: fp32, int8, fp16, auto (fp32)")
    model.add_argument("--watch-registry", type=float, default=0.0, metavar="SECONDS",
                       help="poll the registry's current pointer and hot-reload when it moves (0 = off)")
    exp = parser.add_argument_group("A/B experiments")
    exp.add_argument("--experiments", type=Path, metavar="FILE",
                     help="experiment config (YAML, docs/experiments.md): route requests to its rankers; "
                          "replaces --version (each ranker names its version); --ranker is the default blender")
    exp.add_argument("--experiments-poll-s", type=float, default=5.0, metavar="SECONDS",
                     help="re-read the experiment config this often; a malformed edit is refused and the "
                          "running config keeps serving (5; 0 = never)")
    net = parser.add_argument_group("network and capacity")
    net.add_argument("--host", default="[::]", help="bind address ([::])")
    net.add_argument("--port", type=int, default=50051, help="gRPC port, 0 = any free port (50051)")
    net.add_argument("--workers", type=int, default=1,
                     help="server processes sharing the port (SO_REUSEPORT), each folding the same event log; "
                          "N > 1 needs --state redis://... (1)")
    net.add_argument("--threads", type=int, default=0, help="request threads per process (0 = usable CPUs)")
    net.add_argument("--ort-threads", type=int, default=1, help="intra-op threads per ONNX session (1)")
    net.add_argument("--max-inflight", type=int, default=64, help="in-flight requests before shedding (64)")
    net.add_argument("--max-candidates", type=int, default=1000, help="candidates per Rank request (1000)")
    net.add_argument("--max-top-k", type=int, default=1000, help="largest top_k (1000)")
    net.add_argument("--max-users", type=int, default=1_000_000,
                     help="users with live state; beyond it the least recently active are evicted (cold start again) (1000000)")
    net.add_argument("--retrieve-k", type=int, default=200, help="Recommend: embedding-search candidates to blend (200)")
    net.add_argument("--inline-candidates", type=int, default=256,
                     help="Rank requests up to this size run on the event loop, not a worker thread (256; 0 = never)")
    net.add_argument("--drain-seconds", type=float, default=5.0,
                     help="SIGTERM: report NOT_SERVING but keep serving this long so load balancers move away (5)")
    net.add_argument("--grace-s", type=float, default=10.0,
                     help="SIGTERM: then seconds the admitted requests get to finish; later ones get UNAVAILABLE (10)")
    net.add_argument("--ready-file", type=Path, help="write {'port': N, 'metrics_port': M} here once serving (for scripts using --port 0)")
    logs = parser.add_argument_group("logs and metrics")
    logs.add_argument("--exposure-dir", type=Path, help="write served lists here as parquet parts (recsys prepare reads them)")
    logs.add_argument("--exposure-flush-records", type=int, default=50_000,
                      help="flush after this many rows (50000; the time bound --exposure-flush-s usually comes first)")
    logs.add_argument("--exposure-flush-s", type=float, default=1.0, help="flush rows older than this (1.0 s)")
    logs.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    logs.add_argument("--log-json", action="store_true", help="structured JSON log lines")
    logs.add_argument("--stall-ms", type=float, default=0.0, metavar="MS",
                      help="record event-loop callbacks longer than MS with their cause (recsys_loop_stall_seconds; 0 = off)")
    logs.add_argument("--stall-log", type=Path, metavar="FILE",
                      help="with --stall-ms: write the stall timeline (JSON) here at shutdown")
    st = parser.add_argument_group("online state (events, served lists)")
    st.add_argument("--state", metavar="URL",
                    help="shared event log: redis://HOST:PORT/DB[?stream=NAME] (Redis Streams; run Redis with appendonly yes)")
    st.add_argument("--state-dir", type=Path, metavar="DIR",
                    help="embedded event journal + snapshots here (one process); with --state: local snapshots only. "
                         "Neither flag: events live in memory and are lost on restart")
    st.add_argument("--consistency-wait-ms", type=float, default=50.0,
                    help="Rank/Recommend with a consistency token wait at most this long for this replica to fold it (50)")
    st.add_argument("--snapshot-events", type=int, default=100_000, help="snapshot the folded state every N events (100000; a served list counts as one)")
    st.add_argument("--snapshot-s", type=float, default=300.0, help="... or every S seconds with new events (300)")
    st.add_argument("--fold-exposures", action=argparse.BooleanOptionalAction, default=None,
                    help="fold served lists logged with --exposure-dir into every replica's state as impressions "
                         "(default: on with --state or --state-dir, off in memory)")
    sec = parser.add_argument_group("security")
    sec.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    sec.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    sec.add_argument("--tls-client-ca", type=Path, help="mutual TLS: CA that client certificates must chain to")
    sec.add_argument("--auth-token-file", type=Path,
                     help=f"file holding the bearer token for ModelAdmin RPCs (or set ${TOKEN_ENV})")
    sec.add_argument("--auth-all", action="store_true", help="require the token on every RPC, not only ModelAdmin")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from recsys.errors import InputError
    from recsys.files import write_json_atomic
    from recsys.serving.config import ServeConfig
    from recsys.serving.server import serve

    if args.log_json:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    token = os.environ.get(TOKEN_ENV)
    if args.auth_token_file is not None:
        if not args.auth_token_file.is_file():
            raise InputError(f"--auth-token-file {args.auth_token_file} does not exist")
        token = args.auth_token_file.read_text().strip()
    config = ServeConfig(
        registry=args.registry, version=args.version, ranker=args.ranker, data=args.data,
        host=args.host, port=args.port, workers=args.threads, ort_threads=args.ort_threads,
        provider=args.provider, precision=args.precision, max_inflight=args.max_inflight,
        max_candidates=args.max_candidates, max_top_k=args.max_top_k, max_users=args.max_users, retrieve_k=args.retrieve_k,
        inline_candidates=args.inline_candidates,
        exposure_dir=args.exposure_dir, exposure_flush_records=args.exposure_flush_records,
        exposure_flush_s=args.exposure_flush_s, metrics_port=args.metrics_port,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        auth_token=token or None, auth_all=args.auth_all, drain_s=args.drain_seconds, grace_s=args.grace_s, watch_s=args.watch_registry,
        experiments=args.experiments, experiments_poll_s=args.experiments_poll_s,
        state=args.state, state_dir=args.state_dir, consistency_wait_ms=args.consistency_wait_ms,
        snapshot_events=args.snapshot_events, snapshot_s=args.snapshot_s, fold_exposures=args.fold_exposures,
        stall_ms=args.stall_ms, stall_log=args.stall_log,
    )
    if args.workers != 1:
        from recsys.serving.workers import serve_workers

        return serve_workers(config, args.workers, args.ready_file)

    def ready(port: int, metrics_port: int | None) -> None:
        if args.ready_file is not None:
            write_json_atomic(args.ready_file, {"port": port, "metrics_port": metrics_port, "pid": os.getpid()})

    asyncio.run(serve(config, ready))
    return 0
