"""Evaluation report: Markdown (for people and the README), JSON (for machines), PNG plots (Agg).

Everything is derived from an `EvalResult`, so the three views can never disagree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from recsys.evaluation.evaluate import BLEND, SLICES, EvalResult

DESIGN = """\
**Blend (two-stage stacking).** Candidates are the union of the top-N of several retrievers ({retrievers});
a LightGBM LambdaMART ranker re-ranks the union from the shared point-in-time features (match score,
decayed popularity, co-visitation, category/tag affinity, item attributes) plus each collaborative
system's score and full-ranking rank ({features_from}) passed as per-candidate `extra` features.
Items outside the union score -inf. The ranker is trained on the **valid** window, where the
retrievers were fit on **train** only (their scores are out-of-sample for it); for the **test**
window every collaborative system, popularity included, is refit on {test_fit} (all data before the
window, identically for the baselines and the blend's retrievers). The matcher is trained on train
only and reads each user's history up to the cutoff. Features are exact point in time (events
strictly before each user's cutoff, replayed in time order)."""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(metrics: dict[str, Any], key: str) -> str:
    ci = metrics.get(f"{key}_ci")
    if not ci or any(math.isnan(c) for c in ci):
        return _fmt(metrics.get(key))
    return f"{metrics[key]:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def main_table(result: EvalResult, slice_name: str = "all") -> str:
    """Markdown table of every system on one slice (the README table)."""
    k = result.config["k"]
    rows = result.metrics.get(slice_name, {})
    head = f"| system | NDCG@{k} [95% CI] | Recall@{k} | HitRate@{k} | MRR@{k} | coverage@{k} | AUC (sampled) | NDCG@{k} (sampled) |"
    lines = [head, "|" + "---|" * 8]
    for system in result.systems:
        m = rows.get(system, {})
        if not m.get("users"):
            continue
        name = f"**{system}**" if system == BLEND else system
        lines.append(
            f"| {name} | {_ci(m, f'ndcg@{k}')} | {_fmt(m.get(f'recall@{k}'))} | {_fmt(m.get(f'hit@{k}'))} | "
            f"{_fmt(m.get(f'mrr@{k}'))} | {_fmt(m.get(f'coverage@{k}'), 3)} | {_fmt(m.get('auc'))} | "
            f"{_fmt(m.get(f'sampled_ndcg@{k}'))} |"
        )
    return "\n".join(lines)


def paired_table(result: EvalResult, slice_name: str = "all") -> str:
    k = result.config["k"]
    rows = result.paired.get(slice_name, {})
    lines = [f"| blend − system | ΔNDCG@{k} | 95% CI (paired bootstrap) | blend better? |", "|---|---|---|---|"]
    for system, r in rows.items():
        verdict = "yes" if r["lo"] > 0 else "no (worse)" if r["hi"] < 0 else "not separable"
        lines.append(f"| {system} | {_fmt(r['diff'])} | [{_fmt(r['lo'])}, {_fmt(r['hi'])}] | {verdict} |")
    return "\n".join(lines)


def slice_table(result: EvalResult) -> str:
    k = result.config["k"]
    present = [s for s in SLICES if s in result.metrics]
    lines = ["| system | " + " | ".join(f"{s} NDCG@{k}" for s in present) + " |", "|---|" + "---|" * len(present)]
    for system in result.systems:
        cells = [_ci(result.metrics[s].get(system, {}), f"ndcg@{k}") for s in present]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    users = [str(result.metrics[s].get(result.systems[0], {}).get("users", 0)) for s in present]
    lines.append("| *users* | " + " | ".join(users) + " |")
    return "\n".join(lines)


def markdown(result: EvalResult, title: str | None = None, plots: dict[str, str] | None = None) -> str:
    """The full Markdown report of one run."""
    d, cfg, blend = result.dataset, result.config, result.blend
    k = cfg["k"]
    out = [
        f"## {title or 'Evaluation'}",
        "",
        f"Dataset `{d['root']}`: {d['n_users']} users, {d['n_items']} items; protocol **{d['protocol']}** test "
        f"window: {d['test_users']} users, {d['test_targets']} targets; {d['held_out_items']} items held out "
        f"of all training (cold-start slice). Full ranking over every item the user had not interacted with "
        f"before the window; candidate protocol: targets + {cfg['sampled_negatives']} sampled unseen items.",
        "",
        main_table(result),
        "",
    ]
    if result.paired:
        out += [f"Paired bootstrap ({cfg['n_boot']} resamples of the same users) of the per-user NDCG@{k} difference:", "", paired_table(result), ""]
    out += ["Slices (warm/cold: only the targets of that kind count; new users: ≤ "
            f"{cfg['new_user_max']} training interactions):", "", slice_table(result), ""]
    if result.paired.get("cold_items"):
        out += ["Cold-start slice, blend − system:", "", paired_table(result, "cold_items"), ""]
    if blend:
        test_fit = " + ".join(d.get("fit_splits_test_window", ["train"]))
        retrievers = ", ".join(f"{n} top-{v}" for n, v in blend.get("retrievers", {}).items())
        out += [
            DESIGN.format(retrievers=retrievers, features_from=", ".join(blend.get("features_from", [])), test_fit=test_fit),
            "",
            f"Blend: matcher `{blend.get('matcher')}`; {blend.get('trained_on')}; "
            f"groups {blend.get('groups')}; best iteration {blend.get('best_iteration')}; mean candidates "
            f"{_fmt(blend.get('mean_candidates'), 1)}; candidate-union recall: valid "
            f"{_fmt(blend.get('valid_candidate_recall'), 3)}, test {_fmt(blend.get('test_candidate_recall'), 3)}.",
        ]
        if blend.get("importance"):
            top = ", ".join(f"{n} ({v:.0f})" for n, v in list(blend["importance"].items())[:10])
            out += ["", f"Top features by gain: {top}."]
        out.append("")
    if result.notes:
        out += ["Notes: " + " ".join(result.notes), ""]
    out.append("Timings (s): " + ", ".join(f"{n} {v}" for n, v in result.timings.items()))
    for name, path in (plots or {}).items():
        out += ["", f"![{name}]({path})"]
    return "\n".join(out) + "\n"


def plot(result: EvalResult, out_dir: Path, prefix: str) -> dict[str, str]:
    """PNG plots: NDCG@k per slice with CIs, NDCG vs k, paired differences. -> name -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result.config["k"]
    files: dict[str, str] = {}
    systems = result.systems
    present = [s for s in SLICES if s in result.metrics and result.metrics[s].get(systems[0], {}).get("users")]

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(systems) * max(1, len(present)) / 2), 4))
    width = 0.8 / max(1, len(present))
    x = np.arange(len(systems))
    for j, sname in enumerate(present):
        m = [result.metrics[sname][s] for s in systems]
        vals = np.array([r.get(f"ndcg@{k}", np.nan) for r in m])
        ci = np.array([r.get(f"ndcg@{k}_ci", [np.nan, np.nan]) for r in m])
        err = np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals]))
        ax.bar(x + j * width, vals, width, yerr=err, capsize=2, label=f"{sname} ({m[0].get('users', 0)} users)")
    ax.set_xticks(x + width * (len(present) - 1) / 2, systems, rotation=20)
    ax.set_ylabel(f"NDCG@{k}")
    ax.set_title(f"NDCG@{k} by system and slice (95% bootstrap CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files["ndcg_by_slice"] = f"{prefix}_ndcg.png"
    fig.savefig(out_dir / files["ndcg_by_slice"], dpi=110)
    plt.close(fig)

    ks = result.config["ks"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in systems:
        row = result.metrics["all"][s]
        ax.plot(ks, [row.get(f"ndcg@{kk}", np.nan) for kk in ks], marker="o", label=s, linewidth=2.5 if s == BLEND else 1.2)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(kk) for kk in ks])
    ax.set_xlabel("K")
    ax.set_ylabel("NDCG@K")
    ax.set_title("NDCG@K, all test targets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files["ndcg_at_k"] = f"{prefix}_ndcg_at_k.png"
    fig.savefig(out_dir / files["ndcg_at_k"], dpi=110)
    plt.close(fig)

    if result.paired.get("all"):
        rows = result.paired["all"]
        names = list(rows)
        fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
        diff = np.array([rows[n]["diff"] for n in names])
        lo = np.array([rows[n]["lo"] for n in names])
        hi = np.array([rows[n]["hi"] for n in names])
        ax.errorbar(diff, np.arange(len(names)), xerr=[diff - lo, hi - diff], fmt="o", capsize=3)
        ax.axvline(0, color="grey", linestyle="--")
        ax.set_yticks(np.arange(len(names)), names)
        ax.set_xlabel(f"blend − system, NDCG@{k} (paired bootstrap 95% CI)")
        fig.tight_layout()
        files["paired_diff"] = f"{prefix}_paired.png"
        fig.savefig(out_dir / files["paired_diff"], dpi=110)
        plt.close(fig)
    return files


def write_report(result: EvalResult, out_dir: Path | str, prefix: str = "evaluation", title: str | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write <prefix>.md, <prefix>.json (with `extra`'s keys) and <prefix>_*.png into out_dir; returns role -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(result, out_dir, prefix)
    paths = {"markdown": out_dir / f"{prefix}.md", "json": out_dir / f"{prefix}.json"}
    paths["markdown"].write_text(markdown(result, title, plots))
    payload = {**result.to_dict(), "plots": plots, **(extra or {})}
    paths["json"].write_text(json.dumps(payload, indent=2, default=_json_default))
    paths.update({name: out_dir / file for name, file in plots.items()})
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
