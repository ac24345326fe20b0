"""gRPC servicers: proto <-> engine, and the one place errors become status codes.

    FieldError / InputError      -> INVALID_ARGUMENT (field path in the message and in the
                                    `invalid-field` trailing metadata)
    ModelError                   -> FAILED_PRECONDITION (e.g. a broken version on Reload; a baseline
                                    ranker on Reload; ExplainAssignment without --experiments)
    ServiceError(code)           -> that code: RESOURCE_EXHAUSTED (shed), UNAVAILABLE (draining),
                                    NOT_FOUND (unknown version or variant)
    StateUnavailable             -> UNAVAILABLE (the event log cannot take events: nothing acknowledged)
    deadline passed              -> DEADLINE_EXCEEDED
    anything else                -> INTERNAL (logged with its traceback)
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from recsys.errors import ConfigError, InputError, ModelError, NotFoundError
from recsys.experiments.assignment import SESSION_KEY
from recsys.experiments.config import context_text
from recsys.serving import engine
from recsys.serving.latency import StageClock
from recsys.serving.metrics import variant_series
from recsys.serving.model import BaselineModel
from recsys.serving.proto import ranking_pb2 as pb
from recsys.serving.proto import ranking_pb2_grpc as pb_grpc
from recsys.serving.validation import (
    FieldError,
    RankInput,
    RecommendInput,
    assignment_input,
    events_input,
    rank_input,
    recommend_input,
    reload_version,
)
from recsys.state.log import StateUnavailable, format_position

if TYPE_CHECKING:
    from recsys.serving.server import ServingApp

log = logging.getLogger("recsys.serving")
T = TypeVar("T")
LOCAL_FOLD_S = 5.0  # LogEvents waits this long at most for its own process to fold what it appended


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, StateUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, InputError | ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ModelError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the request was scored"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as event-loop time (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def _timestamp(t_us: float) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromMicroseconds(int(t_us))
    return ts


class Handler:
    """Shared RPC plumbing: admission (load shedding, draining), deadlines, metrics, error mapping."""

    def __init__(self, app: ServingApp) -> None:
        self.app = app

    async def call(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        work: Callable[[], Awaitable[tuple[T, str]]],
        shed: bool = True,
    ) -> T:
        app = self.app
        metrics = app.metrics
        if app.draining:
            metrics.errors.labels(rpc, "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down: retry on another replica")
        if shed and app.inflight >= app.config.max_inflight:
            metrics.shed.labels(rpc).inc()
            metrics.errors.labels(rpc, "RESOURCE_EXHAUSTED").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server at its in-flight limit ({app.config.max_inflight}): back off and retry",
            )
        app.inflight += 1
        metrics.inflight.inc()
        started = time.perf_counter()
        failure: tuple[grpc.StatusCode, str, str | None] | None = None
        try:
            response, variant = await work()
            metrics.latency.labels(rpc, variant_series(variant)).observe(time.perf_counter() - started)
            return response
        except Exception as exc:
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", rpc)
            else:
                log.debug("%s refused: %s %s", rpc, code.name, message)
            failure = (code, message, exc.field if isinstance(exc, FieldError) else None)
        finally:
            app.inflight -= 1
            metrics.inflight.dec()
        code, message, field = failure
        metrics.errors.labels(rpc, code.name).inc()
        if field is not None:
            context.set_trailing_metadata((("invalid-field", field),))
        await context.abort(code, message)
        raise AssertionError("unreachable")  # abort raises

    async def run(
        self, context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: Any, inline: bool = False,
        clock: StageClock | None = None, **kwargs: Any,
    ) -> T:
        """CPU-bound work on the worker pool, bounded by the caller's deadline.

        inline=True: the caller vouches that the work is small and bounded (a warm Rank: ~1 ms of
        vectorised NumPy/ONNX/LightGBM), so it runs right here on the event loop, as protobuf parsing
        does: the hop to a worker thread and back costs more CPU than the work itself and adds two
        thread wake-ups to the request (bench/serve.py: +20% throughput, lower p95/p99 inline). The
        work must not block: the engine raises `engine.StateBusy` instead of waiting for the feature
        state's write lock (events being applied), and the work then goes to the pool."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise TimeoutError
        if clock is not None:
            kwargs["clock"] = clock
        if inline:
            try:
                return fn(*args, blocking=False, **kwargs)
            except engine.StateBusy:
                pass
        call: Callable[[], T] = functools.partial(fn, *args, **kwargs)
        if clock is not None:
            clock.restart()
            call = functools.partial(_lapped, clock, call)

        future = asyncio.get_running_loop().run_in_executor(self.app.executor, call)
        return await asyncio.wait_for(future, remaining)


def _lapped(clock: StageClock, call: Callable[[], T]) -> T:
    """On the worker thread: the lap since submission is the pool wait."""
    clock.lap("pool_wait")
    return call()


def _items(
    ranked: engine.Ranked, served: list[str], *, scores: np.ndarray, match: np.ndarray, source: np.ndarray, explain: bool
) -> list[Any]:
    """ScoredItems of the served list (ids, scores, match scores, sources in served order)."""
    rows = zip(served, scores.tolist(), match.tolist(), source.tolist(), strict=True)
    out = [
        pb.ScoredItem(item_id=item, score=score, match_score=m, position=pos, source=src)
        for pos, (item, score, m, src) in enumerate(rows)
    ]
    if explain and ranked.contributions is not None and ranked.bias is not None and ranked.features is not None:
        names = ranked.features.names
        for pos, (item, i) in enumerate(zip(out, ranked.order.tolist(), strict=True)):
            contrib = ranked.contributions[pos]
            values = ranked.features.matrix[i]
            item.bias = float(ranked.bias[pos])
            item.contributions.extend(
                pb.FeatureContribution(name=names[j], value=float(values[j]), contribution=float(contrib[j]))
                for j in np.argsort(-np.abs(contrib), kind="stable").tolist()
            )
    return out


class RankingServicer(pb_grpc.RankingServiceServicer):
    def __init__(self, app: ServingApp) -> None:
        self.app = app
        self.handler = Handler(app)

    async def Rank(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.handler.call("Rank", context, lambda: self._rank(request, context))

    async def _rank(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, str]:
        started = time.perf_counter()
        app = self.app
        await self._consistent(request.consistency_token)
        clock = StageClock(app.metrics.stages["Rank"])
        inp = rank_input(request, app.config)
        variant, model = app.router(inp.user_id, inp.request_id, inp.context)
        idx = app.live.catalogue.lookup(inp.item_ids)
        inline = len(idx) <= app.config.inline_candidates and not inp.explain
        clock.lap("validate")
        if isinstance(model, BaselineModel):
            ranked = await self.handler.run(context, engine.rank_baseline, model, app.live, inp, idx, inline=inline)
        else:
            cold = np.flatnonzero((idx < 0) & np.fromiter(map(bool, inp.texts), bool, len(inp.texts)))
            if len(cold):
                vectors = await app.batcher.encode(model, [inp.texts[i] for i in cold], _deadline(context))
                clock.lap("cold_encode")
            else:
                vectors = None
            ranked = await self.handler.run(
                context, engine.rank, model, app.live, inp, idx, vectors, inline=inline, clock=clock
            )
        return self._respond(
            pb.RankResponse, inp, inp.item_ids, ranked, version=model.version, variant=variant, started=started, clock=clock
        )

    def _respond(
        self, cls: Any, inp: RankInput | RecommendInput, ids: list[str], ranked: engine.Ranked, *,
        version: str, variant: str, started: float, clock: StageClock | None = None,
    ) -> tuple[Any, str]:
        """The reply and the exposure log of one served list (`ids`: the request's candidate ids)."""
        app = self.app
        request_id, user_id, t_us, context = inp.request_id, inp.user_id, inp.time_us, inp.context
        latency_ms = (time.perf_counter() - started) * 1000.0
        order = ranked.order  # the served list, best first: gathered once for the reply and the log
        served = [ids[i] for i in order.tolist()]
        scores, match, source = ranked.scores[order], ranked.match[order], ranked.source[order]
        items = _items(ranked, served, scores=scores, match=match, source=source, explain=inp.explain)
        response = cls(request_id=request_id, items=items, model_version=version, variant=variant)
        if clock is not None:
            clock.lap("reply")
        if app.exposure is not None:
            session = context.get(SESSION_KEY)
            app.exposure.append(
                request_id, user_id, t_us, version, variant, served, scores, match, source,
                latency_ms=latency_ms, session_id=context_text(session) if session not in (None, "") else None,
            )
            app.metrics.exposures.inc(len(order))
            if app.config.folds_exposures:  # logged served lists are impressions every replica's features see
                app.state.append_exposure(user_id, t_us, request_id, served)
            if clock is not None:
                clock.lap("exposure")
        counts = np.bincount(ranked.source, minlength=4)
        for code, name in ((1, "catalogue"), (2, "encoded"), (3, "no_text")):
            if counts[code]:
                app.metrics.items.labels(name).inc(int(counts[code]))
        return response, variant

    async def Recommend(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.handler.call("Recommend", context, lambda: self._recommend(request, context))

    async def _recommend(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, str]:
        started = time.perf_counter()
        app = self.app
        await self._consistent(request.consistency_token)
        inp = recommend_input(request, app.config)
        variant, model = app.router(inp.user_id, inp.request_id, inp.context)

        def work() -> tuple[engine.Ranked, np.ndarray]:
            if isinstance(model, BaselineModel):
                return engine.recommend_baseline(model, app.live, inp)
            return engine.recommend(model, app.live, inp)

        ranked, idx = await self.handler.run(context, work)
        ids = [app.live.catalogue.ids[i] for i in idx.tolist()]
        return self._respond(pb.RecommendResponse, inp, ids, ranked, version=model.version, variant=variant, started=started)

    async def _consistent(self, token: str) -> None:
        """Read-your-writes: wait (bounded) until this process folded the events behind `token`."""
        if token and not await self.app.state.wait_token(token, self.app.config.consistency_wait_ms / 1000):
            self.app.metrics.consistency_timeouts.inc()

    async def _append(self, requests: list[Any], key: str, context: grpc.aio.ServicerContext) -> Any:
        """Validate, append durably to the event log, wait (bounded) for this process to fold it.
        The reply is sent only after the append is durable; a log that cannot take it -> UNAVAILABLE."""
        app = self.app
        inp = events_input(requests, app.config)
        unknown = int((app.live.catalogue.lookup(inp.item_ids) < 0).sum())
        new = len({u for u in inp.user_ids if app.live.users.get(u) < 0})
        position = await app.state.append(inp, key)
        remaining = context.time_remaining()
        await app.state.follower.wait_for(position, min(remaining, LOCAL_FOLD_S) if remaining else LOCAL_FOLD_S)
        accepted = len(inp) - unknown
        app.metrics.events.labels("accepted").inc(accepted)
        if unknown:
            app.metrics.events.labels("unknown_item").inc(unknown)
        return pb.LogEventsResponse(
            accepted=accepted, unknown_items=unknown, new_users=new, consistency_token=format_position(position)
        )

    async def LogEvents(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> tuple[Any, str]:
            return await self._append([request], request.idempotency_key, context), "-"

        return await self.handler.call("LogEvents", context, work)

    async def StreamEvents(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        """All or nothing: the stream's events (at most max_events) are appended as one record when
        the client closes it, so a broken stream appends nothing and its retry cannot double-count;
        with an idempotency_key (first message) a retry after a lost reply is folded once too."""

        async def work() -> tuple[Any, str]:
            requests: list[Any] = []
            total = 0
            async for request in request_iterator:
                total += len(request.events)
                if total > self.app.config.max_events:
                    raise FieldError("events", f"the stream has more than {self.app.config.max_events} events, the "
                                     "limit per stream (it is appended as one batch): split it into several streams")
                if request.events:
                    requests.append(request)
            # A client that died mid-stream (RST_STREAM) ends the iteration like a half-close does; the
            # cancellation that came with it reaches this task within a few loop turns and cancels it
            # here, before anything is appended.
            for _ in range(3):
                await asyncio.sleep(0)
            if context.cancelled():
                raise asyncio.CancelledError
            if not requests:
                return pb.LogEventsResponse(consistency_token=self.app.state.token()), "-"
            return await self._append(requests, requests[0].idempotency_key, context), "-"

        return await self.handler.call("StreamEvents", context, work)


class AdminServicer(pb_grpc.ModelAdminServicer):
    def __init__(self, app: ServingApp) -> None:
        self.app = app
        self.handler = Handler(app)

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> tuple[Any, str]:
            app = self.app
            variants = []
            for name, holder in sorted(app.holders.copy().items()):
                m = holder.current
                if isinstance(m, BaselineModel):
                    info = pb.VariantInfo(
                        variant=name, model_version=m.version, baseline=m.kind,
                        catalogue_items=len(app.live.catalogue.ids), loaded_at=_timestamp(m.loaded_at * 1e6),
                    )
                else:
                    info = pb.VariantInfo(
                        variant=name, model_version=m.version, ranker=str(m.ranker_path),
                        feature_names=list(m.ranker.feature_names), catalogue_items=len(m.item_emb),
                        loaded_at=_timestamp(m.loaded_at * 1e6), providers=list(m.providers),
                        pinned=name in app.pinned,
                    )
                variants.append(info)
            response = pb.GetModelInfoResponse(
                variants=variants, registry=str(app.registry.root), known_users=len(app.live.users),
                events_applied=app.live.events_applied,
                exposures_written=app.exposure.written if app.exposure is not None else 0,
            )
            st = app.state.follower.status()
            response.state.CopyFrom(pb.StateInfo(
                backend=st["backend"], position=format_position(st["position"]), lag_records=st["lag"],
                error=st["error"], records_folded=st["records"], duplicates_skipped=st["duplicates"],
            ))
            status = app.experiment_status()
            if status is not None:
                exp = response.experiments
                exp.path, exp.config_version, exp.name = status["path"], status["version"], status["name"]
                exp.loaded_at.CopyFrom(_timestamp(status["loaded_at"] * 1e6))
                exp.refused = int(status["refused"])
                if status["last_error"]:
                    exp.last_error = status["last_error"]
                    exp.last_error_at.CopyFrom(_timestamp(status["last_error_at"] * 1e6))
            return response, "-"

        return await self.handler.call("GetModelInfo", context, work, shed=False)

    async def Reload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> tuple[Any, str]:
            variant = request.variant or self.app.default_variant
            old, new, seconds = await self.app.reload(variant, reload_version(request))
            return pb.ReloadResponse(
                variant=variant, previous_version=old, model_version=new, load_seconds=seconds,
                pinned=variant in self.app.pinned,
            ), variant

        return await self.handler.call("Reload", context, work, shed=False)

    async def ExplainAssignment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> tuple[Any, str]:
            app = self.app
            router = app.experiments
            if router is None:
                raise ModelError("this server runs without an experiment config (start it with --experiments FILE)")
            inp = assignment_input(request, app.config)
            debug = router.debug(inp.user_id, inp.request_id, inp.context, inp.time_us)
            return pb.ExplainAssignmentResponse(
                json=json.dumps(debug, sort_keys=True), label=debug["label"], ranker=debug["ranker"],
                config_version=debug["config_version"],
            ), "-"

        return await self.handler.call("ExplainAssignment", context, work, shed=False)
