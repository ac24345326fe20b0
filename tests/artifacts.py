"""Tiny scoring artifacts shared by tests and benchmarks: an exported registry version + a ranker.

Built once per session by fixtures (they take seconds): the tiny random BERT matcher exported to
ONNX with its catalogue embedding store, and a LightGBM ranker trained on match scores from a cheap
stand-in user tower (same feature names as the ONNX tower's, so it is a valid, if slightly
mismatched, tiny model). Needs torch (only to build the artifacts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl


def build_scoring_artifacts(base: Path, prepared_dir: Path, seed: int = 3, rounds: int = 40) -> dict[str, Path]:
    """-> {"registry", "ranker", "data", "base"}: registry with one version (current), ranker dir."""
    from recsys.data.prepared import PreparedData
    from recsys.features import EmbeddingMatcher, mean_pool_encoder
    from recsys.ranker import LambdaMARTParams
    from recsys.scoring.store import EmbeddingStore
    from tests.test_export import make_tiny_checkpoint
    from training.export import ExportConfig, export_to_registry
    from training.ranker import RankerConfig, train_ranker

    base.mkdir(parents=True, exist_ok=True)
    ckpt = make_tiny_checkpoint(base / "ckpt", seed=seed)
    version, _ = export_to_registry(ckpt, base / "reg", ExportConfig(), data=prepared_dir)
    data = PreparedData.load(prepared_dir)
    store = EmbeddingStore.load(base / "reg" / "versions" / version / "embeddings")
    emb = np.asarray(store.matrix[store.positions(data.items["item_id"].cast(pl.Utf8).to_list())])
    train_ranker(
        data,
        base / "ranker",
        EmbeddingMatcher(emb, mean_pool_encoder(emb)),
        RankerConfig(lambdamart=LambdaMARTParams(threads=2, num_rounds=rounds)),
    )
    return {"registry": base / "reg", "ranker": base / "ranker", "data": prepared_dir, "base": base, "ckpt": ckpt}


class ServerThread:
    """A real grpc.aio server on its own event loop thread (the tests are plain synchronous clients),
    with a channel and stubs for the ranking and admin services."""

    def __init__(self, config: Any) -> None:
        import asyncio
        import threading

        import grpc

        from recsys.serving.proto import ranking_pb2_grpc as pb_grpc
        from recsys.serving.server import create_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self.call(create_server(config))
        self.call(self.server.start())
        self.app = self.server.app
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.RankingServiceStub(self.channel)
        self.admin = pb_grpc.ModelAdminStub(self.channel)

    def call(self, coro: Any, timeout: float = 120) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.channel.close()
        self.call(self.server.stop(2.0, drain=0.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def spawn_serve(artifacts: dict[str, Any], tmp: Path, *extra: str, ready_name: str = "ready.json") -> tuple[Any, str]:
    """A real `recsys serve` process on v0001 with the artifacts' ranker and data, port 0 -> (process,
    target) once its ready file is written (stdout+stderr piped)."""
    import json
    import subprocess
    import sys
    import time

    ready = tmp / ready_name
    ready.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "recsys.cli", "serve", "--registry", str(artifacts["registry"]), "--version", "v0001",
        "--ranker", str(artifacts["ranker"]), "--data", str(artifacts["data"]), "--host", "127.0.0.1", "--port", "0",
        "--ready-file", str(ready), *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.communicate()[0].decode()[-2000:]}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{json.loads(ready.read_text())['port']}"
