"""Continual learning: new events + exposure logs -> warm-started candidate -> compare -> promote or not.

    1. data     base prepared events + new event files + exposure logs (served lists = impressions)
                + catalogue updates (new and changed items, merged over the base catalogue by item_id),
                validated together, checked against the base (recsys/data/checks.py: refused before
                training when implausible), and prepared into WORKDIR/data with the base's settings and
                the retrain split (`retrain_cutoffs`), leaving out the base's own test window (the
                fixed holdout):
                    train    everything up to the end of the base data: the warm-started matcher;
                    valid    new events before the holdout: the blender (out-of-sample match scores);
                    holdout  the newest share of the new events (or from --holdout-start): comparison;
    2. matcher  warm-started from the production version's own checkpoint (<version>/checkpoint/), with
                its training settings unless overridden;
    3. publish  export + blender trained against the staged export + checkpoint, registered, not promoted
                (training/pipeline.py: the one publishing mechanism);
    4. compare  candidate vs current on the same holdout, both scored by the same code:
                blend NDCG@10 over the holdout's request groups (point-in-time features from
                recsys/features/, each version's matcher and LightGBM ranker) and matcher Recall@10
                in full ranking over the holdout users; paired bootstrap intervals of the deltas; and
                on the fixed holdout (the base's test window), which the new events cannot fabricate;
    5. decide   promote iff no gated metric drops by more than `tolerance` (absolute) on either holdout
                (a metric 0 for both is not measurable); the registry pointer moves, and a server with
                `watch_s > 0` hot-reloads it. A refused candidate is retired from the registry.
Writes WORKDIR/retrain_report.json and .md saying what was compared and why it was (not) promoted.

The feature definitions are pinned to the current version's ranker, so a running server (whose live
feature state has those definitions) can swap the candidate in without a restart.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.data.checks import CHECKS, check_new_data, markdown_rows
from recsys.data.prepare import PrepareConfig, prepare_tables, split_time
from recsys.data.prepared import Histories, PreparedData
from recsys.data.readers import RawTables, read_table
from recsys.data.schema import EVENT_COLUMNS
from recsys.data.validate import validate
from recsys.data.window import check_window, version_window
from recsys.errors import ConfigError, DataCheckError, InputError
from recsys.evaluation.evaluate import matcher_scores, mean_ci, paired_bootstrap
from recsys.evaluation.metrics import per_user_metrics, top_k
from recsys.features import EventBatch, FeatureConfig, FeatureState, to_us
from recsys.files import fault_point, output_lock, write_json_atomic
from recsys.ranker import MODEL_FILE, LambdaMARTParams, Ranker, grouped_ndcg
from recsys.registry import Registry
from recsys.scoring.registry_matcher import registry_matcher
from recsys.serving.exposure import read_exposures
from training.export import ExportConfig
from training.pipeline import CHECKPOINT_DIR, RANKER_DIR, publish_version
from training.ranker import (
    RankerConfig,
    build_group_features,
    request_groups,
    sampled_groups,
)

log = logging.getLogger(__name__)

REPORT_JSON = "retrain_report.json"
NEW_ROW = "__new_row"  # merged events: whether the row came from the new files (data checks)
REPORT_MD = "retrain_report.md"
PLOT = "metrics.png"
METRICS = ("ndcg@10", "recall@10", "matcher_ndcg@10")
# Columns prepare adds; dropped before re-validating the base tables.
_DERIVED = ("user_idx", "item_idx", "strength", "split_global", "split_loo", "split_tail", "text", "first_seen")


@dataclass(frozen=True)
class RetrainConfig:
    registry: Path
    out: Path
    data: Path | None = None  # base prepared dataset; None: the one the current version was trained on
    events: tuple[Path, ...] = ()
    exposures: tuple[Path, ...] = ()
    items: Path | None = None  # new and changed items, merged over the base catalogue by item_id
    holdout_start: str | None = None  # ISO time: pin the comparison holdout (default: see retrain_cutoffs)
    tolerance: float = 0.005  # absolute drop allowed on each gated metric
    promote_metric: str = "ndcg@10"
    guard_metrics: tuple[str, ...] = ("recall@10",)
    promote: bool = True  # False: evaluate and report only
    on_invalid: str = "drop"  # production logs carry some bad rows (unknown items): drop and count
    warm_start: Path | None = None  # default: <current version>/checkpoint
    ranker_warm_start: bool = True  # the blender may continue from (or keep) the current one: see train_ranker
    matcher_overrides: dict[str, Any] = field(default_factory=dict)  # MatcherModelConfig / RunConfig fields
    ranker: RankerConfig | None = None  # default features: pinned to the current ranker's
    export: ExportConfig = field(default_factory=ExportConfig)
    bootstrap: int = 1000
    seed: int = 0
    skip_checks: tuple[str, ...] = ()  # data checks to skip (names in recsys.data.checks.CHECKS, or "all")
    keep_refused: bool = False  # keep a candidate that is not promoted (default: retire it, freeing the disk)
    plots: bool = True  # metrics.png (current vs candidate with intervals) and the fresh data's timeline.png
    flags: dict[str, Any] = field(default_factory=dict)  # the command line's, saved in the report for --config

    def __post_init__(self) -> None:
        for name in self.skip_checks:
            if name not in (*CHECKS, "all"):
                raise ConfigError(f"--skip-data-check {name!r}: use one of {', '.join(CHECKS)} or all")
        for name in (self.promote_metric, *self.guard_metrics):
            if name not in METRICS:
                raise ConfigError(f"unknown promotion metric {name!r}: use one of {', '.join(METRICS)}")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"--tolerance must be in [0, 1), got {self.tolerance}")
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if self.holdout_start is not None:
            try:
                pl.Series([self.holdout_start]).str.to_datetime(time_zone="UTC")
            except Exception as exc:  # polars raises several types for unparseable text
                raise ConfigError(f"--holdout-start {self.holdout_start!r} is not an ISO-8601 time "
                                  f"(write e.g. 2026-01-31T16:00:00Z)") from exc

    @property
    def gated(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.promote_metric, *self.guard_metrics)))

    @property
    def fixed_gated(self) -> tuple[str, ...]:
        """What the fixed holdout (the base's own test window) gates: the guards (else the primary
        metric). The blender is re-fit to the new traffic, which may legitimately differ from the base
        window's; the guards (the matcher's full ranking by default) must not get worse on clean data."""
        return self.guard_metrics or (self.promote_metric,)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def exposure_events(directory: Path) -> pl.DataFrame:
    """The exposure log as impression events (canonical columns only: serving's own columns such
    as model_version/variant must not become request-context features)."""
    if not Path(directory).is_dir():
        raise InputError(f"--exposures {directory} is not a directory (pass the server's --exposure-dir)")
    log_rows = read_exposures(directory)
    return log_rows.select("user_id", "item_id", "event_type", "timestamp", "request_id", "position")


def merge_items(base_items: pl.DataFrame, path: Path) -> tuple[pl.DataFrame, dict[str, int]]:
    """The base catalogue updated by an items file: rows with a known item_id replace that item's
    values (columns the file lacks, or leaves empty, keep the base's), unknown ids are appended. Base
    order is kept, so item_idx of existing items does not move."""
    update = read_table(Path(path), "items file")
    if "item_id" not in update.columns:
        raise InputError(f"--items {path} has no 'item_id' column (it has {', '.join(update.columns)}): "
                         f"new and changed items are merged over the base catalogue by item_id")
    update = update.with_columns(pl.col("item_id").cast(pl.Utf8))
    if update["item_id"].is_duplicated().any():
        dup = update.filter(pl.col("item_id").is_duplicated())["item_id"].unique().head(3).to_list()
        raise InputError(f"--items {path} lists item ids more than once (e.g. {dup}): keep one row per item")
    base_items = base_items.with_columns(pl.col("item_id").cast(pl.Utf8))
    casts = []
    for col in update.columns:
        if col in base_items.columns and update[col].dtype != base_items[col].dtype:
            try:
                casts.append(update[col].cast(base_items[col].dtype))
            except Exception as exc:  # polars raises several types for a failed cast
                raise InputError(f"--items {path}: column {col!r} ({update[col].dtype}) cannot be read as the "
                                 f"base catalogue's {base_items[col].dtype}: write it like the base items file") from exc
    update = update.with_columns(casts)
    known = update["item_id"].is_in(base_items["item_id"].implode())
    changed, added = update.filter(known), update.filter(~known)
    merged = base_items.update(changed.select([c for c in changed.columns if c in base_items.columns]),
                               on="item_id", how="left")
    merged = pl.concat([merged, added], how="diagonal_relaxed") if added.height else merged
    return merged, {"changed": changed.height, "added": added.height}


def merge_tables(base: PreparedData, events: Sequence[Path], exposures: Sequence[Path],
                 context: Sequence[str], items: Path | None = None, *,
                 fixed_holdout: bool = False, mark_new: bool = False) -> tuple[RawTables, dict[str, int]]:
    """Base events + new events + exposures as one raw table, base catalogue + item updates (all
    re-validated by the caller).

    Keeps the canonical columns plus the base's request-context columns; new files may lack them.
    `fixed_holdout`: leave out the base's global test window, the fixed holdout neither version trains on;
    `mark_new`: a boolean column NEW_ROW says which rows came from the new files."""
    keep = [*EVENT_COLUMNS, *[c for c in context if c not in EVENT_COLUMNS]]
    base_events = base.events().collect()
    if fixed_holdout:
        base_events = base_events.filter(pl.col("split_global") != "test")
    frames = [base_events.select([c for c in keep if c in base_events.columns])]
    counts = {"base": base_events.height}
    for path in events:
        frame = read_table(Path(path), "events")
        frames.append(frame.select([c for c in frame.columns if c in keep]))
        counts[f"events:{Path(path).name}"] = frame.height
    for directory in exposures:
        frame = exposure_events(Path(directory))
        frames.append(frame)
        counts[f"exposures:{Path(directory).name}"] = frame.height
    if mark_new:  # which rows came from the new files (for the data checks; dropped before prepare)
        frames = [f.with_columns(pl.lit(i > 0).alias(NEW_ROW)) for i, f in enumerate(frames)]
    # Text ids and UTC timestamps everywhere, so frames from different writers concatenate.
    frames = [f.with_columns(pl.col(c).cast(pl.Utf8) for c in ("user_id", "item_id", "request_id", "event_type")
                             if c in f.columns) for f in frames]
    merged = pl.concat(frames, how="diagonal_relaxed")
    catalogue = base.items.sort("item_idx").drop([c for c in _DERIVED if c in base.items.columns])
    item_source = str(base.root / "items.parquet")
    if items is not None:
        catalogue, item_counts = merge_items(catalogue, Path(items))
        counts.update({f"items:{Path(items).name}:{k}": v for k, v in item_counts.items()})
        item_source += f" + {items}"
    users = base.users.drop([c for c in _DERIVED if c in base.users.columns])
    sources = {"events": f"{base.root}/events.parquet + {len(events)} new event file(s) + {len(exposures)} exposure log(s)",
               "items": item_source, "users": str(base.root / "users.parquet")}
    return RawTables(merged, catalogue, users if users.width > 1 else None, sources), counts


MIN_NEW_POSITIVES = 50  # fewer new positives than this: no separate blender/holdout windows in them


def retrain_cutoffs(events: pl.DataFrame, base_end: Any, prep: PrepareConfig,
                    holdout_start: str | None = None) -> tuple[Any, Any, str]:
    """(valid_start, test_start, why) for the fresh data; (None, None, why): the base's fractions.

    The new window is everything after the base data's last event. By default it is split in two, in
    the base's valid:test proportion (by positive events): the older part trains the blender, the newest
    part is the holdout. The matcher then trains on exactly the data before the new window, so the match
    scores the blender learns from are out-of-sample, and the blender gets every new request group
    before the holdout (a 10% valid slice of all data was ~100 request groups: too few, and older than
    the holdout's traffic). A pinned `holdout_start` keeps the holdout fixed whatever else is added."""
    # Judged by request start, as prepare splits: a request and its outcomes stay on one side.
    positive = (
        events.with_columns(split_time().alias("_t")).filter(pl.col("strength") > 0).get_column("_t").sort()
    )
    new = positive.filter(positive > base_end) if base_end is not None else positive.clear()
    if holdout_start is not None:
        test_start = pl.Series([holdout_start]).str.to_datetime(time_zone="UTC").item()
        why = f"holdout pinned by --holdout-start {holdout_start}"
    elif new.len() >= MIN_NEW_POSITIVES:
        share = prep.test_frac / (prep.valid_frac + prep.test_frac) if prep.valid_frac + prep.test_frac else 0.5
        test_start = new.quantile(1.0 - share, "lower")
        why = f"holdout = the newest {share:.0%} of the {new.len():,} new positive events"
    else:
        return None, None, (f"only {new.len()} new positive events after the base data: the base's "
                            f"fraction split (valid {prep.valid_frac}, test {prep.test_frac}) of all data")
    before = positive.filter(positive < test_start)
    if not before.len() or positive.filter(positive >= test_start).len() == 0:
        raise InputError(f"the holdout from {test_start} would leave no positive events "
                         f"{'before' if not before.len() else 'in'} it: pick --holdout-start inside the data")
    fresh = new.filter(new < test_start)
    if fresh.len() >= MIN_NEW_POSITIVES // 2:
        valid_start = fresh.min()
        why += f"; blender window = the {fresh.len():,} new positives before it"
    else:  # nothing new before the holdout: the base's valid share of what precedes it
        share = prep.valid_frac / (1.0 - prep.test_frac)
        valid_start = before.quantile(1.0 - share, "lower")
        why += f"; blender window = the last {share:.0%} of positives before it"
    return valid_start, test_start, why


def run_data_checks(base: PreparedData, config: RetrainConfig, clean: Any, report: Any,
                    counts: dict[str, int]) -> dict[str, Any]:
    """recsys.data.checks on the rows of the new files; writes the refusal report and raises
    DataCheckError (exit 2) naming the failed checks, unless they are skipped."""
    new_rows = sum(v for k, v in counts.items() if k.startswith(("events:", "exposures:")))
    checks = check_new_data(clean.events, clean.events[NEW_ROW], base_users=base.users["user_id"],
                            unknown_item_rows=report.dropped.get("unknown_item", 0), new_input_rows=new_rows,
                            has_exposures=bool(config.exposures))
    skipped = set(CHECKS) if "all" in config.skip_checks else set(config.skip_checks)
    checks["skipped_by_flag"] = sorted(skipped)
    failed = [name for name in checks["failed"] if name not in skipped]
    if failed:
        details = "; ".join(f"{r['check']}: {r['detail']}" for r in checks["checks"] if r["check"] in failed)
        refusal = {"refused": True, "failed_checks": failed, "data_checks": checks, "input_rows": counts,
                   "validation": report.to_dict()}
        write_json_atomic(config.out / REPORT_JSON, refusal)
        (config.out / REPORT_MD).write_text("\n".join(
            [f"# Retrain refused: data check(s) failed: {', '.join(failed)}", "", *markdown_rows(checks), ""]))
        raise DataCheckError(
            f"retrain refused before training: the new data failed the check(s) {', '.join(failed)} ({details}). "
            f"Nothing was trained or registered; report: {config.out / REPORT_MD}. Fix the data, or if the change "
            f"is real, pass --skip-data-check {failed[0]} (or all)."
        )
    return checks


def _fixed_holdout_used(base: PreparedData, config: RetrainConfig) -> bool:
    """Whether the base's global test window is kept out of training as the fixed holdout: yes, unless
    --holdout-start pins the holdout at or before it (then the pinned holdout is that fixed slice)."""
    base_test = base.manifest.get("cutoffs", {}).get("test_start")
    if base_test in (None, "None"):
        return False
    if config.holdout_start is None:
        return True
    pinned = pl.Series([config.holdout_start]).str.to_datetime(time_zone="UTC").item()
    return bool(pinned > pl.Series([base_test]).str.to_datetime(time_zone="UTC").item())


def prepare_fresh(base: PreparedData, config: RetrainConfig, context: Sequence[str]) -> tuple[PreparedData, dict[str, Any]]:
    fixed = _fixed_holdout_used(base, config)
    raw, counts = merge_tables(base, config.events, config.exposures, context, config.items, fixed_holdout=fixed,
                               mark_new=True)
    clean, report = validate(raw, on_invalid=config.on_invalid)
    known = {f.name for f in fields(PrepareConfig)}
    settings = {k: v for k, v in base.manifest.get("config", {}).items() if k in known}
    prep = replace(PrepareConfig(**settings), valid_start=None, test_start=None)
    base_end = base.events().select(pl.col("timestamp").max()).collect().item()
    checks = run_data_checks(base, config, clean, report, counts)
    clean.events = clean.events.drop(NEW_ROW)
    valid_start, test_start, why = retrain_cutoffs(clean.events, base_end, prep, config.holdout_start)
    if test_start is not None:
        prep = replace(prep, valid_start=valid_start.isoformat(), test_start=test_start.isoformat())
    manifest = prepare_tables(clean.events, clean.items, clean.users, config.out / "data", prep,
                              inputs=raw.sources, validation=report.to_dict(), plots=config.plots)
    return PreparedData.load(config.out / "data"), {
        "input_rows": counts, "validation": report.to_dict(), "data_checks": checks, "fixed_holdout": fixed, "split": why,
        "base_end": str(base_end),
        "prepared": {"rows": manifest["rows"], "cutoffs": manifest["cutoffs"]}}


# --------------------------------------------------------------------------------------------------
# Matcher
# --------------------------------------------------------------------------------------------------


def matcher_config(checkpoint: Path, data: Path, out: Path, overrides: dict[str, Any]) -> Any:
    """TrainConfig for a warm start: the production run's settings (its training report, nested or
    the flat form written before the model/run split, else the checkpoint's model config), the new
    data, then explicit overrides (field names of either part)."""
    from training.matcher.config import TrainConfig

    settings: dict[str, Any] = {}
    report = checkpoint / "training_report.json"
    if report.is_file():
        settings.update(TrainConfig.flatten(json.loads(report.read_text()).get("config", {})))
    model_cfg = checkpoint / "matcher_config.json"
    if model_cfg.is_file():
        raw = json.loads(model_cfg.read_text())
        settings.update({k: raw[k] for k in ("max_history", "max_text_tokens", "temperature", "dropout", "item_head")
                         if k in raw})
    settings.update({"data": str(data), "out": str(out), "warm_start": str(checkpoint), "base_model": None,
                     "resume": False, "max_steps": 0, "progress": False})
    settings.update(overrides)
    return TrainConfig.from_dict(settings)


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------


@dataclass
class VersionScores:
    """Per-unit metrics of one version on the holdout: blend NDCG per request group, matcher
    Recall/NDCG per user (same units, same order for every version: paired comparisons)."""

    version: str
    group_ndcg: np.ndarray | None
    user_recall: np.ndarray
    user_ndcg: np.ndarray

    def summary(self) -> dict[str, float | None]:
        def mean(a: np.ndarray | None) -> float | None:
            return float(np.nanmean(a)) if a is not None and len(a) else None

        return {"ndcg@10": mean(self.group_ndcg), "recall@10": mean(self.user_recall),
                "matcher_ndcg@10": mean(self.user_ndcg)}

    def units(self, metric: str) -> np.ndarray | None:
        return {"ndcg@10": self.group_ndcg, "recall@10": self.user_recall, "matcher_ndcg@10": self.user_ndcg}[metric]


def score_version(version_dir: Path, data: PreparedData, events: pl.DataFrame, k: int = 10,
                  label_gain: Sequence[float] = LambdaMARTParams().label_gain, seed: int = 0) -> VersionScores:
    """Holdout = the global "test" window of `data` (after everything either version trained on)."""
    check_window(version_window(version_dir), data, "global", ("test",), what=f"version {version_dir.name}",
                 fix="compare on a holdout after everything the version trained on (--holdout-start later than "
                 "its training window), or retrain from a version trained with --protocol global.")
    matcher = registry_matcher(version_dir, data)
    frame = data.eval_set("global", "test")
    hist = Histories.from_frame(frame)
    ranked = top_k(matcher_scores(matcher, hist), k, exclude=data.seen_items(frame, "global", "test"))
    users = per_user_metrics(ranked, [np.asarray(t, np.int64) for t in frame["target_item_idx"].to_list()], k)

    group_ndcg = None
    if (version_dir / RANKER_DIR).is_dir():
        ranker = Ranker.load(version_dir / RANKER_DIR)
        test_start = to_us(data.manifest["cutoffs"]["test_start"])
        state = FeatureState.build(data.items, events, before=test_start, config=ranker.feature_config,
                                   n_users=data.users.height)
        context = list(state.config.context_columns or ())
        has_impressions = bool(events.filter(pl.col("request_id").is_not_null() & (pl.col("strength") <= 0)).height)
        groups = (request_groups(events, test_start, context) if has_impressions
                  else sampled_groups(data, events, test_start, RankerConfig().negatives, seed))
        table = build_group_features(state, EventBatch.from_frame(events), groups, matcher)
        scores = ranker.score(table.matrix, table.names)
        group_ndcg = grouped_ndcg(scores, table.labels, table.sizes, k, label_gain)
    return VersionScores(version_dir.name, group_ndcg, users.recall, users.ndcg)


def compare(current: VersionScores, candidate: VersionScores, gated: Sequence[str], tolerance: float,
            n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per metric: both values, delta (candidate - current), paired bootstrap interval, verdict."""
    cur, cand = current.summary(), candidate.summary()
    rows: dict[str, Any] = {}
    reasons: list[str] = []
    promote = True
    for metric in METRICS:
        a, b = candidate.units(metric), current.units(metric)
        row: dict[str, Any] = {"current": cur[metric], "candidate": cand[metric], "gated": metric in gated}
        if a is None or b is None:
            row.update(delta=None, note="not available for both versions (no ranker/ in one of them)")
        else:
            ok = ~(np.isnan(a) | np.isnan(b))
            row["delta"] = float(np.mean(a[ok] - b[ok])) if ok.any() else None
            row["units"] = int(ok.sum())
            if n_boot and ok.any():
                row["bootstrap95"] = paired_bootstrap(a[ok], b[ok], n_boot, seed)
                row["current95"], row["candidate95"] = mean_ci(b[ok], n_boot, seed), mean_ci(a[ok], n_boot, seed)
        if row["delta"] is not None and not cur[metric] and not cand[metric]:
            row.update(delta=None, note="0 for both versions: not measurable on this holdout")
        if metric in gated:
            if row["delta"] is None:
                reasons.append(f"{metric}: not comparable ({row.get('note', 'no holdout units')}), not gated")
            elif row["delta"] < -tolerance:
                promote = False
                reasons.append(f"{metric} dropped by {-row['delta']:.4f} ({row['current']:.4f} -> "
                               f"{row['candidate']:.4f}), more than the tolerance {tolerance}")
            else:
                reasons.append(f"{metric} {row['current']:.4f} -> {row['candidate']:.4f} "
                               f"(delta {row['delta']:+.4f}, tolerance -{tolerance})")
        rows[metric] = row
    if not any(rows[m]["gated"] and rows[m]["delta"] is not None for m in METRICS):
        promote = False
        reasons.append("no gated metric could be compared: not promoting blind")
    return {"promote": promote, "metrics": rows, "reasons": reasons}


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _current_feature_config(version_dir: Path) -> FeatureConfig | None:
    meta = version_dir / RANKER_DIR / "ranker.json"
    if not meta.is_file():
        return None
    return FeatureConfig.from_dict(json.loads(meta.read_text())["feature_config"])


def _base_data(config: RetrainConfig, manifest: dict[str, Any]) -> Path:
    if config.data is not None:
        return config.data
    recorded = (manifest.get("data") or {}).get("path") or (manifest.get("source") or {}).get("data")
    if not recorded:
        raise InputError("pass --data BASE_PREPARED: the current version does not record its training data")
    return Path(recorded)


def retrain(config: RetrainConfig) -> dict[str, Any]:
    """Run the loop (see the module docstring); returns the report (also written to config.out).

    The work directory is locked for the run (a second retrain into it exits 2 naming the holder)."""
    with output_lock(config.out, what=f"retrain work directory {config.out}"):
        config.out.mkdir(parents=True, exist_ok=True)
        return _retrain(config)


def _retrain(config: RetrainConfig) -> dict[str, Any]:
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    registry = Registry(config.registry)
    current = registry.resolve(None)
    current_dir = registry.path(current)
    manifest = registry.manifest(current)
    warm = config.warm_start or current_dir / CHECKPOINT_DIR
    if not (warm / "matcher_config.json").is_file():
        raise InputError(
            f"model version {current} has no {CHECKPOINT_DIR}/ to warm-start from ({warm}); publish versions "
            f"with training.pipeline.publish_version, or pass --warm-start CHECKPOINT"
        )
    features = _current_feature_config(current_dir)
    ranker_cfg = config.ranker or RankerConfig()
    if features is not None and ranker_cfg.features == FeatureConfig():
        ranker_cfg = replace(ranker_cfg, features=features)  # same definitions as the live server
    base = PreparedData.load(_base_data(config, manifest))
    t = time.perf_counter()

    data, data_report = prepare_fresh(base, config, list(ranker_cfg.features.context_columns or ()))
    fault_point("retrain:prepared")
    t = lap("prepare", t)

    from training.matcher.train import train

    train_cfg = matcher_config(warm, data.root, config.out / "matcher", config.matcher_overrides)
    train_report = train(train_cfg)
    t = lap("train_matcher", t)

    current_model = current_dir / RANKER_DIR / MODEL_FILE
    ranker_init = current_model if config.ranker_warm_start and current_model.is_file() else None
    candidate = publish_version(
        config.out / "matcher", registry, data, ranker_config=ranker_cfg, export_config=config.export,
        promote=False, ranker_init=ranker_init,
        extra={"lineage": {"parent": current, "warm_start": str(warm), "retrain_out": str(config.out),
                           "ranker_init": None if ranker_init is None else str(ranker_init)}},
    )
    fault_point("retrain:published")
    cand_manifest = registry.manifest(candidate)
    t = lap("publish", t)

    verdict, fixed, cand_scores = _evaluate(config, registry, (current_dir, candidate), (data, base),
                                            ranker_cfg.lambdamart.label_gain, data_report["fixed_holdout"])
    lap("evaluate", t)
    promoted, removed = _decide(config, registry, candidate, verdict, fixed)
    timings["total"] = round(time.perf_counter() - started, 2)
    report = {
        "current": current,
        "candidate": candidate,
        "promoted": promoted,
        "candidate_removed": removed,
        "registry_current": registry.current(),
        "decision": {"tolerance": config.tolerance, "promote_metric": config.promote_metric,
                     "gated": list(config.gated), "reasons": verdict["reasons"]},
        "metrics": verdict["metrics"],
        "fixed_holdout": fixed,
        "warnings": cand_manifest.get("warnings", []),
        "holdout": {"window": data_report["split"], "from": data.manifest["cutoffs"]["test_start"],
                    "blender_window_from": data.manifest["cutoffs"]["valid_start"],
                    "request_groups": None if cand_scores.group_ndcg is None else len(cand_scores.group_ndcg),
                    "users": len(cand_scores.user_recall)},
        "data": {"base": str(base.root), "fresh": str(data.root), **data_report},
        "matcher": {"warm_start": str(warm), "config": train_cfg.to_dict(),
                    "valid": train_report.get("fine_tuned", {}).get("valid"),
                    "best_epoch": train_report.get("best_epoch")},
        "blender": cand_manifest.get("ranker", {}).get("selection"),
        "seconds": timings,
        "command": "retrain",
        "flags": config.flags,
    }
    _write_report(config, report)
    log.info("retrain: candidate %s %s (current %s)", candidate, "PROMOTED" if promoted else "not promoted", current)
    return report


def _write_report(config: RetrainConfig, report: dict[str, Any]) -> None:
    """metrics.png (unless --no-plots), retrain_report.json and retrain_report.md, which links the picture."""
    if config.plots:
        report["plot"] = plot_metrics(report, config.out / PLOT)
    write_json_atomic(config.out / REPORT_JSON, json.loads(json.dumps(report, default=str)))
    (config.out / REPORT_MD).write_text(markdown(report))


def _evaluate(config: RetrainConfig, registry: Registry, versions: tuple[Path, str],
              datasets: tuple[PreparedData, PreparedData], label_gain: Sequence[float],
              fixed_used: bool) -> tuple[dict[str, Any], dict[str, Any], VersionScores]:
    """Both versions on the fresh holdout (newest new events) and on the fixed holdout (the base data's
    global test window, which the retrain left out of training: the new events cannot fabricate it;
    gated on `config.fixed_gated`)."""
    current_dir, candidate = versions
    data, base = datasets
    events = data.events().sort("timestamp", maintain_order=True).collect()
    cur = score_version(current_dir, data, events, label_gain=label_gain, seed=config.seed)
    cand = score_version(registry.path(candidate), data, events, label_gain=label_gain, seed=config.seed)
    verdict = compare(cur, cand, config.gated, config.tolerance, config.bootstrap, config.seed)
    fixed: dict[str, Any] = {"window_from": base.manifest.get("cutoffs", {}).get("test_start")}
    if not fixed_used:
        fixed.update(promote=True, metrics={}, reasons=["not used: --holdout-start pins the holdout at or before "
                                                        "the base's test window, so the holdout above is fixed"])
    elif base.eval_set("global", "test").height:
        base_events = base.events().sort("timestamp", maintain_order=True).collect()
        fixed.update(compare(
            score_version(current_dir, base, base_events, label_gain=label_gain, seed=config.seed),
            score_version(registry.path(candidate), base, base_events, label_gain=label_gain, seed=config.seed),
            config.fixed_gated, config.tolerance, config.bootstrap, config.seed))
    else:
        fixed.update(promote=True, metrics={}, reasons=["the base data has no test window: not measurable"])
    return verdict, fixed, cand


def _decide(config: RetrainConfig, registry: Registry, candidate: str, verdict: dict[str, Any],
            fixed: dict[str, Any]) -> tuple[bool, bool]:
    """Promote iff both holdouts pass; retire a refused candidate unless --keep-refused. -> (promoted, removed)."""
    if not fixed["promote"]:
        verdict["promote"] = False
    verdict["reasons"] += [f"fixed holdout (base test window): {r}" for r in fixed["reasons"]]
    if verdict["promote"] and config.promote:
        registry.promote(candidate)
        return True, False
    if verdict["promote"]:
        verdict["reasons"].append("would promote, but promotion is off (--no-promote)")
        return False, False
    if config.keep_refused:
        return False, False
    freed = registry.retire(candidate, "not promoted by recsys retrain")
    verdict["reasons"].append(f"candidate {candidate} removed from the registry ({freed / 1e6:,.1f} MB; "
                              "--keep-refused keeps it)")
    return False, True


def plot_metrics(report: dict[str, Any], path: Path) -> str | None:
    """Current vs candidate per metric with 95% bootstrap intervals (over the holdout's request groups
    or users), the paired delta's interval in the label; a second panel for the fixed holdout when
    there is one. -> the PNG's name, or None if not drawn."""
    from recsys.plots import write_plot

    panels = [(f"holdout from {str(report['holdout']['from'])[:16]}", report["metrics"])]
    if report.get("fixed_holdout"):
        fixed = report["fixed_holdout"]
        panels.append((f"fixed holdout (base test window) from {str(fixed['window_from'])[:16]}", fixed["metrics"]))

    def draw(plt: Any) -> Any:
        height = max(len(m) for _, m in panels)
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 0.9 * height + 1.6), squeeze=False)
        for ax, (title, metrics) in zip(axes[0], panels, strict=True):
            _metrics_panel(ax, metrics, report)
            ax.set_title(title, fontsize=9)
        verdict = "PROMOTED" if report["promoted"] else "NOT promoted"
        fig.suptitle(f"retrain: candidate {report['candidate']} {verdict} (current {report['current']})", fontsize=10)
        fig.tight_layout()
        return fig

    drawn = write_plot(path, draw)
    return drawn.name if drawn else None


def _metrics_panel(ax: Any, metrics: dict[str, Any], report: dict[str, Any]) -> None:
    rows = [(n, r) for n, r in metrics.items() if r.get("current") is not None and r.get("candidate") is not None]
    for y, (_, row) in enumerate(rows):
        for offset, who, color in ((-0.15, "current", "tab:gray"), (0.15, "candidate", "tab:blue")):
            value, ci = row[who], row.get(f"{who}95")
            err = [[value - ci[0]], [ci[1] - value]] if ci else None
            ax.errorbar(value, y + offset, xerr=err, fmt="o", color=color, capsize=3,
                        label=f"{who} {report[who]}" if y == 0 else None)
    labels = []
    for name, row in rows:
        ci = row.get("bootstrap95")
        delta = "n/a" if row.get("delta") is None else f"{row['delta']:+.4f}"
        labels.append(f"{name}{' (gated)' if row['gated'] else ''}\ndelta {delta}"
                      + (f" [{ci['lo']:+.4f}, {ci['hi']:+.4f}]" if ci else ""))
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("metric (95% bootstrap interval)")
    if rows:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no metric measurable for both versions", ha="center", transform=ax.transAxes)


def markdown(report: dict[str, Any]) -> str:
    def fmt(v: Any, sign: str = "") -> str:
        return "n/a" if v is None else format(v, f"{sign}.4f")

    verdict = "PROMOTED" if report["promoted"] else "NOT promoted"
    lines = [
        f"# Retrain: {report['candidate']} {verdict} (current was {report['current']})", "",
        f"Holdout: {report['holdout']['window']}, from {report['holdout']['from']}: "
        f"{report['holdout']['request_groups']} request groups, {report['holdout']['users']} users.", "",
        "| metric | gated | current | candidate | delta | paired 95% CI |", "|---|---|---|---|---|---|",
    ]
    for name, row in report["metrics"].items():
        ci = row.get("bootstrap95")
        interval = f"[{ci['lo']:+.4f}, {ci['hi']:+.4f}]" if ci else "n/a"
        lines.append(f"| {name} | {'yes' if row['gated'] else 'no'} | {fmt(row['current'])} | "
                     f"{fmt(row['candidate'])} | {fmt(row['delta'], '+')} | {interval} |")
    if report.get("plot"):
        lines += ["", f"![current vs candidate]({report['plot']})"]
    lines += ["", f"Decision (tolerance {report['decision']['tolerance']}):", ""]
    lines += [f"- {r}" for r in report["decision"]["reasons"]]
    lines += [f"- WARNING: {w}" for w in report.get("warnings", [])]
    lines += ["", *markdown_rows(report["data"]["data_checks"])] if report["data"].get("data_checks") else []
    rows = report["data"]["prepared"]["rows"]
    dropped = report["data"]["validation"].get("dropped") or {}
    lines += ["", f"Data: {rows['events']:,} events ({rows['interactions']:,} interactions) from "
              f"{report['data']['input_rows']}; dropped by validation: {dropped or 'none'}.",
              f"Timings (s): {report['seconds']}.", ""]
    return "\n".join(lines)
