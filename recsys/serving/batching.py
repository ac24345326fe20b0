"""Cold-start encoding batched across concurrent requests.

Requests with unknown items hand their texts to one `ColdBatcher`; while an encoder pass runs, texts
from other requests accumulate and go together in the next pass (dynamic batching: no fixed wait when
idle beyond `wait_s`). Encodings are cached per model by text, so an item new to the catalogue is
encoded once, not once per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from recsys.serving.model import ServingModel


@dataclass
class _Queue:
    model: ServingModel
    waiting: list[tuple[list[str], asyncio.Future[dict[str, np.ndarray]]]] = field(default_factory=list)
    busy: bool = False


class ColdBatcher:
    def __init__(self, executor: Executor, max_batch: int = 64, wait_s: float = 0.002) -> None:
        self.executor = executor
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._queues: dict[int, _Queue] = {}
        self.batch_sizes: list[int] = []  # recent pass sizes (metrics read and clear them)

    async def encode(self, model: ServingModel, texts: Sequence[str]) -> np.ndarray:
        """texts -> [n, D] float32 in order (cache hits are not re-encoded)."""
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
            queue.waiting.append((list(missing), future))
            if not queue.busy:
                queue.busy = True
                loop.call_later(self.wait_s, lambda: asyncio.ensure_future(self._drain(id(model))))
            vectors = await future
            for text, rows in missing.items():
                out[rows] = vectors[text]
        return out

    async def _drain(self, key: int) -> None:
        queue = self._queues[key]
        loop = asyncio.get_running_loop()
        try:
            while queue.waiting:
                batch: list[tuple[list[str], asyncio.Future[dict[str, np.ndarray]]]] = []
                texts: dict[str, None] = {}
                while queue.waiting and (not batch or len(texts) + len(queue.waiting[0][0]) <= self.max_batch):
                    item = queue.waiting.pop(0)
                    batch.append(item)
                    texts.update(dict.fromkeys(item[0]))
                unique = list(texts)
                try:
                    vectors = await loop.run_in_executor(self.executor, queue.model.encode_texts, unique)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.batch_sizes.append(len(unique))
                found = dict(zip(unique, vectors, strict=True))
                for text, vector in found.items():
                    queue.model.cold_cache.put(text, vector)
                for _, future in batch:
                    if not future.done():
                        future.set_result(found)
        finally:
            queue.busy = False
            if not queue.waiting:
                self._queues.pop(key, None)
