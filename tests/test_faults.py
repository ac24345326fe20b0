"""Fault injection: `prepare`, `score` and `publish` are SIGKILLed at named points (RECSYS_FAULT_AT, see
recsys.files.fault_point) in a real subprocess. Afterwards the previous outputs and the registry are
intact (hashes), nothing half-written is readable as data, and the next run succeeds. (`retrain` is
killed the same way in tests/test_retrain.py, where its registry and traffic are built.)"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from recsys.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def killed_at(point: str, *argv: str, timeout: float = 300) -> None:
    """Run `recsys argv` in a subprocess that SIGKILLs itself at `point`; assert it died there."""
    env = {**os.environ, "RECSYS_FAULT_AT": point, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "recsys.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])


def test_prepare_killed_keeps_the_previous_dataset(tmp_path: Path, synthetic_log: Any) -> None:
    from recsys.data.prepared import PreparedData

    synthetic_log.events.head(6000).write_parquet(tmp_path / "events.parquet")
    synthetic_log.items.write_parquet(tmp_path / "items.parquet")
    argv = ["prepare", "--events", str(tmp_path / "events.parquet"), "--items", str(tmp_path / "items.parquet"),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    before = tree(tmp_path / "out")
    killed_at("prepare:written", *argv, "--max-history", "5")  # new tables written, not yet moved in
    assert tree(tmp_path / "out") == before
    assert [p.name for p in tmp_path.glob(".out.tmp-*")]  # the dead run's temp: never read
    killed_at("replace:aside", *argv, "--max-history", "5")  # between the two renames
    assert not (tmp_path / "out").exists() and tree(tmp_path / ".out.old") == before
    assert main([*argv, "--max-history", "5"]) == 0  # the next run recovers, then replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.parquet", "items.parquet", "out"]
    assert PreparedData.load(tmp_path / "out").max_history == 5


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> dict[str, Path]:
    pytest.importorskip("torch")
    pytest.importorskip("lightgbm")
    from tests.artifacts import build_scoring_artifacts

    return build_scoring_artifacts(tmp_path_factory.mktemp("faults"), prepared_dir)


def test_score_killed_after_a_chunk_resumes_to_the_same_result(artifacts: dict[str, Path], tmp_path: Path) -> None:
    users = pl.read_parquet(artifacts["data"] / "users.parquet")["user_id"].to_list()[:40]
    items = pl.read_parquet(artifacts["data"] / "items.parquet")["item_id"].to_list()
    rng = np.random.default_rng(0)
    pairs = pl.DataFrame([{"user_id": u, "item_id": i} for u in users for i in rng.choice(items, 12, replace=False)])
    pairs.write_parquet(tmp_path / "pairs.parquet")

    def argv(out: str) -> list[str]:
        return ["score", "--registry", str(artifacts["registry"]), "--ranker", str(artifacts["ranker"]),
                "--data", str(artifacts["data"]), "--provider", "cpu", "--input", str(tmp_path / "pairs.parquet"),
                "--out", str(tmp_path / out), "--chunk-rows", "120", "--time", "2026-01-31T12:00:00Z", "--no-progress"]

    assert main(argv("full")) == 0
    killed_at("score:chunk", *argv("run"))  # killed right after committing chunk 0
    committed = tree(tmp_path / "run")
    assert "part-00000.parquet" in committed and "rejects.parquet" not in committed
    assert main(argv("run")) == 0  # resumes: chunk 0 kept, the rest scored
    assert tree(tmp_path / "run")["part-00000.parquet"] == committed["part-00000.parquet"]

    def scored(out: str) -> pl.DataFrame:
        return pl.read_parquet(sorted((tmp_path / out).glob("part-*.parquet"))).sort("input_row")

    assert scored("run").equals(scored("full"))


def test_publish_killed_leaves_the_registry_as_it_was(artifacts: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from recsys.registry import Registry

    shutil.copytree(artifacts["registry"], tmp_path / "reg")
    registry = Registry(tmp_path / "reg")
    before = (registry.versions(), registry.current(), tree(registry.versions_dir))
    argv = ["publish", "--checkpoint", str(artifacts["ckpt"]), "--registry", str(registry.root),
            "--data", str(artifacts["data"]), "--promote", "--threads", "1"]
    for point in ("publish:staged", "registry:register"):
        killed_at(point, *argv)
        assert (registry.versions(), registry.current(), tree(registry.versions_dir)) == before, point
    assert main(["models", "gc", "--registry", str(registry.root), "--keep", "10"]) == 0  # dead staging dirs go
    assert not list((registry.root / ".staging").iterdir())
    assert main(argv) == 0  # the next run succeeds
    assert registry.versions() == [*before[0], "v0002"] and registry.current() == "v0002"
    registry.verify("v0002")
