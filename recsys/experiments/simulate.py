"""Simulated traffic for tests and end-to-end checks: exposure logs and the clicks that follow them.

`simulate_clicks` works on any exposure log in the service's format (recsys.serving.exposure), so the
service's end-to-end test can serve a two-variant config, read the exposure parts back, simulate
clicks with a different click model per variant, and check that `analyze` finds the planted lift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TypeVar

import numpy as np
import polars as pl

from recsys.errors import InputError
from recsys.experiments.assignment import SESSION_KEY, assign, parse_label
from recsys.experiments.config import ExperimentConfig

_T = TypeVar("_T")


@dataclass(frozen=True)
class ClickModel:
    """P(click) = ctr * examination(position) * user propensity; P(purchase | click) = purchase_rate.

    examination = 1 / log2(position + 2) (position bias); user propensity is log-normal with mean 1
    and log-sd `user_sd` (heterogeneous users: why analysis must cluster by unit)."""

    ctr: float
    purchase_rate: float = 0.1
    user_sd: float = 0.5
    delay_s: float = 30.0  # mean seconds from exposure to click (exponential)

    def __post_init__(self) -> None:
        if not 0 <= self.ctr <= 1 or not 0 <= self.purchase_rate <= 1 or self.user_sd < 0 or self.delay_s < 0:
            raise ValueError(f"invalid click model {self}")


def simulate_exposures(
    config: ExperimentConfig,
    n_users: int = 1000,
    requests_per_user: int = 3,
    list_size: int = 10,
    n_items: int = 500,
    start: datetime | None = None,
    context: Mapping[str, str] | None = None,
    latency_ms: Mapping[str, float] | None = None,
    seed: int = 0,
) -> pl.DataFrame:
    """An exposure log as the service writes it, assigned by the real `assign` (so SRM-free).

    Users "u000000".., requests "r<user>-<k>" one minute apart from `start`, sessions one per user
    (context session_id), random items. `latency_ms` (arm or label -> mean ms) adds a latency_ms column."""
    rng = np.random.default_rng(seed)
    t0 = start or datetime(2024, 5, 1, tzinfo=timezone.utc)
    users, requests, labels, stamps = [], [], [], []
    for u in range(n_users):
        uid = f"u{u:06d}"
        ctx = {SESSION_KEY: f"s{u:06d}", **(context or {})}
        for k in range(requests_per_user):
            rid = f"r{u:06d}-{k}"
            t = t0 + timedelta(minutes=u * requests_per_user + k)
            labels.append(assign(config, uid, rid, ctx, t).label)
            users.append(uid)
            requests.append(rid)
            stamps.append(int(t.timestamp() * 1_000_000))
    n_req = len(requests)
    if list_size > n_items:
        raise ValueError("list_size must be <= n_items")
    items = (rng.integers(0, n_items, size=n_req)[:, None] + np.arange(list_size)) % n_items  # distinct per list
    frame = pl.DataFrame({
        "user_id": np.repeat(users, list_size),
        "item_id": [f"i{i:05d}" for i in items.ravel().tolist()],
        "event_type": "impression",
        "timestamp": pl.Series(np.repeat(stamps, list_size)).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
        "request_id": np.repeat(requests, list_size),
        "position": np.tile(np.arange(list_size, dtype=np.int32), n_req),
        "model_version": "sim",
        "variant": np.repeat(labels, list_size),
        "score": np.tile(-np.arange(list_size, dtype=np.float64), n_req),
        "session_id": np.repeat([f"s{int(u[1:]):06d}" for u in users], list_size),
    })
    if latency_ms is not None:
        means = np.array([_lookup(latency_ms, lab, "latency_ms") for lab in labels])
        per_request = rng.gamma(4.0, means / 4.0)  # right-skewed, mean = means
        frame = frame.with_columns(pl.Series("latency_ms", np.repeat(per_request, list_size)))
    return frame


def _lookup(models: Mapping[str, _T], label: str, what: str) -> _T:
    """Keys may be full labels, "experiment/variant", variant names or "*" (everything else)."""
    if label in models:
        return models[label]
    parsed = parse_label(label)
    if parsed is not None:
        for key in (f"{parsed.group}/{parsed.arm}", parsed.arm):
            if key in models:
                return models[key]
    if "*" in models:
        return models["*"]
    raise InputError(f"{what}: no entry for variant {label!r} (keys: {', '.join(models)}); add it or a '*' default")


def simulate_clicks(
    exposures: pl.DataFrame,
    models: Mapping[str, ClickModel | float],
    seed: int = 0,
    with_request_id: float = 1.0,
) -> pl.DataFrame:
    """Click and purchase events for an exposure log (columns of the data contract).

    `models` maps variant labels (or "experiment/variant", variant names, "*") to a ClickModel or a
    bare CTR. A share `with_request_id` of events carry the request_id (the rest must be attributed
    by (user, item) within the window, as events from other clients are)."""
    rng = np.random.default_rng(seed)
    if exposures.height == 0:
        return pl.DataFrame(schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "event_type": pl.Utf8,
                                    "timestamp": pl.Datetime("us", "UTC"), "request_id": pl.Utf8})  # fmt: skip
    resolved = {k: v if isinstance(v, ClickModel) else ClickModel(float(v)) for k, v in models.items()}
    labels = exposures["variant"].cast(pl.Utf8)
    uniq = labels.unique().to_list()
    per_label = {lab: _lookup(resolved, lab, "click model") for lab in uniq}
    code = labels.replace_strict({lab: i for i, lab in enumerate(uniq)}, return_dtype=pl.Int64).to_numpy()
    ctr = np.array([per_label[lab].ctr for lab in uniq])[code]
    buy = np.array([per_label[lab].purchase_rate for lab in uniq])[code]
    sd = np.array([per_label[lab].user_sd for lab in uniq])[code]
    delay = np.array([per_label[lab].delay_s for lab in uniq])[code]
    user_codes = exposures["user_id"].cast(pl.Utf8).cast(pl.Categorical).to_physical().to_numpy()
    user_z = rng.standard_normal(int(user_codes.max()) + 1)[user_codes]
    propensity = np.exp(sd * user_z - sd * sd / 2)
    pos = exposures["position"].to_numpy().astype(np.float64)
    p = np.clip(ctr * propensity / np.log2(pos + 2), 0, 1)
    clicked = rng.random(len(p)) < p
    bought = clicked & (rng.random(len(p)) < buy)
    click_delay = rng.exponential(np.maximum(delay, 1e-3))
    buy_delay = click_delay + rng.exponential(np.maximum(10 * delay, 1e-3))
    base = exposures.select("user_id", "item_id", "request_id", "timestamp")
    keep_rid = rng.random(len(p)) < with_request_id

    def events(mask: np.ndarray, kind: str, after: np.ndarray) -> pl.DataFrame:
        rows = base.filter(pl.Series(mask))
        offset = pl.Series((after[mask] * 1e6).astype(np.int64)).cast(pl.Duration("us"))
        return rows.with_columns(
            pl.lit(kind).alias("event_type"),
            (pl.col("timestamp") + offset).alias("timestamp"),
            pl.when(pl.Series(keep_rid[mask])).then(pl.col("request_id").cast(pl.Utf8)).otherwise(None).alias("request_id"),
        ).select("user_id", "item_id", "event_type", "timestamp", "request_id")

    return pl.concat([events(clicked, "click", click_delay), events(bought, "purchase", buy_delay)]).sort("timestamp")


def true_ctr(model: ClickModel, list_size: int) -> float:
    """Expected CTR per exposure under a click model, averaged over positions (for tests)."""
    return model.ctr * sum(1 / math.log2(p + 2) for p in range(list_size)) / list_size
