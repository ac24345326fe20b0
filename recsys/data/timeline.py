"""prepare's timeline: events per day, with the global split cutoffs marked (timeline.png + timeline.json)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from recsys.plots import write_plot

PNG = "timeline.png"


def timeline_series(events: pl.DataFrame, valid_start: datetime, test_start: datetime) -> dict[str, Any]:
    """Per UTC day with events: positive events (strength > 0) and the rest (impressions, ratings below
    the threshold); and the cutoffs. Every day in the span is listed, a day without events as 0."""
    daily = events.group_by(pl.col("timestamp").dt.date().alias("day")).agg(
        (pl.col("strength") > 0).sum().alias("positive"), (pl.col("strength") <= 0).sum().alias("other"),
    )
    days = daily.select(pl.date_range(pl.col("day").min(), pl.col("day").max(), "1d").alias("day"))
    daily = days.join(daily, on="day", how="left", maintain_order="left").fill_null(0)
    return {
        "day": [d.isoformat() for d in daily["day"].to_list()],
        "positive_events": daily["positive"].to_list(),
        "other_events": daily["other"].to_list(),
        "valid_start": valid_start.isoformat(),
        "test_start": test_start.isoformat(),
    }


def write_timeline(out_dir: Path, series: dict[str, Any]) -> Path | None:
    def draw(plt: Any) -> Any:
        days = [datetime.fromisoformat(d).replace(tzinfo=timezone.utc) for d in series["day"]]
        fig, ax = plt.subplots(figsize=(9, 3.2))
        ax.bar(days, series["positive_events"], width=0.9, color="tab:blue", label="positive events")
        ax.bar(days, series["other_events"], width=0.9, bottom=series["positive_events"], color="tab:gray",
               alpha=0.5, label="impressions and other non-positive events")
        end = days[-1] + (days[-1] - days[0]) / max(len(days), 1)
        spans = (("valid_start", "test_start", "tab:orange", "valid"), ("test_start", None, "tab:red", "test"))
        for row, (key, until, color, name) in enumerate(spans):
            cutoff = datetime.fromisoformat(series[key])
            ax.axvspan(cutoff, datetime.fromisoformat(series[until]) if until else end, color=color, alpha=0.12)
            ax.axvline(cutoff, color=color, lw=1.5)
            ax.annotate(f"{name} from {cutoff:%Y-%m-%d %H:%M}", (cutoff, 1), xycoords=("data", "axes fraction"),
                        xytext=(-3, -12 - 13 * row), textcoords="offset points", color=color, fontsize=8,
                        ha="right", bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        ax.set_ylabel("events per day (UTC)")
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False, fontsize=8)
        fig.autofmt_xdate()
        fig.tight_layout()
        return fig

    return write_plot(out_dir / PNG, draw, series=series)
