"""Data checks on new events before a retrain: is the fresh window plausibly the same system's data?

`recsys retrain` learns from new events and then compares the candidate with the current version on
the newest share of those same events, so data that is broken in a consistent way (every click on one
item, shuffled item ids, a remapped catalogue) would look like an improvement. These checks compare
the rows of the new files (what validation kept of them) with the base data and refuse the retrain
before anything is trained (exit 2, the report names the failed checks). Each can be overridden with
`recsys retrain --skip-data-check NAME` (or `all`) when the change is real.

    exposure_coverage  share of new positive events on an item that was never served to that user
                       (by request_id + item_id, else user_id + item_id), when exposure logs are given
    item_overlap       share of new event rows whose item id is not in the catalogue (base + --items)
    user_overlap       share of new positive events by users the base data has never seen
    concentration      share of new positives on the single top item vs the base's, and the entropy
                       of the item distribution vs the base's
    event_mix          an event type that is (almost) absent from the base's positives dominating the new ones
    volume             new positive events per day vs the base's rate

Checks that need a sample (concentration, event_mix, volume) are skipped, and say so, below
`min_new_positives` new positive events.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

CHECKS = ("exposure_coverage", "item_overlap", "user_overlap", "concentration", "event_mix", "volume")


@dataclass(frozen=True)
class CheckLimits:
    max_unexposed_share: float = 0.5
    max_unknown_item_share: float = 0.2
    max_unknown_user_share: float = 0.9
    top_item_ratio: float = 5.0  # new top-item share may be at most this many times the base's ...
    top_item_floor: float = 0.2  # ... or this share, whichever is larger
    min_entropy_ratio: float = 0.5  # item entropy of new positives / base positives
    rare_type_share: float = 0.01  # an event type below this share of base positives ...
    dominant_type_share: float = 0.5  # ... may not make up more than this share of new positives
    max_volume_ratio: float = 20.0  # new positives per day / base positives per day
    min_new_positives: int = 50


def _row(name: str, value: float | None, limit: str, passed: bool | None, detail: str) -> dict[str, Any]:
    status = "skipped" if passed is None else "ok" if passed else "FAILED"
    return {"check": name, "value": value, "limit": limit, "status": status, "detail": detail}


def _top_and_entropy(positives: pl.DataFrame) -> tuple[float, str, float]:
    counts = positives.group_by("item_id").len().sort("len", descending=True)
    p = counts["len"].to_numpy() / max(positives.height, 1)
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum()) + 0.0  # no "-0.00"
    return float(p[0]) if len(p) else 0.0, str(counts["item_id"][0]) if len(p) else "", entropy


def _span_days(ts: pl.Series) -> float:
    """Days covered, at least one (a burst of a few hours is not a day's volume)."""
    if ts.len() < 2:
        return 1.0
    return max((ts.max() - ts.min()).total_seconds() / 86400.0, 1.0)  # type: ignore[operator,union-attr]


def check_new_data(
    events: pl.DataFrame,
    is_new: pl.Series,
    *,
    base_users: pl.Series,
    unknown_item_rows: int,
    new_input_rows: int,
    has_exposures: bool,
    limits: CheckLimits | None = None,
) -> dict[str, Any]:
    """Compare the rows that came from the new files (`is_new`, after validation dropped exact
    duplicates of base rows) with the base rows.

    `events`: clean merged events (user_id, item_id, event_type, timestamp, request_id, strength);
    `unknown_item_rows`: new rows validation dropped for an unknown item; `new_input_rows`: rows read
    from the new files. -> {"checks": [rows], "failed": [names], "limits": ...}."""
    limits = limits or CheckLimits()
    new, base = events.filter(is_new), events.filter(~is_new)
    new_pos, base_pos = new.filter(pl.col("strength") > 0), base.filter(pl.col("strength") > 0)
    rows = [
        _exposure_coverage(events, new_pos, has_exposures, limits),
        _item_overlap(unknown_item_rows, new_input_rows, limits),
        _user_overlap(new_pos, base_users, limits),
        *_sampled(new_pos, base_pos, limits),
    ]
    return {"checks": rows, "failed": [r["check"] for r in rows if r["status"] == "FAILED"],
            "new_positive_events": new_pos.height, "limits": asdict(limits)}


def _exposure_coverage(events: pl.DataFrame, new_pos: pl.DataFrame, has_exposures: bool,
                       limits: CheckLimits) -> dict[str, Any]:
    """New positives against every served list on record (base impressions and the new exposure logs)."""
    name, limit = "exposure_coverage", f"<= {limits.max_unexposed_share:.0%} unexposed"
    shown = events.filter(pl.col("event_type") == "impression")
    if not has_exposures or not shown.height or not new_pos.height:
        return _row(name, None, limit, None, "no exposure log or no new positive events")
    by_request = new_pos.join(shown.select("request_id", "item_id").unique(), on=["request_id", "item_id"], how="semi")
    by_pair = new_pos.join(shown.select("user_id", "item_id").unique(), on=["user_id", "item_id"], how="semi")
    exposed = pl.concat([by_request, by_pair]).unique().height
    share = 1 - exposed / new_pos.height
    return _row(name, share, limit, share <= limits.max_unexposed_share,
                f"{new_pos.height - exposed:,} of {new_pos.height:,} new positive events are on items never served to "
                f"that user in the exposure logs (shuffled or remapped item ids?)")


def _item_overlap(unknown: int, new_rows: int, limits: CheckLimits) -> dict[str, Any]:
    name, limit = "item_overlap", f"<= {limits.max_unknown_item_share:.0%} unknown"
    if not new_rows:
        return _row(name, None, limit, None, "no new event rows")
    share = unknown / new_rows
    return _row(name, share, limit, share <= limits.max_unknown_item_share,
                f"{unknown:,} of {new_rows:,} new rows name items that are not in the catalogue (dropped); "
                "a remapped catalogue? pass the catalogue update with --items")


def _user_overlap(new_pos: pl.DataFrame, base_users: pl.Series, limits: CheckLimits) -> dict[str, Any]:
    name, limit = "user_overlap", f"<= {limits.max_unknown_user_share:.0%} by unseen users"
    if not new_pos.height:
        return _row(name, None, limit, None, "no new positive events")
    unseen = new_pos.filter(~pl.col("user_id").is_in(base_users.cast(pl.Utf8).implode())).height
    share = unseen / new_pos.height
    return _row(name, share, limit, share <= limits.max_unknown_user_share,
                f"{unseen:,} of {new_pos.height:,} new positive events are by users the base data has never seen")


def _sampled(new_pos: pl.DataFrame, base_pos: pl.DataFrame, limits: CheckLimits) -> list[dict[str, Any]]:
    names = ("concentration", "event_mix", "volume")
    if new_pos.height < limits.min_new_positives or not base_pos.height:
        why = f"only {new_pos.height} new positive events (< {limits.min_new_positives}): not measurable"
        return [_row(n, None, "-", None, why) for n in names]
    top_new, item_new, h_new = _top_and_entropy(new_pos)
    top_base, _, h_base = _top_and_entropy(base_pos)
    top_limit = max(limits.top_item_floor, limits.top_item_ratio * top_base)
    ratio = h_new / h_base if h_base > 0 else 1.0
    concentration = _row(
        "concentration", top_new, f"top item <= {top_limit:.1%}, entropy >= {limits.min_entropy_ratio:.0%} of base",
        top_new <= top_limit and ratio >= limits.min_entropy_ratio,
        f"top item {item_new!r} has {top_new:.1%} of new positives (base top item {top_base:.1%}); item entropy "
        f"{h_new:.2f} vs base {h_base:.2f} nats ({ratio:.0%})")
    share_new = new_pos.group_by("event_type").len().with_columns(pl.col("len") / new_pos.height)
    share_base = dict(base_pos.group_by("event_type").len().with_columns(pl.col("len") / base_pos.height).iter_rows())
    odd = [(t, s) for t, s in share_new.iter_rows()
           if s > limits.dominant_type_share and share_base.get(t, 0.0) < limits.rare_type_share]
    mix = _row("event_mix", max((s for _, s in odd), default=0.0),
               f"no type < {limits.rare_type_share:.0%} of base positives above {limits.dominant_type_share:.0%} of new",
               not odd, "; ".join(f"{t!r} is {s:.0%} of new positives but {share_base.get(t, 0.0):.2%} of the base's"
                                   for t, s in odd) or "new positives have the base's event types")
    rate_new = new_pos.height / _span_days(new_pos["timestamp"])
    rate_base = base_pos.height / _span_days(base_pos["timestamp"])
    volume = _row("volume", rate_new / rate_base, f"<= {limits.max_volume_ratio:g}x the base rate",
                  rate_new <= limits.max_volume_ratio * rate_base,
                  f"{rate_new:,.0f} new positive events per day vs {rate_base:,.0f} in the base data")
    return [concentration, mix, volume]


def markdown_rows(report: dict[str, Any]) -> list[str]:
    """The checks as a markdown table (for the retrain report)."""
    lines = ["| data check | status | value | limit | detail |", "|---|---|---|---|---|"]
    for r in report["checks"]:
        value = "n/a" if r["value"] is None else f"{r['value']:.3g}"
        lines.append(f"| {r['check']} | {r['status']} | {value} | {r['limit']} | {r['detail']} |")
    return lines
