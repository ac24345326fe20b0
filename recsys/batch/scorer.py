"""One chunk -> scored rows: the one request path (`RequestScorer`) with R = the chunk's requests.

A request is a run of rows with the same (user, time, context) (pairs mode: its rows are the
candidates; top-K mode: its candidates are retrieved from the catalogue, as the service's Recommend).
The scorer runs the ONNX user tower once on all the chunk's request histories and LightGBM once on
the chunk's stacked feature matrix; both are row-wise, so every score equals the service's. The
model is loaded with the service's own loader (`recsys.serving.model.load_model`), so catalogue
embeddings, the user tower wrapper and the ranker are the service's objects, not copies.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from recsys.batch.io import REJECT_SCHEMA, InputSpec, normalize
from recsys.data.prepared import PreparedData
from recsys.errors import ConfigError, InputError
from recsys.ranker import recorded_data_dir
from recsys.scoring.request import RequestBatch, ScoredBatch

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema(
    [
        ("input_row", pa.int64()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("score", pa.float64()),
        ("match_score", pa.float64()),
        ("rank", pa.int32()),
        ("model_version", pa.string()),
    ]
)


@dataclass(frozen=True)
class ModelRef:
    """Everything needed to load the same model in any process (driver, Ray actor)."""

    registry: str
    version: str  # resolved: a resumed run keeps the version it started with
    ranker: str | None
    data: str
    provider: str = "auto"
    precision: str = "fp32"
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoreParams:
    """What a row means and how it is scored (part of the resume identity)."""

    spec: InputSpec
    time_us: int  # request time where the input has none
    top_k: int = 0  # topk mode: rows kept per user
    retrieve_k: int = 200  # topk mode: embedding-search candidates blended per user
    include_seen: bool = False


def resolve_data_dir(registry: Path, version: str, ranker: Path | None, data: Path | None) -> tuple[Path, Path]:
    """-> (prepared data dir, ranker dir): --data, else the dataset recorded in ranker.json (as serve)."""
    from recsys.serving.model import RANKER_SUBDIR

    own = registry / "versions" / version / RANKER_SUBDIR
    ranker_dir = own if own.is_dir() else ranker
    if ranker_dir is None:
        raise ConfigError(
            f"model version {version} has no {RANKER_SUBDIR}/ directory: pass --ranker DIR "
            f"(a `recsys train ranker` output)"
        )
    if data is None:
        data = recorded_data_dir(Path(ranker_dir))
    return Path(data), Path(ranker_dir)


@dataclass
class ChunkResult:
    index: int
    start: int
    scored: pa.Table
    rejects: pa.Table
    stats: dict[str, int]


class ChunkScorer:
    """A loaded model + feature state + id maps; `score(chunk)` is a pure function of the chunk."""

    def __init__(self, ref: ModelRef) -> None:
        from recsys.registry import Registry
        from recsys.serving.model import ItemCatalogue, load_model

        self.ref = ref
        data = PreparedData.load(ref.data)
        items = data.items.sort("item_idx")
        item_ids = items["item_id"].cast(pl.Utf8)
        catalogue = ItemCatalogue.from_lists(item_ids.to_list(), items["text"].cast(pl.Utf8).fill_null("").to_list())
        self.model = load_model(
            Registry(ref.registry), ref.version, catalogue, None, ranker_dir=Path(ref.ranker) if ref.ranker else None,
            provider=ref.provider, precision=ref.precision, threads=ref.threads, cold_cache=0,
        )
        assert self.model.initial_state is not None
        self.state = self.model.initial_state
        self.item_ids = item_ids.to_numpy()
        self.items = pl.DataFrame({"item_id": item_ids, "item_idx": np.arange(items.height, dtype=np.int64)})
        self.users = data.users.select(pl.col("user_id").cast(pl.Utf8), pl.col("user_idx").cast(pl.Int64))
        ranker = self.model.ranker
        self.context_text = {c: c in self.state.context_vocab for c in ranker.context_names}
        self.extra_names = tuple(self.model.extra_names)
        self.scorer = self.model.scorer(self.state)

    @property
    def version(self) -> str:
        return self.model.version

    def providers(self) -> tuple[str, ...]:
        return self.model.providers

    # ------------------------------------------------------------------------------ scoring

    def score(self, table: pa.Table, start: int, index: int, params: ScoreParams) -> ChunkResult:
        norm = normalize(
            table, start, params.spec, self.users, self.items, params.time_us, self.context_text, self.extra_names
        )
        frame = norm.pairs.sort("_req", "_row", maintain_order=True)
        scored = self._score_topk(frame, params) if params.spec.mode == "topk" else self._score_lists(frame)
        rejects = norm.rejects.to_arrow().cast(REJECT_SCHEMA)
        stats = {
            "input_rows": norm.input_rows,
            "scored_rows": scored.num_rows,
            "rejected_rows": rejects.num_rows,
            "requests": int(frame["_req"].n_unique()) if frame.height else 0,
            "unknown_users": int(frame.filter(pl.col("user_idx") < 0)["user_id"].n_unique()) if frame.height else 0,
        }
        return ChunkResult(index, start, scored, rejects, stats)

    def _requests(self, frame: pl.DataFrame, with_candidates: bool) -> RequestBatch:
        """Runs of rows with one _req (rows sorted by _req) -> a RequestBatch: the rows are the
        candidates, or (top-K mode) requests without candidates. Every context the ranker knows,
        None where absent (the service's rule)."""
        req = frame["_req"].to_numpy()
        starts = np.flatnonzero(np.concatenate([[True], req[1:] != req[:-1]])) if len(req) else np.zeros(0, np.int64)
        ctx_cols = {c: frame[c].gather(starts).to_list() for c in self.context_text}
        return RequestBatch(
            users=frame["user_idx"].to_numpy()[starts].astype(np.int64),
            times=frame["time_us"].to_numpy()[starts].astype(np.int64),
            indptr=np.append(starts, len(req)).astype(np.int64) if with_candidates else np.zeros(len(starts) + 1, np.int64),
            items=frame["item_idx"].to_numpy().astype(np.int64) if with_candidates else np.zeros(0, np.int64),
            contexts=[{c: ctx_cols[c][r] for c in self.context_text} for r in range(len(starts))],
            extra={name: frame[name].to_numpy() for name in self.extra_names} if with_candidates else None,
        )

    def _score_lists(self, frame: pl.DataFrame) -> pa.Table:
        return self._finish(frame, self.scorer.score(self._requests(frame, True)))

    def _score_topk(self, frame: pl.DataFrame, params: ScoreParams) -> pa.Table:
        """Recommend for every row's user: exact cosine top-`retrieve_k` over the catalogue (minus
        seen items unless include_seen), blended by the ranker, top `top_k` kept."""
        batch = self._requests(frame, False)
        scored = self.scorer.recommend(batch, retrieve_k=params.retrieve_k, top_k=0, include_seen=params.include_seen)
        starts = np.flatnonzero(np.concatenate([[True], np.diff(frame["_req"].to_numpy()) != 0])) if frame.height else np.zeros(0, np.int64)
        expanded = frame[np.repeat(starts, np.diff(scored.indptr))] if frame.height else frame.clear()
        return self._finish(expanded, scored, params.top_k)

    def _finish(self, frame: pl.DataFrame, scored: ScoredBatch, keep_top: int = 0) -> pa.Table:
        """Scored requests -> output rows (ranks within requests, best first; ties by position) in
        input order; frame row j is candidate j."""
        n = len(scored.items)
        if not n:
            return OUTPUT_SCHEMA.empty_table()
        out = pl.DataFrame(
            {
                "input_row": frame["_row"],
                "user_id": frame["user_id"],
                "item_id": self.item_ids[scored.items],
                "time": frame["time_us"].cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
                "score": scored.scores,
                "match_score": scored.match,
                "rank": (scored.ranks() + 1).astype(np.int32),
                "model_version": pl.repeat(self.version, n, eager=True, dtype=pl.Utf8),
            }
        )
        if keep_top > 0:
            out = out.filter(pl.col("rank") <= keep_top).sort("input_row", "rank")
        else:
            out = out.sort("input_row", maintain_order=True)
        return out.to_arrow().cast(OUTPUT_SCHEMA)


def check_params(params: ScoreParams) -> None:
    if params.spec.mode == "topk" and params.top_k < 1:
        raise InputError("top-K mode needs --top-k K >= 1")
    if params.spec.mode == "topk" and params.retrieve_k < params.top_k:
        raise InputError(f"--retrieve-k {params.retrieve_k} must be >= --top-k {params.top_k}")
