"""The service side: a `VariantRouter` driven by an experiment config, and a hot-reload watcher.

`ExperimentRouter(config, resolve)` is called per request as
`router(user_id, request_id, context=None, t_us=None) -> (label, model)`, which is the serving hook's
signature (`recsys.serving.model.VariantRouter`) plus two optional arguments. `resolve(ranker_name)`
returns the model object for a ranker (the service passes e.g. `lambda n: holders[n].current`), so
this module needs no serving imports. The config is swapped by one reference assignment: a request
reads it once, so in-flight requests finish under the config they started with.

`ConfigWatcher` polls the file; a new version is parsed, validated, checked by the service's `prepare`
hook (load the models it names) and only then swapped in. A malformed file is refused and reported
(`status()["last_error"]`, an ERROR log line once per bad content), and the last good config keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from recsys.errors import ConfigError
from recsys.experiments.assignment import Assignment, Context, assign, explain
from recsys.experiments.config import ExperimentConfig, load_config, parse_config

log = logging.getLogger("recsys.experiments")
M = TypeVar("M")


class ExperimentRouter(Generic[M]):
    """Routes requests to their variant's ranker; thread-safe, no locks on the request path."""

    def __init__(self, config: ExperimentConfig, resolve: Callable[[str], M]) -> None:
        self._resolve = resolve
        self._check(config)
        self._config = config

    @property
    def config(self) -> ExperimentConfig:
        return self._config

    def _check(self, config: ExperimentConfig) -> None:
        """Every reachable ranker must resolve now, not fail on the first request that needs it."""
        for name in sorted(config.used_rankers()):
            try:
                self._resolve(name)
            except Exception as exc:
                raise ConfigError(
                    f"experiment config {config.version}: ranker {name!r} is not loaded by the service "
                    f"({type(exc).__name__}: {exc}): load it before switching to this config"
                ) from None

    def swap(self, config: ExperimentConfig) -> ExperimentConfig:
        """Install `config` (after checking its rankers resolve); returns the previous one."""
        self._check(config)
        old, self._config = self._config, config
        if old.version != config.version:
            log.info("experiment config %s -> %s", old.version, config.version)
        return old

    def assignment(
        self, user_id: str, request_id: str = "", context: Context | None = None, t_us: float | None = None
    ) -> Assignment:
        return assign(self._config, user_id, request_id, context, t_us)

    def __call__(
        self, user_id: str, request_id: str, context: Context | None = None, t_us: float | None = None
    ) -> tuple[str, M]:
        a = assign(self._config, user_id, request_id, context, t_us)
        return a.label, self._resolve(a.ranker)

    def debug(
        self, user_id: str, request_id: str = "", context: Context | None = None, t_us: float | None = None
    ) -> dict[str, Any]:
        """The assignment debug call (JSON-serialisable): buckets, checks and the outcome."""
        return explain(self._config, user_id, request_id, context, t_us)


@dataclass
class WatchStatus:
    path: str
    version: str
    loaded_at: float
    last_error: str | None = None
    last_error_at: float | None = None
    refused: int = 0  # bad contents seen since start


class ConfigWatcher:
    """Hot reload with last-good semantics. `poll()` is cheap when the file is unchanged (one stat)."""

    def __init__(
        self,
        path: Path | str,
        apply: Callable[[ExperimentConfig], Any],
        prepare: Callable[[ExperimentConfig], Any] | None = None,
        current: ExperimentConfig | None = None,
    ) -> None:
        self.path = Path(path)
        self._apply = apply
        self._prepare = prepare
        self._lock = threading.Lock()
        self._stat: tuple[int, int] | None = None
        self._digest: str | None = None
        if current is None:
            current = load_config(self.path)  # startup: a bad file is fatal (nothing to fall back on)
            apply(current)
        self._remember()
        self.config = current
        self._status = WatchStatus(str(self.path), current.version, time.time())
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _remember(self) -> None:
        try:
            st = self.path.stat()
            self._stat = (st.st_mtime_ns, st.st_size)
            self._digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            self._stat = None

    def status(self) -> dict[str, Any]:
        return dict(vars(self._status))

    def poll(self) -> bool:
        """Reload if the file changed; True when a new config was installed."""
        with self._lock:
            try:
                st = self.path.stat()
                stat = (st.st_mtime_ns, st.st_size)
                if stat == self._stat:
                    return False
                data = self.path.read_bytes()
            except OSError as exc:
                return self._refuse(f"experiment config {self.path} cannot be read: {exc}", key=f"os:{exc}")
            self._stat = stat
            digest = hashlib.sha256(data).hexdigest()
            if digest == self._digest:
                return False  # touched, not changed
            self._digest = digest
            try:
                config = parse_config(data.decode("utf-8", errors="replace"), str(self.path))
                if config.version == self.config.version:  # reformatted or reverted: same semantics
                    self._status.last_error = self._status.last_error_at = None
                    return False
                if self._prepare is not None:
                    self._prepare(config)
                self._apply(config)
            except Exception as exc:  # anything: the running config must keep serving
                return self._refuse(str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}")
            self.config = config
            self._status = WatchStatus(str(self.path), config.version, time.time(), refused=self._status.refused)
            log.info("experiment config reloaded: %s (version %s)", self.path, config.version)
            return True

    def _refuse(self, message: str, key: str | None = None) -> bool:
        s = self._status
        if s.last_error != message:
            log.error("experiment config refused, still serving version %s: %s", s.version, message)
            s.refused += 1
        s.last_error, s.last_error_at = message, time.time()
        if key is not None:
            self._stat = None  # retry the read next poll
        return False

    async def run(self, interval_s: float = 5.0) -> None:
        """Poll forever from an event loop (file I/O in a thread)."""
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.poll)

    def start(self, interval_s: float = 5.0) -> None:
        """Poll on a daemon thread (for non-asyncio hosts); `stop()` ends it."""
        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.poll()

        self._thread = threading.Thread(target=loop, name="experiment-config", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def build_router(
    path: Path | str, resolve: Callable[[str], M], prepare: Callable[[ExperimentConfig], Any] | None = None
) -> tuple[ExperimentRouter[M], ConfigWatcher]:
    """Startup helper: load the file (fatal if bad), build the router and its watcher."""
    config = load_config(path)
    if prepare is not None:
        prepare(config)
    router: ExperimentRouter[M] = ExperimentRouter(config, resolve)
    return router, ConfigWatcher(path, router.swap, prepare, current=config)

