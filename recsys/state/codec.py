"""Records of the event log: one LogEvents batch (or one served list) as compact JSON.

    {"u": [user ids], "i": [item ids], "e": [event types], "t": [epoch µs], "r": [request id|null],
     "v": [value|null], "k": "idempotency key" (optional)}

Ids, not indices: the log outlives catalogues and user maps, and `recsys state export` turns it back
into the data contract's events table (what `recsys prepare` / `recsys retrain --events` read).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np
import polars as pl

from recsys.serving.validation import EventsInput


def encode(events: EventsInput, key: str = "") -> bytes:
    record = {
        "u": events.user_ids,
        "i": events.item_ids,
        "e": events.event_types,
        "t": events.ts_us.tolist(),
        "r": events.request_ids,
        "v": [None if math.isnan(v) else v for v in events.values.tolist()],
    }
    if key:
        record["k"] = key
    return json.dumps(record, separators=(",", ":")).encode()


def decode(payload: bytes) -> tuple[EventsInput, str]:
    """-> (events, idempotency key or "")."""
    r = json.loads(payload)
    values = np.asarray([math.nan if v is None else v for v in r["v"]], np.float64)
    events = EventsInput(r["u"], r["i"], r["e"], np.asarray(r["t"], np.int64), r["r"], values)
    return events, r.get("k", "")


def concat(batches: list[EventsInput]) -> EventsInput:
    """Several batches as one (in order)."""
    if len(batches) == 1:
        return batches[0]
    return EventsInput(
        [u for b in batches for u in b.user_ids], [i for b in batches for i in b.item_ids],
        [e for b in batches for e in b.event_types], np.concatenate([b.ts_us for b in batches]),
        [r for b in batches for r in b.request_ids], np.concatenate([b.values for b in batches]),
    )


def to_frame(payloads: Iterable[bytes]) -> pl.DataFrame:
    """Records -> the events table of the data contract (user_id, item_id, event_type, timestamp UTC,
    request_id, value), duplicates by idempotency key dropped as the follower drops them."""
    seen: set[str] = set()
    columns: dict[str, list] = {"user_id": [], "item_id": [], "event_type": [], "timestamp": [], "request_id": [], "value": []}
    for payload in payloads:
        r = json.loads(payload)
        key = r.get("k", "")
        if key:
            if key in seen:
                continue
            seen.add(key)
        for name, field in (("user_id", "u"), ("item_id", "i"), ("event_type", "e"), ("timestamp", "t"),
                            ("request_id", "r"), ("value", "v")):
            columns[name].extend(r[field])
    return pl.DataFrame(
        columns,
        schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "event_type": pl.Utf8, "timestamp": pl.Int64,
                "request_id": pl.Utf8, "value": pl.Float64},
    ).with_columns(pl.col("timestamp").cast(pl.Datetime("us", "UTC")))
