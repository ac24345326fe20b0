"""The grpc.aio server: `create_server(config) -> (server, port)`, and `serve(config)` with signals.

Request work (feature computation, ONNX, LightGBM) runs on a thread pool, so the event loop only
parses, admits and answers; in-flight requests are bounded (RESOURCE_EXHAUSTED beyond the bound).
SIGTERM/SIGINT drains in three steps (`RankingServer.stop`): health goes NOT_SERVING and the server
keeps serving for `drain_s` (--drain-seconds) so load balancers move traffic away; then new RPCs are
refused with UNAVAILABLE (retryable elsewhere, never CANCELLED); every RPC already admitted finishes
(up to `grace_s`) before the transport stops, the exposure log is flushed and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import polars as pl

from recsys.data.prepared import PreparedData
from recsys.errors import ConfigError, InputError, ModelError, NotFoundError
from recsys.experiments.config import ExperimentConfig, RankerSpec, load_config
from recsys.experiments.router import ConfigWatcher, ExperimentRouter, build_router
from recsys.features import FeatureState
from recsys.ranker import recorded_data_dir
from recsys.registry import Registry
from recsys.serving.auth import TokenAuthInterceptor, server_credentials
from recsys.serving.batching import ColdBatcher
from recsys.serving.config import ServeConfig
from recsys.serving.engine import LiveState
from recsys.serving.exposure import ExposureLog
from recsys.serving.latency import StallMonitor
from recsys.serving.metrics import ServingMetrics
from recsys.serving.model import (
    CONTROL,
    RANKER_SUBDIR,
    AnyModel,
    BaselineModel,
    ItemCatalogue,
    ModelHolder,
    ServingModel,
    SingleVariantRouter,
    VariantRouter,
    load_model,
)
from recsys.serving.proto import ranking_pb2 as pb
from recsys.serving.proto import ranking_pb2_grpc as pb_grpc
from recsys.serving.servicer import AdminServicer, RankingServicer
from recsys.serving.validation import add_guarded
from recsys.state.service import StateService

log = logging.getLogger("recsys.serving")
SERVICES = tuple(pb.DESCRIPTOR.services_by_name[name].full_name for name in ("RankingService", "ModelAdmin"))
SWITCH_INTERVAL_S = 0.0005  # sys.setswitchinterval while serving (CPython's default is 0.005)
STATE_HEALTH = "recsys.state"  # health name: NOT_SERVING while the event log is unreachable (Rank still serves)


def _data_dir(config: ServeConfig, registry: Registry, version: str | None) -> Path:
    """The prepared dataset giving id maps and item texts: --data, else the ranker's training data."""
    if config.data is not None:
        return config.data
    version_dir = registry.path(registry.resolve(version))
    ranker = version_dir / RANKER_SUBDIR if (version_dir / RANKER_SUBDIR).is_dir() else config.ranker
    if ranker is None:
        raise ConfigError("pass --data PREPARED: the prepared dataset the ranker was trained on (id maps, item texts)")
    return recorded_data_dir(ranker)


class ServingApp:
    """Everything the servicers share: models per variant, live features, logs, metrics, pools.

    Without --experiments one holder, "control", serves every request. With --experiments there is one
    holder per ranker name the config can route to (registry versions and baselines), an
    `ExperimentRouter` choosing per request, and a `ConfigWatcher` re-reading the file: an edit is
    parsed, validated, its new or changed rankers loaded (`_prepare_rankers`), and only then swapped
    in; anything failing on the way leaves the running config and models serving."""

    def __init__(self, config: ServeConfig, router: VariantRouter | None = None) -> None:
        self.config = config
        self.registry = Registry(config.registry)
        experiments: ExperimentConfig | None = None
        if config.experiments is not None:
            if router is not None:
                raise ConfigError("pass either an experiment config or a router, not both")
            experiments = load_config(config.experiments)  # fail fast, before any model loads
        self.data_dir = _data_dir(config, self.registry, _state_version(config, experiments))
        data = PreparedData.load(self.data_dir)
        items = data.items.sort("item_idx")
        self.catalogue = ItemCatalogue.from_lists(
            items["item_id"].cast(pl.Utf8).to_list(), items["text"].cast(pl.Utf8).fill_null("").to_list()
        )
        self._users = data.users.sort("user_idx")["user_id"].cast(pl.Utf8).to_list()
        self._live: LiveState | None = None  # set by the first model load
        self.metrics = ServingMetrics()
        self.holders: dict[str, ModelHolder] = {}
        self.specs: dict[str, RankerSpec | None] = {}  # what each holder was loaded from (None: --version)
        self._models_lock = threading.Lock()  # one config's rankers load at a time
        self._idle: set[str] = set()  # holders no config traffic reached at the last prune
        self.pinned: set[str] = set()  # variants an admin Reload{version} pinned: the registry watcher skips them
        self.experiments: ExperimentRouter[AnyModel] | None = None
        self.watcher: ConfigWatcher | None = None
        if experiments is None:
            self._install(self._load_all({CONTROL: None}))
            self.router: VariantRouter = router or SingleVariantRouter(self.holders)
        else:
            assert config.experiments is not None
            self.experiments, self.watcher = build_router(
                config.experiments, resolve=lambda name: self.holders[name].current, prepare=self._prepare_rankers
            )
            self.router = self.experiments
            c = self.experiments.config
            log.info(
                "experiment config %s (version %s): %s; rankers %s",
                config.experiments, c.version, ", ".join(e.name for _, e in c.experiments()) or "no experiments",
                ", ".join(f"{n}={self.holders[n].current.version}" for n in sorted(self.holders)),
            )
        # Start-up replay (snapshot + log tail) before anything is served; the follower starts with the server.
        self.state = StateService.open(
            self.live, state=config.state, state_dir=config.state_dir,
            snapshot_events=config.snapshot_events, snapshot_s=config.snapshot_s,
        )
        self.executor = ThreadPoolExecutor(config.threads, thread_name_prefix="rank")
        self.reload_executor = ThreadPoolExecutor(1, thread_name_prefix="reload")
        self.batcher = ColdBatcher(self.executor, config.cold_batch, config.cold_wait_ms / 1000)
        self.exposure = (
            ExposureLog(config.exposure_dir, config.exposure_flush_records, config.exposure_flush_s)
            if config.exposure_dir is not None
            else None
        )
        self._counted: dict[str, int] = {}  # totals already added to the drop counters
        self.inflight = 0
        self.draining = False
        self.reload_lock = asyncio.Lock()

    @property
    def live(self) -> LiveState:
        """The feature state kept current by the events RPCs (shared by every model)."""
        assert self._live is not None, "no model loaded yet"
        return self._live

    # ---------------------------------------------------------------- models per ranker

    def ranker_dir(self, name: str) -> Path | None:
        return self._ranker_dir(self.specs.get(name))

    def _ranker_dir(self, spec: RankerSpec | None) -> Path | None:
        """The LightGBM ranker directory used when a version has no ranker/ of its own: the config's
        `blender` (a relative path is taken from the config file's folder), else --ranker."""
        if spec is None or not spec.blender:
            return self.config.ranker
        path = Path(spec.blender).expanduser()
        if not path.is_absolute() and self.config.experiments is not None:
            path = self.config.experiments.parent / path
        return path

    def _build(self, spec: RankerSpec | None, state: FeatureState | None) -> AnyModel:
        cfg = self.config
        if spec is not None and spec.baseline is not None:
            return BaselineModel(spec.baseline)
        version = cfg.version if spec is None else (None if spec.model == "current" else spec.model)
        if self._live is not None:  # a running server: vet the version out of process first
            version = self.registry.resolve(version)
            self.vet(version, self._ranker_dir(spec))
        return load_model(
            self.registry, version, self.catalogue, state, ranker_dir=self._ranker_dir(spec),
            provider=cfg.provider, precision=cfg.precision, threads=cfg.ort_threads, cold_cache=cfg.cold_cache,
        )

    def _load_all(
        self, wanted: dict[str, RankerSpec | None], preferred: str = CONTROL
    ) -> dict[str, tuple[RankerSpec | None, AnyModel]]:
        """Load every wanted ranker beside the serving ones (nothing is installed: a failure leaves
        the service as it was). At startup the first model loaded (`preferred` if it is one) brings
        the saved feature state that becomes the live one; later loads must fit the live state."""
        state = self._live.state if self._live is not None else None
        order = sorted(wanted, key=lambda n: (_is_baseline(wanted[n]), n != preferred, n))
        # Rankers with the same pinned spec share one model (memory: item embeddings, ONNX sessions).
        shared: dict[RankerSpec, AnyModel] = {
            spec: self.holders[n].current
            for n, spec in self.specs.items()
            if spec is not None and spec.model not in (None, "current") and n in self.holders
            and self.holders[n].current.version == spec.model  # not since replaced by an admin Reload
        }
        staged: dict[str, tuple[RankerSpec | None, AnyModel]] = {}
        for name in order:
            spec = wanted[name]
            model = shared.get(spec) if spec is not None else None
            if model is None:
                model = self._build(spec, state)
                if state is None and isinstance(model, ServingModel):
                    state = model.initial_state
                if spec is not None:
                    shared[spec] = model
            staged[name] = (spec, model)
        if self._live is None:
            if state is None:  # only baselines: the feature state comes from a ranker directory
                state = self._saved_state()
            self._live = LiveState(state, self._users, self.catalogue, self.config.max_users)
        return staged

    def vet(self, version: str, ranker_dir: Path | None) -> None:
        """Load and smoke-score `version` in a child process (recsys.candidate): a version that would
        crash or fail to score is refused (ModelError) before this process parses any of it."""
        from recsys.candidate import vet_version

        cfg = self.config
        result = vet_version(
            self.registry.root, version, ranker=ranker_dir, data=self.data_dir, provider=cfg.provider,
            precision=cfg.precision,
        )
        log.info("version %s passed the load-and-score check in %.1fs", version, result["seconds"])

    def _saved_state(self) -> FeatureState:
        from recsys.ranker import Ranker

        own = self.registry.path(self.registry.resolve(self.config.version)) / RANKER_SUBDIR
        path = own if own.is_dir() else self.config.ranker
        if path is None:
            raise ModelError(
                "an experiment config with only baseline rankers needs a feature state: pass --ranker "
                "(or serve a registry version with a ranker/ directory)"
            )
        return Ranker.load(path).load_state()

    def _install(self, staged: dict[str, tuple[RankerSpec | None, AnyModel]]) -> None:
        for name, (spec, model) in staged.items():
            if isinstance(model, ServingModel):
                model.initial_state = None
            holder = self.holders.get(name)
            if holder is None:
                self.holders[name] = ModelHolder(model)
                previous = None
            else:
                previous = holder.swap(model).version
            self.specs[name] = spec
            self.metrics.set_model(name, model.version, previous)
            if previous is not None:
                log.info("ranker %s: %s -> %s (experiment config)", name, previous, model.version)

    def _prepare_rankers(self, config: ExperimentConfig) -> None:
        """The watcher's `prepare` hook (and the startup load): load the rankers `config` routes to
        that are not loaded as it specifies (new names, or a changed model/blender/baseline), all of
        them before installing any. Runs on the watcher's thread."""
        with self._models_lock:
            wanted: dict[str, RankerSpec | None] = {
                name: config.rankers[name]
                for name in sorted(config.used_rankers())
                if name not in self.holders or self.specs.get(name) != config.rankers[name]
            }
            if wanted:
                self._install(self._load_all(wanted, config.default_ranker))

    def prune(self) -> list[str]:
        """Unload rankers the running config no longer routes to, once they were already idle at the
        previous call (a request that read the old config just before a swap still resolves)."""
        if self.experiments is None:
            return []
        used = self.experiments.config.used_rankers()
        with self._models_lock:
            idle = {name for name in self.holders if name not in used}
            dropped = sorted(idle & self._idle)
            for name in dropped:
                model = self.holders.pop(name).current
                self.specs.pop(name, None)
                with contextlib.suppress(KeyError):
                    self.metrics.model.remove(name, model.version)
                log.info("ranker %s (%s) unloaded: the experiment config no longer routes to it", name, model.version)
            self._idle = idle - set(dropped)
        return dropped

    @property
    def default_variant(self) -> str:
        """What Reload reloads when no variant is named."""
        return self.experiments.config.default_ranker if self.experiments is not None else CONTROL

    def follows_registry(self, name: str) -> bool:
        """Does holder `name` track the registry's current pointer (--watch-registry)? Not while an
        admin Reload{version} pins it; a Reload without a version follows the registry again."""
        if name not in self.specs or name in self.pinned:
            return False
        spec = self.specs[name]
        return spec is None or spec.model == "current"

    def experiment_status(self) -> dict[str, Any] | None:
        if self.watcher is None:
            return None
        status = self.watcher.status()
        status["name"] = self.watcher.config.name
        return status

    # ---------------------------------------------------------------- timers

    async def reload(self, variant: str, version: str | None, by_watcher: bool = False) -> tuple[str, str, float]:
        """Vet `version` (None: registry current) in a child process, load it beside the serving
        model, then swap. Serialised; a failure leaves the serving model in place and is reported
        (FAILED_PRECONDITION / NOT_FOUND). With --experiments a variant is a ranker name of the config;
        baselines have nothing to reload.

        The pin rule (with --watch-registry): an admin Reload naming a version pins the variant there
        and the registry watcher leaves it alone; an admin Reload without a version loads the
        registry's current version and follows the registry again. The watcher (`by_watcher`) never
        pins, and gives way to a pin set while it waited for the lock."""
        holder = self.holders.get(variant)
        if holder is None:
            raise NotFoundError(f"unknown variant {variant!r}: serving {sorted(self.holders)}")
        if isinstance(holder.current, BaselineModel):
            raise ModelError(f"{variant!r} serves the {holder.current.kind} baseline: there is no model version to reload")
        async with self.reload_lock:
            if by_watcher and variant in self.pinned:
                return holder.current.version, holder.current.version, 0.0
            started = time.perf_counter()
            try:
                model = await asyncio.get_running_loop().run_in_executor(
                    self.reload_executor, self._vet_and_load, version, self.ranker_dir(variant)
                )
            except InputError as exc:  # unknown version / no current version
                self.metrics.reloads.labels(variant, "refused").inc()
                raise NotFoundError(str(exc)) from exc
            except Exception:
                self.metrics.reloads.labels(variant, "refused").inc()
                raise
            old = holder.swap(model)
            if not by_watcher:
                (self.pinned.add if version else self.pinned.discard)(variant)
            seconds = time.perf_counter() - started
            self.metrics.set_model(variant, model.version, old.version)
            self.metrics.reloads.labels(variant, "ok").inc()
            log.info(
                "variant %s: %s -> %s (loaded in %.2fs%s)", variant, old.version, model.version, seconds,
                ", pinned" if variant in self.pinned else "",
            )
            return old.version, model.version, seconds

    def _vet_and_load(self, version: str | None, ranker_dir: Path | None) -> ServingModel:
        name = self.registry.resolve(version)
        self.vet(name, ranker_dir)
        cfg = self.config
        return load_model(
            self.registry, name, self.live.catalogue, self.live.state, ranker_dir=ranker_dir,
            provider=cfg.provider, precision=cfg.precision, threads=cfg.ort_threads, cold_cache=cfg.cold_cache,
        )

    async def background(self) -> None:
        """Timers: exposure flush deadline, registry watch, cold-batch metrics."""
        period = min(self.config.exposure_flush_s, self.config.watch_s or 1.0, 0.5)
        next_watch = 0.0
        loop = asyncio.get_running_loop()
        failed: dict[str, str | None] = {}
        while True:
            await asyncio.sleep(period)
            if self.exposure is not None:
                self.exposure.flush_if_due()
            for size in self.batcher.batch_sizes:
                self.metrics.cold_batches.observe(size)
            self.batcher.batch_sizes.clear()
            self._count_drops()
            if self.config.watch_s and loop.time() >= next_watch:
                next_watch = loop.time() + self.config.watch_s
                current: str | None = None
                for name in [n for n in sorted(self.holders.copy()) if self.follows_registry(n)]:
                    try:
                        current = self.registry.current()
                        holder = self.holders.get(name)
                        if holder and current and current not in (holder.current.version, failed.get(name)):
                            await self.reload(name, current, by_watcher=True)
                    except Exception as exc:  # keep serving
                        failed[name] = current
                        log.error("registry watch: version %s refused for %s: %s", current, name, exc)

    def _count_drops(self) -> None:
        """Evicted users and dropped cold texts since the last tick -> their counters (on the loop)."""
        users = self.live.users
        self.metrics.users.set(len(users))
        for counter, total, key in (
            (self.metrics.users_evicted, users.evicted, "users"), (self.metrics.cold_dropped, self.batcher.dropped, "cold"),
        ):
            counter.inc(total - self._counted.get(key, 0))
            self._counted[key] = total

    async def watch_experiments(self) -> None:
        """Re-read the experiment config every experiments_poll_s (file I/O and model loads in a
        thread, so request handling and the exposure timers never wait on them)."""
        interval = self.config.experiments_poll_s
        if self.watcher is None or not interval:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.watcher.poll)  # refusals are logged and kept in status()
            except Exception:
                log.exception("experiment config watch failed; still serving version %s", self.watcher.config.version)
            self.prune()

    def close(self) -> None:
        if self.exposure is not None:
            self.exposure.close()
        self.state.close()
        self.executor.shutdown(wait=True)
        self.reload_executor.shutdown(wait=True)


def _is_baseline(spec: RankerSpec | None) -> bool:
    return spec is not None and spec.baseline is not None


def _state_version(config: ServeConfig, experiments: ExperimentConfig | None) -> str | None:
    """The registry version whose ranker names the prepared dataset when --data is not given."""
    if experiments is not None:
        spec = experiments.rankers[experiments.default_ranker]
        specs = [spec, *(experiments.rankers[n] for n in sorted(experiments.used_rankers()))]
        for s in specs:
            if s.model is not None:
                return None if s.model == "current" else s.model
    return config.version


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
        self.monitor: StallMonitor | None = None

    def _monitor_stalls(self) -> None:
        """--stall-ms: time this loop's callbacks; background work marks itself for the attribution."""
        app = self.app
        self.monitor = StallMonitor(app.config.stall_ms / 1000, on_stall=app.metrics.stall)
        self.monitor.install(asyncio.get_running_loop())
        for part in (app.exposure, app.state, app.state.follower, app.batcher):
            if part is not None:
                part.monitor = self.monitor

    async def start(self) -> None:
        if self.app.config.stall_ms:
            self._monitor_stalls()
        await self.grpc.start()
        self.app.state.start()
        self._tasks.append(asyncio.ensure_future(self.app.background()))
        self._tasks.append(asyncio.ensure_future(self._watch_state()))
        self._tasks.append(asyncio.ensure_future(self.app.watch_experiments()))
        cfg = self.app.config
        if cfg.metrics_port is not None:
            self.metrics_http, self.metrics_port = self.app.metrics.start_http(cfg.metrics_port, cfg.metrics_host)

    async def _watch_state(self, period_s: float = 0.25) -> None:
        """Replica lag and log reachability -> metrics and the `recsys.state` health name."""
        from grpc_health.v1 import health_pb2

        follower, metrics = self.app.state.follower, self.app.metrics
        serving: bool | None = None
        tick = 0
        while True:
            self.app.state.flush_exposures_soon()  # served lists of a quiet moment
            tick += 1
            if tick % 4 == 1:
                metrics.state_lag.set(await asyncio.to_thread(follower.refresh_lag))
            ok = follower.error is None
            metrics.state_degraded.set(0 if ok else 1)
            if ok != serving:
                serving = ok
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                await self.health.set(STATE_HEALTH, status)
            await asyncio.sleep(period_s)

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """NOT_SERVING, still serving for `drain` s -> refuse new RPCs (UNAVAILABLE) -> admitted ones
        finish (up to `grace` s) -> stop the transport -> flush the exposure log.

        grpc.aio's own `stop(grace)` cancels calls that reached the transport but whose handler has
        not run yet (queued behind inline work on the event loop): they would get CANCELLED, which
        retry policies do not retry. So the transport stops only once the handlers have drained: by
        then every late arrival was answered UNAVAILABLE by `Handler.call`."""
        if self._stopped.is_set():
            return
        from grpc_health.v1 import health_pb2

        cfg = self.app.config
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(cfg.drain_s if drain is None else drain)
        self.app.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (cfg.grace_s if grace is None else grace)
        quiet_since: float | None = None
        while loop.time() < deadline:  # admitted RPCs finish; queued ones run and are refused
            if self.app.inflight:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= 0.05:
                break
            await asyncio.sleep(0.005)
        await self.grpc.stop(max(deadline - loop.time(), 0.0))
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.get_running_loop().run_in_executor(None, self.app.close)
        if self.monitor is not None:
            self.monitor.uninstall()
            if self.app.config.stall_log is not None:
                self.monitor.write(self.app.config.stall_log)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
        self._stopped.set()
        log.info("server stopped; exposure rows written: %s", self.app.exposure.written if self.app.exposure else 0)

    async def wait(self) -> None:
        await self._stopped.wait()


def _enable_reflection(server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """Server reflection as both grpc.reflection.v1 and v1alpha (grpcurl and newer clients ask v1,
    older ones v1alpha). The two protos are wire-identical, so one servicer answers both names."""
    from grpc_reflection.v1alpha import reflection, reflection_pb2

    names = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")
    servicer = reflection.aio.ReflectionServicer((*services, *names))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}) for name in names)
    )


async def create_server(config: ServeConfig, router: VariantRouter | None = None) -> tuple[RankingServer, int]:
    """Load the model, build the server, bind the port (0 = any free one); call `start()` to serve."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    credentials = (  # checked before the model loads: a mismatched key fails fast, naming the file
        server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        if config.tls_cert is not None and config.tls_key is not None
        else None
    )
    loop = asyncio.get_running_loop()
    app = await loop.run_in_executor(None, lambda: ServingApp(config, router))
    interceptors = [TokenAuthInterceptor(config.auth_token, config.auth_all)] if config.auth_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.so_reuseport", int(config.reuse_port)), ("grpc.max_receive_message_length", 16 * 1024 * 1024)],
    )
    add_guarded(server, pb_grpc.add_RankingServiceServicer_to_server, RankingServicer(app), stages=app.metrics.stages)
    add_guarded(server, pb_grpc.add_ModelAdminServicer_to_server, AdminServicer(app))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _enable_reflection(server, (*SERVICES, health.SERVICE_NAME))
    address = f"{config.host}:{config.port}"
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot bind {address}: the port is taken or the address is not local")
    return RankingServer(app, server, health_servicer), port


async def serve(config: ServeConfig, ready: Any = None) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully. `ready(port, metrics_port)` is called once
    serving (scripts that bind port 0 learn the ports from it)."""
    from threadpoolctl import threadpool_limits

    # One BLAS thread: the request path's matrix products are small (100 x 384), where OpenBLAS's
    # thread pool costs more in wake-ups and spin-waits than it saves; concurrency comes from requests.
    threadpool_limits(1, user_api="blas")
    server, port = await create_server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    models = ", ".join(f"{name}={h.current.version}" for name, h in sorted(server.app.holders.items()))
    log.info(
        "serving %s on port %d (%s; metrics %s)",
        models, port, "TLS" if config.tls_cert else "plaintext", server.metrics_port,
    )
    # Everything loaded so far lives as long as the process: keep it out of the cyclic collector's
    # scans, whose full passes over it were the service's longest pauses (tens of ms).
    gc.collect()
    gc.freeze()
    # A background thread (exposure flush, event-log append, fold) holding the GIL makes the event loop
    # wait up to the switch interval before it may run: 5 ms by default, the loop's longest stalls
    # under load (bench/results/serve_tail.md). 0.5 ms bounds that wait; the threads' own work is not
    # latency-bound and pays a few more switches.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    server.app.metrics.gc_frozen.set(gc.get_freeze_count())
    if ready is not None:
        ready(port, server.metrics_port)
    await stop.wait()
    log.info("signal received: NOT_SERVING, draining (drain %.1fs, grace %.1fs)", config.drain_s, config.grace_s)
    await server.stop()
