"""Records of the event log, compact JSON. Two kinds:

* events (one LogEvents / StreamEvents batch), one row per event:

      {"u": [user ids], "i": [item ids], "e": [event types], "t": [epoch µs], "r": [request id|null],
       "v": [value|null], "k": "idempotency key" (optional)}

* served lists (what Rank / Recommend returned, buffered and appended a few times a second), one
  row per list and the lists' item ids back to back:

      {"n": [items per list], "u": [user id per list], "t": [epoch µs per list],
       "r": [request id|null per list], "i": [item ids of every list, in list order]}

  A served list is N impression events of one user, time and request, so the second kind writes
  and reads the user, time and request once per list instead of once per item, and the follower
  folds it through `LiveState.apply_served` (no per-event Python). It means exactly the events
  `ServedLists.events()` gives: export and the fold treat the two kinds alike.

Ids, not indices: the log outlives catalogues and user maps, and `recsys state export` turns it back
into the data contract's events table (what `recsys prepare` / `recsys retrain --events` read).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import polars as pl

from recsys.serving.validation import EventsInput, ServedLists

Record = EventsInput | ServedLists


def encode(events: Record, key: str = "") -> bytes:
    if isinstance(events, ServedLists):
        assert not key, "served lists carry no idempotency key (each is appended once, by the server that served it)"
        return json.dumps(
            {"n": events.counts.tolist(), "u": events.user_ids, "t": events.ts_us.tolist(), "r": events.request_ids,
             "i": events.item_ids},
            separators=(",", ":"),
        ).encode()
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


def _record(r: dict[str, Any]) -> Record:
    if "n" in r:
        return ServedLists(r["u"], np.asarray(r["t"], np.int64), r["r"], np.asarray(r["n"], np.int64), r["i"])
    values = np.asarray([math.nan if v is None else v for v in r["v"]], np.float64)
    return EventsInput(r["u"], r["i"], r["e"], np.asarray(r["t"], np.int64), r["r"], values)


def decode(payload: bytes) -> tuple[Record, str]:
    """-> (events or served lists, idempotency key or "")."""
    r = json.loads(payload)
    return _record(r), r.get("k", "")


def concat(batches: Sequence[EventsInput]) -> EventsInput:
    """Several batches as one (in order)."""
    if len(batches) == 1:
        return batches[0]
    return EventsInput(
        [u for b in batches for u in b.user_ids], [i for b in batches for i in b.item_ids],
        [e for b in batches for e in b.event_types], np.concatenate([b.ts_us for b in batches]),
        [r for b in batches for r in b.request_ids], np.concatenate([b.values for b in batches]),
    )


def concat_served(batches: Sequence[ServedLists]) -> ServedLists:
    """Several records of served lists as one (in order)."""
    if len(batches) == 1:
        return batches[0]
    return ServedLists(
        [u for b in batches for u in b.user_ids], np.concatenate([b.ts_us for b in batches]),
        [r for b in batches for r in b.request_ids], np.concatenate([b.counts for b in batches]),
        [i for b in batches for i in b.item_ids],
    )


def _expand(served: ServedLists) -> dict[str, list[Any]]:
    events = served.events()
    return {"u": events.user_ids, "i": events.item_ids, "e": events.event_types, "t": events.ts_us.tolist(),
            "r": events.request_ids, "v": [None] * len(events)}


def to_frame(payloads: Iterable[bytes]) -> pl.DataFrame:
    """Records -> the events table of the data contract (user_id, item_id, event_type, timestamp UTC,
    request_id, value), duplicates by idempotency key dropped as the follower drops them; served
    lists become their impression events."""
    seen: set[str] = set()
    columns: dict[str, list] = {"user_id": [], "item_id": [], "event_type": [], "timestamp": [], "request_id": [], "value": []}
    for payload in payloads:
        r = json.loads(payload)
        key = r.get("k", "")
        if key:
            if key in seen:
                continue
            seen.add(key)
        if "n" in r:  # served lists: their impression events
            served = _record(r)
            assert isinstance(served, ServedLists)
            r = _expand(served)
        for name, field in (("user_id", "u"), ("item_id", "i"), ("event_type", "e"), ("timestamp", "t"),
                            ("request_id", "r"), ("value", "v")):
            columns[name].extend(r[field])
    return pl.DataFrame(
        columns,
        schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "event_type": pl.Utf8, "timestamp": pl.Int64,
                "request_id": pl.Utf8, "value": pl.Float64},
    ).with_columns(pl.col("timestamp").cast(pl.Datetime("us", "UTC")))
