"""Offline batch scoring: counts and input order, chunking that keeps users whole, resume after a
crash, rejects with reasons, the CLI, and Ray (slow). Equality with the service and the other
callers of the request path: tests/test_request_path.py."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("lightgbm")
pytest.importorskip("torch")  # only to build the test artifacts

T0 = datetime(2026, 1, 31, 12, 0, tzinfo=timezone.utc)  # after the synthetic log (Jan 2026)
T0_US = int(T0.timestamp() * 1_000_000)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> dict[str, Path]:
    from tests.artifacts import build_scoring_artifacts

    return build_scoring_artifacts(tmp_path_factory.mktemp("batch"), prepared_dir)


@pytest.fixture(scope="module")
def scorer(artifacts: dict[str, Path]) -> Any:
    from recsys.batch.scorer import ChunkScorer, ModelRef, resolve_data_dir

    data, ranker = resolve_data_dir(artifacts["registry"], "v0001", artifacts["ranker"], artifacts["data"])
    return ChunkScorer(ModelRef(str(artifacts["registry"]), "v0001", str(ranker), str(data), "cpu"))


@pytest.fixture(scope="module")
def pairs_file(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~1.2k pairs, grouped by user; some users at two request times; per-row device context; one
    user the model has never seen."""
    users = pl.read_parquet(artifacts["data"] / "users.parquet")["user_id"].to_list()
    items = pl.read_parquet(artifacts["data"] / "items.parquet")["item_id"].to_list()
    rng = np.random.default_rng(1)
    rows = []
    for j, user in enumerate([*users[:60], "never-seen-user"]):
        for t in (["2026-01-31T12:00:00Z", "2026-02-01T08:30:00Z"] if j % 3 == 0 else [None]):
            device = ["mobile", "desktop", "tablet"][j % 3]
            for item in rng.choice(items, int(rng.integers(5, 25)), replace=False):
                rows.append({"user_id": user, "item_id": item, "time": t, "device": device})
    path = tmp_path_factory.mktemp("inputs") / "pairs.parquet"
    pl.DataFrame(rows).write_parquet(path, row_group_size=100)
    return path


def _config(artifacts: dict[str, Path], out: Path, **kw: Any) -> Any:
    from recsys.batch.job import BatchConfig

    kw.setdefault("time", T0.isoformat())
    kw.setdefault("chunk_rows", 150)
    return BatchConfig(out=out, registry=artifacts["registry"], ranker=artifacts["ranker"], data=artifacts["data"],
                       provider="cpu", progress=False, **kw)


def _read(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(out.glob("part-*.parquet")))


# ------------------------------------------------------------------------------------------ parity


def test_pairs_keep_input_order_and_count_requests(artifacts: dict[str, Path], scorer: Any, pairs_file: Path,
                                                  tmp_path: Path) -> None:
    from recsys.batch.job import run_batch

    report = run_batch(_config(artifacts, tmp_path / "out", input=pairs_file), scorer=scorer)
    got = _read(tmp_path / "out")
    n_in = pl.read_parquet(pairs_file).height
    assert report.complete and report.chunks > 3 and report.scored_rows == got.height == n_in
    assert report.rejected_rows == 0 and report.unknown_users == 1
    assert got["input_row"].to_list() == list(range(n_in))  # input order, no duplicates
    assert set(got["model_version"]) == {"v0001"}
    src = pl.read_parquet(pairs_file).with_row_index("input_row").with_columns(pl.col("input_row").cast(pl.Int64))
    requests = src.join(got, on="input_row", suffix="_out").group_by("user_id", "time", maintain_order=True).agg(pl.all())
    assert requests.height > 61  # users with two request times are two requests
    for req in requests.iter_rows(named=True):  # ranks 1..n within each request, best score first
        order = np.argsort(req["rank"])
        assert sorted(req["rank"]) == list(range(1, len(req["rank"]) + 1))
        assert np.all(np.diff(np.asarray(req["score"])[order]) <= 0)


def test_topk_keeps_k_unseen_items_per_user(artifacts: dict[str, Path], scorer: Any, tmp_path: Path) -> None:
    from recsys.batch.io import InputSpec
    from recsys.batch.job import run_batch

    users = pl.read_parquet(artifacts["data"] / "users.parquet").sort("user_idx")["user_id"].to_list()
    pl.DataFrame({"user_id": [*users[:25], "brand-new"]}).write_parquet(tmp_path / "users.parquet")
    config = _config(artifacts, tmp_path / "out", input=tmp_path / "users.parquet", spec=InputSpec("topk"),
                     top_k=5, retrieve_k=30, chunk_rows=200)
    report = run_batch(config, scorer=scorer)
    got = _read(tmp_path / "out")
    assert report.chunks == 4 and got.height == 26 * 5 and report.unknown_users == 1
    state, ids = scorer.state, scorer.item_ids
    for user, rows in got.group_by("user_id", maintain_order=True):
        assert rows["rank"].to_list() == [1, 2, 3, 4, 5]
        idx = {u: i for i, u in enumerate(users)}.get(str(user[0]), -1)
        seen = set(ids[state.user_item.row(idx)[0]].tolist()) if idx >= 0 else set()
        assert not seen & set(rows["item_id"].to_list())


def test_candidate_lists_from_csv_equal_pairs(artifacts: dict[str, Path], scorer: Any, pairs_file: Path,
                                              tmp_path: Path) -> None:
    from recsys.batch.io import InputSpec
    from recsys.batch.job import run_batch

    src = pl.read_parquet(pairs_file).filter(pl.col("time").is_null())
    lists = src.group_by("user_id", maintain_order=True).agg(pl.col("item_id"), pl.col("device").first())
    lists.with_columns(pl.col("item_id").list.join("|").alias("candidates")).drop("item_id").write_csv(
        tmp_path / "lists.csv"
    )
    src.write_parquet(tmp_path / "pairs.parquet")
    run_batch(_config(artifacts, tmp_path / "a", input=tmp_path / "lists.csv", spec=InputSpec("candidates")), scorer=scorer)
    run_batch(_config(artifacts, tmp_path / "b", input=tmp_path / "pairs.parquet"), scorer=scorer)
    a, b = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert a.height == b.height == src.height
    cols = ["user_id", "item_id", "score", "match_score", "rank"]
    assert a.sort("user_id", "item_id").select(cols).equals(b.sort("user_id", "item_id").select(cols))


# ------------------------------------------------------------------------------------------ chunking


def test_chunks_never_split_a_user_and_reject_regrouped_input(tmp_path: Path) -> None:
    from recsys.batch.io import InputSpec, iter_chunks, read_rows
    from recsys.errors import InputError

    rng = np.random.default_rng(0)
    users = np.repeat([f"u{i}" for i in range(200)], rng.integers(1, 40, 200))
    pl.DataFrame({"user_id": users, "item_id": "x"}).write_parquet(tmp_path / "in.parquet", row_group_size=333)
    chunks = list(iter_chunks(tmp_path / "in.parquet", InputSpec(), 500))
    seen: set[str] = set()
    assert sum(c.rows for c in chunks) == len(users) and len(chunks) > 5
    for c in chunks:
        ids = set(c.table.column("user_id").to_pylist())
        assert not ids & seen
        seen |= ids
        assert c.table.equals(read_rows(tmp_path / "in.parquet", c.start, c.rows))  # Ray's row-range read
    # the same boundaries from the cutting column alone (the Ray planner)
    plan = [(c.index, c.start, c.rows) for c in iter_chunks(tmp_path / "in.parquet", InputSpec(), 500, ["user_id"])]
    assert plan == [(c.index, c.start, c.rows) for c in chunks]
    pl.DataFrame({"user_id": [*users, "u3"], "item_id": "x"}).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"user 'u3' appears again at input row \d+ .*Sort the input by user"):
        list(iter_chunks(tmp_path / "bad.parquet", InputSpec(), 500))


# ------------------------------------------------------------------------------------------ resume


def test_resume_after_crash_equals_uninterrupted_run(artifacts: dict[str, Path], scorer: Any, pairs_file: Path,
                                                     tmp_path: Path) -> None:
    from recsys.batch.job import run_batch
    from recsys.batch.manifest import part_name
    from recsys.errors import InputError

    full = run_batch(_config(artifacts, tmp_path / "full", input=pairs_file), scorer=scorer)
    crashed = run_batch(_config(artifacts, tmp_path / "run", input=pairs_file, stop_after=3), scorer=scorer)
    assert not crashed.complete and crashed.chunks == 3
    assert not (tmp_path / "run" / "rejects.parquet").exists()
    # a crash after writing chunk 3's part but before its manifest entry: a torn, uncommitted file
    (tmp_path / "run" / part_name(3)).write_bytes(b"PAR1 torn write")
    resumed = run_batch(_config(artifacts, tmp_path / "run", input=pairs_file), scorer=scorer)
    assert resumed.complete and resumed.chunks_skipped == 3 and resumed.chunks == full.chunks
    assert _read(tmp_path / "run").equals(_read(tmp_path / "full"))
    assert resumed.scored_rows == full.scored_rows == pl.read_parquet(pairs_file).height
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["totals"]["scored_rows"] == full.scored_rows and "finished" in manifest
    # other settings must not reuse the parts
    with pytest.raises(InputError, match=r"other settings \(differs in: chunk_rows\).*--overwrite"):
        run_batch(_config(artifacts, tmp_path / "run", input=pairs_file, chunk_rows=99), scorer=scorer)


def test_resume_without_time_keeps_the_first_runs_time(artifacts: dict[str, Path], scorer: Any, pairs_file: Path,
                                                       tmp_path: Path) -> None:
    from recsys.batch.job import run_batch

    run_batch(_config(artifacts, tmp_path / "o", input=pairs_file, time=None, stop_after=1), scorer=scorer)
    first = json.loads((tmp_path / "o" / "manifest.json").read_text())["time_us"]
    run_batch(_config(artifacts, tmp_path / "o", input=pairs_file, time=None), scorer=scorer)
    src = pl.read_parquet(pairs_file).with_row_index("input_row")
    untimed = src.filter(pl.col("time").is_null())["input_row"].cast(pl.Int64)
    got = _read(tmp_path / "o").filter(pl.col("input_row").is_in(untimed.implode()))
    assert got.height == len(untimed) > 0 and set(got["time"].dt.epoch("us")) == {first}


# ------------------------------------------------------------------------------------------ rejects


def test_rejects_file_names_each_bad_row(artifacts: dict[str, Path], scorer: Any, tmp_path: Path) -> None:
    from recsys.batch.job import run_batch

    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "user_id,item_id,time,device\n"
        "u1,i1,2026-01-31T12:00:00Z,mobile\n"  # row 0 ok
        "u1,i2,,mobile\n"  # row 1 ok: empty time = the run's time
        "u1,no-such-item,2026-01-31T12:00:00Z,mobile\n"  # row 2 unknown item
        "u2,i3,yesterday,desktop\n"  # row 3 bad time
        ",i4,2026-01-31T12:00:00Z,desktop\n"  # row 4 missing user
        "u3,i5,2026-01-31T12:00:00Z,tablet,EXTRA\n"  # malformed line 7 (skipped by the parser)
        "u3,,2026-01-31T12:00:00Z,tablet\n"  # row 5 missing item
        "u3,i6,1769860800000000,tablet\n"  # row 6 ok: epoch µs
    )
    report = run_batch(_config(artifacts, tmp_path / "out", input=csv), scorer=scorer)
    rejects = pl.read_parquet(tmp_path / "out" / "rejects.parquet")
    assert rejects.select("input_row", "user_id", "item_id", "code").rows() == [
        (-1, None, None, "malformed_line"),
        (2, "u1", "no-such-item", "unknown_item"),
        (3, "u2", "i3", "bad_time"),
        (4, None, "i4", "missing_user"),
        (5, "u3", None, "missing_item"),
    ]
    reasons = rejects["reason"].to_list()
    assert "line 7: expected 4 fields, got 5" in reasons[0] and "EXTRA" in reasons[0]
    assert "no-such-item is not in the model's catalogue" in reasons[1]
    assert "time yesterday is not a timestamp" in reasons[2]
    got = _read(tmp_path / "out")
    assert got["input_row"].to_list() == [0, 1, 6]
    assert got["time"].dt.epoch("us").to_list() == [T0_US, T0_US, 1769860800000000]
    assert (report.input_rows, report.scored_rows, report.rejected_rows) == (8, 3, 5)
    assert report.rejects_by_code == {"malformed_line": 1, "unknown_item": 1, "bad_time": 1, "missing_user": 1,
                                      "missing_item": 1}
    assert "rejected rows 5" in report.summary() and "unknown_item 1" in report.summary()


# ------------------------------------------------------------------------------------------ CLI


def test_cli_scores_prints_counts_and_exits_2_on_bad_input(artifacts: dict[str, Path], pairs_file: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.cli import main

    base = ["score", "--registry", str(artifacts["registry"]), "--ranker", str(artifacts["ranker"]),
            "--data", str(artifacts["data"]), "--provider", "cpu", "--no-progress", "--time", T0.isoformat()]
    small = tmp_path / "small.parquet"
    pl.read_parquet(pairs_file).head(40).write_parquet(small)
    assert main([*base, "--input", str(small), "--out", str(tmp_path / "o"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["scored_rows"] == 40 and counts["rejected_rows"] == 0 and counts["version"] == "v0001"
    assert main([*base, "--input", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    pl.DataFrame({"uid": ["u1"], "item_id": ["i1"]}).write_parquet(tmp_path / "cols.parquet")
    assert main([*base, "--input", str(tmp_path / "cols.parquet"), "--out", str(tmp_path / "o3")]) == 2
    assert "no column 'user_id'" in capsys.readouterr().err


def test_score_help_needs_no_heavy_imports() -> None:
    import subprocess
    import sys

    code = ("import sys; from recsys.cli import main\n"
            "try: main(['score', '--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('onnxruntime', 'lightgbm', 'ray', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    assert "--engine" in res.stdout and "--chunk-rows" in res.stdout


# ------------------------------------------------------------------------------------------ Ray


@pytest.mark.slow
def test_ray_engine_equals_local_and_resumes_a_local_run(artifacts: dict[str, Path], scorer: Any, pairs_file: Path,
                                                         tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from recsys.batch.job import run_batch

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        local = run_batch(_config(artifacts, tmp_path / "local", input=pairs_file), scorer=scorer)
        ray_report = run_batch(_config(artifacts, tmp_path / "ray", input=pairs_file, engine="ray", ray_actors=2))
        assert ray_report.complete and ray_report.chunks == local.chunks
        assert _read(tmp_path / "ray").equals(_read(tmp_path / "local"))
        # a local run that crashed, finished by Ray: same parts, same result
        run_batch(_config(artifacts, tmp_path / "mixed", input=pairs_file, stop_after=2), scorer=scorer)
        mixed = run_batch(_config(artifacts, tmp_path / "mixed", input=pairs_file, engine="ray", ray_actors=2))
        assert mixed.chunks_skipped == 2
        assert _read(tmp_path / "mixed").equals(_read(tmp_path / "local"))
    finally:
        ray.shutdown()


def test_a_moved_registry_and_data_still_score_and_serve_without_data(prepared_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """ranker.json records its dataset relative to itself too: a site (registry, ranker, data) moved to
    another place and used from another working directory scores and serves without --data (the old
    record was the path as typed, relative to the publisher's working directory)."""
    import shutil

    from recsys.cli import main
    from recsys.registry import Registry
    from recsys.serving.config import ServeConfig
    from recsys.serving.server import _data_dir
    from tests.artifacts import build_scoring_artifacts

    site = tmp_path / "site"
    shutil.copytree(prepared_dir, site / "data")
    monkeypatch.chdir(site)  # published with relative paths, as the README tour does
    arts = build_scoring_artifacts(Path("."), Path("data"), rounds=5)
    moved = tmp_path / "elsewhere" / "site"
    moved.parent.mkdir()
    shutil.move(str(site), str(moved))
    monkeypatch.chdir(tmp_path / "elsewhere")
    ranker, registry = moved / arts["ranker"], moved / arts["registry"]
    config = ServeConfig(registry=registry, ranker=ranker, host="127.0.0.1", port=0)
    assert _data_dir(config, Registry(registry), None).resolve() == (moved / "data").resolve()
    code = main(["score", "--registry", str(registry), "--ranker", str(ranker), "--provider", "cpu", "--no-progress",
                 "--mode", "topk", "--top-k", "3", "--out", str(tmp_path / "scores"), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out)["scored_rows"] > 0
    shutil.rmtree(moved / "data")  # gone from both places: a clear error naming what was tried and --data
    assert main(["score", "--registry", str(registry), "--ranker", str(ranker), "--mode", "topk", "--top-k", "3",
                 "--out", str(tmp_path / "scores2")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "pass --data PREPARED" in err and "is not at" in err


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_killed_ray_run_leaves_no_ray_processes(artifacts: dict[str, Path], pairs_file: Path, tmp_path: Path,
                                                 signum: str) -> None:
    """`recsys score --engine ray` started its own local Ray instance: killed mid-run (kill PID, Ctrl-C,
    or kill -9, which the driver cannot see: then recsys.batch.ray_reaper does it), every process that
    instance started (GCS, raylet, dashboard and runtime-env agents, workers) stops too."""
    pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import os
    import signal
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    argv = [sys.executable, "-m", "recsys.cli", "score", "--engine", "ray", "--ray-actors", "1", "--no-progress",
            "--registry", str(artifacts["registry"]), "--ranker", str(artifacts["ranker"]),
            "--data", str(artifacts["data"]), "--input", str(pairs_file), "--chunk-rows", "20",
            "--out", str(tmp_path / "out")]
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            for child in psutil.Process(driver.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    seen[child.pid] = " ".join(child.cmdline())[:120]
            names = " ".join(seen.values())
            if "raylet" in names and "gcs_server" in names and "Agent" in names and "RayChunkScorer" in names:
                break  # the instance is up and an actor scores chunks: kill the driver mid-run
            time.sleep(0.3)
        assert driver.poll() is None, (seen, driver.communicate()[0].decode()[-3000:])
        assert any("raylet" in c for c in seen.values()), seen
        os.kill(driver.pid, getattr(signal, signum))
        output = driver.communicate(timeout=60)[0].decode()
        assert driver.returncode != 0, output[-3000:]
        deadline = time.monotonic() + 30
        alive = [p for p in seen if psutil.pid_exists(p)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not alive, {p: seen[p] for p in alive}
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        for pid in seen:  # whatever the code under test left behind (the test's own cleanup)
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
