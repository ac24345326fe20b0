"""`run_batch`: input -> chunks -> scored parts + rejects, on the local engine or Ray, resumable.

The local engine streams the input once (bounded: one chunk in memory), skips chunks the manifest
already holds, scores the rest in this process and commits each. The Ray engine (ray_engine.py)
plans the same chunks from the cutting columns only and scores them in an actor pool; the driver
commits what comes back. Both write the same parts, so a run may even resume on the other engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.batch.io import InputSpec, check_columns, csv_to_parquet, fingerprint, is_csv, iter_chunks
from recsys.batch.manifest import RunManifest
from recsys.batch.scorer import (
    ChunkResult,
    ChunkScorer,
    ModelRef,
    ScoreParams,
    check_params,
    resolve_data_dir,
)
from recsys.errors import InputError
from recsys.files import fault_point, output_lock

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class BatchConfig:
    """A batch scoring job. `input` None in topk mode = every user of the prepared dataset."""

    out: Path
    registry: Path
    input: Path | None = None
    version: str | None = None
    ranker: Path | None = None
    data: Path | None = None
    spec: InputSpec = field(default_factory=InputSpec)
    time: str | None = None  # request time where rows have none (default: now, kept on resume)
    top_k: int = 0
    retrieve_k: int = 200
    include_seen: bool = False
    chunk_rows: int = 100_000  # pairs per chunk (memory ~ chunk_rows x features x 12 bytes)
    engine: str = "local"
    provider: str = "auto"
    precision: str = "fp32"
    threads: int = 1  # ONNX intra-op threads per session
    ray_address: str | None = None
    ray_actors: int = 0  # 0 = one per CPU (or GPU) Ray offers
    ray_gpus: float | None = None  # per actor; None = 1 when the cluster has GPUs, else 0
    overwrite: bool = False
    progress: bool = True
    stop_after: int | None = None  # testing: stop after committing this many chunks (a "crash")

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InputError(f"unknown --engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        if self.chunk_rows < 1:
            raise InputError(f"--chunk-rows must be >= 1, got {self.chunk_rows}")


@dataclass
class BatchReport:
    out: Path
    version: str
    engine: str
    chunks: int
    chunks_skipped: int
    input_rows: int
    scored_rows: int
    rejected_rows: int
    requests: int
    unknown_users: int
    seconds: float
    rejects_by_code: dict[str, int]
    rejects_path: Path | None
    complete: bool

    @property
    def pairs_per_s(self) -> float:
        return self.scored_rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out"], out["rejects_path"] = str(self.out), str(self.rejects_path) if self.rejects_path else None
        return out

    def summary(self) -> str:
        lines = [
            f"{'scored' if self.complete else 'stopped early'}: model {self.version}, engine {self.engine}, "
            f"{self.chunks} chunks ({self.chunks_skipped} already done)",
            f"input rows {self.input_rows:,}  scored rows {self.scored_rows:,}  rejected rows {self.rejected_rows:,}  "
            f"requests {self.requests:,}  unknown users {self.unknown_users:,}",
            f"{self.seconds:.1f}s, {self.pairs_per_s:,.0f} pairs/s -> {self.out}",
        ]
        if self.rejects_by_code:
            codes = ", ".join(f"{k} {v:,}" for k, v in sorted(self.rejects_by_code.items()))
            lines.append(f"rejects by reason: {codes} -> {self.rejects_path}")
        return "\n".join(lines)


@dataclass
class _Prepared:
    manifest: RunManifest
    source: Path  # the parquet the chunks come from
    ref: ModelRef
    params: ScoreParams
    malformed: pa.Table | None


def _default_time_us(text: str | None) -> int:
    from recsys.features import to_us

    if text:
        return to_us(text)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    return to_us(now)


def prepare(config: BatchConfig) -> _Prepared:
    """Resolve model and data, open (or resume) the manifest, make the input a parquet file."""
    from recsys.registry import Registry

    if not Path(config.registry).is_dir():
        raise InputError(f"model registry {config.registry} does not exist: create it with recsys export --registry")
    registry = Registry(config.registry)
    version = registry.resolve(config.version)
    data_dir, ranker_dir = resolve_data_dir(Path(config.registry), version, config.ranker, config.data)
    spec = config.spec
    if spec.mode == "topk" and config.input is None:
        source_in = data_dir / "users.parquet"
    elif config.input is None:
        raise InputError("pass --input FILE (parquet or CSV), or --top-k K to score every user's top K")
    else:
        source_in = Path(config.input)
    if not source_in.is_file():
        raise InputError(f"input {source_in} does not exist: pass a parquet or CSV file with --input")
    out = Path(config.out)
    settings: dict[str, Any] = {
        "input": fingerprint(source_in),
        "spec": asdict(spec),
        "chunk_rows": config.chunk_rows,
        "top_k": config.top_k,
        "retrieve_k": config.retrieve_k,
        "include_seen": config.include_seen,
        "model_version": version,
        "registry": str(Path(config.registry).resolve()),
        "ranker": str(ranker_dir.resolve()),
        "data": str(data_dir.resolve()),
        "precision": config.precision,
    }
    explicit_time = _default_time_us(config.time) if config.time else None
    if explicit_time is not None:
        settings["time_us"] = explicit_time
    manifest = _open_manifest(out, settings, config.overwrite)
    # The default time is fixed at the first start and kept on resume (same rows, same scores).
    time_us = explicit_time if explicit_time is not None else manifest.data.setdefault("time_us", _default_time_us(None))
    malformed = None
    if is_csv(source_in):
        source = out / "_input.parquet"
        malformed_path = out / "rejects" / "malformed.parquet"
        if not (manifest.data.get("converted") and source.exists()):
            malformed = csv_to_parquet(source_in, source)
            malformed_path.parent.mkdir(exist_ok=True)
            pq.write_table(malformed, malformed_path)
            manifest.data["converted"] = True
        elif malformed_path.exists():
            malformed = pq.read_table(malformed_path)
    else:
        source = source_in
    manifest.save()
    check_columns(source, spec)
    params = ScoreParams(spec, time_us, config.top_k, config.retrieve_k, config.include_seen)
    check_params(params)
    ref = ModelRef(
        str(config.registry), version, str(ranker_dir), str(data_dir), config.provider, config.precision, config.threads
    )
    return _Prepared(manifest, source, ref, params, malformed)


def _open_manifest(out: Path, settings: dict[str, Any], overwrite: bool) -> RunManifest:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: batch output is a directory of parquet parts")
    return RunManifest.open(out, settings, overwrite)


def run_batch(config: BatchConfig, scorer: ChunkScorer | None = None) -> BatchReport:
    """Score `config.input` into `config.out`; `scorer` reuses a loaded model (local engine only)."""
    if config.engine == "ray":  # before anything is written: a missing Ray must not leave a manifest behind
        from recsys.compat import require

        require("ray")
    with output_lock(Path(config.out), what=f"batch output {config.out}"):
        return _run_locked(config, scorer)


def _run_locked(config: BatchConfig, scorer: ChunkScorer | None) -> BatchReport:
    started = time.perf_counter()
    prep = prepare(config)
    per_user = prep.params.retrieve_k if prep.params.spec.mode == "topk" else 1
    total_rows = pq.ParquetFile(prep.source).metadata.num_rows
    with ExitStack() as stack:
        if config.engine == "ray":
            from recsys.batch.ray_engine import ray_session, score_with_ray

            stack.enter_context(ray_session(config.ray_address))  # torn down with this command, even on SIGTERM
            results: Iterator[ChunkResult | int] = score_with_ray(config, prep.manifest, prep.source, prep.ref, prep.params)
        else:
            results = _score_local(config, prep, per_user, scorer)
        skipped, committed = _commit_all(config, prep, results, total_rows)
    complete = config.stop_after is None or committed < config.stop_after
    return _report(config, prep, skipped, time.perf_counter() - started, complete)


def _commit_all(config: BatchConfig, prep: _Prepared, results: Iterator[ChunkResult | int],
                total_rows: int) -> tuple[int, int]:
    """Commit every result as it arrives -> (chunks skipped, chunks committed)."""
    committed = skipped = 0
    bar = _progress(total_rows, config.progress)
    for result in results:
        if isinstance(result, int):  # a chunk the manifest already had: its input row count
            skipped += 1
            bar(result)
            continue
        prep.manifest.commit(result.index, result.start, result.scored, result.rejects, result.stats)
        fault_point("score:chunk")
        committed += 1
        bar(result.stats["input_rows"])
        if config.stop_after is not None and committed >= config.stop_after:
            break
    bar(None)
    return skipped, committed


def _score_local(
    config: BatchConfig, prep: _Prepared, per_user: int, scorer: ChunkScorer | None
) -> Iterator[ChunkResult | int]:
    if scorer is None:
        scorer = ChunkScorer(prep.ref)
        log.info("local engine: model %s on %s", scorer.version, ", ".join(scorer.providers()))
    elif scorer.ref != prep.ref:
        raise InputError(f"the given scorer was loaded for {scorer.ref}, this run needs {prep.ref}")
    for chunk in iter_chunks(prep.source, prep.params.spec, config.chunk_rows, per_user=per_user):
        if prep.manifest.done(chunk.index):
            yield chunk.rows
            continue
        yield scorer.score(chunk.table, chunk.start, chunk.index, prep.params)


def _report(config: BatchConfig, prep: _Prepared, skipped: int, seconds: float, complete: bool) -> BatchReport:
    chunks = prep.manifest.chunks
    totals = {k: sum(int(c.get(k, 0)) for c in chunks.values())
              for k in ("input_rows", "scored_rows", "rejected_rows", "requests", "unknown_users")}
    malformed = prep.malformed.num_rows if prep.malformed is not None else 0
    rejects_path = None
    by_code: dict[str, int] = {}
    if complete:
        rejects_path = prep.manifest.finish({**totals, "malformed_lines": malformed}, prep.malformed)
        counts = pq.read_table(rejects_path, columns=["code"]).column("code").value_counts()
        by_code = {str(c["values"]): int(c["counts"]) for c in counts.to_pylist()}
    return BatchReport(
        out=Path(config.out),
        version=prep.ref.version,
        engine=config.engine,
        chunks=len(chunks),
        chunks_skipped=skipped,
        input_rows=totals["input_rows"] + malformed,
        scored_rows=totals["scored_rows"],
        rejected_rows=totals["rejected_rows"] + malformed,
        requests=totals["requests"],
        unknown_users=totals["unknown_users"],
        seconds=seconds,
        rejects_by_code=by_code,
        rejects_path=rejects_path,
        complete=complete,
    )


def _progress(total: int, enabled: bool) -> Callable[[int | None], None]:
    """A bar over input rows on stderr (recsys.progress; no-op when disabled); call with None to close."""
    if not enabled:
        return lambda n: None
    from recsys.progress import bar as progress_bar

    bar = progress_bar(desc="score", total=total, unit="row", unit_scale=True)

    def update(n: int | None) -> None:
        if n is None:
            bar.close()
        else:
            bar.update(n)

    return update
