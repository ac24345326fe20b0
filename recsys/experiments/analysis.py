"""Offline analysis: exposures joined with later events -> per-variant metrics, lifts, SRM, guardrails.

Attribution: an event (click-like or conversion) belongs to at most one exposure:
  * an event with a request_id goes to the exposure of the same (request_id, item_id), if it happened
    within `window_s` after it (events whose request is not in the log stay unattributed: they answer
    a list we did not serve);
  * an event without one goes to the latest exposure of the same (user_id, item_id) at most `window_s`
    before it.

Metrics per variant, all clustered by the experiment's randomisation unit (see `stats`):
  ctr                 clicked exposures / exposures  (an exposure is clicked if any click-like event
                      was attributed to it)
  conversion_per_unit conversions (attributed conversion events) per unit
  ndcg@k              mean NDCG@k of served lists, relevance = clicked; lists without clicks score 0
  latency_ms          mean request latency (guardrail), when exposures carry latency_ms
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.data.schema import EVENT_ALIASES
from recsys.errors import ConfigError, InputError
from recsys.experiments.config import Experiment, ExperimentConfig
from recsys.experiments.stats import Comparison, RatioEstimate, SrmResult, compare, ratio, srm_check

UNIT_COLUMN = {"user": "user_id", "session": "session_id", "request": "request_id"}
_LABEL = r"^(?P<group>[^/@#]+)/(?P<arm>[^/@#]+)@(?P<config_version>[^@#]*)(?P<qa>#qa)?$"
UTC = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class AnalysisConfig:
    window_s: float = 24 * 3600.0  # attribution window after an exposure
    click_types: tuple[str, ...] = ("click", "comment", "share", "add_to_cart", "purchase")
    conversion_types: tuple[str, ...] = ("purchase",)
    ndcg_k: int = 10
    alpha: float = 0.05  # two-sided: 95% intervals
    srm_alpha: float = 0.001
    latency_max_increase: float = 0.10  # guardrail: relative increase of mean latency tolerated
    primary_metric: str = "ctr"
    include_forced: bool = False  # QA (forced) traffic is excluded by default

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ConfigError(f"attribution window must be > 0 seconds, got {self.window_s}")
        if self.ndcg_k < 1:
            raise ConfigError(f"ndcg_k must be >= 1, got {self.ndcg_k}")
        if not (0 < self.alpha < 1 and 0 < self.srm_alpha < 1):
            raise ConfigError("alpha and srm_alpha must be in (0, 1)")
        if self.latency_max_increase < 0:
            raise ConfigError("latency_max_increase must be >= 0")

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("ctr", "conversion_per_unit", f"ndcg@{self.ndcg_k}")


# --------------------------------------------------------------------------- inputs


def _utc(s: pl.Series, what: str) -> pl.Series:
    """Datetime (naive = UTC), ISO text or unix seconds/ms/us -> UTC µs."""
    dtype = s.dtype
    if isinstance(dtype, pl.Datetime):
        out = s.dt.replace_time_zone("UTC") if dtype.time_zone is None else s.dt.convert_time_zone("UTC")
        return out.cast(UTC)
    if dtype.is_numeric():
        x = s.cast(pl.Float64)
        top = float(x.abs().fill_nan(None).max() or 0.0)  # type: ignore[arg-type]
        scale = 1e6 if top < 1e11 else 1e3 if top < 1e14 else 1.0  # seconds, ms or µs
        return (x * scale).cast(pl.Int64).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype == pl.Utf8:
        try:
            out = s.str.to_datetime(time_unit="us")
        except pl.exceptions.PolarsError as exc:
            raise InputError(f"{what}: timestamps are not ISO-8601 text ({str(exc).splitlines()[0]})") from None
        return _utc(out, what)
    raise InputError(f"{what}: timestamp has type {dtype}; write datetimes, ISO-8601 text or unix seconds")


def _require(df: pl.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(
            f"{what} lacks column(s) {', '.join(missing)} (has: {', '.join(df.columns)}). Fix: pass the "
            "service's exposure log (recsys serve --exposure-dir) or a table with these columns."
        )


def prepare_exposures(df: pl.DataFrame, what: str = "exposure log") -> pl.DataFrame:
    """Canonical exposures: ids as text, UTC timestamps, label parts (group, arm, config_version, forced),
    one row per (request_id, item_id)."""
    _require(df, ("user_id", "item_id", "request_id", "position", "variant", "timestamp"), what)
    ids = [pl.col(c).cast(pl.Utf8) for c in ("user_id", "item_id", "request_id", "variant")]
    if "session_id" in df.columns:
        ids.append(pl.col("session_id").cast(pl.Utf8))
    out = df.with_columns(*ids, pl.col("position").cast(pl.Int64), _utc(df["timestamp"], what).alias("timestamp"))
    if "latency_ms" in out.columns:
        out = out.with_columns(pl.col("latency_ms").cast(pl.Float64))
    parts = pl.col("variant").str.extract_groups(_LABEL)
    out = out.with_columns(
        parts.struct.field("group").alias("group"),
        parts.struct.field("arm").alias("arm"),
        parts.struct.field("config_version").alias("config_version"),
        parts.struct.field("qa").is_not_null().alias("forced"),
    )
    return out.unique(["request_id", "item_id"], keep="first", maintain_order=True)


def prepare_events(df: pl.DataFrame, what: str = "events") -> pl.DataFrame:
    _require(df, ("user_id", "item_id", "event_type", "timestamp"), what)
    kind = pl.col("event_type").cast(pl.Utf8).str.strip_chars().str.to_lowercase()
    out = df.with_columns(
        pl.col("user_id").cast(pl.Utf8),
        pl.col("item_id").cast(pl.Utf8),
        kind.replace(EVENT_ALIASES).alias("event_type"),
        _utc(df["timestamp"], what).alias("timestamp"),
        (pl.col("request_id").cast(pl.Utf8) if "request_id" in df.columns else pl.lit(None, pl.Utf8)).alias("request_id"),
    )
    return out.select("user_id", "item_id", "event_type", "timestamp", "request_id")


def read_table_any(path: Path | str, role: str) -> pl.DataFrame:
    from recsys.data.readers import read_table

    return read_table(Path(path), role)


# --------------------------------------------------------------------------- attribution


@dataclass
class Attribution:
    events: int = 0  # click-like or conversion events considered
    by_request: int = 0
    by_user_item: int = 0
    unattributed: int = 0


def attribute(exposures: pl.DataFrame, events: pl.DataFrame, cfg: AnalysisConfig) -> tuple[pl.DataFrame, Attribution]:
    """exposures (prepared) + clicked (0/1) and conversions (count) per exposure row."""
    exp = exposures.with_row_index("row")
    kinds = set(cfg.click_types) | set(cfg.conversion_types)
    ev = events.filter(pl.col("event_type").is_in(sorted(kinds))).with_row_index("ev")
    window = timedelta(seconds=cfg.window_s)
    keys = exp.select("row", "request_id", "item_id", pl.col("timestamp").alias("exp_ts"))
    by_req = (
        ev.filter(pl.col("request_id").is_not_null())
        .join(keys, on=["request_id", "item_id"], how="inner")
        .filter((pl.col("timestamp") >= pl.col("exp_ts")) & (pl.col("timestamp") <= pl.col("exp_ts") + window))
        .select("ev", "row")
        .unique("ev", keep="first")
    )
    loose = ev.filter(pl.col("request_id").is_null()).sort("timestamp")
    by_pair = (
        loose.join_asof(
            exp.select("row", "user_id", "item_id", "timestamp").sort("timestamp"),
            on="timestamp", by=["user_id", "item_id"], strategy="backward", tolerance=window, check_sortedness=False,
        )
        .filter(pl.col("row").is_not_null())
        .select("ev", "row")
    )
    linked = pl.concat([by_req, by_pair]).join(ev.select("ev", "event_type"), on="ev")
    per_row = linked.group_by("row").agg(
        pl.col("event_type").is_in(list(cfg.click_types)).any().cast(pl.Int64).alias("clicked"),
        pl.col("event_type").is_in(list(cfg.conversion_types)).sum().cast(pl.Int64).alias("conversions"),
    )
    out = exp.join(per_row, on="row", how="left").with_columns(
        pl.col("clicked").fill_null(0), pl.col("conversions").fill_null(0)
    ).drop("row")
    stats = Attribution(ev.height, by_req.height, by_pair.height, ev.height - by_req.height - by_pair.height)
    return out, stats


# --------------------------------------------------------------------------- per-unit tables


def unit_table(rows: pl.DataFrame, unit: str, k: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per request, per unit) totals from attributed exposure rows of one experiment."""
    col = UNIT_COLUMN[unit]
    if col not in rows.columns:
        raise InputError(
            f"the experiment is randomised by {unit} but the exposure log has no {col} column: "
            f"log the {col} with each exposure (the service's request context {col!r})"
        )
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    ideal = np.concatenate([[0.0], np.cumsum(discount)])
    gain = pl.when((pl.col("position") < k) & (pl.col("clicked") > 0)).then(1.0 / (pl.col("position") + 2).log(2)).otherwise(0.0)
    has_latency = "latency_ms" in rows.columns
    requests = rows.group_by("request_id").agg(
        pl.col(col).first().alias("unit"),
        pl.col("arm").first(),
        pl.len().alias("exposures"),
        pl.col("clicked").sum().alias("clicks"),
        pl.col("conversions").sum(),
        gain.sum().alias("dcg"),
        pl.col("clicked").sum().clip(upper_bound=k).alias("n_rel"),
        pl.col("timestamp").min(),
        *([pl.col("latency_ms").first()] if has_latency else []),
    )
    idcg = pl.Series(ideal)[requests["n_rel"].to_numpy().astype(np.int64)]
    requests = requests.with_columns(
        pl.when(pl.col("n_rel") > 0).then(pl.col("dcg") / idcg).otherwise(0.0).alias("ndcg")
    )
    return requests, units_of(requests)


def units_of(requests: pl.DataFrame) -> pl.DataFrame:
    """Per-unit totals of a request table (unit_table's first part)."""
    has_latency = "latency_ms" in requests.columns
    return requests.group_by("unit", "arm").agg(
        pl.col("exposures").sum(),
        pl.col("clicks").sum(),
        pl.col("conversions").sum(),
        pl.len().alias("requests"),
        pl.col("ndcg").sum().alias("ndcg_sum"),
        *(
            [pl.col("latency_ms").sum().alias("latency_sum"), pl.col("latency_ms").is_not_null().sum().alias("latency_n")]
            if has_latency
            else []
        ),
    )


# --------------------------------------------------------------------------- results


@dataclass
class ArmSummary:
    arm: str
    units: int
    requests: int
    exposures: int
    clicks: int
    conversions: int
    metrics: dict[str, float]
    latency_p95_ms: float | None = None


@dataclass
class MetricResult:
    metric: str
    arm: str  # treatment arm, compared with the control
    comparison: Comparison


@dataclass
class Guardrail:
    name: str
    arm: str
    status: str  # pass | fail | inconclusive
    rel_change: float
    rel_ci: tuple[float, float]
    threshold: float


@dataclass
class ExperimentResult:
    experiment: str
    unit: str
    control: str
    arms: list[ArmSummary]
    results: list[MetricResult]
    srm: SrmResult
    guardrails: list[Guardrail]
    config_versions: list[str]
    excluded: dict[str, int]
    alpha: float
    primary_metric: str
    warnings: list[str] = field(default_factory=list)
    over_time: list[dict[str, Any]] = field(default_factory=list)  # cumulative lift: see lift_over_time

    def result(self, metric: str, arm: str) -> Comparison:
        for r in self.results:
            if r.metric == metric and r.arm == arm:
                return r.comparison
        raise KeyError((metric, arm))

    def verdicts(self) -> dict[str, str]:
        """One line per treatment arm on the primary metric, refusing to call anything under SRM."""
        out = {}
        for arm in (a.arm for a in self.arms if a.arm != self.control):
            if self.srm.mismatch:
                out[arm] = "invalid: sample-ratio mismatch (fix assignment/logging before reading results)"
                continue
            c = self.result(self.primary_metric, arm)
            if not math.isfinite(c.p_value):
                out[arm] = "not enough data"
            elif c.p_value < self.alpha:
                direction = "better" if c.abs_lift > 0 else "worse"
                out[arm] = f"{direction} than {self.control} on {self.primary_metric} ({c.rel_lift:+.2%}, p={c.p_value:.3g})"
            else:
                out[arm] = f"no significant difference on {self.primary_metric} (p={c.p_value:.3g})"
            bad = [g for g in self.guardrails if g.arm == arm and g.status == "fail"]
            if bad:
                out[arm] += "; guardrail failed: " + ", ".join(g.name for g in bad)
        return out

    def to_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            if isinstance(x, float):
                return x if math.isfinite(x) else None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return [clean(v) for v in x]
            return x

        return clean({
            "experiment": self.experiment, "unit": self.unit, "control": self.control, "alpha": self.alpha,
            "primary_metric": self.primary_metric, "config_versions": self.config_versions,
            "arms": [asdict(a) for a in self.arms],
            "results": [{"metric": r.metric, "arm": r.arm, **asdict(r.comparison)} for r in self.results],
            "srm": {**asdict(self.srm), "mismatch": self.srm.mismatch},
            "guardrails": [asdict(g) for g in self.guardrails],
            "excluded": self.excluded, "warnings": self.warnings, "verdicts": self.verdicts(),
            "over_time": self.over_time,
        })


@dataclass
class AnalysisResult:
    experiments: list[ExperimentResult]
    attribution: Attribution
    analysis: AnalysisConfig
    config_version: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_version": self.config_version,
            "analysis": asdict(self.analysis),
            "attribution": asdict(self.attribution),
            "experiments": [e.to_dict() for e in self.experiments],
        }


# --------------------------------------------------------------------------- analysis


def _estimates(units: pl.DataFrame, cfg: AnalysisConfig) -> dict[str, RatioEstimate]:
    n = units.height
    out = {
        "ctr": ratio(units["clicks"].to_numpy(), units["exposures"].to_numpy()),
        "conversion_per_unit": ratio(units["conversions"].to_numpy(), np.ones(n)),
        f"ndcg@{cfg.ndcg_k}": ratio(units["ndcg_sum"].to_numpy(), units["requests"].to_numpy()),
    }
    if "latency_sum" in units.columns:
        out["latency_ms"] = ratio(units["latency_sum"].fill_null(0).to_numpy(), units["latency_n"].to_numpy())
    return out


def analyze_experiment(rows: pl.DataFrame, exp: Experiment, cfg: AnalysisConfig) -> ExperimentResult:
    """One experiment from attributed exposure rows (any labels; this filters its own)."""
    mine = rows.filter(pl.col("group") == exp.name)
    excluded: dict[str, int] = {}
    if not cfg.include_forced:
        excluded["forced_rows"] = int(mine["forced"].sum())
        mine = mine.filter(~pl.col("forced"))
    arms = [v.name for v in exp.variants]
    unknown = mine.filter(~pl.col("arm").is_in(arms))
    warnings = []
    if unknown.height:
        names = ", ".join(sorted(set(unknown["arm"].to_list())))
        warnings.append(f"{unknown.height} exposure rows name variants not in the config ({names}): ignored")
        excluded["unknown_variant_rows"] = unknown.height
        mine = mine.filter(pl.col("arm").is_in(arms))
    requests, units = unit_table(mine, exp.unit, cfg.ndcg_k)
    mixed = units.group_by("unit").agg(pl.col("arm").n_unique().alias("n")).filter(pl.col("n") > 1)
    if mixed.height:
        excluded["units_in_several_variants"] = mixed.height
        warnings.append(
            f"{mixed.height} {exp.unit}s were served more than one variant (config edited mid-run?): excluded"
        )
        units = units.filter(~pl.col("unit").is_in(mixed["unit"].implode()))
        requests = requests.filter(~pl.col("unit").is_in(mixed["unit"].implode()))
    versions = sorted(v for v in mine["config_version"].unique().to_list() if v is not None)
    if len(versions) > 1:
        warnings.append(f"exposures span {len(versions)} config versions ({', '.join(versions)}): check weights did not change")
    estimates = {arm: _estimates(units.filter(pl.col("arm") == arm), cfg) for arm in arms}
    summaries = []
    for arm in arms:
        u = units.filter(pl.col("arm") == arm)
        r = requests.filter(pl.col("arm") == arm)
        p95 = None
        if "latency_ms" in r.columns and r["latency_ms"].drop_nulls().len():
            p95 = float(np.percentile(r["latency_ms"].drop_nulls().to_numpy(), 95))
        summaries.append(ArmSummary(
            arm=arm, units=u.height, requests=int(u["requests"].sum()), exposures=int(u["exposures"].sum()),
            clicks=int(u["clicks"].sum()), conversions=int(u["conversions"].sum()),
            metrics={m: e.value for m, e in estimates[arm].items()}, latency_p95_ms=p95,
        ))
    control = exp.control
    results, guardrails = [], []
    for arm in arms[1:]:
        for metric in cfg.metrics:
            results.append(MetricResult(metric, arm, compare(estimates[arm][metric], estimates[control][metric], cfg.alpha)))
        if "latency_ms" in estimates[arm]:
            c = compare(estimates[arm]["latency_ms"], estimates[control]["latency_ms"], cfg.alpha)
            results.append(MetricResult("latency_ms", arm, c))
            lo, hi = c.rel_ci
            limit = cfg.latency_max_increase
            status = "pass" if hi < limit else "fail" if lo > limit else "inconclusive"
            guardrails.append(Guardrail("latency_ms", arm, status, c.rel_lift, c.rel_ci, limit))
    over_time = lift_over_time(requests, arms, control, cfg)
    srm = srm_check({s.arm: s.units for s in summaries}, exp.expected_shares(), cfg.srm_alpha)
    if srm.mismatch:
        warnings.insert(0, f"sample-ratio mismatch: p={srm.p_value:.2g} < {cfg.srm_alpha}; results are not trustworthy")
    return ExperimentResult(
        experiment=exp.name, unit=exp.unit, control=control, arms=summaries, results=results, srm=srm,
        guardrails=guardrails, config_versions=versions, excluded=excluded, alpha=cfg.alpha,
        primary_metric=cfg.primary_metric, warnings=warnings, over_time=over_time,
    )


def lift_over_time(requests: pl.DataFrame, arms: list[str], control: str, cfg: AnalysisConfig,
                   points: int = 20) -> list[dict[str, Any]]:
    """The primary metric's lift per treatment arm, re-estimated (same estimator, same interval) on the
    requests served up to each of `points` times, which split the analysed requests into equal shares;
    the last point is the whole analysis. Shows how an estimate and its interval settled over the run:
    a lift that flips sign, or an interval that stops shrinking, is worth a look before any decision."""
    if not requests.height:
        return []
    stamps = requests["timestamp"].sort()
    cuts = sorted({stamps[-(-len(stamps) * k // points) - 1] for k in range(1, points + 1)})
    out = []
    for cut in cuts:
        units = units_of(requests.filter(pl.col("timestamp") <= cut))
        estimates = {arm: _estimates(units.filter(pl.col("arm") == arm), cfg) for arm in arms}
        if cfg.primary_metric not in estimates[control]:
            return []  # latency_ms without a latency column: nothing to plot
        lifts = {}
        for arm in arms:
            if arm != control:
                c = compare(estimates[arm][cfg.primary_metric], estimates[control][cfg.primary_metric], cfg.alpha)
                lifts[arm] = {"rel_lift": c.rel_lift, "rel_ci": list(c.rel_ci), "abs_lift": c.abs_lift,
                              "abs_ci": list(c.abs_ci), "p_value": c.p_value}
        counts = {arm: units.filter(pl.col("arm") == arm).height for arm in arms}
        out.append({"until": cut.isoformat(), "units": counts, "lift": lifts})
    return out


def analyze(
    config: ExperimentConfig,
    exposures: pl.DataFrame,
    events: pl.DataFrame,
    cfg: AnalysisConfig | None = None,
    experiments: list[str] | None = None,
) -> AnalysisResult:
    """Every experiment of `config` (or the named ones) over raw exposure and event tables."""
    cfg = cfg or AnalysisConfig()
    if cfg.primary_metric not in (*cfg.metrics, "latency_ms"):
        raise ConfigError(f"unknown primary metric {cfg.primary_metric!r}: use one of {', '.join(cfg.metrics)}")
    rows, attribution = attribute(prepare_exposures(exposures), prepare_events(events), cfg)
    chosen = [config.experiment(n) for n in experiments] if experiments else [e for _, e in config.experiments()]
    present = set(rows["group"].drop_nulls().unique().to_list())
    results = [analyze_experiment(rows, e, cfg) for e in chosen if experiments or e.name in present]
    if not results:
        names = ", ".join(sorted(present)) or "none"
        raise InputError(
            f"no exposures of the config's experiments in the log (experiment labels found: {names}). "
            "Fix: pass the exposure log of the service that ran this config."
        )
    if attribution.events and not attribution.events - attribution.unattributed:
        raise InputError(
            f"none of the {attribution.events:,} click/conversion events matches one of the {rows.height:,} exposures "
            f"(by request_id + item_id, or user_id + item_id within {cfg.window_s:g} s after the exposure), so every "
            "metric would be 0 and the comparison meaningless. Fix: pass the events of the same users, items and "
            "time range as the exposure log (check the id columns and the time zone)."
        )
    for result in results:
        _check_config_version(rows, result, config.version)
    return AnalysisResult(results, attribution, cfg, config.version)


def _check_config_version(rows: pl.DataFrame, result: ExperimentResult, version: str) -> None:
    """A warning with the counts when the log's labels carry another config version than --config."""
    mine = rows.filter(pl.col("group") == result.experiment)
    other = mine.filter(pl.col("config_version").is_not_null() & (pl.col("config_version") != version))
    if other.height:
        seen = ", ".join(sorted(set(other["config_version"].to_list())))
        result.warnings.append(
            f"{other.height:,} of {mine.height:,} exposure rows were served under config version(s) {seen}, not "
            f"{version} (the --config given): their weights or arms may differ; pass the config that ran"
        )
