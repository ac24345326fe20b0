"""Experiment report: report.json (everything), report.md (for people), lift.png (relative lifts + 95% CIs
per metric) and lift_over_time.png (the primary metric's cumulative lift with its interval, SRM verdict)."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from recsys.experiments.analysis import AnalysisResult, ExperimentResult
from recsys.plots import write_plot

LOWER_IS_BETTER = {"latency_ms"}


def _pct(x: float) -> str:
    return f"{x:+.2%}" if math.isfinite(x) else "n/a"


def _num(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.4g}"


def experiment_markdown(e: ExperimentResult) -> str:
    lines = [f"## Experiment `{e.experiment}` (unit: {e.unit}, control: `{e.control}`)", ""]
    for w in e.warnings:
        lines.append(f"> **Warning:** {w}")
    if e.warnings:
        lines.append("")
    for arm, verdict in e.verdicts().items():
        lines.append(f"- **{arm}**: {verdict}")
    lines += ["", "| variant | units | requests | exposures | clicks | conversions | "
              + " | ".join(e.arms[0].metrics) + " | latency p95 ms |", "|" + "---|" * (7 + len(e.arms[0].metrics))]
    for a in e.arms:
        metrics = " | ".join(_num(v) for v in a.metrics.values())
        lines.append(
            f"| {a.arm} | {a.units} | {a.requests} | {a.exposures} | {a.clicks} | {a.conversions} | {metrics} | {_num(a.latency_p95_ms)} |"
        )
    level = f"{1 - e.alpha:.0%}"
    lines += ["", f"| metric | variant | control | treatment | abs lift [{level} CI] | rel lift [{level} CI] | p |",
              "|---|---|---|---|---|---|---|"]
    for r in e.results:
        c = r.comparison
        lines.append(
            f"| {r.metric} | {r.arm} | {_num(c.control)} | {_num(c.treatment)} | {_num(c.abs_lift)} "
            f"[{_num(c.abs_ci[0])}, {_num(c.abs_ci[1])}] | {_pct(c.rel_lift)} [{_pct(c.rel_ci[0])}, {_pct(c.rel_ci[1])}] "
            f"| {_num(c.p_value)} |"
        )
    s = e.srm
    observed = ", ".join(f"{k}={v}" for k, v in s.observed.items())
    expected = ", ".join(f"{k}={v:.3f}" for k, v in s.expected_share.items())
    lines += ["", f"**Sample-ratio check:** units {observed}; expected shares {expected}; "
              f"chi2={s.chi2:.3f} (df={s.df}), p={_num(s.p_value)} -> {'MISMATCH' if s.mismatch else 'ok'} "
              f"(threshold {s.alpha})"]  # fmt: skip
    for g in e.guardrails:
        lines.append(
            f"\n**Guardrail {g.name} ({g.arm}):** {g.status.upper()}: change {_pct(g.rel_change)} "
            f"[{_pct(g.rel_ci[0])}, {_pct(g.rel_ci[1])}], tolerated +{g.threshold:.0%}"
        )
    if e.excluded:
        lines.append("\nExcluded: " + ", ".join(f"{k}={v}" for k, v in e.excluded.items()))
    lines.append(f"\nConfig versions in the log: {', '.join(e.config_versions) or 'n/a'}")
    return "\n".join(lines)


def markdown(result: AnalysisResult, plots: tuple[str, ...] = ()) -> str:
    a, cfg = result.attribution, result.analysis
    pictures = {"lift.png": "relative lift", "lift_over_time.png": "cumulative lift over time"}
    head = [
        "# Experiment report", "",
        f"Config version {result.config_version}. Attribution window {cfg.window_s:g} s: "
        f"{a.events} events, {a.by_request} attributed by request_id, {a.by_user_item} by (user, item), "
        f"{a.unattributed} unattributed. Intervals are {1 - cfg.alpha:.0%} (delta method, clustered by the "
        "randomisation unit); p-values two-sided.", "",
        *(f"![{pictures[name]}]({name})" for name in plots), "", "",
    ]  # fmt: skip
    return "\n".join(head) + "\n\n".join(experiment_markdown(e) for e in result.experiments) + "\n"


def plot(result: AnalysisResult, path: Path) -> Path | None:
    rows = [(e.experiment, r) for e in result.experiments for r in e.results]

    def draw(plt: Any) -> Any:
        fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(rows), 2) + 1.2))
        for y, (_, r) in enumerate(rows):
            c = r.comparison
            if not math.isfinite(c.rel_lift):
                continue
            good, bad = (c.rel_ci[1] < 0, c.rel_ci[0] > 0) if r.metric in LOWER_IS_BETTER else (c.rel_ci[0] > 0, c.rel_ci[1] < 0)
            color = "tab:green" if good else "tab:red" if bad else "tab:gray"
            ax.errorbar(c.rel_lift * 100, y, xerr=[[(c.rel_lift - c.rel_ci[0]) * 100], [(c.rel_ci[1] - c.rel_lift) * 100]],
                        fmt="o", color=color, capsize=3)  # fmt: skip
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(rows)), [f"{n}/{r.arm}: {r.metric}" for n, r in rows])
        ax.invert_yaxis()
        ax.set_xlabel(f"relative lift vs control, % ({1 - result.analysis.alpha:.0%} CI)")
        fig.tight_layout()
        return fig

    return write_plot(path, draw)


def plot_over_time(result: AnalysisResult, path: Path) -> Path | None:
    """One panel per experiment: the primary metric's relative lift of each treatment arm on the
    exposures up to each time (ExperimentResult.over_time), its interval as a band; the SRM verdict
    in the panel's title, since a lift under a sample-ratio mismatch is not to be read."""
    experiments = [e for e in result.experiments if e.over_time]
    if not experiments:
        return None
    level = f"{1 - result.analysis.alpha:.0%}"

    def draw(plt: Any) -> Any:
        import matplotlib.dates as mdates

        fig, axes = plt.subplots(len(experiments), 1, figsize=(8, 3.2 * len(experiments)), squeeze=False)
        for ax, e in zip(axes[:, 0], experiments, strict=True):
            locator = mdates.AutoDateLocator()
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
            times = [datetime.fromisoformat(p["until"]) for p in e.over_time]
            for arm in (a.arm for a in e.arms if a.arm != e.control):
                lift = [_finite(p["lift"][arm]["rel_lift"]) for p in e.over_time]
                lo = [_finite(p["lift"][arm]["rel_ci"][0]) for p in e.over_time]
                hi = [_finite(p["lift"][arm]["rel_ci"][1]) for p in e.over_time]
                line = ax.plot(times, [v * 100 for v in lift], marker="o", ms=3, label=f"{arm} vs {e.control}")[0]
                ax.fill_between(times, [v * 100 for v in lo], [v * 100 for v in hi], color=line.get_color(), alpha=0.2,
                                label=f"{level} interval")
            ax.axhline(0, color="black", lw=0.8)
            s = e.srm
            srm = f"SRM p={_num(s.p_value)}: {'MISMATCH, do not read the lift' if s.mismatch else 'ok'}"
            ax.set_title(f"{e.experiment}: cumulative {e.primary_metric} lift; {srm}", fontsize=9,
                         color="tab:red" if s.mismatch else "black")
            ax.set_ylabel(f"relative lift, % ({level} CI)")
            ax.legend(fontsize=8, loc="best")
        axes[-1, 0].set_xlabel("exposures served up to (UTC)")
        fig.tight_layout()
        return fig

    return write_plot(path, draw)


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else math.nan


def write_report(result: AnalysisResult, out: Path | str, plots: bool = True) -> dict[str, Path]:
    """report.json, report.md and (with `plots`, when matplotlib is installed) the two pictures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    if plots:
        for name, draw in (("lift", plot), ("lift_over_time", plot_over_time)):
            drawn = draw(result, out / f"{name}.png")
            if drawn is not None:
                paths[name] = drawn
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    paths["markdown"].write_text(markdown(result, tuple(p.name for k, p in paths.items() if p.suffix == ".png")))
    return paths
