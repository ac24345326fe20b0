"""Experiment report: report.json (everything), report.md (for people), lift.png (relative lifts + 95% CIs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from recsys.experiments.analysis import AnalysisResult, ExperimentResult

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


def markdown(result: AnalysisResult) -> str:
    a, cfg = result.attribution, result.analysis
    head = [
        "# Experiment report", "",
        f"Config version {result.config_version}. Attribution window {cfg.window_s:g} s: "
        f"{a.events} events, {a.by_request} attributed by request_id, {a.by_user_item} by (user, item), "
        f"{a.unattributed} unattributed. Intervals are {1 - cfg.alpha:.0%} (delta method, clustered by the "
        "randomisation unit); p-values two-sided.", "",
        "![relative lift](lift.png)", "", "",
    ]  # fmt: skip
    return "\n".join(head) + "\n\n".join(experiment_markdown(e) for e in result.experiments) + "\n"


def plot(result: AnalysisResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(e.experiment, r) for e in result.experiments for r in e.results]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: AnalysisResult, out: Path | str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "lift.png"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["plot"])
    return paths
