"""`--engine ray`: the local engine's chunks, scored by a Ray Data actor pool.

The driver plans chunks with `iter_chunks` over the cutting columns only (user id, or the candidate
lists), so boundaries equal the local engine's; the unfinished ones become a dataset of
(index, start, rows) descriptors. `map_batches` runs them through an actor pool: each actor loads the
model once (one ONNX session per tower, GPU when it was given one), reads its chunk's rows from the
parquet input by row group, scores it with the same `ChunkScorer`, and returns the result as Arrow
IPC bytes. The driver commits results as they arrive, so manifest, parts and resume are shared with
the local engine. Paths (input, registry, data, output) must be visible to every node.

Ray is optional (`pip install 'recsys-text-ranker[distributed]'`) and imported only here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recsys.batch.io import InputSpec, iter_chunks, read_rows
from recsys.batch.manifest import RunManifest
from recsys.batch.scorer import ChunkResult, ChunkScorer, ModelRef, ScoreParams
from recsys.compat import require
from recsys.errors import RecsysError

log = logging.getLogger(__name__)


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


class RayChunkScorer:
    """Ray Data actor: one loaded model per actor, any number of chunks."""

    def __init__(self, ref: dict[str, Any], params: dict[str, Any], source: str) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # LightGBM: one core per actor, not all of them
        spec = InputSpec(**params.pop("spec"))
        self.params = ScoreParams(spec=spec, **params)
        self.scorer = ChunkScorer(ModelRef(**ref))
        self.source = Path(source)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"index": [], "start": [], "scored": [], "rejects": [], "stats": []}
        for index, start, rows in zip(batch["index"], batch["start"], batch["rows"], strict=True):
            table = read_rows(self.source, int(start), int(rows))
            result = self.scorer.score(table, int(start), int(index), self.params)
            out["index"].append(int(index))
            out["start"].append(int(start))
            out["scored"].append(_to_ipc(result.scored))
            out["rejects"].append(_to_ipc(result.rejects))
            out["stats"].append(json.dumps(result.stats))
        return {k: np.asarray(v, dtype=object if k in ("scored", "rejects", "stats") else np.int64) for k, v in out.items()}


def plan(source: Path, params: ScoreParams, chunk_rows: int) -> list[tuple[int, int, int]]:
    """(index, start, rows) of every chunk, from the cutting columns only (bounded memory)."""
    spec = params.spec
    columns = {"pairs": [spec.user_col], "candidates": [spec.candidates_col], "topk": [spec.user_col]}[spec.mode]
    per_user = params.retrieve_k if spec.mode == "topk" else 1
    return [(c.index, c.start, c.rows) for c in iter_chunks(source, spec, chunk_rows, columns, per_user)]


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so that cleanup (`finally`, context managers) runs."""


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join the Ray cluster at `address` ($RAY_ADDRESS when None), or start a local Ray instance, for
    the duration of the block. The session ends with the block, however it ends: Python's default
    SIGTERM kills the driver without cleanup, which leaves a local instance's GCS, raylet, dashboard
    and runtime-env agents and idle workers running; here SIGTERM becomes an exception (SIGINT
    already is one) so `ray.shutdown()` stops every process the session started. A session the caller
    opened before (ray.init in a notebook or a test) is theirs: used, not ended."""
    ray = require("ray")
    require("ray.data")
    if ray.is_initialized():
        yield
        return
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    # A driver killed outright (SIGKILL) runs none of this: ray_reaper stops what a local instance left.
    reaper = _start_reaper() if not (address or os.environ.get("RAY_ADDRESS")) else None
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
        if main:  # after init, which installs its own handler (sys.exit(15), exit code 15)
            signal.signal(signal.SIGTERM, _terminate)
        yield
    finally:
        try:
            ray.shutdown()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if reaper is not None:
                reaper.stdin.close()  # type: ignore[union-attr]  # EOF: sweep what is left, then exit
                reaper.wait(timeout=30)


def _start_reaper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "recsys.batch.ray_reaper", str(os.getpid()), f"{time.time() - 1.0:.3f}"],
        stdin=subprocess.PIPE, start_new_session=True,
    )


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def score_with_ray(
    config: Any, manifest: RunManifest, source: Path, ref: ModelRef, params: ScoreParams
) -> Iterator[ChunkResult | int]:
    """Yield skipped chunks' row counts, then ChunkResults as actors finish them (any order).
    Runs inside `ray_session` (the caller's, so the session outlives this generator's consumer)."""
    ray = require("ray")
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's own bar counts rows
    chunks = plan(source, params, config.chunk_rows)
    todo = [c for c in chunks if not manifest.done(c[0])]
    for c in chunks:
        if manifest.done(c[0]):
            yield c[2]
    if not todo:
        return
    resources = ray.cluster_resources()
    gpus = config.ray_gpus if config.ray_gpus is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    slots = resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 1)
    actors = max(1, min(config.ray_actors or int(slots), len(todo)))
    provider = ref.provider if gpus or ref.provider != "auto" else "cpu"
    ref_dict = {**ref.to_dict(), "provider": provider}
    params_dict = {
        "spec": params.spec.__dict__.copy(),
        "time_us": params.time_us,
        "top_k": params.top_k,
        "retrieve_k": params.retrieve_k,
        "include_seen": params.include_seen,
    }
    log.info("ray engine: %d chunks to score on %d actors (%s GPU each)", len(todo), actors, gpus)
    ds = ray.data.from_items(
        [{"index": i, "start": s, "rows": n} for i, s, n in todo], override_num_blocks=len(todo)
    )
    scored = ds.map_batches(
        RayChunkScorer,
        fn_constructor_kwargs={"ref": ref_dict, "params": params_dict, "source": str(source)},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=gpus or None,
    )
    try:
        for row in scored.iter_rows():
            yield ChunkResult(
                int(row["index"]), int(row["start"]), _from_ipc(row["scored"]), _from_ipc(row["rejects"]),
                {k: int(v) for k, v in json.loads(row["stats"]).items()},
            )
    except Exception as exc:  # an actor's own error (bad model, bad input) keeps its type and message
        own = _recsys_cause(exc)
        if own is None:
            raise
        raise own from None


def _recsys_cause(exc: BaseException) -> RecsysError | None:
    """The project's error inside Ray's wrappers (RayTaskError.cause, __cause__ chains), if any."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RecsysError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None
