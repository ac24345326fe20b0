"""`recsys train ranker`: LightGBM LambdaMART over the shared features (recsys/features/).

Windows (the prepared global split): the matcher learns from "train"; the ranker learns from request
groups in the "valid" window (so the match score it sees is out-of-sample), early-stops on the last
`holdout_frac` of that window (by time), and is evaluated on the "test" window.

Groups: served requests (request_id with impressions) where the logs have them: candidates = items
shown or acted on, label = integer grade of the strongest event (impression-only 0, view 1, click 2,
add_to_cart/share 3, purchase 4); groups without any positive are skipped (no lambdarank gradient,
undefined NDCG). Logs without impressions: one group per positive interaction, the positive plus
`negatives` popularity-sampled items.

Point in time, exactly: groups are processed in request-time order while the log is replayed into a
FeatureState (`FeatureState.replay`), applying only events with timestamp < the group's request time
before computing its features (no window-start approximation), through the one request scorer
(`recsys.scoring.request.RequestScorer`, R = the groups one replay step sees) that the service, batch
scoring and evaluation use. The LambdaMART fit is `recsys.ranker.train_lambdamart` (also evaluate's
blend), its parameters `RankerConfig.lambdamart`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.compat import require
from recsys.data.prepared import PreparedData
from recsys.data.window import training_window
from recsys.errors import ConfigError, InputError, ModelError
from recsys.features import EmbeddingMatcher, EventBatch, FeatureConfig, Features, FeatureState, to_us
from recsys.ranker import (
    IMPORTANCE_FILE,
    META_FILE,
    MODEL_FILE,
    RANKER_FORMAT,
    STATE_DIR,
    LambdaMARTParams,
    data_reference,
    grouped_ndcg,
    train_lambdamart,
)
from recsys.scoring.request import RequestBatch, RequestScorer

log = logging.getLogger(__name__)

MAX_GRADE = 4


@dataclass(frozen=True)
class RankerConfig:
    """`recsys train ranker` settings. The LambdaMART fit's own settings are one `LambdaMARTParams`
    (recsys/ranker.py: the one parameter source, also evaluate's blend); the rest is how the request
    groups are built. Its seed also draws the sampled negatives and the cold-item dropout rows."""

    lambdamart: LambdaMARTParams = field(default_factory=LambdaMARTParams)
    holdout_frac: float = 0.2  # last share (by time) of the valid window: early stopping
    negatives: int = 20  # per positive, for logs without impressions
    refresh_s: float = 0.0  # 0: exact point-in-time replay; > 0: refresh the state at most this often
    # Share of fit candidates shown as items without behaviour (FeatureState.mask_unseen_items), so
    # the blender learns to rank new items by their text match instead of burying them for having no
    # clicks yet. A trade: bench/results/cold_items.md measures cold-item gains against warm losses.
    cold_item_dropout: float = 0.0
    # Served exploration: the last `cold_slots` of each list's first `cold_k` places go to the
    # candidates without behaviour the matcher scores highest (recsys/scoring/explore.py; 0 = off).
    cold_slots: int = 0
    cold_k: int = 10
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        gains = self.lambdamart.label_gain
        if len(gains) != MAX_GRADE + 1 or list(gains) != sorted(gains):
            raise ConfigError(f"label_gain needs {MAX_GRADE + 1} non-decreasing gains (grades 0..4), got {gains}")
        if not 0.0 < self.holdout_frac < 1.0:
            raise ConfigError(f"holdout_frac must be in (0, 1), got {self.holdout_frac}")
        if self.refresh_s < 0:
            raise ConfigError(f"refresh_s must be >= 0, got {self.refresh_s}")
        if self.negatives < 1:
            raise ConfigError(f"negatives must be >= 1, got {self.negatives}")
        if not 0.0 <= self.cold_item_dropout < 1.0:
            raise ConfigError(f"cold_item_dropout must be in [0, 1), got {self.cold_item_dropout}")
        if not 0 <= self.cold_slots <= self.cold_k or self.cold_k < 1:
            raise ConfigError(f"--cold-slots must be in [0, {self.cold_k}] (places of the first {self.cold_k} "
                              f"reserved for items without behaviour), got {self.cold_slots}")


def grade(strength: np.ndarray) -> np.ndarray:
    """Event strength -> integer relevance grade 0..4 (ratings round to the nearest grade)."""
    return np.clip(np.rint(np.asarray(strength, np.float64)), 0, MAX_GRADE).astype(np.int32)


@dataclass
class GroupTable:
    """Feature rows of many request groups, in group order (groups sorted by request time).

    matrix [R, F] f32, labels [R] i32 grades, item_idx [R]; per group [G]: sizes, time_us, user_idx,
    group_id, split ("valid" | "test")."""

    matrix: np.ndarray
    names: tuple[str, ...]
    labels: np.ndarray
    item_idx: np.ndarray
    sizes: np.ndarray
    time_us: np.ndarray
    user_idx: np.ndarray
    group_id: list[str]
    split: np.ndarray

    def select(self, groups: np.ndarray) -> GroupTable:
        """The given group indices (ascending), rows included."""
        starts = np.concatenate([[0], np.cumsum(self.sizes)])
        rows = (
            np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups])
            if len(groups)
            else np.zeros(0, int)
        )
        return GroupTable(
            self.matrix[rows],
            self.names,
            self.labels[rows],
            self.item_idx[rows],
            self.sizes[groups],
            self.time_us[groups],
            self.user_idx[groups],
            [self.group_id[g] for g in groups],
            self.split[groups],
        )

    def column(self, name: str) -> np.ndarray:
        return self.matrix[:, self.names.index(name)]


# --------------------------------------------------------------------------------------------------
# Candidate groups
# --------------------------------------------------------------------------------------------------


def request_groups(events: pl.DataFrame, start_us: int, context: Sequence[str] = ()) -> pl.DataFrame:
    """Served requests at or after start_us with at least one positive: one row per (request, item)
    with user_idx, time_us (the request's first event), strength (max), context values; sorted by
    (time_us, request_id, item_idx)."""
    req = events.filter(pl.col("request_id").is_not_null()).with_columns(
        pl.col("timestamp").dt.epoch("us").alias("_ts")
    )
    heads = (
        req.sort("_ts", maintain_order=True)
        .group_by("request_id", maintain_order=True)
        .agg(
            pl.col("_ts").min().alias("time_us"),
            pl.col("user_idx").first(),
            (pl.col("strength") <= 0).any().alias("_exposed"),
            (pl.col("strength") > 0).any().alias("_positive"),
            *(pl.col(c).first() for c in context),
        )
        .filter(pl.col("_exposed") & pl.col("_positive") & (pl.col("time_us") >= start_us))
        .drop("_exposed", "_positive")
    )
    rows = req.group_by("request_id", "item_idx").agg(pl.col("strength").max())
    return heads.join(rows, on="request_id").sort("time_us", "request_id", "item_idx")


def sampled_groups(
    data: PreparedData, events: pl.DataFrame, start_us: int, negatives: int, seed: int
) -> pl.DataFrame:
    """Logs without impressions: per positive interaction at or after start_us, the positive plus
    `negatives` distinct items sampled by popularity before start_us (same layout as request_groups)."""
    pairs = (
        pl.scan_parquet(data.root / "pairs.parquet")
        .with_columns(pl.col("timestamp").dt.epoch("us").alias("time_us"))
        .filter(pl.col("time_us") >= start_us)
        .select("user_idx", "item_idx", "time_us", "strength")
        .collect()
    )
    if not pairs.height:
        return pairs.with_columns(pl.lit("", pl.Utf8).alias("request_id"))
    before = events.filter(pl.col("timestamp").dt.epoch("us") < start_us, pl.col("strength") > 0)
    counts = np.bincount(before["item_idx"].to_numpy(), minlength=data.n_items).astype(np.float64) + 1.0
    p = counts / counts.sum()
    rng = np.random.default_rng(seed)
    k = min(negatives, data.n_items - 1)
    draws = rng.choice(data.n_items, size=(pairs.height, 3 * k + 3), p=p)
    user, item, t = pairs["user_idx"].to_numpy(), pairs["item_idx"].to_numpy(), pairs["time_us"].to_numpy()
    frames = []
    for g in range(pairs.height):  # per group, not per candidate
        negs = pd_unique(draws[g][draws[g] != item[g]])[:k]
        frames.append((np.full(len(negs) + 1, g), np.concatenate([[item[g]], negs])))
    group = np.concatenate([f[0] for f in frames])
    items = np.concatenate([f[1] for f in frames])
    first = np.concatenate([[True], group[1:] != group[:-1]])
    return pl.DataFrame(
        {
            "request_id": [f"pair{g}" for g in group],
            "time_us": t[group],
            "user_idx": user[group].astype(np.int32),
            "item_idx": items.astype(np.int32),
            "strength": np.where(first, pairs["strength"].to_numpy()[group], 0.0).astype(np.float32),
        }
    ).sort("time_us", "request_id", "item_idx")


def pd_unique(values: np.ndarray) -> np.ndarray:
    """Unique values in first-seen order."""
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]


def build_group_features(
    state: FeatureState,
    events: EventBatch,
    groups: pl.DataFrame,
    matcher: EmbeddingMatcher | None = None,
    *,
    split_at_us: int | None = None,
    refresh_s: float = 0.0,
) -> GroupTable:
    """Replay `events` (sorted by time; those already in `state` are skipped by time) and compute each
    group's features from exactly the events before its request time (`FeatureState.replay`, the
    request scorer with R = the groups one replay step sees). Mutates `state`.

    groups: rows (request_id, time_us, user_idx, item_idx, strength, <context>) sorted by time_us.
    refresh_s > 0: see `FeatureState.replay` (stale by up to refresh_s, never leaking)."""
    context = [c for c in state.config.context_columns or () if c in groups.columns]
    heads = groups.group_by("request_id", maintain_order=True).agg(
        pl.col("time_us").first(),
        pl.col("user_idx").first(),
        pl.len().alias("size"),
        *(pl.col(c).first() for c in context),
    )
    sizes = heads["size"].to_numpy().astype(np.int64)
    times = heads["time_us"].to_numpy().astype(np.int64)
    ctx_values = {c: heads[c].to_list() for c in context}
    requests = RequestBatch(
        users=heads["user_idx"].to_numpy().astype(np.int64),
        times=times,
        indptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        items=groups["item_idx"].to_numpy().astype(np.int64),
        contexts=[{c: ctx_values[c][g] for c in context} for g in range(len(sizes))],
    )
    scorer = RequestScorer(state, matcher=matcher, context_names=context)
    blocks = [
        scorer.features(requests.select(int(run[0]), int(run[-1]) + 1))[0]
        for run in state.replay(events, times, int(refresh_s * 1e6))
    ]
    names = blocks[0].names if blocks else state.feature_names(matcher is not None, context)
    split = np.where(times >= split_at_us, "test", "valid") if split_at_us is not None else np.full(len(sizes), "valid")
    return GroupTable(
        matrix=np.concatenate([b.matrix for b in blocks]) if blocks else np.zeros((0, len(names)), np.float32),
        names=names,
        labels=grade(groups["strength"].to_numpy()),
        item_idx=requests.items,
        sizes=sizes,
        time_us=times,
        user_idx=requests.users,
        group_id=heads["request_id"].cast(pl.Utf8).to_list(),
        split=split,
    )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out_dir: Path
    metrics: dict[str, Any]
    best_iteration: int
    feature_names: tuple[str, ...]
    importance: dict[str, float]
    table: GroupTable
    selection: dict[str, Any] | None = None  # with init_model: which blender was kept, and why


def _cutoff_us(data: PreparedData, name: str) -> int:
    try:
        return to_us(data.manifest["cutoffs"][name])
    except (KeyError, InputError) as exc:
        raise InputError(
            f"{data.root}/manifest.json has no usable cutoffs.{name}: rerun recsys prepare"
        ) from exc


def evaluate_groups(
    table: GroupTable, scores: dict[str, np.ndarray], k: int, label_gain: Sequence[float]
) -> dict[str, Any]:
    """Mean NDCG@k per scorer over the table's groups (all have a positive)."""
    out: dict[str, Any] = {"groups": len(table.sizes), "rows": int(table.sizes.sum())}
    for name, s in scores.items():
        out[f"ndcg@{k}/{name}"] = float(np.nanmean(grouped_ndcg(s, table.labels, table.sizes, k, label_gain)))
    return out


def train_ranker(
    data: PreparedData | Path | str,
    out_dir: Path | str,
    matcher: EmbeddingMatcher | None = None,
    config: RankerConfig | None = None,
    matcher_ref: str | None = None,
    init_model: Path | str | None = None,
) -> TrainResult:
    """Build point-in-time groups, train LambdaMART with early stopping, evaluate, save (no pickle).

    `init_model` (a previous blender's model.txt over the same feature names): continual learning on
    a small fresh window. Three blenders compete on the early-stopping holdout (groups no tree was fit
    on): a fresh one, the previous one continued with new trees (early-stopped), and the previous one
    as it is. The best is saved, and the choice recorded in ranker.json ("selection"). Why: a window
    of a hundred or two request groups is too little to relearn what the previous blender knows, and
    a fresh blender fit on it can be worse than keeping that one (measured in training/retrain.py)."""
    started = time.perf_counter()
    config = config or RankerConfig()
    data = data if isinstance(data, PreparedData) else PreparedData.load(data)
    out_dir = Path(out_dir)
    require("lightgbm")
    if matcher is not None and len(matcher.item_embeddings) != data.n_items:
        raise ModelError(
            f"matcher has {len(matcher.item_embeddings)} item embeddings, the dataset {data.n_items} items: "
            f"export the matcher for this catalogue"
        )
    state, table, source = _group_table(data, matcher, config)
    fit, stop, test = _split(table, config, data)
    if config.cold_item_dropout > 0:  # fit rows only: the holdout and test metrics stay on real features
        rows = np.flatnonzero(np.random.default_rng(config.lambdamart.seed).random(len(fit.labels)) < config.cold_item_dropout)
        state.mask_unseen_items(Features(fit.matrix, table.names), rows)
    params = config.lambdamart
    booster, best = train_lambdamart(params, fit, stop, table.names)
    selection: dict[str, Any] | None = None
    if init_model is not None:
        booster, best, selection = _select_blender(
            params, fit, stop, fresh=(booster, best), init_model=Path(init_model), names=table.names
        )
    metrics = {name: _group_metrics(part, booster, best, config) for name, part in (("holdout", stop), ("test", test))
               if len(part.sizes)}
    importance = dict(zip(table.names, booster.feature_importance("gain", iteration=best).tolist(), strict=True))
    importance = dict(sorted(importance.items(), key=lambda kv: -kv[1]))
    meta = {
        "format": RANKER_FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "feature_names": list(table.names),
        "feature_config": state.config.to_dict(),
        "config": {**asdict(config), "features": state.config.to_dict()},
        "params": params.lgb_params(),
        "label_gain": list(config.lambdamart.label_gain),
        "best_iteration": best,
        "groups": {"fit": len(fit.sizes), "holdout": len(stop.sizes), "test": len(test.sizes), "source": source},
        "windows": {
            "fit_and_holdout": [data.manifest["cutoffs"]["valid_start"], data.manifest["cutoffs"]["test_start"]],
            "test_from": data.manifest["cutoffs"]["test_start"],
        },
        "training_window": training_window(data, "global", ("valid",)),
        "metrics": metrics,
        "selection": selection,
        **data_reference(out_dir, data.root),
        "matcher": matcher_ref,
        "seconds": round(time.perf_counter() - started, 2),
    }
    _save(out_dir, booster, best, meta=meta, importance=importance, state=state)
    return TrainResult(out_dir, metrics, best, table.names, importance, table, selection)


def _group_table(
    data: PreparedData, matcher: EmbeddingMatcher | None, config: RankerConfig
) -> tuple[FeatureState, GroupTable, str]:
    """-> (the state at the end of the data, every group's point-in-time features, group source)."""
    valid_start, test_start = _cutoff_us(data, "valid_start"), _cutoff_us(data, "test_start")
    events = data.events().sort("timestamp", maintain_order=True).collect()
    state = FeatureState.build(data.items, events, before=valid_start, config=config.features, n_users=data.users.height)
    has_impressions = bool(events.filter(pl.col("request_id").is_not_null() & (pl.col("strength") <= 0)).height)
    if has_impressions:
        groups = request_groups(events, valid_start, list(state.config.context_columns or ()))
    else:
        groups = sampled_groups(data, events, valid_start, config.negatives, config.lambdamart.seed)
    batch = EventBatch.from_frame(events)
    table = build_group_features(state, batch, groups, matcher, split_at_us=test_start, refresh_s=config.refresh_s)
    state.catch_up(batch)
    return state, table, "requests" if has_impressions else "sampled_negatives"


def _split(table: GroupTable, config: RankerConfig, data: PreparedData) -> tuple[GroupTable, GroupTable, GroupTable]:
    """-> (fit, early-stopping holdout: the last holdout_frac of the valid window by time, test)."""
    valid = np.flatnonzero(table.split == "valid")
    test = np.flatnonzero(table.split == "test")
    n_fit = round(len(valid) * (1.0 - config.holdout_frac))
    if n_fit < 2 or len(valid) - n_fit < 1:
        raise InputError(
            f"only {len(valid)} request groups with a positive in the validation window of {data.root}: "
            f"need a few dozen. Prepare with a larger --valid-frac or more data."
        )
    fit, stop, tst = table.select(valid[:n_fit]), table.select(valid[n_fit:]), table.select(test)
    log.info("ranker groups: fit %d, early-stop %d, test %d; %d features",
             len(fit.sizes), len(stop.sizes), len(tst.sizes), len(table.names))
    return fit, stop, tst


def _group_metrics(part: GroupTable, booster: Any, best: int, config: RankerConfig) -> dict[str, Any]:
    """NDCG@k of the blender and of one-feature baselines on a part of the group table."""
    scores = {
        "ranker": booster.predict(part.matrix, num_iteration=best),
        "popularity": part.column("item_pop_all"),
        "popularity_7d": part.column("item_pop_7d") if "item_pop_7d" in part.names else part.column("item_pop_all"),
    }
    if "match_score" in part.names:
        scores["match_score"] = part.column("match_score")
    scores["random"] = np.random.default_rng(config.lambdamart.seed).random(len(part.labels))
    return evaluate_groups(part, scores, config.lambdamart.eval_at, config.lambdamart.label_gain)


def _save(
    out_dir: Path, booster: Any, best: int, *, meta: dict[str, Any], importance: dict[str, float], state: FeatureState
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(out_dir / MODEL_FILE), num_iteration=best)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    (out_dir / IMPORTANCE_FILE).write_text(json.dumps({"type": "gain", "importance": importance}, indent=2))
    state.save(out_dir / STATE_DIR)


def _select_blender(
    params: LambdaMARTParams,
    fit: GroupTable,
    stop: GroupTable,
    *,
    fresh: tuple[Any, int],
    init_model: Path,
    names: tuple[str, ...],
) -> tuple[Any, int, dict[str, Any]]:
    """Fresh vs previous-continued vs previous-as-is, by NDCG on the early-stopping holdout."""
    lgb = require("lightgbm")
    previous = lgb.Booster(model_file=str(init_model))
    if list(previous.feature_name()) != list(names):
        log.warning("ranker init model %s has other features: training a fresh blender only", init_model)
        return (*fresh, {"chosen": "fresh", "init_model": str(init_model),
                         "note": "init model has other feature names: not used"})

    def ndcg(b: Any, iteration: int) -> float:
        scores = b.predict(stop.matrix, num_iteration=iteration)
        return float(np.nanmean(grouped_ndcg(scores, stop.labels, stop.sizes, params.eval_at, params.label_gain)))

    base_iter = previous.current_iteration()
    # best iteration counts the init model's trees too (LightGBM continues its iteration count).
    continued = train_lambdamart(params, fit, stop, names, init_model=previous)
    options = {"fresh": fresh, "continued": continued, "previous": (lgb.Booster(model_file=str(init_model)), base_iter)}
    scores = {name: ndcg(b, it) for name, (b, it) in options.items()}
    chosen = max(scores, key=lambda n: scores[n])  # first wins ties: fresh, then continued
    log.info("blender selection on the early-stopping holdout: %s -> %s", scores, chosen)
    booster, best = options[chosen]
    return booster, best, {
        "chosen": chosen,
        "holdout_ndcg": scores,
        "new_trees": {"fresh": fresh[1], "continued": continued[1] - base_iter, "previous": 0},
        "init_model": str(init_model),
    }
