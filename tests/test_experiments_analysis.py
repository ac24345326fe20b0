"""Experiment analysis on simulated logs: attribution, SRM, A/A interval coverage, a planted lift,
the latency guardrail, the report and `recsys experiment analyze`."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.experiments.analysis import (
    AnalysisConfig,
    analyze,
    attribute,
    prepare_events,
    prepare_exposures,
    unit_table,
)
from recsys.experiments.config import ExperimentConfig, config_from_dict
from recsys.experiments.report import write_report
from recsys.experiments.simulate import ClickModel, simulate_clicks, simulate_exposures, true_ctr
from recsys.experiments.stats import chi2_sf, normal_quantile, ratio, srm_check


def _config(name: str = "ab", weights: tuple[float, float] = (1, 1), unit: str = "user") -> ExperimentConfig:
    return config_from_dict({
        "default_ranker": "control",
        "rankers": {"control": {"model": "current"}, "new": {"model": "v2"}},
        "layers": [{"name": "ranking", "salt": f"layer-{name}", "experiments": [{
            "name": name, "salt": f"salt-{name}", "unit": unit,
            "variants": [{"name": "control", "ranker": "control", "weight": weights[0]},
                         {"name": "treatment", "ranker": "new", "weight": weights[1]}],
        }]}],
    })


@pytest.fixture(scope="module")
def ab() -> ExperimentConfig:
    return _config()


@pytest.fixture(scope="module")
def ab_log(ab: ExperimentConfig) -> pl.DataFrame:
    return simulate_exposures(ab, n_users=1000, requests_per_user=2, list_size=5, seed=0)


# --------------------------------------------------------------------------- statistics


def test_distribution_functions_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 20):
        for x in (0.01, 0.5, 3.0, 10.0, 40.0):
            assert chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-9, abs=1e-15)
    for p in (1e-6, 0.001, 0.025, 0.3, 0.5, 0.8, 0.975, 0.999999):
        assert normal_quantile(p) == pytest.approx(stats.norm.ppf(p), abs=1e-9)


def test_delta_method_matches_the_cluster_bootstrap() -> None:
    rng = np.random.default_rng(3)
    n = rng.integers(1, 30, 2000).astype(float)
    y = rng.binomial(n.astype(int), np.clip(rng.beta(2, 20, 2000), 0, 1)).astype(float)
    est = ratio(y, n)
    boot = [y[i].sum() / n[i].sum() for i in (rng.integers(0, 2000, 2000) for _ in range(400))]
    assert est.se == pytest.approx(np.std(boot), rel=0.15)
    naive = math.sqrt(est.value * (1 - est.value) / n.sum())
    assert est.se > naive  # heterogeneous units: the naive binomial error is too small


def test_srm_check_on_counts() -> None:
    assert not srm_check({"a": 5000, "b": 5050}, {"a": 0.5, "b": 0.5}).mismatch
    assert srm_check({"a": 5000, "b": 5400}, {"a": 0.5, "b": 0.5}).mismatch
    assert not srm_check({"a": 2500, "b": 7450}, {"a": 1, "b": 3}).mismatch


# --------------------------------------------------------------------------- attribution and metrics


def test_attribution_rules_and_ndcg() -> None:
    t0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
    label = "ab/control@v"
    exposures = pl.DataFrame({
        "user_id": ["u1"] * 4 + ["u2"] * 2,
        "item_id": ["a", "b", "c", "d", "a", "b"],
        "request_id": ["r1"] * 4 + ["r2"] * 2,
        "position": [0, 1, 2, 3, 0, 1],
        "variant": [label] * 6,
        "timestamp": [t0] * 4 + [t0 + timedelta(hours=1)] * 2,
    })
    events = pl.DataFrame({
        "user_id": ["u1", "u1", "u1", "u2", "u2", "u1"],
        "item_id": ["b", "c", "d", "b", "a", "a"],
        "event_type": ["click", "Purchase", "click", "clicks", "click", "click"],
        "timestamp": [t0 + timedelta(minutes=1), t0 + timedelta(minutes=5), t0 + timedelta(days=3),
                      t0 + timedelta(hours=1, minutes=2), t0 + timedelta(hours=1, minutes=3), t0 + timedelta(minutes=2)],
        "request_id": ["r1", None, None, None, "r-unknown", "r1"],
    })  # fmt: skip
    rows, stats = attribute(prepare_exposures(exposures), prepare_events(events), AnalysisConfig(window_s=3600))
    clicked = dict(zip(rows["request_id"] + "/" + rows["item_id"], rows["clicked"], strict=True))
    # b: by request; c: purchase by (user, item); d: outside the window; r2/b: by (user, item);
    # r2/a: its request_id is not in the log -> unattributed; r1/a: by request
    assert clicked == {"r1/a": 1, "r1/b": 1, "r1/c": 1, "r1/d": 0, "r2/a": 0, "r2/b": 1}
    assert int(rows["conversions"].sum()) == 1
    assert (stats.events, stats.by_request, stats.by_user_item, stats.unattributed) == (6, 2, 2, 2)
    requests, units = unit_table(rows, "user", k=10)
    ndcg = dict(zip(requests["request_id"], requests["ndcg"], strict=True))
    d = 1 / np.log2(np.arange(2, 6))
    assert ndcg["r1"] == pytest.approx((d[0] + d[1] + d[2]) / (d[0] + d[1] + d[2]))
    assert ndcg["r2"] == pytest.approx(d[1] / d[0])
    assert sorted(units["exposures"].to_list()) == [2, 4]


# --------------------------------------------------------------------------- SRM on simulated logs


def test_srm_detected_on_skewed_log_not_on_fair_one(ab: ExperimentConfig) -> None:
    ab_log = simulate_exposures(ab, n_users=4000, requests_per_user=1, list_size=2, seed=21)
    events = simulate_clicks(ab_log, {"*": 0.1}, seed=1)
    fair = analyze(ab, ab_log, events).experiments[0]
    assert not fair.srm.mismatch and fair.srm.p_value > 0.01
    # treatment loses 20% of its users' logs (a broken logger in one arm)
    rng = np.random.default_rng(0)
    users = ab_log["user_id"].unique().sort().to_list()
    lost = {u for u in users if rng.random() < 0.2}
    skewed_log = ab_log.filter(~(pl.col("variant").str.starts_with("ab/treatment") & pl.col("user_id").is_in(sorted(lost))))
    skewed = analyze(ab, skewed_log, events).experiments[0]
    assert skewed.srm.mismatch and skewed.srm.p_value < 1e-6
    assert all(v.startswith("invalid: sample-ratio mismatch") for v in skewed.verdicts().values())
    # unequal weights are what SRM compares against
    weighted = _config("w", (1, 3))
    log = simulate_exposures(weighted, n_users=2000, requests_per_user=1, list_size=2, seed=5)
    assert not analyze(weighted, log, events.clear()).experiments[0].srm.mismatch


# --------------------------------------------------------------------------- A/A and a planted lift


def test_aa_intervals_cover_zero_95_percent_of_the_time(ab: ExperimentConfig, ab_log: pl.DataFrame) -> None:
    """200 simulated A/A runs (user propensities and clicks redrawn each run): the 95% intervals
    for the difference must contain 0 in [91%, 99%] of the runs, and clustering must matter."""
    model = {"*": ClickModel(ctr=0.15, purchase_rate=0.2, user_sd=0.8)}
    metrics = ("ctr", "ndcg@10", "conversion_per_unit")
    covered = dict.fromkeys(metrics, 0)
    naive_covered = 0
    runs = 200
    for seed in range(runs):
        events = simulate_clicks(ab_log, model, seed=1000 + seed, with_request_id=0.5)
        e = analyze(ab, ab_log, events).experiments[0]
        for m in metrics:
            lo, hi = e.result(m, "treatment").abs_ci
            covered[m] += lo <= 0 <= hi
        arms = {a.arm: a for a in e.arms}
        p = [arms[k].clicks / arms[k].exposures for k in ("control", "treatment")]
        se = math.sqrt(sum(pi * (1 - pi) / arms[k].exposures for pi, k in zip(p, ("control", "treatment"), strict=True)))
        naive_covered += abs(p[1] - p[0]) <= 1.96 * se
    rates = {m: c / runs for m, c in covered.items()}
    assert all(0.91 <= r <= 0.99 for r in rates.values()), rates
    assert naive_covered / runs < rates["ctr"], (naive_covered, rates)


def test_true_lift_is_found(ab: ExperimentConfig) -> None:
    log = simulate_exposures(ab, n_users=4000, requests_per_user=3, list_size=5, seed=11)
    control, treatment = ClickModel(0.10, purchase_rate=0.1), ClickModel(0.12, purchase_rate=0.1)
    events = simulate_clicks(log, {"control": control, "treatment": treatment}, seed=12, with_request_id=0.7)
    e = analyze(ab, log, events).experiments[0]
    c = e.result("ctr", "treatment")
    true_rel = true_ctr(treatment, 5) / true_ctr(control, 5) - 1  # +20%
    assert c.p_value < 0.001 and c.abs_lift > 0
    assert c.rel_ci[0] < true_rel < c.rel_ci[1]
    assert c.treatment == pytest.approx(true_ctr(treatment, 5), rel=0.1)
    assert e.result("ndcg@10", "treatment").rel_lift > 0
    assert e.verdicts()["treatment"].startswith("better than control on ctr")

    # Cumulative lift over time: growing prefixes of the run, the last one the whole analysis.
    points = e.over_time
    assert 10 <= len(points) <= 20
    units = [sum(p["units"].values()) for p in points]
    assert units == sorted(units) and units[0] < units[-1] == sum(a.units for a in e.arms)
    last = points[-1]["lift"]["treatment"]
    assert last["rel_lift"] == pytest.approx(c.rel_lift) and last["rel_ci"] == pytest.approx(list(c.rel_ci))
    width = [p["lift"]["treatment"]["rel_ci"][1] - p["lift"]["treatment"]["rel_ci"][0] for p in points]
    assert width[-1] < 0.5 * width[0]  # the interval narrows as traffic accumulates


# --------------------------------------------------------------------------- guardrail, report, CLI


def test_latency_guardrail_report_and_cli(tmp_path: Path, ab: ExperimentConfig, capsys: pytest.CaptureFixture[str]) -> None:
    log = simulate_exposures(ab, n_users=800, requests_per_user=2, list_size=4, seed=3,
                             latency_ms={"control": 20.0, "treatment": 26.0})  # fmt: skip
    events = simulate_clicks(log, {"*": 0.1}, seed=4)
    result = analyze(ab, log, events, AnalysisConfig(latency_max_increase=0.1))
    e = result.experiments[0]
    (guard,) = e.guardrails
    assert guard.status == "fail" and guard.rel_change == pytest.approx(0.3, abs=0.08)
    assert "guardrail failed: latency_ms" in e.verdicts()["treatment"]
    paths = write_report(result, tmp_path / "report")
    report = json.loads(paths["json"].read_text())
    assert report["experiments"][0]["srm"]["mismatch"] is False
    assert {r["metric"] for r in report["experiments"][0]["results"]} == {"ctr", "conversion_per_unit", "ndcg@10", "latency_ms"}
    md = paths["markdown"].read_text()
    assert "Sample-ratio check" in md and "Guardrail latency_ms (treatment):** FAIL" in md
    for name in ("lift", "lift_over_time"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[name].stat().st_size > 1000
        assert f"]({name}.png)" in md
    assert report["experiments"][0]["over_time"][-1]["lift"]["treatment"]["rel_lift"] == pytest.approx(
        e.result("ctr", "treatment").rel_lift)

    from recsys.cli import main

    config_path = tmp_path / "ab.yaml"
    config_path.write_text(json.dumps(config_from_dict_source()))
    exposure_dir = tmp_path / "exposures"
    exposure_dir.mkdir()
    log.write_parquet(exposure_dir / "part-1.parquet")  # the service writes a folder of parts
    events.write_ndjson(tmp_path / "events.jsonl")
    out = tmp_path / "cli-report"
    code = main(["experiment", "analyze", "--config", str(config_path), "--exposures", str(exposure_dir),
                 "--events", str(tmp_path / "events.jsonl"), "--out", str(out), "--window", "1h"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (out / "report.md").exists() and "ab/treatment:" in capsys.readouterr().out
    assert (out / "lift_over_time.png").exists()
    bare = tmp_path / "no-plots"
    assert main(["experiment", "analyze", "--config", str(config_path), "--exposures", str(exposure_dir),
                 "--events", str(tmp_path / "events.jsonl"), "--out", str(bare), "--window", "1h", "--no-plots"]) == 0
    assert sorted(p.name for p in bare.iterdir()) == ["report.json", "report.md"]
    assert "](lift" not in (bare / "report.md").read_text()
    # a merged log (impressions + events in one table) works without --events
    merged = pl.concat([log.select("user_id", "item_id", "event_type", "timestamp", "request_id", "position", "variant"),
                        events.with_columns(pl.lit(None, pl.Int32).alias("position"), pl.lit(None, pl.Utf8).alias("variant"))],
                       how="diagonal_relaxed")  # fmt: skip
    merged.write_parquet(tmp_path / "merged.parquet")
    assert main(["experiment", "analyze", "--config", str(config_path), "--exposures", str(tmp_path / "merged.parquet"),
                 "--out", str(tmp_path / "r2")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["attribution"]["events"] == events.height
    # missing columns and unknown experiments end with exit code 2 and a message
    assert main(["experiment", "analyze", "--config", str(config_path), "--exposures", str(tmp_path / "events.jsonl"),
                 "--out", str(tmp_path / "r3")]) == 2  # fmt: skip
    assert "lacks column(s) position, variant" in capsys.readouterr().err
    assert main(["experiment", "analyze", "--config", str(config_path), "--exposures", str(exposure_dir),
                 "--out", str(tmp_path / "r4"), "--experiment", "nope"]) == 2  # fmt: skip
    assert "no experiment named 'nope'" in capsys.readouterr().err


def config_from_dict_source() -> dict:
    """The dict behind `_config()` (JSON is YAML, so the CLI reads it as a config file)."""
    return {
        "default_ranker": "control",
        "rankers": {"control": {"model": "current"}, "new": {"model": "v2"}},
        "layers": [{"name": "ranking", "salt": "layer-ab", "experiments": [{
            "name": "ab", "salt": "salt-ab", "unit": "user",
            "variants": [{"name": "control", "ranker": "control", "weight": 1},
                         {"name": "treatment", "ranker": "new", "weight": 1}],
        }]}],
    }


def test_request_unit_clusters_by_request() -> None:
    config = _config("req", unit="request")
    log = simulate_exposures(config, n_users=300, requests_per_user=4, list_size=3, seed=8)
    e = analyze(config, log, simulate_clicks(log, {"*": 0.2}, seed=9)).experiments[0]
    assert sum(a.units for a in e.arms) == 1200 and e.unit == "request"
    assert config_from_dict(config_from_dict_source()).version == _config().version


def test_service_exposure_log_round_trip(tmp_path: Path) -> None:
    """The router's labels through the service's ExposureLog, read back and analysed (the service
    end-to-end test minus gRPC)."""
    from recsys.experiments.router import ExperimentRouter
    from recsys.serving.exposure import ExposureLog, read_exposures

    config = _config()
    router = ExperimentRouter(config, {"control": "model-a", "new": "model-b"}.__getitem__)
    log = ExposureLog(tmp_path / "exposures", flush_records=500)
    t0 = int(datetime(2024, 5, 1, tzinfo=timezone.utc).timestamp() * 1e6)
    for i in range(3000):
        user, rid = f"u{i % 1500}", f"r{i}"
        label, model = router(user, rid, {})
        items = [f"i{(i + k) % 97}" for k in range(4)]
        log.append(rid, user, t0 + i * 1_000_000, model, label, items, -np.arange(4.0), np.zeros(4), np.ones(4, np.int8))
    log.close()
    exposures = read_exposures(tmp_path / "exposures")
    assert exposures.height == 12_000 and exposures["variant"][0].endswith(f"@{config.version}")
    events = simulate_clicks(exposures, {"control": 0.08, "treatment": 0.16}, seed=2, with_request_id=0.5)
    e = analyze(config, exposures, events).experiments[0]
    assert not e.srm.mismatch and e.result("ctr", "treatment").p_value < 1e-6
    models = dict(zip(exposures["variant"].str.extract(r"/(\w+)@"), exposures["model_version"], strict=True))
    assert models == {"control": "model-a", "treatment": "model-b"}


def test_exposure_flush_is_a_barrier_behind_the_writer_thread(tmp_path: Path) -> None:
    """flush() returns only when every row appended before it is on disk, even while the writer thread is
    in the middle of a flush it started itself (a test read back 5,190 of 6,000 rows when flush() ran on the
    caller's thread and found nothing left to take)."""
    from recsys.serving.exposure import ExposureLog, read_exposures

    log = ExposureLog(tmp_path / "exposures", flush_records=10**9)
    items = [f"i{k}" for k in range(50)]
    for round_ in range(3):
        for i in range(1000):
            log.append(f"r{round_}-{i}", f"u{i}", 1_700_000_000_000_000, "v1", "control", items,
                       -np.arange(50.0), np.zeros(50), np.ones(50, np.int8))
        log.flush_async()  # the writer takes these rows and starts writing them
        log.flush()
        assert read_exposures(tmp_path / "exposures").height == (round_ + 1) * 1000 * 50
    log.close()
