"""Deterministic assignment: a pure function of (config, unit ids, request context, time).

The hash (version "v1", frozen by tests/data/assignment_vectors_v1.json):

    bucket(salt, unit_id) = int.from_bytes(sha256(f"v1:{salt}:{unit_id}".encode("utf-8"))[:8], "big") % 10000

Per request, in this order (the first rule that applies decides):

1. forced: a unit listed under an experiment's `force` gets that variant (QA; ignores time, targeting,
   coverage and holdouts; labelled `#qa` and left out of analysis);
2. holdouts: bucket(holdout.salt, unit) < coverage * 10000 -> the holdout's ranker;
3. layers, in file order; within a layer at most one experiment can match, because experiments own
   disjoint ranges of bucket(layer.salt, unit). A unit in the range is enrolled when the experiment
   is running (start <= t < end), the request matches `targeting`, and
   bucket(f"{salt}/coverage", unit) < coverage threshold. Its variant is the one whose cumulative
   weight range holds bucket(f"{salt}/variant", unit);
4. otherwise the default ranker.

Why three hashes: the coverage draw and the variant draw are independent, so raising coverage only
adds units and never moves an enrolled unit to another variant; each layer has its own salt, so
enrolment in one layer says nothing about another. The first enrolling layer picks the ranker; since
layers are independent, every experiment still gets a random (smaller) slice of its units.

Labels (the `variant` the service reports and logs): `{experiment}/{variant}@{config_version}`,
`holdout/{holdout}@{config_version}`, `default/{ranker}@{config_version}`, with `#qa` appended for
forced units. Names cannot contain '/', '@' or '#'.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from recsys.experiments.config import BUCKETS, Experiment, ExperimentConfig, context_text

HASH_VERSION = "v1"
SESSION_KEY = "session_id"  # request context key holding the session id (unit: session)
QA_SUFFIX = "#qa"

Context = Mapping[str, Any]


def bucket(salt: str, unit_id: str, version: str = HASH_VERSION) -> int:
    """The documented hash: a unit's bucket in [0, 10000) under a salt."""
    if version != HASH_VERSION:
        raise ValueError(f"unknown assignment hash version {version!r}")
    digest = hashlib.sha256(f"{version}:{salt}:{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def coverage_salt(exp: Experiment) -> str:
    return f"{exp.salt}/coverage"


def variant_salt(exp: Experiment) -> str:
    return f"{exp.salt}/variant"


def pick_variant(exp: Experiment, variant_bucket: int) -> str:
    for v, t in zip(exp.variants, exp.variant_thresholds, strict=True):
        if variant_bucket < t:
            return v.name
    return exp.variants[-1].name  # unreachable: the last threshold is BUCKETS


@dataclass(frozen=True)
class Assignment:
    ranker: str
    config_version: str
    experiment: str | None = None
    variant: str | None = None
    layer: str | None = None
    holdout: str | None = None
    forced: bool = False

    @property
    def label(self) -> str:
        if self.experiment is not None:
            group, arm = self.experiment, self.variant
        elif self.holdout is not None:
            group, arm = "holdout", self.holdout
        else:
            group, arm = "default", self.ranker
        return f"{group}/{arm}@{self.config_version}{QA_SUFFIX if self.forced else ''}"


@dataclass(frozen=True)
class Label:
    group: str  # experiment name, "holdout" or "default"
    arm: str  # variant, holdout or ranker name
    config_version: str
    forced: bool


def parse_label(label: str) -> Label | None:
    """Inverse of `Assignment.label`; None for labels this package did not write (e.g. "control")."""
    forced = label.endswith(QA_SUFFIX)
    body = label[: -len(QA_SUFFIX)] if forced else label
    head, sep, version = body.rpartition("@")
    group, slash, arm = head.partition("/")
    if not (sep and slash and group and arm):
        return None
    return Label(group, arm, version, forced)


def unit_id(unit: str, user_id: str, request_id: str, context: Context | None) -> str | None:
    """The randomisation unit's id for a request; None (not enrolled) when a session id is missing."""
    if unit == "user":
        return user_id or None
    if unit == "request":
        return request_id or None
    value = (context or {}).get(SESSION_KEY)
    return context_text(value) if value not in (None, "") else None


def _active(exp: Experiment, t: datetime) -> bool:
    return (exp.start is None or exp.start <= t) and (exp.end is None or t < exp.end)


def _targeted(exp: Experiment, context: Context | None) -> bool:
    ctx = context or {}
    for key, allowed in exp.targeting.items():
        value = ctx.get(key)
        if value is None or context_text(value) not in allowed:
            return False
    return True


def _as_datetime(t: datetime | float | None) -> datetime:
    """None = now; numbers are unix microseconds (the service's request time)."""
    if t is None:
        return datetime.fromtimestamp(time.time(), timezone.utc)
    if isinstance(t, datetime):
        return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(t / 1e6, timezone.utc)


def _enrol(exp: Experiment, layer_bucket: int, uid: str, t: datetime, context: Context | None) -> str | None:
    lo, hi = exp.layer_buckets
    if not lo <= layer_bucket < hi:
        return None
    if not (_active(exp, t) and _targeted(exp, context)):
        return None
    if bucket(coverage_salt(exp), uid) >= exp.coverage_threshold:
        return None
    return pick_variant(exp, bucket(variant_salt(exp), uid))


def assign(
    config: ExperimentConfig,
    user_id: str,
    request_id: str = "",
    context: Context | None = None,
    t: datetime | float | None = None,
) -> Assignment:
    """Which ranker serves this request, and under which label. Pure given `t` (default: now)."""
    version = config.version
    for layer in config.layers:
        for exp in layer.experiments:
            if exp.force:
                uid = unit_id(exp.unit, user_id, request_id, context)
                if uid is not None and uid in exp.force:
                    name = exp.force[uid]
                    ranker = next(v.ranker for v in exp.variants if v.name == name)
                    return Assignment(ranker, version, exp.name, name, layer.name, forced=True)
    for hold in config.holdouts:
        uid = unit_id(hold.unit, user_id, request_id, context)
        if uid is not None and bucket(hold.salt, uid) < hold.threshold:
            return Assignment(hold.ranker or config.default_ranker, version, holdout=hold.name)
    when = _as_datetime(t)
    for layer in config.layers:
        if not layer.experiments:
            continue
        uid = unit_id(layer.experiments[0].unit, user_id, request_id, context)  # one unit per layer
        if uid is None:
            continue
        layer_bucket = bucket(layer.salt, uid)
        for exp in layer.experiments:
            arm = _enrol(exp, layer_bucket, uid, when, context)
            if arm is not None:
                ranker = next(v.ranker for v in exp.variants if v.name == arm)
                return Assignment(ranker, version, exp.name, arm, layer.name)
    return Assignment(config.default_ranker, version)


def explain(
    config: ExperimentConfig,
    user_id: str,
    request_id: str = "",
    context: Context | None = None,
    t: datetime | float | None = None,
) -> dict[str, Any]:
    """The assignment debug call: every bucket and check behind `assign`, JSON-serialisable."""
    when = _as_datetime(t)
    result = assign(config, user_id, request_id, context, when)
    holdouts = []
    for hold in config.holdouts:
        uid = unit_id(hold.unit, user_id, request_id, context)
        b = bucket(hold.salt, uid) if uid is not None else None
        holdouts.append({
            "holdout": hold.name, "unit": hold.unit, "unit_id": uid, "bucket": b, "threshold": hold.threshold,
            "in_holdout": b is not None and b < hold.threshold,
        })
    experiments = []
    for layer in config.layers:
        for exp in layer.experiments:
            uid = unit_id(exp.unit, user_id, request_id, context)
            row: dict[str, Any] = {"layer": layer.name, "experiment": exp.name, "unit": exp.unit, "unit_id": uid}
            if uid is not None:
                lb, cb, vb = bucket(layer.salt, uid), bucket(coverage_salt(exp), uid), bucket(variant_salt(exp), uid)
                lo, hi = exp.layer_buckets
                row.update({
                    "layer_bucket": lb, "layer_buckets": [lo, hi], "in_segment": lo <= lb < hi,
                    "active": _active(exp, when), "targeted": _targeted(exp, context),
                    "coverage_bucket": cb, "coverage_threshold": exp.coverage_threshold,
                    "covered": cb < exp.coverage_threshold,
                    "variant_bucket": vb, "variant_thresholds": list(exp.variant_thresholds),
                    "variant_if_enrolled": pick_variant(exp, vb),
                    "forced": exp.force.get(uid),
                    "enrolled": _enrol(exp, lb, uid, when, context) is not None,
                })
            experiments.append(row)
    return {
        "user_id": user_id, "request_id": request_id, "context": {k: context_text(v) for k, v in (context or {}).items()},
        "time": when.isoformat(), "hash_version": HASH_VERSION, "config_version": config.version,
        "label": result.label, "ranker": result.ranker, "experiment": result.experiment, "variant": result.variant,
        "layer": result.layer, "holdout": result.holdout, "forced": result.forced,
        "holdouts": holdouts, "experiments": experiments,
    }
