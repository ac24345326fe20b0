"""Cold-start encoding batched across concurrent requests.

Requests with unknown items hand their texts to one `ColdBatcher`; while an encoder pass runs, texts
from other requests accumulate and go together in the next pass (dynamic batching: no fixed wait when
idle beyond `wait_s`). Encodings are cached per model by text, so an item new to the catalogue is
encoded once, not once per request.

Work is bounded: one pass encodes at most `max_batch` distinct texts (a request with more is served
over several passes), and before every pass the entries whose request was cancelled or whose deadline
has passed are dropped, so a client that gave up (DEADLINE_EXCEEDED) never costs encoder time that the
next request would wait behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recsys.serving.latency import NO_MONITOR
from recsys.serving.model import ServingModel


@dataclass(eq=False)  # identity: entries are compared as objects, never by their arrays
class _Entry:
    """One request's missing texts; `found` fills pass by pass until every text has its vector."""

    texts: list[str]
    future: asyncio.Future[dict[str, np.ndarray]]
    deadline: float | None  # event-loop time; None = no deadline
    found: dict[str, np.ndarray] = field(default_factory=dict)

    def pending(self) -> list[str]:
        return [t for t in self.texts if t not in self.found]


@dataclass
class _Queue:
    model: ServingModel
    waiting: list[_Entry] = field(default_factory=list)
    busy: bool = False


class ColdBatcher:
    def __init__(self, executor: Executor, max_batch: int = 64, wait_s: float = 0.002) -> None:
        self.executor = executor
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._queues: dict[int, _Queue] = {}
        self.batch_sizes: list[int] = []  # recent pass sizes (metrics read and clear them)
        self.dropped = 0  # entries dropped unencoded: cancelled or past their deadline
        self.monitor: Any = NO_MONITOR  # the server's stall monitor marks encoder passes

    async def encode(self, model: ServingModel, texts: Sequence[str], deadline: float | None = None) -> np.ndarray:
        """texts -> [n, D] float32 in order (cache hits are not re-encoded). `deadline` (event-loop
        time): past it the texts still waiting are dropped and TimeoutError raised."""
        out = np.empty((len(texts), model.item_emb.shape[1]), np.float32)
        missing: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            vector = model.cold_cache.get(text)
            if vector is None:
                missing.setdefault(text, []).append(i)
            else:
                out[i] = vector
        if missing:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
            queue = self._queues.setdefault(id(model), _Queue(model))
            queue.waiting.append(_Entry(list(missing), future, deadline))
            if not queue.busy:
                queue.busy = True
                loop.call_later(self.wait_s, lambda: asyncio.ensure_future(self._drain(id(model))))
            vectors = await future
            for text, rows in missing.items():
                out[rows] = vectors[text]
        return out

    def _live_entries(self, queue: _Queue, now: float) -> None:
        """Drop cancelled entries and fail expired ones, before any encoder time is spent on them."""
        kept = []
        for entry in queue.waiting:
            if entry.future.done():
                self.dropped += 1
            elif entry.deadline is not None and now >= entry.deadline:
                self.dropped += 1
                entry.future.set_exception(TimeoutError())
            else:
                kept.append(entry)
        queue.waiting = kept

    def _next_pass(self, queue: _Queue) -> list[str]:
        """Up to max_batch distinct texts, oldest entries first (a big entry may span passes)."""
        texts: dict[str, None] = {}
        for entry in queue.waiting:
            for text in entry.pending():
                if len(texts) >= self.max_batch:
                    return list(texts)
                texts[text] = None
        return list(texts)

    def _encode(self, model: ServingModel, texts: list[str]) -> np.ndarray:
        with self.monitor.activity("cold-encode"):
            return model.encode_texts(texts)

    async def _drain(self, key: int) -> None:
        queue = self._queues[key]
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._live_entries(queue, loop.time())
                if not queue.waiting:
                    break
                unique = self._next_pass(queue)
                try:
                    vectors = await loop.run_in_executor(self.executor, self._encode, queue.model, unique)
                except Exception as exc:
                    for entry in queue.waiting:
                        if not entry.future.done() and any(t in unique for t in entry.pending()):
                            entry.future.set_exception(exc)
                    queue.waiting = [e for e in queue.waiting if not e.future.done() or e.future.cancelled()]
                    continue
                self.batch_sizes.append(len(unique))
                found = dict(zip(unique, vectors, strict=True))
                for text, vector in found.items():
                    queue.model.cold_cache.put(text, vector)
                served = []
                for entry in queue.waiting:
                    entry.found.update((t, found[t]) for t in entry.texts if t in found)
                    if not entry.future.done() and not entry.pending():
                        entry.future.set_result(entry.found)
                        served.append(entry)
                queue.waiting = [e for e in queue.waiting if e not in served]  # the rest: next pass
        finally:
            queue.busy = False
            if not queue.waiting:
                self._queues.pop(key, None)
