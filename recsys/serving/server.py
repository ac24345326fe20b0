"""The grpc.aio server: `create_server(config) -> (server, port)`, and `serve(config)` with signals.

Request work (feature computation, ONNX, LightGBM) runs on a thread pool, so the event loop only
parses, admits and answers; in-flight requests are bounded (RESOURCE_EXHAUSTED beyond the bound).
SIGTERM/SIGINT: health goes NOT_SERVING, new RPCs get UNAVAILABLE, in-flight ones get `grace_s` to
finish, then the exposure log is flushed and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import polars as pl

from recsys.data.prepared import PreparedData
from recsys.errors import ConfigError, InputError, ModelError
from recsys.registry import Registry
from recsys.serving.auth import TokenAuthInterceptor, server_credentials
from recsys.serving.batching import ColdBatcher
from recsys.serving.config import ServeConfig
from recsys.serving.engine import LiveState
from recsys.serving.exposure import ExposureLog
from recsys.serving.metrics import ServingMetrics
from recsys.serving.model import (
    CONTROL,
    RANKER_SUBDIR,
    ItemCatalogue,
    ModelHolder,
    SingleVariantRouter,
    VariantRouter,
    load_model,
)
from recsys.serving.proto import ranking_pb2 as pb
from recsys.serving.proto import ranking_pb2_grpc as pb_grpc
from recsys.serving.servicer import AdminServicer, RankingServicer, reload_model

log = logging.getLogger("recsys.serving")
SERVICES = tuple(pb.DESCRIPTOR.services_by_name[name].full_name for name in ("RankingService", "ModelAdmin"))


def _data_dir(config: ServeConfig, registry: Registry) -> Path:
    """The prepared dataset giving id maps and item texts: --data, else the ranker's training data."""
    if config.data is not None:
        return config.data
    version_dir = registry.path(registry.resolve(config.version))
    ranker = version_dir / RANKER_SUBDIR if (version_dir / RANKER_SUBDIR).is_dir() else config.ranker
    meta_path = ranker / "ranker.json" if ranker is not None else None
    if meta_path is not None and meta_path.is_file():
        data = json.loads(meta_path.read_text()).get("data")
        if data:
            return Path(data)
    raise ConfigError("pass --data PREPARED: the prepared dataset the ranker was trained on (id maps, item texts)")


class ServingApp:
    """Everything the servicers share: models per variant, live features, logs, metrics, pools."""

    def __init__(self, config: ServeConfig, router: VariantRouter | None = None) -> None:
        self.config = config
        self.registry = Registry(config.registry)
        data = PreparedData.load(_data_dir(config, self.registry))
        items = data.items.sort("item_idx")
        catalogue = ItemCatalogue.from_lists(
            items["item_id"].cast(pl.Utf8).to_list(), items["text"].cast(pl.Utf8).fill_null("").to_list()
        )
        model = load_model(
            self.registry, config.version, catalogue, None, config.ranker,
            config.provider, config.precision, config.ort_threads, config.cold_cache,
        )
        assert model.initial_state is not None
        users = data.users.sort("user_idx")["user_id"].cast(pl.Utf8).to_list()
        self.live = LiveState(model.initial_state, users, catalogue)
        model.initial_state = None
        self.holders = {CONTROL: ModelHolder(model)}
        self.router: VariantRouter = router or SingleVariantRouter(self.holders)
        self.metrics = ServingMetrics()
        self.metrics.set_model(CONTROL, model.version)
        self.executor = ThreadPoolExecutor(config.threads, thread_name_prefix="rank")
        self.reload_executor = ThreadPoolExecutor(1, thread_name_prefix="reload")
        self.batcher = ColdBatcher(self.executor, config.cold_batch, config.cold_wait_ms / 1000)
        self.exposure = (
            ExposureLog(config.exposure_dir, config.exposure_flush_records, config.exposure_flush_s)
            if config.exposure_dir is not None
            else None
        )
        self.inflight = 0
        self.draining = False
        self.reload_lock = asyncio.Lock()

    async def reload(self, variant: str, version: str | None) -> tuple[str, str, float]:
        return await reload_model(self, variant, version)

    async def background(self) -> None:
        """Timers: exposure flush deadline, registry watch, cold-batch metrics."""
        period = min(self.config.exposure_flush_s, self.config.watch_s or 1.0, 0.5)
        next_watch = 0.0
        loop = asyncio.get_running_loop()
        failed: str | None = None
        while True:
            await asyncio.sleep(period)
            if self.exposure is not None:
                self.exposure.flush_if_due()
            for size in self.batcher.batch_sizes:
                self.metrics.cold_batches.observe(size)
            self.batcher.batch_sizes.clear()
            if self.config.watch_s and loop.time() >= next_watch:
                next_watch = loop.time() + self.config.watch_s
                try:
                    current = self.registry.current()
                    if current and current not in (self.holders[CONTROL].current.version, failed):
                        await self.reload(CONTROL, current)
                except (InputError, ModelError, grpc.RpcError, Exception) as exc:  # keep serving
                    failed = current
                    log.error("registry watch: version %s refused: %s", current, exc)

    def close(self) -> None:
        if self.exposure is not None:
            self.exposure.close()
        self.executor.shutdown(wait=True)
        self.reload_executor.shutdown(wait=True)


class RankingServer:
    """A started-or-not grpc.aio server with its app; `stop()` is the graceful path."""

    def __init__(self, app: ServingApp, server: grpc.aio.Server, health: Any) -> None:
        self.app = app
        self.grpc = server
        self.health = health
        self.metrics_http: Any = None
        self.metrics_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        await self.grpc.start()
        self._tasks.append(asyncio.ensure_future(self.app.background()))
        cfg = self.app.config
        if cfg.metrics_port is not None:
            self.metrics_http, self.metrics_port = self.app.metrics.start_http(cfg.metrics_port, cfg.metrics_host)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING -> refuse new RPCs -> let in-flight ones finish -> flush the exposure log."""
        if self._stopped.is_set():
            return
        from grpc_health.v1 import health_pb2

        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.app.draining = True
        await self.grpc.stop(self.app.config.grace_s if grace is None else grace)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.get_running_loop().run_in_executor(None, self.app.close)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
        self._stopped.set()
        log.info("server stopped; exposure rows written: %s", self.app.exposure.written if self.app.exposure else 0)

    async def wait(self) -> None:
        await self._stopped.wait()


async def create_server(config: ServeConfig, router: VariantRouter | None = None) -> tuple[RankingServer, int]:
    """Load the model, build the server, bind the port (0 = any free one); call `start()` to serve."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    loop = asyncio.get_running_loop()
    app = await loop.run_in_executor(None, lambda: ServingApp(config, router))
    interceptors = [TokenAuthInterceptor(config.auth_token, config.auth_all)] if config.auth_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 16 * 1024 * 1024)],
    )
    pb_grpc.add_RankingServiceServicer_to_server(RankingServicer(app), server)
    pb_grpc.add_ModelAdminServicer_to_server(AdminServicer(app), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert is not None and config.tls_key is not None:
        port = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot bind {address}: the port is taken or the address is not local")
    return RankingServer(app, server, health_servicer), port


async def serve(config: ServeConfig, ready: Any = None) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully. `ready(port, metrics_port)` is called once
    serving (scripts that bind port 0 learn the ports from it)."""
    server, port = await create_server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    model = server.app.holders[CONTROL].current
    log.info(
        "serving model %s on port %d (%s; metrics %s)",
        model.version, port, "TLS" if config.tls_cert else "plaintext", server.metrics_port,
    )
    if ready is not None:
        ready(port, server.metrics_port)
    await stop.wait()
    log.info("signal received: draining (grace %.1fs)", config.grace_s)
    await server.stop()
