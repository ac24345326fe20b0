"""Request checks at the service edge: proto messages -> plain typed inputs, or a FieldError naming
the offending field (`candidates[3].item_id`), which the servicer maps to INVALID_ARGUMENT.

Everything here is cheap and linear in the request size; it runs before any model work, so a bad
request costs almost nothing and never reaches the engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys.data.schema import EVENT_ALIASES, EVENT_CODES
from recsys.errors import InputError
from recsys.registry import is_version_name
from recsys.serving.config import ServeConfig
from recsys.timestamps import range_problem


class FieldError(InputError):
    """A request field is missing or invalid; `field` is its path in the request."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class HistoryInput:
    item_ids: list[str]
    codes: list[int]
    ts_us: list[int]


@dataclass(frozen=True)
class RankInput:
    request_id: str
    user_id: str
    item_ids: list[str]
    texts: list[str]  # "" = no text
    extra: dict[str, np.ndarray]  # name -> [n] float64 (NaN where a candidate did not pass it)
    context: dict[str, str | float]
    top_k: int  # 0 = all
    explain: bool
    time_us: int
    history: HistoryInput | None


@dataclass(frozen=True)
class RecommendInput:
    request_id: str
    user_id: str
    history: HistoryInput | None
    top_k: int
    exclude: list[str]
    include_seen: bool
    context: dict[str, str | float]
    explain: bool
    retrieve_k: int
    time_us: int


@dataclass(frozen=True)
class EventsInput:
    user_ids: list[str]
    item_ids: list[str]
    event_types: list[str]
    ts_us: np.ndarray  # i64
    request_ids: list[str | None]
    values: np.ndarray  # f64, NaN = none

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True)
class ServedLists:
    """Served lists [L] (the item ids of all of them back to back, `counts[l]` each)."""

    user_ids: list[str]
    ts_us: np.ndarray  # [L] i64
    request_ids: list[str | None]
    counts: np.ndarray  # [L] i64
    item_ids: list[str]  # [sum(counts)]

    def __len__(self) -> int:
        """Impression events (what `events()` returns)."""
        return len(self.item_ids)

    @classmethod
    def from_lists(cls, lists: Sequence[tuple[str, int, str | None, list[str]]]) -> ServedLists:
        """(user id, epoch µs, request id, served item ids) per list."""
        return cls(
            [u for u, _, _, _ in lists], np.fromiter((t for _, t, _, _ in lists), np.int64, len(lists)),
            [r for _, _, r, _ in lists], np.fromiter((len(i) for _, _, _, i in lists), np.int64, len(lists)),
            [i for _, _, _, items in lists for i in items],
        )

    def list_of_item(self) -> np.ndarray:
        """[sum(counts)] the list each item belongs to."""
        return np.repeat(np.arange(len(self.counts)), self.counts)

    def events(self) -> EventsInput:
        """The same lists as impression events (one per served item)."""
        rows = self.list_of_item()
        return EventsInput(
            [self.user_ids[j] for j in rows.tolist()], list(self.item_ids), ["impression"] * len(rows), self.ts_us[rows],
            [self.request_ids[j] for j in rows.tolist()], np.full(len(rows), math.nan),
        )


def now_us() -> int:
    return time.time_ns() // 1000


def _ts(message: Any, name: str, default: int, field: str | None = None) -> int:
    """A Timestamp field -> epoch µs; out of the documented range (recsys.timestamps) is refused."""
    if not message.HasField(name):
        return default
    ts = getattr(message, name)
    problem = range_problem(int(ts.seconds), int(ts.nanos))
    if problem is not None:
        raise FieldError(field or name, problem)
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


def _id(value: str, field: str, limit: int, required: bool = True) -> str:
    if not value:
        if required:
            raise FieldError(field, "is required")
        return value
    if required and value.isspace():
        raise FieldError(field, "is only whitespace: pass a real id")
    if len(value) > limit:
        raise FieldError(field, f"is {len(value)} characters, the limit is {limit}")
    return value


def event_code(name: str, field: str) -> tuple[str, int]:
    """Event type (case-insensitive, aliases accepted) -> (canonical name, code)."""
    key = name.strip().lower()
    key = EVENT_ALIASES.get(key, key)
    if key not in EVENT_CODES:
        raise FieldError(field, f"unknown event type {name!r}: use one of {', '.join(EVENT_CODES)}")
    return key, EVENT_CODES[key]


def _context(raw: Mapping[str, Any], cfg: ServeConfig) -> dict[str, str | float]:
    out: dict[str, str | float] = {}
    for key, value in raw.items():
        _id(key, "context", cfg.max_id_chars)
        kind = value.WhichOneof("kind")
        if kind == "text":
            out[key] = _id(value.text, f"context[{key}].text", cfg.max_id_chars, required=False)
        elif kind == "number":
            if not math.isfinite(value.number):
                raise FieldError(f"context[{key}].number", "must be finite")
            out[key] = float(value.number)
        else:
            raise FieldError(f"context[{key}]", "has neither text nor number")
    return out


def _history(request: Any, cfg: ServeConfig, t_us: int) -> HistoryInput | None:
    if not request.HasField("history"):
        return None
    events = request.history.events
    if len(events) > cfg.max_history:
        raise FieldError("history.events", f"has {len(events)} events, the limit is {cfg.max_history}")
    ids, codes, stamps = [], [], []
    for i, event in enumerate(events):
        ids.append(_id(event.item_id, f"history.events[{i}].item_id", cfg.max_id_chars))
        codes.append(event_code(event.event_type or "click", f"history.events[{i}].event_type")[1])
        stamps.append(_ts(event, "timestamp", t_us, f"history.events[{i}].timestamp"))
    return HistoryInput(ids, codes, stamps)


def _top_k(value: int, field: str, cfg: ServeConfig, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not low <= value <= cfg.max_top_k:
        raise FieldError(field, f"must be in [{low}, {cfg.max_top_k}], got {value}")
    return value


def rank_input(request: Any, cfg: ServeConfig) -> RankInput:
    request_id = _id(request.request_id, "request_id", cfg.max_id_chars)
    user_id = _id(request.user_id, "user_id", cfg.max_id_chars)
    packed = len(request.candidate_ids)
    if packed and len(request.candidates):
        raise FieldError("candidate_ids", "set either candidates or candidate_ids, not both")
    field = "candidate_ids" if packed else "candidates"
    n = packed or len(request.candidates)
    if n == 0:
        raise FieldError("candidates", "is empty: pass at least one candidate (candidates or candidate_ids)")
    if n > cfg.max_candidates:
        raise FieldError(field, f"has {n} items, the limit is {cfg.max_candidates}")
    ids: list[str] = []
    texts: list[str] = []
    featured: list[int] = []
    if packed:
        ids = list(request.candidate_ids)
        texts = [""] * n
    else:
        # One pass over the candidate messages (each attribute read builds a Python object), then
        # C-speed checks over the plain lists; only failing or feature-carrying rows are revisited.
        for c in request.candidates:
            ids.append(c.item_id)
            texts.append(c.text)
            if c.features:
                featured.append(len(ids) - 1)
    id_field = "candidate_ids[{}]" if packed else "candidates[{}].item_id"
    if len(set(ids)) != n:
        seen: set[str] = set()
        for i, item in enumerate(ids):
            if item in seen:
                raise FieldError(id_field.format(i), f"duplicate id {item[:64]!r}")
            seen.add(item)
    if not all(ids) or max(map(len, ids)) > cfg.max_id_chars:
        for i, item in enumerate(ids):
            _id(item, id_field.format(i), cfg.max_id_chars)
    if max(map(len, texts)) > cfg.max_text_chars:
        i, text = next((i, t) for i, t in enumerate(texts) if len(t) > cfg.max_text_chars)
        raise FieldError(f"candidates[{i}].text", f"is {len(text)} characters, the limit is {cfg.max_text_chars}")
    extra: dict[str, np.ndarray] = {}
    for i in featured:
        features = request.candidates[i].features
        if len(features) > cfg.max_features:
            raise FieldError(f"candidates[{i}].features", f"has {len(features)} entries, the limit is {cfg.max_features}")
        for name, value in features.items():
            if not math.isfinite(value):
                raise FieldError(f"candidates[{i}].features[{name}]", "must be finite")
            extra.setdefault(name, np.full(n, np.nan))[i] = value
    t_us = _ts(request, "request_time", now_us())
    return RankInput(
        request_id=request_id,
        user_id=user_id,
        item_ids=ids,
        texts=texts,
        extra=extra,
        context=_context(request.context, cfg),
        top_k=_top_k(request.top_k, "top_k", cfg, allow_zero=True),
        explain=bool(request.explain),
        time_us=t_us,
        history=_history(request, cfg, t_us),
    )


def recommend_input(request: Any, cfg: ServeConfig) -> RecommendInput:
    request_id = _id(request.request_id, "request_id", cfg.max_id_chars)
    user_id = _id(request.user_id, "user_id", cfg.max_id_chars)
    top_k = _top_k(request.top_k, "top_k", cfg, allow_zero=False)
    if len(request.exclude_item_ids) > cfg.max_candidates:
        raise FieldError(
            "exclude_item_ids", f"has {len(request.exclude_item_ids)} ids, the limit is {cfg.max_candidates}"
        )
    exclude = [_id(x, f"exclude_item_ids[{i}]", cfg.max_id_chars) for i, x in enumerate(request.exclude_item_ids)]
    retrieve_k = request.retrieve_k or max(cfg.retrieve_k, top_k)
    if not top_k <= retrieve_k <= cfg.max_candidates:
        raise FieldError("retrieve_k", f"must be in [top_k={top_k}, {cfg.max_candidates}], got {retrieve_k}")
    t_us = _ts(request, "request_time", now_us())
    return RecommendInput(
        request_id=request_id,
        user_id=user_id,
        history=_history(request, cfg, t_us),
        top_k=top_k,
        exclude=exclude,
        include_seen=bool(request.include_seen),
        context=_context(request.context, cfg),
        explain=bool(request.explain),
        retrieve_k=retrieve_k,
        time_us=t_us,
    )


@dataclass(frozen=True)
class AssignmentInput:
    user_id: str
    request_id: str
    context: dict[str, str | float]
    time_us: int


def assignment_input(request: Any, cfg: ServeConfig) -> AssignmentInput:
    """ExplainAssignment: the inputs of the experiment assignment (request_id may be empty)."""
    return AssignmentInput(
        user_id=_id(request.user_id, "user_id", cfg.max_id_chars),
        request_id=_id(request.request_id, "request_id", cfg.max_id_chars, required=False),
        context=_context(request.context, cfg),
        time_us=_ts(request, "request_time", now_us()),
    )


def events_input(requests: list[Any], cfg: ServeConfig) -> EventsInput:
    """One or more LogEventsRequest messages -> aligned event arrays."""
    events = [e for r in requests for e in r.events]
    if not events:
        raise FieldError("events", "is empty")
    if len(events) > cfg.max_events:
        raise FieldError("events", f"has {len(events)} events, the limit per call is {cfg.max_events}")
    now = now_us()
    users, items, types, stamps, reqs, values = [], [], [], [], [], []
    for i, e in enumerate(events):
        users.append(_id(e.user_id, f"events[{i}].user_id", cfg.max_id_chars))
        items.append(_id(e.item_id, f"events[{i}].item_id", cfg.max_id_chars))
        name = event_code(_id(e.event_type, f"events[{i}].event_type", cfg.max_id_chars), f"events[{i}].event_type")[0]
        if name == "rating" and not e.value:
            raise FieldError(f"events[{i}].value", "a rating event needs its value")
        if not math.isfinite(e.value):
            raise FieldError(f"events[{i}].value", "must be finite")
        types.append(name)
        stamps.append(_ts(e, "timestamp", now, f"events[{i}].timestamp"))
        reqs.append(_id(e.request_id, f"events[{i}].request_id", cfg.max_id_chars, required=False) or None)
        values.append(e.value if e.value else math.nan)
    return EventsInput(users, items, types, np.asarray(stamps, np.int64), reqs, np.asarray(values, np.float64))


def reload_version(request: Any) -> str | None:
    """ReloadRequest.version: empty (the registry's current version) or a version name, never a path."""
    version = request.version
    if not version:
        return None
    if not is_version_name(version):
        raise FieldError("version", f"{version[:80]!r} is not a version name: pass one like v0003 (versions are looked up under the registry's versions/ only)")
    return str(version)


# ------------------------------------------------------------------------------------------ undecodable bytes


class UndecodableRequest(FieldError):
    """The request bytes are not a valid message (truncated, or invalid UTF-8 in a string field)."""

    def __init__(self, type_name: str, exc: BaseException) -> None:
        reason = str(exc).rpartition(": ")[2] or "unreadable bytes"
        super().__init__(
            "request", f"cannot decode the bytes as {type_name} ({reason}): send a well-formed {type_name} message"
        )


def _guard(handler: Any, stages: dict[str, Any] | None = None) -> Any:
    """A method handler whose deserializer never raises: undecodable bytes become an
    `UndecodableRequest` value, answered INVALID_ARGUMENT (grpc.aio would answer UNKNOWN with the
    Python exception's class name). `stages`: histogram children observing the `parse` and
    `serialise` times of the method (recsys.serving.latency)."""
    import grpc

    parse = handler.request_deserializer
    type_name = parse.__self__.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError (and nothing else is possible here)
            return UndecodableRequest(type_name, exc)

    kwargs = {"request_deserializer": deserialize, "response_serializer": handler.response_serializer}
    if stages is not None:
        parsed, serialised = stages["parse"], stages["serialise"]

        def timed_deserialize(data: bytes) -> Any:
            start = time.perf_counter()
            request = deserialize(data)
            parsed.observe(time.perf_counter() - start)
            return request

        def timed_serialize(response: Any) -> bytes:
            start = time.perf_counter()
            out: bytes = response.SerializeToString()
            serialised.observe(time.perf_counter() - start)
            return out

        kwargs = {"request_deserializer": timed_deserialize, "response_serializer": timed_serialize}
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: Any) -> Any:
            if isinstance(request, UndecodableRequest):
                context.set_trailing_metadata((("invalid-field", request.field),))
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.stream_unary is not None:
        inner_stream = handler.stream_unary

        async def checked(requests: Any) -> Any:
            async for request in requests:
                if isinstance(request, UndecodableRequest):
                    raise request  # inside Handler.call: INVALID_ARGUMENT naming the field
                yield request

        async def stream(requests: Any, context: Any) -> Any:
            return await inner_stream(checked(requests), context)

        return grpc.stream_unary_rpc_method_handler(stream, **kwargs)
    raise TypeError(f"no decoding guard for {handler!r}")  # the proto has no server-streaming RPCs


class _Capture:
    """Stands in for a server while a generated `add_..._to_server` registers its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def add_guarded(server: Any, add_to_server: Any, servicer: Any, stages: dict[str, dict[str, Any]] | None = None) -> None:
    """`add_to_server(servicer, server)` with every method's request decoding guarded (`_guard`);
    the methods named in `stages` (method -> stage histogram children) time their parse and serialise."""
    import grpc

    capture = _Capture()
    add_to_server(servicer, capture)
    stages = stages or {}
    guarded = {name: _guard(handler, stages.get(name)) for name, handler in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, guarded),))
    server.add_registered_method_handlers(capture.service, guarded)
