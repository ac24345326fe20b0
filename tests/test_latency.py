"""Where a request's time goes (recsys.serving.latency): the stall monitor names planted stalls (a slow
callback, a full garbage collection, background work beside it), every Rank stage lands in its
histogram on /metrics, a blocked exposure flush does not hold up a Rank, background threads run at a
lower priority, served-list strengths equal the Polars rule, and a real `recsys serve` freezes its
start-up heap out of the collector."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import numpy as np
import polars as pl
import pytest

from recsys.serving.latency import STAGES, StallMonitor, cause, lower_priority

# ------------------------------------------------------------------------------------------ stall monitor


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def planted_stall() -> None:
    _busy(0.02)


def _run_on_monitored_loop(monitor: StallMonitor, *callbacks: Any) -> None:
    loop = asyncio.new_event_loop()
    monitor.install(loop)
    try:
        for cb in callbacks:
            loop.call_soon(cb)
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        monitor.uninstall()
        loop.close()


def test_monitor_records_a_planted_slow_callback() -> None:
    seen: list[dict[str, Any]] = []
    monitor = StallMonitor(0.005, on_stall=seen.append)
    _run_on_monitored_loop(monitor, lambda: None, planted_stall, lambda: None)
    (record,) = [r for r in monitor.timeline() if r["what"] == "planted_stall"]
    assert record["ms"] >= 20 and record["cpu_ms"] > 0 and abs(record["unix_s"] - time.time()) < 60
    assert seen == monitor.timeline()  # the metrics hook saw it too


def test_monitor_attributes_a_full_collection_to_gc() -> None:
    garbage: list[Any] = []

    def collect() -> None:
        for _ in range(200_000):  # cyclic garbage that makes a full collection take milliseconds
            a: list[Any] = []
            a.append(a)
            garbage.append(a)
        garbage.clear()
        started = time.perf_counter()
        gc.collect()
        assert time.perf_counter() - started > 0.001

    monitor = StallMonitor(0.001)
    _run_on_monitored_loop(monitor, collect)
    record = next(r for r in monitor.timeline() if r["what"].endswith("collect"))
    assert any(g["generation"] == 2 for g in record["gc"]), record


def test_monitor_names_background_work_that_overlaps_a_stall() -> None:
    monitor = StallMonitor(0.002)
    inside, release = threading.Event(), threading.Event()

    def flush() -> None:
        with monitor.activity("exposure-flush"):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=flush)
    thread.start()
    assert inside.wait(10)
    try:
        _run_on_monitored_loop(monitor, planted_stall)
    finally:
        release.set()
        thread.join(10)
    (record,) = [r for r in monitor.timeline() if r["what"] == "planted_stall"]
    assert record["background"] == ["exposure-flush"]
    # The cause rule: off the CPU beside background work is that work's doing; on the CPU, the loop's own.
    assert cause({**record, "cpu_ms": 0.0, "gc": []}) == "gil:exposure-flush"
    assert cause({**record, "cpu_ms": 0.0, "gc": [], "background": []}) == "preempted"
    assert cause({**record, "cpu_ms": record["ms"], "gc": []}) == "callback"


def test_background_threads_run_at_a_lower_priority() -> None:
    if not hasattr(os, "getpriority"):
        pytest.skip("per-thread niceness is a Linux feature")
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []

    def work() -> None:
        lower_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    with ThreadPoolExecutor(1, initializer=lower_priority) as pool:
        pool.submit(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))).result()
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [min(base + 10, 19), min(base + 10, 19)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller's own is untouched


def test_event_strengths_without_polars_equal_the_strength_rule() -> None:
    from recsys.data.schema import StrengthRule
    from recsys.serving.engine import strengths

    for types, values in (
        (["impression", "view", "click", "purchase", "share", "add_to_cart", "comment", "mystery"], [np.nan] * 8),
        (["rating", "rating", "click", "impression", "rating"], [5.0, 1.0, np.nan, np.nan, 3.5]),
    ):
        frame = pl.DataFrame({"event_type": types, "value": values}, schema={"event_type": pl.Utf8, "value": pl.Float64})
        want = frame.with_columns(StrengthRule().expr())["strength"].fill_null(0.0).to_numpy()
        np.testing.assert_array_equal(strengths(types, np.asarray(values)), want)


# ------------------------------------------------------------------------------------------ in a real server

pytest.importorskip("onnxruntime")
pytest.importorskip("lightgbm")
grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")  # only to build the test artifacts

from recsys.serving.proto import ranking_pb2 as pb  # noqa: E402
from tests.artifacts import ServerThread, build_scoring_artifacts, spawn_serve  # noqa: E402


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> dict[str, Path]:
    return build_scoring_artifacts(tmp_path_factory.mktemp("latency"), prepared_dir)


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    from recsys.serving.config import ServeConfig

    config = ServeConfig(
        registry=artifacts["registry"], ranker=artifacts["ranker"], data=artifacts["data"], host="127.0.0.1", port=0,
        workers=2, exposure_dir=tmp_path_factory.mktemp("exposures"), exposure_flush_s=60.0, stall_ms=5.0,
    )
    srv = ServerThread(config)
    yield srv
    srv.stop()


def _rank(server: ServerThread, n: int = 20) -> Any:
    import polars as pl

    items = pl.read_parquet(server.app.data_dir / "items.parquet")["item_id"].cast(pl.Utf8).to_list()[:n]
    request = pb.RankRequest(request_id=f"r-{time.monotonic_ns()}", user_id="u1", candidate_ids=items, top_k=5)
    return server.stub.Rank(request, timeout=30)


def _counts(text: str, family: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            for s in fam.samples:
                if s.name.endswith("_count"):
                    out[",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))] = s.value
    return out


def test_every_rank_stage_is_a_histogram_on_metrics(server: ServerThread) -> None:
    for _ in range(3):
        assert len(_rank(server).items) == 5
    counts = _counts(server.app.metrics.exposition().decode(), "recsys_stage_seconds")
    warm = [s for s in STAGES if s not in ("cold_encode", "pool_wait")]  # a warm inline Rank takes every other stage
    for stage in warm:
        assert counts.get(f"rpc=Rank,stage={stage}", 0) >= 3, (stage, counts)


def test_a_blocked_exposure_flush_does_not_hold_up_rank(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush runs on the exposure writer thread: with it stuck mid-write, Ranks are answered (and
    their lists buffered); once released the flush writes them too."""
    log = server.app.exposure
    assert log is not None
    _rank(server)
    writing, release = threading.Event(), threading.Event()
    original = log._write_frame

    def stuck() -> int:
        writing.set()
        release.wait(30)
        return original()

    monkeypatch.setattr(log, "_write_frame", stuck)
    flushed = log.flush_async()
    try:
        assert writing.wait(10)
        replies = [_rank(server) for _ in range(3)]
        assert not release.is_set() and not flushed.done()  # answered while the flush was stuck
    finally:
        release.set()
    assert all(len(r.items) == 5 for r in replies)
    assert flushed.result(30) >= 4 * 5  # the stuck flush, once released, wrote the lists served meanwhile


def test_server_stall_monitor_reports_a_planted_stall_on_its_loop(server: ServerThread) -> None:
    monitor = server.server.monitor
    assert monitor is not None
    done = threading.Event()

    def planted() -> None:
        planted_stall()
        done.set()

    server.loop.call_soon_threadsafe(planted)
    assert done.wait(10)
    _rank(server)  # the loop has moved on
    record = next(r for r in monitor.timeline() if r["what"].endswith("planted"))
    assert record["ms"] >= 20
    counts = _counts(server.app.metrics.exposition().decode(), "recsys_loop_stall_seconds")
    assert counts.get(f"cause={record['cause']}", 0) >= 1, counts  # callback, or preempted on a busy machine


def test_recsys_serve_freezes_its_startup_heap_and_writes_the_stall_log(artifacts: dict[str, Path], tmp_path: Path) -> None:
    import signal

    log = tmp_path / "stalls.json"
    proc, _ = spawn_serve(artifacts, tmp_path, "--metrics-port", "0", "--stall-ms", "1", "--stall-log", str(log),
                          "--drain-seconds", "0")
    try:
        port = json.loads((tmp_path / "ready.json").read_text())["metrics_port"]
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        frozen = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("recsys_gc_frozen_objects "))
        assert frozen > 10_000  # the loaded models, tables and modules
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    timeline = json.loads(log.read_text())
    assert timeline["threshold_ms"] == 1.0 and isinstance(timeline["stalls"], list)
