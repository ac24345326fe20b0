"""One chunk -> scored rows: the service's request path, batched where batching cannot change a bit.

Per request the steps are those of `recsys.ranker.score_request` (and the service's Recommend for
top-K): user vector from the stored history, match = item_emb[candidates] @ user (the same matrix-
vector product `EmbeddingMatcher.scores` does), `FeatureState.compute`, LightGBM. Two steps are
batched over the chunk because they are row-wise: the ONNX user tower runs once on all the chunk's
request histories, and LightGBM predicts the chunk's stacked feature matrix in one call. Tests assert
the results equal `score_request` and the gRPC engine exactly.

The model is loaded with the service's own loader (`recsys.serving.model.load_model`), so catalogue
embeddings, the user tower wrapper and the ranker are the service's objects, not copies.
"""

from __future__ import annotations

import json
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
from recsys.features import Features

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
        meta = Path(ranker_dir) / "ranker.json"
        recorded = json.loads(meta.read_text()).get("data") if meta.is_file() else None
        if not recorded:
            raise ConfigError("pass --data PREPARED: the prepared dataset the ranker was trained on")
        data = Path(recorded)
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
            Registry(ref.registry),
            ref.version,
            catalogue,
            None,
            Path(ref.ranker) if ref.ranker else None,
            ref.provider,
            ref.precision,
            ref.threads,
            cold_cache=0,
        )
        assert self.model.initial_state is not None
        self.state = self.model.initial_state
        self.item_ids = item_ids.to_numpy()
        self.items = pl.DataFrame({"item_id": item_ids, "item_idx": np.arange(items.height, dtype=np.int64)})
        self.users = data.users.select(pl.col("user_id").cast(pl.Utf8), pl.col("user_idx").cast(pl.Int64))
        ranker = self.model.ranker
        self.context_text = {c: c in self.state.context_vocab for c in ranker.context_names}
        self.extra_names = tuple(self.model.extra_names)

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

    def _requests(self, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Request run starts [R+1], user_idx [R], time_us [R], context dicts [R] (rows sorted by _req)."""
        req = frame["_req"].to_numpy()
        starts = np.flatnonzero(np.concatenate([[True], req[1:] != req[:-1]])) if len(req) else np.zeros(0, np.int64)
        bounds = np.append(starts, len(req))
        users = frame["user_idx"].to_numpy()[starts].astype(np.int64)
        times = frame["time_us"].to_numpy()[starts].astype(np.int64)
        # Every context the ranker knows, None where absent (the service's rule).
        ctx_cols = {c: frame[c].gather(starts).to_list() for c in self.context_text}
        contexts = [{c: ctx_cols[c][r] for c in self.context_text} for r in range(len(starts))]
        return bounds, users, times, contexts

    def _user_vectors(self, users: np.ndarray, times: np.ndarray) -> np.ndarray:
        """One ONNX user-tower call for every request of the chunk: [R, D] (row-wise, so equal to
        one call per request)."""
        if not len(users):
            return np.zeros((0, self.model.item_emb.shape[1]), np.float32)
        hists = [self.state.history(int(u), int(t)) for u, t in zip(users, times, strict=True)]
        items = np.concatenate([h.item_idx for h in hists])
        codes = np.concatenate([h.event_code for h in hists])
        ages = np.concatenate([h.age_s for h in hists])
        return self.model.user_vectors(items, codes, ages)

    def _score_lists(self, frame: pl.DataFrame) -> pa.Table:
        bounds, users, times, contexts = self._requests(frame)
        vectors = self._user_vectors(users, times)
        item_idx = frame["item_idx"].to_numpy().astype(np.int64)
        extras = {name: frame[name].to_numpy() for name in self.extra_names}
        emb, state = self.model.item_emb, self.state
        blocks: list[np.ndarray] = []
        names: tuple[str, ...] = ()
        for r in range(len(users)):
            lo, hi = bounds[r], bounds[r + 1]
            cand = item_idx[lo:hi]
            match = np.asarray(emb[cand] @ vectors[r], np.float32)  # = EmbeddingMatcher.scores
            extra = {name: values[lo:hi] for name, values in extras.items()}
            features = state.compute(int(users[r]), cand, int(times[r]), match, None, contexts[r], extra)
            blocks.append(features.matrix)
            names = features.names
        return self._finish(frame, bounds, blocks, names, item_idx)

    def _score_topk(self, frame: pl.DataFrame, params: ScoreParams) -> pa.Table:
        """Recommend for every row's user: exact cosine top-`retrieve_k` over the catalogue (minus
        seen items unless include_seen), blended by the ranker, top `top_k` kept."""
        bounds, users, times, contexts = self._requests(frame)
        vectors = self._user_vectors(users, times)
        emb, state = self.model.item_emb, self.state
        blocks: list[np.ndarray] = []
        names: tuple[str, ...] = ()
        picked: list[np.ndarray] = []
        rows: list[int] = []
        for r in range(len(users)):
            user = int(users[r])
            cand = self._retrieve(user, int(times[r]), vectors[r], params)
            picked.append(cand)
            rows.append(len(cand))
            if not len(cand):
                continue
            match = np.asarray(emb[cand] @ vectors[r], np.float32)
            features = state.compute(user, cand, int(times[r]), match, None, contexts[r], {})
            blocks.append(features.matrix)
            names = features.names
        counts = np.asarray(rows, np.int64)
        expanded = frame[np.repeat(bounds[:-1], counts)] if len(counts) else frame.clear()
        new_bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        item_idx = np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, np.int64)
        return self._finish(expanded, new_bounds, blocks, names, item_idx, params.top_k)

    def _retrieve(self, user: int, t_us: int, vector: np.ndarray, params: ScoreParams) -> np.ndarray:
        """The service's `engine.retrieve` with the chunk's precomputed user vector."""
        state = self.state
        scores = self.model.item_emb @ vector
        drop = []
        if not params.include_seen:
            seen = state.user_item.row(user)[0] if user >= 0 else np.zeros(0, np.int64)
            hist = state.history(user, t_us).item_idx
            drop = [seen, hist[hist >= 0]]
        if drop:
            scores[np.concatenate(drop).astype(np.int64)] = -np.inf
        k = min(params.retrieve_k, int(np.isfinite(scores).sum()))
        if k <= 0:
            return np.zeros(0, np.int64)
        top = np.argpartition(-scores, k - 1)[:k]
        return top[np.argsort(-scores[top], kind="stable")].astype(np.int64)

    def _finish(
        self,
        frame: pl.DataFrame,
        bounds: np.ndarray,
        blocks: list[np.ndarray],
        names: tuple[str, ...],
        item_idx: np.ndarray,
        keep_top: int = 0,
    ) -> pa.Table:
        """One LightGBM call for the chunk, ranks within requests, rows back in input order."""
        n = int(bounds[-1]) if len(bounds) else 0
        if not n:
            return OUTPUT_SCHEMA.empty_table()
        features = Features(np.concatenate(blocks), names)
        scores = self.model.ranker.score(features)
        match = features.matrix[:, names.index("match_score")].astype(np.float64)
        sizes = np.diff(bounds)
        req = np.repeat(np.arange(len(sizes)), sizes)
        order = np.lexsort((np.arange(n), -scores, req))  # per request: best first, ties by position
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - np.repeat(bounds[:-1], sizes)[order]
        out = pl.DataFrame(
            {
                "input_row": frame["_row"],
                "user_id": frame["user_id"],
                "item_id": self.item_ids[item_idx],
                "time": frame["time_us"].cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
                "score": scores,
                "match_score": match,
                "rank": (rank + 1).astype(np.int32),
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
