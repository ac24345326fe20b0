"""Experiment configs and assignment: schema errors with paths, the frozen hash, uniformity, stability
across restarts and coverage changes, layer independence, the router and hot reload, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from recsys.errors import ConfigError
from recsys.experiments.assignment import assign, bucket, explain, parse_label
from recsys.experiments.config import BUCKETS, ExperimentConfig, config_from_dict, load_config, parse_config
from recsys.experiments.router import ConfigWatcher, ExperimentRouter, build_router
from recsys.experiments.stats import chi2_sf

VECTORS = Path(__file__).parent / "data" / "assignment_vectors_v1.json"
T = datetime(2024, 5, 15, tzinfo=timezone.utc)

BASE = textwrap.dedent(
    """
    name: test
    default_ranker: control
    rankers:
      control: {model: current}
      v2: {model: "2024-05-01", blender: rankers/v2}
      pop: {baseline: popularity}
    layers:
      - name: ranking
        salt: layer-a
        experiments:
          - name: exp-a
            salt: salt-a
            coverage: 0.4
            layer_buckets: [0, 5000]
            variants:
              - {name: control, ranker: control}
              - {name: treatment, ranker: v2}
          - name: exp-b
            salt: salt-b
            coverage: 0.5
            layer_buckets: [5000, 10000]
            variants:
              - {name: control, ranker: control}
              - {name: pop, ranker: pop}
              - {name: v2, ranker: v2, weight: 2}
    """
)


def _cfg(text: str = BASE) -> ExperimentConfig:
    return parse_config(text, "test.yaml")


def _two_layers(cov1: float = 0.5, cov2: float = 0.5) -> ExperimentConfig:
    exp = lambda name, cov: {  # noqa: E731
        "name": name, "salt": f"s-{name}", "coverage": cov,
        "variants": [{"name": "a", "ranker": "control"}, {"name": "b", "ranker": "control"}],
    }
    return config_from_dict({
        "default_ranker": "control", "rankers": {"control": {"model": "current"}},
        "layers": [{"name": "l1", "salt": "layer-1", "experiments": [exp("e1", cov1)]},
                   {"name": "l2", "salt": "layer-2", "experiments": [exp("e2", cov2)]}],
    })


# --------------------------------------------------------------------------- the frozen hash


def test_bucket_follows_documented_formula_and_vectors() -> None:
    doc = json.loads(VECTORS.read_text())
    assert doc["hash_version"] == "v1" and len(doc["buckets"]) >= 30
    for case in doc["buckets"]:
        digest = hashlib.sha256(f"v1:{case['salt']}:{case['unit_id']}".encode()).digest()
        assert int.from_bytes(digest[:8], "big") % 10000 == case["bucket"]  # the documented function
        assert bucket(case["salt"], case["unit_id"]) == case["bucket"], case


def test_assignment_vectors() -> None:
    doc = json.loads(VECTORS.read_text())
    config = config_from_dict(doc["config"])
    assert config.version == doc["config_version"], "canonical config form changed: labels in old logs will differ"
    groups = set()
    for case in doc["assignments"]:
        a = assign(config, case["user_id"], case["request_id"], case["context"], datetime.fromisoformat(case["time"]))
        assert (a.label, a.ranker, a.experiment, a.variant, a.holdout) == (
            case["label"], case["ranker"], case["experiment"], case["variant"], case["holdout"]
        ), case
        groups.add(case["label"].split("/")[0])
    assert {"holdout", "blend", "pop", "session-test", "request-test"} <= groups  # every path is exercised


# --------------------------------------------------------------------------- uniformity and stability


def test_buckets_and_variants_are_uniform() -> None:
    ids = [f"user-{i}" for i in range(40_000)]
    b = np.array([bucket("uniformity", u) for u in ids])
    counts = np.bincount(b // 500, minlength=20)  # 20 equal bins of the bucket space
    chi2 = ((counts - len(ids) / 20) ** 2 / (len(ids) / 20)).sum()
    assert chi2_sf(chi2, 19) > 0.001, counts
    config = _cfg()
    exp = config.experiment("exp-b")
    labels = [assign(config, u, t=T).label for u in ids]
    observed = np.array([sum(lab.startswith(f"exp-b/{v.name}@") for lab in labels) for v in exp.variants])
    expected = observed.sum() * np.array([0.25, 0.25, 0.5])
    assert chi2_sf(float(((observed - expected) ** 2 / expected).sum()), 2) > 0.001, observed
    share_a = sum(lab.startswith("exp-a/") for lab in labels) / len(ids)
    assert abs(share_a - 0.4) < 0.01 and abs(observed.sum() / len(ids) - 0.5) < 0.01


def test_assignment_is_stable_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    ids = [f"u{i}" for i in range(300)]
    here = [assign(load_config(path), u, t=T).label for u in ids]
    script = (
        "import json, sys\nfrom datetime import datetime, timezone\n"
        "from recsys.experiments.config import load_config\nfrom recsys.experiments.assignment import assign\n"
        f"c = load_config({str(path)!r})\n"
        f"print(json.dumps([assign(c, f'u{{i}}', t=datetime(2024, 5, 15, tzinfo=timezone.utc)).label for i in range(300)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == here


def test_raising_coverage_only_adds_units() -> None:
    low = _cfg(BASE.replace("coverage: 0.4", "coverage: 0.05"))
    high = _cfg()
    ids = [f"u{i}" for i in range(20_000)]
    before = {u: assign(low, u, t=T) for u in ids}
    after = {u: assign(high, u, t=T) for u in ids}
    enrolled = [u for u in ids if before[u].experiment == "exp-a"]
    assert abs(len(enrolled) / len(ids) - 0.05) < 0.006
    assert all(after[u].experiment == "exp-a" and after[u].variant == before[u].variant for u in enrolled)
    # other experiments of the layer are untouched
    assert all(after[u].label.split("@")[0] == before[u].label.split("@")[0] for u in ids if before[u].experiment == "exp-b")


def test_layers_are_independent_and_experiments_in_a_layer_exclusive() -> None:
    config = _two_layers()
    table = np.zeros((3, 3))  # layer-1 outcome (out, a, b) x layer-2 outcome
    code = {None: 0, "a": 1, "b": 2}
    for i in range(20_000):
        rows = {r["experiment"]: r for r in explain(config, f"u{i}", t=T)["experiments"]}
        v1 = rows["e1"]["variant_if_enrolled"] if rows["e1"]["enrolled"] else None
        v2 = rows["e2"]["variant_if_enrolled"] if rows["e2"]["enrolled"] else None
        table[code[v1], code[v2]] += 1
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    assert chi2_sf(float(((table - expected) ** 2 / expected).sum()), 4) > 0.001, table
    # within a layer: disjoint buckets -> never in two experiments
    config = _cfg()
    for i in range(5000):
        rows = explain(config, f"u{i}", t=T)["experiments"]
        assert sum(r["enrolled"] for r in rows) <= 1


def test_targeting_time_window_forced_and_holdout() -> None:
    text = BASE.replace(
        "        coverage: 0.4\n",
        "        coverage: 0.4\n        start: 2024-05-01T00:00:00Z\n        end: 2024-06-01\n"
        "        force: {qa-1: treatment}\n",
    ).replace("        coverage: 0.5\n", "        coverage: 0.5\n        targeting: {country: [US, 1]}\n")
    text += "holdouts:\n  - {name: hold, salt: hold-1, coverage: 0.1, ranker: pop}\n"
    config = _cfg(text)
    ids = [f"u{i}" for i in range(4000)]
    labels = {u: assign(config, u, t=T, context={"country": "US"}) for u in ids}
    held = [u for u in ids if labels[u].holdout == "hold"]
    assert abs(len(held) / len(ids) - 0.1) < 0.02 and all(labels[u].ranker == "pop" for u in held)
    late = datetime(2024, 7, 1, tzinfo=timezone.utc)
    assert not any(assign(config, u, t=late, context={"country": "US"}).experiment == "exp-a" for u in ids)
    assert any(a.experiment == "exp-b" for a in labels.values())
    assert not any(assign(config, u, t=T, context={"country": "FR"}).experiment == "exp-b" for u in ids)
    assert any(assign(config, u, t=T, context={"country": 1.0}).experiment == "exp-b" for u in ids)  # 1.0 == "1"
    qa = assign(config, "qa-1", t=late)  # forced: outside the window, whatever its holdout bucket
    assert (qa.experiment, qa.variant, qa.ranker, qa.forced) == ("exp-a", "treatment", "v2", True)
    parsed = parse_label(qa.label)
    assert parsed is not None and parsed.forced and parsed.group == "exp-a" and parsed.config_version == config.version
    assert parse_label("control") is None


def test_session_and_request_units() -> None:
    text = BASE.replace("salt: salt-a\n", "salt: salt-a\n        unit: session\n").replace(
        "salt: salt-b\n", "salt: salt-b\n        unit: session\n"
    )
    config = _cfg(text)
    # same session -> same variant whatever the user; no session id -> not enrolled
    got = {assign(config, f"user{i}", f"r{i}", {"session_id": "S1"}, T).label for i in range(50)}
    assert len(got) == 1
    assert assign(config, "user1", "r1", {}, T).label.startswith("default/control@")


# --------------------------------------------------------------------------- schema errors


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace("{name: v2, ranker: v2, weight: 2}", "{name: v2, ranker: v2, weight: 0}"),
         "layers[0].experiments[1].variants[2].weight: must be > 0"),
        (lambda s: s.replace("coverage: 0.4", "covrage: 0.4"), "layers[0].experiments[0].covrage: unknown key"),
        (lambda s: s.replace("ranker: v2}", "ranker: v3}", 1), "layers[0].experiments[0].variants[1].ranker: unknown ranker 'v3'"),
        (lambda s: s.replace("[5000, 10000]", "[4000, 10000]"), "layers[0].experiments[1].layer_buckets: [4000, 10000] overlaps"),
        (lambda s: s.replace("salt: salt-b", "salt: salt-a"), "layers[0].experiments[1].salt: salt 'salt-a' is already used"),
        (lambda s: s.replace("coverage: 0.4", "coverage: 0.6"), "layers[0].experiments[0].coverage: 0.6 exceeds"),
        (lambda s: s.replace("coverage: 0.4", "coverage: 1.5"), "layers[0].experiments[0].coverage: must be in [0, 1]"),
        (lambda s: s.replace("coverage: 0.4", "coverage: lots"), "layers[0].experiments[0].coverage: must be a number"),
        (lambda s: s.replace("name: exp-b", "name: exp/b"), "layers[0].experiments[1].name: 'exp/b' is not a valid name"),
        (lambda s: s.replace("name: exp-b", "name: exp-a"), "layers[0].experiments[1].name: name 'exp-a' is already used"),
        (lambda s: s.replace("salt: salt-a\n", "salt: salt-a\n        unit: device\n"), "layers[0].experiments[0].unit: must be one of"),
        (lambda s: s.replace("salt: salt-a\n", "salt: salt-a\n        unit: request\n"), "layers[0].experiments[1].unit: experiments in one layer must share a unit"),
        (lambda s: s.replace("salt: salt-a\n", "salt: salt-a\n        start: 2024-06-01\n        end: 2024-05-01\n"),
         "layers[0].experiments[0].end: must be after start"),
        (lambda s: s.replace("salt: salt-a\n", "salt: salt-a\n        start: tomorrow\n"), "layers[0].experiments[0].start: 'tomorrow' is not an ISO-8601"),
        (lambda s: s.replace("salt: salt-a\n", "salt: salt-a\n        force: {qa: nope}\n"), "layers[0].experiments[0].force.qa: unknown variant 'nope'"),
        (lambda s: s.replace("pop: {baseline: popularity}", "pop: {baseline: trending}"), "rankers.pop.baseline: unknown baseline"),
        (lambda s: s.replace("pop: {baseline: popularity}", "pop: {model: v1, baseline: popularity}"), "rankers.pop: set exactly one of"),
        (lambda s: s.replace("default_ranker: control", "default_ranker: nope"), "default_ranker: unknown ranker 'nope'"),
        (lambda s: s.replace("          - {name: pop, ranker: pop}\n", "").replace("          - {name: v2, ranker: v2, weight: 2}\n", ""),
         "layers[0].experiments[1].variants: needs at least two variants"),
        (lambda s: s.replace("name: exp-a", "name: default"), "layers[0].experiments[0].name: 'default' is reserved"),
        (lambda s: s + "holdouts:\n  - {name: h, salt: layer-a, coverage: 0.1}\n", "layers[0].salt: salt 'layer-a' is already used"),
        (lambda s: s.replace("rankers:", "rankers: [", 1), "test.yaml: line"),
    ],
)
def test_config_errors_name_the_path(edit, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(edit(BASE))
    assert message in str(info.value), str(info.value)
    assert str(info.value).startswith("experiment config test.yaml")


def test_config_version_ignores_formatting() -> None:
    a = _cfg()
    b = _cfg("# a comment\n" + BASE.replace("{name: control, ranker: control}", "{ranker: control, name: control}"))
    c = _cfg(BASE.replace("coverage: 0.4", "coverage: 0.3"))
    assert a.version == b.version != c.version
    assert a.used_rankers() == {"control", "v2", "pop"}
    assert a.experiment("exp-a").variant_thresholds == (5000, BUCKETS)


# --------------------------------------------------------------------------- router and hot reload


def test_router_hot_reload_keeps_last_good_config(tmp_path: Path) -> None:
    path = tmp_path / "experiments.yaml"
    path.write_text(BASE)
    models = {"control": "M-control", "v2": "M-v2", "pop": "M-pop"}
    prepared: list[str] = []
    router, watcher = build_router(path, models.__getitem__, prepare=lambda c: prepared.append(c.version))
    first = router.config.version
    label, model = router("u1", "r1", {"country": "US"}, T.timestamp() * 1e6)
    a = router.assignment("u1", "r1", {"country": "US"}, T.timestamp() * 1e6)
    assert label == a.label and model == models[a.ranker] and label.endswith(f"@{first}")
    assert router.debug("u1", "r1")["label"].endswith(f"@{first}")
    assert watcher.poll() is False  # unchanged
    # a malformed edit is refused; the running config keeps serving and the error is reported
    path.write_text(BASE.replace("weight: 2", "weight: -2"))
    assert watcher.poll() is False
    status = watcher.status()
    assert status["version"] == first and "variants[2].weight: must be > 0" in status["last_error"]
    assert router.config.version == first and status["refused"] == 1
    path.write_text("# reverted\n" + BASE)  # back to the running config: the error clears
    assert watcher.poll() is False and watcher.status()["last_error"] is None
    # a config naming a ranker the service cannot resolve is refused too
    path.write_text(BASE.replace("pop: {baseline: popularity}", "pop: {baseline: random}").replace("v2: {model", "v9: {model").replace("ranker: v2", "ranker: v9"))
    assert watcher.poll() is False and "ranker 'v9' is not loaded" in watcher.status()["last_error"]
    # a good edit is installed
    path.write_text(BASE.replace("coverage: 0.4", "coverage: 0.2"))
    assert watcher.poll() is True
    assert router.config.version != first and watcher.status()["last_error"] is None
    assert router("u1", "r1")[0].endswith(f"@{router.config.version}")
    assert prepared[0] == first and prepared[-1] == router.config.version


def test_router_refuses_unresolvable_rankers_at_start() -> None:
    with pytest.raises(ConfigError, match="ranker 'pop' is not loaded"):
        ExperimentRouter(_cfg(), {"control": 1, "v2": 2}.__getitem__)


def test_watcher_thread_picks_up_changes(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    seen: list[str] = []
    watcher = ConfigWatcher(path, lambda c: seen.append(c.version))
    watcher.start(0.02)
    try:
        path.write_text(BASE.replace("coverage: 0.5", "coverage: 0.25"))
        for _ in range(200):
            if len(seen) == 2:
                break
            import time

            time.sleep(0.01)
    finally:
        watcher.stop()
    assert len(seen) == 2 and seen[0] != seen[1]


# --------------------------------------------------------------------------- CLI


def test_cli_validate_and_assign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    assert main(["experiment", "validate", str(path)]) == 0
    assert "valid (config version" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("weight: 2", "weight: 0"))
    assert main(["experiment", "validate", str(bad)]) == 2
    assert "layers[0].experiments[1].variants[2].weight: must be > 0" in capsys.readouterr().err
    units = tmp_path / "units.txt"
    units.write_text("\n".join(f"u{i}" for i in range(500)))
    out = tmp_path / "assign.csv"
    assert main(["experiment", "assign", str(path), "--units", str(units), "--out", str(out), "--time", "2024-05-15"]) == 0
    printed = capsys.readouterr().out
    assert "exp-a/treatment@" in printed and out.exists()
    import polars as pl

    frame = pl.read_csv(out)
    assert frame.height == 500 and frame["label"][0] == assign(load_config(path), "u0", "u0", {"session_id": "u0"}, T).label
    assert main(["experiment", "assign", str(path), "--count", "50"]) == 0
    assert "50 units" in capsys.readouterr().out
    assert main(["experiment", "assign", str(path), "--debug", "u7", "--context", "country=US"]) == 0
    debug = json.loads(capsys.readouterr().out)
    assert debug["user_id"] == "u7" and debug["context"]["country"] == "US" and len(debug["experiments"]) == 2
    assert main(["experiment", "assign", str(path), "--count", "5", "--context", "oops"]) == 2
