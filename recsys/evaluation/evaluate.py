"""`recsys evaluate`: every system side by side on one prepared dataset, one protocol, one run.

Systems (each a score matrix [U, n_items] over the evaluated users of a window):
    popularity, itemknn (co-visitation cosine), als (`implicit`), ease   collaborative baselines
    <matcher names> (e.g. zero_shot, fine_tuned)    text encoders: <user(history), item> cosines
    <sequence names> (sasrec)                       exported sequence models over ordered histories
    blend                                           two-stage: candidates + LightGBM re-ranking

The blend is the production answer to "beat strong CF in full ranking": candidate generation is the
union of the top-N of several retrievers (the blend's matcher, EASE, item-kNN, popularity); the
LambdaMART ranker re-ranks the union from the shared point-in-time features (recsys/features/:
match score, decayed popularity, co-visitation, affinities) plus each retriever's score and rank as
caller-supplied `extra` features. Items outside the union get -inf. Stacking needs the retrievers'
scores to be out-of-sample for the ranker, so windows are staggered:

    valid window   CF + popularity fit on "train"; features as of each user's valid cutoff; the
                   ranker learns from these groups (one group per user, its valid targets = 1)
    test window    CF + popularity refit on "train" + "valid" (all data before the window, the same
                   for every baseline and every retriever); ranker applied unchanged; the matcher is
                   not refit (too costly) but reads each user's history up to the cutoff

Features are exact point in time: users are processed in cutoff order while the event log is
replayed into a FeatureState (`FeatureState.replay`), applying only events strictly before the
user's cutoff, through the one request scorer (`recsys.scoring.request`) the service, batch scoring
and ranker training use.

Protocols: full ranking over every item the user has not interacted with before the window (NDCG@K,
Recall@K, HitRate@K, MRR@K, catalogue coverage), and candidate ranking over the targets plus
`sampled_negatives` uniformly drawn unseen items (the same draw for every system): AUC, NDCG@K.

Slices: all targets; warm targets (items with training interactions); cold items (the dataset's
held-out items, see `write_holdout`: removed from every training input); new users (no training
interactions). Paired bootstrap: per-user differences blend - system, users resampled jointly.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.compat import require
from recsys.data.prepared import SPLIT_COLUMN, Histories, PreparedData, _check_protocol
from recsys.errors import ConfigError, InputError
from recsys.evaluation.baselines import Popularity
from recsys.evaluation.collaborative import ALS, EASE, ItemKNN, rows_matrix
from recsys.evaluation.metrics import per_user_metrics, top_k
from recsys.evaluation.sequence import SequenceSystem
from recsys.features import EmbeddingMatcher, EventBatch, FeatureConfig, Features, FeatureState
from recsys.ranker import LambdaMARTParams, Ranker, RankingSet, train_lambdamart
from recsys.scoring.explore import cold_share, reserve_cold_slots
from recsys.scoring.request import RequestBatch, RequestScorer

log = logging.getLogger(__name__)

CF_SYSTEMS = ("popularity", "itemknn", "als", "ease")
BLEND = "blend"
EXPLORE = "blend_explore"  # the blend with reserved cold-item places (BlendConfig.cold_slots)
HOLDOUT_KEY = "holdout"
SLICES = ("all", "warm", "cold_items", "new_users")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlendConfig:
    """Two-stage blend: retriever top-N sizes (0 = not a retriever) and the LambdaMART settings."""

    matcher_top: int = 100
    ease_top: int = 100
    itemknn_top: int = 50
    popularity_top: int = 50
    features_from: tuple[str, ...] = ("ease", "itemknn", "als", "popularity")  # extra score features
    matchers_from: tuple[str, ...] = ()  # other matchers (by name) whose scores are extra features too
    holdout_frac: float = 0.2  # share of valid-window users held out for early stopping
    cold_slots: int = 0  # > 0: also report blend_explore, the last N top-k places for cold items (scoring/explore.py)
    cold_prior: str = ""  # the matcher whose score picks the cold items for those places ("": the blend's matcher)
    drop_features: tuple[str, ...] = ()  # ablation: feature columns the blend is trained and scored without
    # LambdaMART models, each early-stopped on another random share of the valid users, scores averaged:
    # one model's NDCG@10 moves by a standard deviation of 0.009 between seeds on ML-100K leave-last-out
    # (943 groups of one target each; bench/results/sequential/blend_seeds.md), as much as the effects
    # measured; 5 cut that noise and the blend stays a few dozen trees.
    bags: int = 5
    # Binary labels (a valid target or not), rows of one user per group, truncated at 20; 1 LightGBM
    # thread is fastest for these small group tables on a busy CPU.
    lambdamart: LambdaMARTParams = field(default_factory=lambda: LambdaMARTParams(
        num_rounds=400, num_leaves=15, min_data_in_leaf=20, lambda_l2=0.0, early_stopping_rounds=40,
        label_gain=(0.0, 1.0), truncation_level=20, col_wise=False, threads=1,
    ))

    def __post_init__(self) -> None:
        if min(self.matcher_top, self.ease_top, self.itemknn_top, self.popularity_top) < 0:
            raise ConfigError("blend retriever sizes must be >= 0")
        if self.bags < 1:
            raise ConfigError(f"blend bags must be >= 1, got {self.bags}")
        if not 0.0 < self.holdout_frac < 1.0:
            raise ConfigError(f"blend holdout_frac must be in (0, 1), got {self.holdout_frac}")
        bad = [s for s in self.features_from if s not in CF_SYSTEMS]
        if bad:
            raise ConfigError(f"blend features_from {bad[0]!r} is not one of {', '.join(CF_SYSTEMS)}")


@dataclass(frozen=True)
class EvalConfig:
    protocol: str = "tail"
    ks: tuple[int, ...] = (5, 10, 20, 50)
    k: int = 10  # headline cut-off (NDCG@k in tables, bootstrap differences)
    systems: tuple[str, ...] = CF_SYSTEMS  # collaborative baselines to run
    blend: bool = True
    refit_on_valid: bool = True  # test window: CF fit on train + valid (documented in the report)
    sampled_negatives: int = 100  # candidate protocol
    n_boot: int = 1000
    new_user_max: int = 0  # "new users": at most this many training interactions
    seed: int = 0
    ease_l2: float = 200.0
    knn_neighbours: int = 100
    als_factors: int = 64
    als_iterations: int = 15
    feature_config: FeatureConfig = field(default_factory=FeatureConfig)
    blend_config: BlendConfig = field(default_factory=BlendConfig)

    def __post_init__(self) -> None:
        _check_protocol(self.protocol)
        if self.k not in self.ks:
            raise ConfigError(f"headline k={self.k} must be one of ks={self.ks}")
        if min(self.ks) < 1:
            raise ConfigError(f"ks must be positive, got {self.ks}")
        bad = [s for s in self.systems if s not in CF_SYSTEMS]
        if bad:
            raise ConfigError(f"unknown system {bad[0]!r}: choose from {', '.join(CF_SYSTEMS)}")
        if self.sampled_negatives < 1:
            raise ConfigError(f"sampled_negatives must be >= 1, got {self.sampled_negatives}")
        if not 0 <= self.blend_config.cold_slots <= self.k:
            raise ConfigError(f"--cold-slots {self.blend_config.cold_slots} must be in [0, --k {self.k}]: it is how many "
                              f"of the top {self.k} places go to items without behaviour")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------


@dataclass
class Window:
    """One evaluation window: users [U], their cutoffs (µs), histories as of the cutoff, targets,
    seen items (excluded from ranking) and the training positives the models of this window see."""

    split: str
    users: np.ndarray
    cutoff_us: np.ndarray
    history: Histories
    targets: list[np.ndarray]
    seen: list[np.ndarray]
    fit_user: np.ndarray  # training positives (user_idx, item_idx) for CF / popularity
    fit_item: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    def take(self, rows: np.ndarray) -> Window:
        return Window(
            self.split,
            self.users[rows],
            self.cutoff_us[rows],
            Histories(self.history.item_idx[rows], self.history.event_code[rows], self.history.age_s[rows]),
            [self.targets[r] for r in rows],
            [self.seen[r] for r in rows],
            self.fit_user,
            self.fit_item,
        )


def held_out_items(data: PreparedData) -> np.ndarray:
    """item_idx of the dataset's cold-start hold-out (empty unless made by `write_holdout`)."""
    return np.asarray(data.manifest.get(HOLDOUT_KEY, {}).get("items", []), dtype=np.int64)


def load_window(data: PreparedData, protocol: str, split: str, fit_splits: Sequence[str]) -> Window:
    frame = data.eval_set(protocol, split)
    if not frame.height:
        raise InputError(f"{data.root}: the {protocol}_{split} evaluation set has no users")
    column = SPLIT_COLUMN[protocol]
    fit = (
        data.events()
        .filter((pl.col("strength") > 0) & pl.col(column).is_in(list(fit_splits)))
        .select("user_idx", "item_idx")
        .collect()
    )
    cutoff = frame["cutoff"]
    cutoff_us = (
        cutoff.cast(pl.Datetime("us")).dt.epoch("us").to_numpy()
        if cutoff.dtype.is_temporal()
        else cutoff.to_numpy()
    )
    return Window(
        split=split,
        users=frame["user_idx"].to_numpy().astype(np.int64),
        cutoff_us=np.asarray(cutoff_us, np.int64),
        history=Histories.from_frame(frame),
        targets=[np.asarray(t, np.int64) for t in frame["target_item_idx"].to_list()],
        seen=data.seen_items(frame, protocol, split),
        fit_user=fit["user_idx"].to_numpy().astype(np.int64),
        fit_item=fit["item_idx"].to_numpy().astype(np.int64),
    )


# --------------------------------------------------------------------------------------------------
# Cold-start hold-out
# --------------------------------------------------------------------------------------------------


def choose_holdout(n_items: int, frac: float, seed: int = 0) -> np.ndarray:
    """round(frac * n_items) items drawn uniformly (sorted item_idx)."""
    if not 0.0 < frac < 1.0:
        raise ConfigError(f"hold-out fraction must be in (0, 1), got {frac}")
    n = max(1, round(frac * n_items))
    return np.sort(np.random.default_rng(seed).choice(n_items, size=n, replace=False)).astype(np.int64)


def drop_from_histories(frame: pl.DataFrame, items: np.ndarray) -> pl.DataFrame:
    """Remove `items` from the hist_* arrays (compacting, most recent first kept) and fix hist_len."""
    if not frame.height:
        return frame
    hist = Histories.from_frame(frame)
    keep = (hist.item_idx >= 0) & ~np.isin(hist.item_idx, items)
    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, original order
    kept = np.take_along_axis(keep, order, 1)
    item = np.where(kept, np.take_along_axis(hist.item_idx, order, 1), -1).astype(np.int32)
    code = np.where(kept, np.take_along_axis(hist.event_code, order, 1), -1).astype(np.int8)
    age = np.where(kept, np.take_along_axis(hist.age_s, order, 1), 0.0).astype(np.float32)
    n = item.shape[1]
    return frame.with_columns(
        pl.Series("hist_item_idx", item, dtype=pl.Array(pl.Int32, n)),
        pl.Series("hist_event_code", code, dtype=pl.Array(pl.Int8, n)),
        pl.Series("hist_age_s", age, dtype=pl.Array(pl.Float32, n)),
        pl.Series("hist_len", kept.sum(1).astype(np.int16)),
    )


def write_holdout(data: PreparedData, out: Path | str, frac: float = 0.1, seed: int = 0) -> PreparedData:
    """A copy of `data` with a random `frac` of items held out of every training input.

    Everything the matcher, the ranker, the feature state and the CF baselines read loses those
    items: their events (all windows), their training pairs, their occurrences in histories and
    hard-negative lists, and valid-window targets. Only test-window targets keep them, so the
    "cold_items" slice measures items no model has seen an interaction with. Train the matcher on the
    returned dataset (same commands), then evaluate it."""
    out = Path(out)
    items = choose_holdout(data.n_items, frac, seed)
    lookup = pl.Series(items.astype(np.int32))
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "eval").mkdir(parents=True)
    shutil.copy2(data.root / "items.parquet", tmp / "items.parquet")
    shutil.copy2(data.root / "users.parquet", tmp / "users.parquet")
    events = pl.read_parquet(data.root / "events.parquet")
    events.filter(~pl.col("item_idx").is_in(lookup)).write_parquet(tmp / "events.parquet")
    pairs = pl.read_parquet(data.root / "pairs.parquet")
    pairs = pairs.filter(~pl.col("item_idx").is_in(lookup))  # eval targets come from eval/, not pairs
    if "neg_item_idx" in pairs.columns:
        pairs = pairs.with_columns(pl.col("neg_item_idx").list.eval(pl.element().filter(~pl.element().is_in(lookup))))
    drop_from_histories(pairs, items).write_parquet(tmp / "pairs.parquet")
    for path in sorted((data.root / "eval").glob("*.parquet")):
        frame = drop_from_histories(pl.read_parquet(path), items)
        if not path.stem.endswith("_test"):
            targets = [np.asarray(t, np.int64) for t in frame["target_item_idx"].to_list()]
            strengths = [np.asarray(w, np.float32) for w in frame["target_strength"].to_list()]
            keep = [~np.isin(t, items) for t in targets]
            frame = frame.with_columns(
                pl.Series("target_item_idx", [t[k].tolist() for t, k in zip(targets, keep, strict=True)], dtype=frame.schema["target_item_idx"]),
                pl.Series("target_strength", [w[k].tolist() for w, k in zip(strengths, keep, strict=True)], dtype=frame.schema["target_strength"]),
            ).filter(pl.col("target_item_idx").list.len() > 0)
        frame.write_parquet(tmp / "eval" / path.name)
    manifest = dict(data.manifest)
    manifest[HOLDOUT_KEY] = {
        "source": str(data.root),
        "fraction": frac,
        "seed": seed,
        "items": items.tolist(),
        "note": "held-out items: removed from events, training pairs, histories, hard negatives and "
        "non-test targets; they remain only as test-window targets",
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return PreparedData.load(out)


# --------------------------------------------------------------------------------------------------
# Systems
# --------------------------------------------------------------------------------------------------


def user_item_matrix(window: Window, n_items: int, exclude: np.ndarray | None = None) -> Any:
    """CSR [U, n_items] of each user's interactions before the cutoff (CF scoring input)."""
    rows = window.seen if exclude is None or not len(exclude) else [s[~np.isin(s, exclude)] for s in window.seen]
    return rows_matrix(rows, n_items)


def cf_scores(
    window: Window, n_items: int, n_users: int, config: EvalConfig, names: Sequence[str], cold: np.ndarray
) -> dict[str, np.ndarray]:
    """Fit each CF system on the window's training positives; [U, n_items] float32 scores each."""
    user_items = user_item_matrix(window, n_items, cold)
    out: dict[str, np.ndarray] = {}
    for name in names:
        started = time.perf_counter()
        if name == "popularity":
            out[name] = np.array(Popularity.fit(window.fit_item, n_items).scores(len(window)))
        else:
            model = (
                ItemKNN(neighbours=config.knn_neighbours)
                if name == "itemknn"
                else EASE(l2=config.ease_l2)
                if name == "ease"
                else ALS(factors=config.als_factors, iterations=config.als_iterations, seed=config.seed)
            )
            model.fit(window.fit_user, window.fit_item, n_users, n_items)
            out[name] = model.scores(user_items)
        log.info("%s window: %s fit and scored in %.1fs", window.split, name, time.perf_counter() - started)
    return out


def matcher_scores(matcher: EmbeddingMatcher, history: Histories, chunk: int = 512) -> np.ndarray:
    """[U, n_items] cosines: user vectors of the eval histories (batched), item embeddings."""
    parts = []
    for s in range(0, len(history.item_idx), chunk):
        rows = slice(s, s + chunk)
        user = matcher.user_vectors(Histories(history.item_idx[rows], history.event_code[rows], history.age_s[rows]))
        parts.append(user @ np.asarray(matcher.item_embeddings, np.float32).T)
    return np.concatenate(parts) if parts else np.zeros((0, len(matcher.item_embeddings)), np.float32)


def full_ranks(scores: np.ndarray, seen: Sequence[np.ndarray]) -> np.ndarray:
    """[U, I] 0-based rank of every item by descending score, seen items ranked last."""
    masked = mask_seen(scores, seen)
    order = np.argsort(-masked, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None, :].repeat(len(scores), 0), 1)
    return ranks


def mask_seen(scores: np.ndarray, seen: Sequence[np.ndarray]) -> np.ndarray:
    out = np.array(scores, np.float32, copy=True)
    for u, s in enumerate(seen):
        out[u, s] = -np.inf
    return out


# --------------------------------------------------------------------------------------------------
# Blend: candidates, point-in-time features, LambdaMART
# --------------------------------------------------------------------------------------------------


def candidate_union(retrieval: Mapping[str, tuple[np.ndarray, int]], seen: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per user: the union (sorted item_idx) of each retriever's top-N unseen items.
    retrieval: name -> (scores [U, I], N)."""
    tops = [top_k(mask_seen(s, seen), n) for s, n in retrieval.values() if n > 0]
    if not tops:
        raise ConfigError("the blend needs at least one retriever with top-N > 0")
    out = []
    for u in range(len(seen)):
        items = np.unique(np.concatenate([t[u] for t in tops]))
        out.append(items[~np.isin(items, seen[u])])
    return out


def replay_states(
    data: PreparedData, window: Window, config: FeatureConfig, drop_items: np.ndarray
) -> tuple[FeatureState, EventBatch, np.ndarray]:
    """Feature state as of the earliest cutoff, the remaining events (time order) and the user order
    (ascending cutoff) in which `advance` must be called."""
    events = data.events().sort("timestamp", maintain_order=True).collect()
    if len(drop_items):
        events = events.filter(~pl.col("item_idx").is_in(pl.Series(drop_items.astype(np.int32))))
    order = np.argsort(window.cutoff_us, kind="stable")
    first = int(window.cutoff_us[order[0]])
    state = FeatureState.build(data.items, events, before=first, config=config, n_users=data.users.height)
    return state, EventBatch.from_frame(events), order


def window_features(
    data: PreparedData,
    window: Window,
    candidates: list[np.ndarray],
    matcher: EmbeddingMatcher | None,
    *,
    extra: Mapping[str, np.ndarray],
    config: FeatureConfig,
    drop_items: np.ndarray,
    context_names: Sequence[str] = (),
) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """Point-in-time features for each user's candidates (events strictly before its cutoff): the
    request scorer with R = the users one `FeatureState.replay` step sees, in cutoff order.
    extra: name -> [U, n_items] per-item values, gathered at the candidates. Windows carry no request
    context: `context_names` (a given ranker's) are NaN, as the service's rule for absent context."""
    state, batch, order = replay_states(data, window, config, drop_items)
    requests = RequestBatch.from_lists(
        window.users[order], window.cutoff_us[order], [candidates[u] for u in order],
        extra={k: np.concatenate([v[u, candidates[u]] for u in order]) for k, v in extra.items()} if len(order) else None,
    )
    scorer = RequestScorer(state, matcher=matcher, context_names=context_names)
    blocks: list[np.ndarray] = [np.zeros(0)] * len(window)
    names: tuple[str, ...] = ()
    for run in state.replay(batch, requests.times):
        part = requests.select(int(run[0]), int(run[-1]) + 1)
        features = scorer.features(part)[0]
        names = features.names
        for j, r in enumerate(run):
            blocks[order[r]] = features.matrix[part.indptr[j] : part.indptr[j + 1]]
    return blocks, names


def retriever_extras(scores: Mapping[str, np.ndarray], names: Sequence[str], seen: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per retriever: its score and its full-ranking rank as [U, I] features `ret_<name>`, `ret_<name>_rank`."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name in scores:
            out[f"ret_{name}"] = scores[name]
            out[f"ret_{name}_rank"] = full_ranks(scores[name], seen).astype(np.float32)
    return out


@dataclass
class TrainedBlend:
    boosters: list[Any]  # BlendConfig.bags models
    names: tuple[str, ...]
    best_iteration: list[int]
    groups: dict[str, int]
    importance: dict[str, float]  # mean gain over the models
    candidate_recall: float  # share of valid targets inside the candidate union


class RankerBag:
    """The blend's re-ranker: Rankers over the same features whose scores are averaged (BlendConfig.bags)."""

    def __init__(self, rankers: Sequence[Ranker]) -> None:
        self.rankers = list(rankers)
        first = self.rankers[0]
        self.feature_names, self.feature_config, self.context_names = first.feature_names, first.feature_config, first.context_names
        self.path = None

    def score(self, features: Features) -> np.ndarray:
        return np.mean([r.score(features) for r in self.rankers], axis=0)


def train_blend(
    blocks: list[np.ndarray], names: tuple[str, ...], candidates: list[np.ndarray], targets: list[np.ndarray], config: BlendConfig
) -> TrainedBlend:
    """LambdaMART on valid-window groups (one per user, label 1 = a valid target), early stopping on
    a random `holdout_frac` of users, `config.bags` times with seeds seed, seed + 1, ... (another
    early-stopping share each). Groups without a positive candidate carry no gradient: dropped."""
    labels = [np.isin(c, t).astype(np.int32) for c, t in zip(candidates, targets, strict=True)]
    useful = np.flatnonzero(np.array([bool(lab.any()) and len(lab) > 1 for lab in labels], dtype=bool))
    if len(useful) < 10:
        raise InputError(f"only {len(useful)} valid-window users have a target among the blend's candidates: need more data")
    n_stop = max(1, round(len(useful) * config.holdout_frac))

    def rows(users: np.ndarray) -> RankingSet:
        return RankingSet(
            np.concatenate([blocks[r] for r in users]),
            np.concatenate([labels[r] for r in users]),
            np.asarray([len(labels[r]) for r in users]),
        )

    boosters, best, gain = [], [], np.zeros(len(names))
    for bag in range(config.bags):
        params = replace(config.lambdamart, seed=config.lambdamart.seed + bag)
        perm = np.random.default_rng(params.seed).permutation(useful)
        stop, fit = np.sort(perm[:n_stop]), np.sort(perm[n_stop:])
        booster, it = train_lambdamart(params, rows(fit), rows(stop), names)
        boosters.append(booster)
        best.append(it)
        gain += booster.feature_importance("gain", iteration=it) / config.bags
    importance = dict(sorted(zip(names, (float(g) for g in gain), strict=True), key=lambda kv: -kv[1]))
    hits = sum(int(np.isin(t, c).sum()) for c, t in zip(candidates, targets, strict=True))
    total = sum(len(t) for t in targets)
    groups = {"fit": len(useful) - n_stop, "early_stop": n_stop, "dropped": len(labels) - len(useful)}
    return TrainedBlend(boosters, names, best, groups, importance, hits / max(total, 1))


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def auc_per_user(scores: np.ndarray, candidates: list[np.ndarray], targets: list[np.ndarray]) -> np.ndarray:
    """AUC of each user's candidate list (targets vs sampled negatives), ties count 1/2."""
    stats = require("scipy.stats")
    out = np.full(len(candidates), np.nan)
    for u, (cand, tgt) in enumerate(zip(candidates, targets, strict=True)):
        pos = np.isin(cand, tgt)
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            s = np.nan_to_num(scores[u, cand].astype(np.float64), neginf=-1e30)
            ranks = stats.rankdata(s)
            out[u] = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def sampled_candidates(
    n_items: int, seen: Sequence[np.ndarray], targets: Sequence[np.ndarray], n_neg: int, seed: int
) -> list[np.ndarray]:
    """Per user: targets + n_neg distinct unseen non-target items drawn uniformly (same for all systems)."""
    rng = np.random.default_rng(seed)
    out = []
    for s, t in zip(seen, targets, strict=True):
        allowed = np.setdiff1d(np.arange(n_items), np.concatenate([s, t]), assume_unique=False)
        negs = rng.choice(allowed, size=min(n_neg, len(allowed)), replace=False) if len(allowed) else allowed
        out.append(np.concatenate([np.unique(t), np.sort(negs)]).astype(np.int64))
    return out


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b per user and its percentile 95% interval, the same users resampled for both."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if not len(diff):
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "users": 0}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for s in range(0, n_boot, 100):
        idx = rng.integers(0, len(diff), size=(min(100, n_boot - s), len(diff)))
        means[s : s + len(idx)] = diff[idx].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"diff": float(diff.mean()), "lo": float(lo), "hi": float(hi), "users": len(diff)}


def mean_ci(values: np.ndarray, n_boot: int, seed: int) -> list[float]:
    r = paired_bootstrap(values, np.zeros_like(values), n_boot, seed)
    return [r["lo"], r["hi"]]


def slice_targets(
    targets: Sequence[np.ndarray], users: np.ndarray, cold: np.ndarray, new_users: np.ndarray
) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """slice -> (row indices into the window, their targets in that slice). warm / cold_items keep
    only warm / cold targets (users without any are left out); new_users keeps all their targets."""
    out: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {"all": (np.arange(len(targets)), list(targets))}
    for name, want_cold in (("warm", False), ("cold_items", True)):
        rows, kept = [], []
        for r, t in enumerate(targets):
            sel = t[np.isin(t, cold) == want_cold]
            if len(sel):
                rows.append(r)
                kept.append(sel)
        out[name] = (np.asarray(rows, np.int64), kept)
    rows_new = np.flatnonzero(np.isin(users, new_users))
    out["new_users"] = (rows_new, [targets[int(r)] for r in rows_new])
    return out


@dataclass
class SystemMetrics:
    metrics: dict[str, Any]
    per_user_ndcg: np.ndarray  # at the headline k, rows of the slice


def system_metrics(
    scores: np.ndarray,
    seen: Sequence[np.ndarray],
    rows: np.ndarray,
    targets: list[np.ndarray],
    ks: Sequence[int],
    k: int,
    n_boot: int,
    seed: int,
    candidates: list[np.ndarray] | None,
    cand_scores: np.ndarray | None,
) -> SystemMetrics:
    """Full-ranking metrics at every k (+ bootstrap CI of the headline ones), coverage, and the
    candidate protocol (AUC, NDCG@k over targets + sampled negatives)."""
    n_items = scores.shape[1]
    if not len(rows):
        return SystemMetrics({"users": 0}, np.zeros(0))
    ranked = top_k(scores[rows], max(ks), exclude=[seen[r] for r in rows])
    # Items with -inf (outside a blend's candidate union, or seen) must never count as recommended.
    finite = np.isfinite(np.take_along_axis(scores[rows], ranked, 1))
    ranked = np.where(finite, ranked, -1)
    out: dict[str, Any] = {"users": len(rows), "targets": int(sum(len(t) for t in targets))}
    headline = np.zeros(0)
    for kk in ks:
        pu = per_user_metrics(ranked, targets, kk)
        out[f"ndcg@{kk}"] = float(pu.ndcg.mean())
        out[f"recall@{kk}"] = float(pu.recall.mean())
        out[f"hit@{kk}"] = float(pu.hit.mean())
        out[f"mrr@{kk}"] = float(pu.mrr.mean())
        top = ranked[:, :kk]
        out[f"coverage@{kk}"] = float(len(np.unique(top[top >= 0])) / n_items)
        if kk == k:
            headline = pu.ndcg
            out[f"ndcg@{kk}_ci"] = mean_ci(pu.ndcg, n_boot, seed)
            out[f"recall@{kk}_ci"] = mean_ci(pu.recall, n_boot, seed)
    if candidates is not None and cand_scores is not None:
        cands = [candidates[r] for r in rows]
        sub = cand_scores[rows]
        auc = auc_per_user(sub, cands, targets)
        out["auc"] = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
        # NDCG@k inside each user's sampled list: rank the list only.
        masked = np.full_like(sub, -np.inf)
        for u, c in enumerate(cands):
            masked[u, c] = np.nan_to_num(sub[u, c], neginf=-1e30)
        ranked_c = top_k(masked, k)
        out[f"sampled_ndcg@{k}"] = float(per_user_metrics(ranked_c, targets, k).ndcg.mean())
    return SystemMetrics(out, headline)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    config: dict[str, Any]
    dataset: dict[str, Any]
    systems: list[str]
    metrics: dict[str, dict[str, dict[str, Any]]]  # slice -> system -> metrics
    paired: dict[str, dict[str, dict[str, float]]]  # slice -> baseline -> blend - baseline
    blend: dict[str, Any]
    timings: dict[str, float]
    notes: list[str]
    per_user: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)  # slice -> system -> ndcg@k
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # system -> [U, I] test scores
    users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    seen: list[np.ndarray] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "dataset": self.dataset,
            "systems": self.systems,
            "metrics": self.metrics,
            "paired_bootstrap": self.paired,
            "blend": self.blend,
            "timings_s": self.timings,
            "notes": self.notes,
        }


def _stage(timings: dict[str, float], name: str, started: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - started, 2)
    log.info("%s: %.1fs", name, now - started)
    return now


def evaluate(
    data: PreparedData | Path | str,
    config: EvalConfig | None = None,
    matchers: Mapping[str, EmbeddingMatcher] | None = None,
    blend_matcher: str | None = None,
    ranker: Ranker | None = None, sequences: Mapping[str, SequenceSystem] | None = None,
) -> EvalResult:
    """Run every system on the test window of `config.protocol` and compare them.

    matchers: name -> EmbeddingMatcher over this catalogue (item_embeddings [n_items, D]); they are
    text systems, and `blend_matcher` (default: "fine_tuned" if given, else the first) feeds the
    blend. ranker: a trained `recsys.ranker.Ranker` to use as the blend's re-ranker instead of
    training one on the valid window (its feature names must be computable here, or it is refused
    with the missing feature named). sequences: name -> SequenceSystem (SASRec), compared, not blended."""
    config = config or EvalConfig()
    data = data if isinstance(data, PreparedData) else PreparedData.load(data)
    matchers = dict(matchers or {})
    blend_matcher = _check_matchers(data, matchers, blend_matcher, config.blend_config.cold_prior)
    cold = held_out_items(data)
    n_items, n_users = data.n_items, data.users.height
    timings: dict[str, float] = {}
    notes: list[str] = []
    config = _as_served(config, ranker, notes)
    started = t0 = time.perf_counter()

    test_fit = ("train", "valid") if config.refit_on_valid else ("train",)
    test = load_window(data, config.protocol, "test", test_fit)
    started = _stage(timings, "load_test_window", started)
    test_scores: dict[str, np.ndarray] = cf_scores(test, n_items, n_users, config, _cf_needed(config), cold)
    started = _stage(timings, "cf_test", started)
    for name, m in matchers.items():
        test_scores[name] = matcher_scores(m, test.history)
    test_scores.update(_sequence_scores(data, config.protocol, test, sequences or {}, taken=(*test_scores, BLEND)))
    started = _stage(timings, "matchers_test", started)  # text matchers and sequence systems

    sampled = sampled_candidates(n_items, test.seen, test.targets, config.sampled_negatives, config.seed)
    blend_info: dict[str, Any] = {}
    cand_scores: dict[str, np.ndarray] = {}
    if config.blend:
        blend_full, blend_cand, blend_info = _run_blend(
            data, config, test, test_scores, sampled=sampled, matcher_name=blend_matcher,
            matcher=matchers[blend_matcher] if blend_matcher else None, ranker=ranker, cold=cold, timings=timings,
            extra_matchers=_blend_matchers(config, matchers),
        )
        blend_info["matcher"] = blend_matcher
        test_scores[BLEND] = blend_full
        cand_scores[BLEND] = blend_cand
        started = time.perf_counter()
    no_behaviour = np.bincount(test.fit_item, minlength=n_items) == 0  # the service's "cold": unseen items
    explore = _explore(config, test, test_scores, blend_matcher, no_behaviour)

    systems = [s for s in config.systems] + list(matchers) + list(sequences or {}) + ([BLEND] if config.blend else []) + ([EXPLORE] if explore else [])
    fit_counts = np.bincount(test.fit_user, minlength=n_users)
    new_users = np.flatnonzero(fit_counts <= config.new_user_max)
    slices = slice_targets(test.targets, test.users, cold, new_users)
    metrics, per_user, paired = _slice_metrics(
        config, test, slices, systems=systems, scores=(test_scores, cand_scores, sampled)
    )
    for system in systems:  # exposure the items without behaviour get
        metrics["all"][system][f"cold_share@{config.k}"] = cold_share(test_scores[system], no_behaviour, test.seen, config.k)
    started = _stage(timings, "metrics", started)
    timings["total"] = round(time.perf_counter() - t0, 2)
    if not len(slices["new_users"][0]):
        notes.append(f"no evaluated user has <= {config.new_user_max} training interactions: the new-user slice is empty")
    if not len(cold):
        notes.append("no items are held out (evaluate a dataset made by write_holdout / --write-holdout for the cold-start slice)")
    return EvalResult(
        config=config.to_dict(),
        dataset=_dataset_info(data, config, test, cold=cold, test_fit=test_fit),
        systems=systems,
        metrics=metrics,
        paired=paired,
        blend=blend_info,
        timings=timings,
        notes=notes,
        per_user=per_user,
        scores={s: test_scores[s] for s in systems},
        users=test.users,
        seen=test.seen,
    )


def _sequence_scores(data: PreparedData, protocol: str, test: Window, sequences: Mapping[str, SequenceSystem],
                     *, taken: Sequence[str]) -> dict[str, np.ndarray]:
    """Each sequence system's [U, n_items] test scores; a name clashing with another system is refused."""
    out = {}
    for name, seq in sequences.items():
        if name in (*CF_SYSTEMS, *taken):
            raise ConfigError(f"sequence system name {name!r} clashes with another system: rename it")
        out[name] = seq.scores(data, protocol, "test", test.users, test.cutoff_us)
    return out


def _as_served(config: EvalConfig, ranker: Ranker | None, notes: list[str]) -> EvalConfig:
    """A given ranker is evaluated as it serves: with its recorded cold-item places (blend_explore),
    unless the config asks for its own."""
    if ranker is None or not ranker.cold_slots or config.blend_config.cold_slots:
        return config
    notes.append(f"blend_explore: the given ranker's {ranker.cold_slots} recorded cold-item place(s) "
                 f"(it serves them in its first {ranker.cold_k}; this report's k is {config.k})")
    return replace(config, blend_config=replace(config.blend_config, cold_slots=ranker.cold_slots))


def _explore(config: EvalConfig, test: Window, test_scores: dict[str, np.ndarray], blend_matcher: str | None,
             no_behaviour: np.ndarray) -> bool:
    """Add the blend with reserved cold-item places (BlendConfig.cold_slots > 0) as EXPLORE; -> added."""
    if not (config.blend and blend_matcher is not None and config.blend_config.cold_slots > 0):
        return False
    prior = config.blend_config.cold_prior or blend_matcher
    test_scores[EXPLORE] = reserve_cold_slots(test_scores[BLEND], test_scores[prior], no_behaviour, test.seen,
                                              k=config.k, slots=config.blend_config.cold_slots)
    return True


def _blend_matchers(config: EvalConfig, matchers: Mapping[str, EmbeddingMatcher]) -> dict[str, EmbeddingMatcher]:
    """The matchers whose scores BlendConfig.matchers_from adds to the blend's features."""
    missing = [n for n in config.blend_config.matchers_from if n not in matchers]
    if missing:
        raise ConfigError(f"blend matchers_from {missing[0]!r} is not among the matchers ({', '.join(matchers) or 'none'})")
    return {n: matchers[n] for n in config.blend_config.matchers_from}


def _cf_needed(config: EvalConfig) -> list[str]:
    """The CF systems to fit: the compared ones, plus the blend's retrievers and feature sources."""
    bc = config.blend_config
    needed = set(config.systems)
    if config.blend:
        tops = (("ease", bc.ease_top), ("itemknn", bc.itemknn_top), ("popularity", bc.popularity_top))
        needed |= set(bc.features_from) | {name for name, top in tops if top > 0}
    return [s for s in CF_SYSTEMS if s in needed]


def _dataset_info(
    data: PreparedData, config: EvalConfig, test: Window, *, cold: np.ndarray, test_fit: Sequence[str]
) -> dict[str, Any]:
    return {
        "root": str(data.root),
        "n_items": data.n_items,
        "n_users": data.users.height,
        "protocol": config.protocol,
        "test_users": len(test),
        "test_targets": int(sum(len(t) for t in test.targets)),
        "held_out_items": len(cold),
        "fit_positives_test_window": len(test.fit_item),
        "fit_splits_test_window": list(test_fit),
    }


def _check_matchers(data: PreparedData, matchers: Mapping[str, EmbeddingMatcher], blend_matcher: str | None,
                    cold_prior: str = "") -> str | None:
    """Refuse matchers over another catalogue or named like a system, and a --cold-prior that names
    none of them; -> the blend's matcher name."""
    if cold_prior and cold_prior not in matchers:
        raise ConfigError(f"--cold-prior {cold_prior!r} is not a matcher of this evaluation: name one of the --matcher "
                          f"systems ({', '.join(matchers) or 'none given'})")
    for name, m in matchers.items():
        if len(m.item_embeddings) != data.n_items:
            raise InputError(
                f"matcher {name!r} has {len(m.item_embeddings)} item embeddings, the dataset {data.n_items} items: "
                f"export it for this catalogue"
            )
        if name in (*CF_SYSTEMS, BLEND):
            raise ConfigError(f"matcher name {name!r} clashes with a built-in system: rename it")
    if blend_matcher is None and matchers:
        blend_matcher = "fine_tuned" if "fine_tuned" in matchers else next(iter(matchers))
    if blend_matcher is not None and blend_matcher not in matchers:
        raise ConfigError(f"blend matcher {blend_matcher!r} is not among the matchers ({', '.join(matchers) or 'none'})")
    return blend_matcher


def _slice_metrics(
    config: EvalConfig,
    test: Window,
    slices: dict[str, tuple[np.ndarray, list[np.ndarray]]],
    *,
    systems: list[str],
    scores: tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[np.ndarray]],
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, np.ndarray]], dict[str, dict[str, dict[str, float]]]]:
    """Every system's metrics on every slice, per-user NDCG, and blend - system paired bootstraps.
    scores: (full-ranking scores per system, candidate-protocol scores where they differ, sampled lists)."""
    full, cand_scores, sampled = scores
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {}
    for sname, (rows, targets) in slices.items():
        metrics[sname], per_user[sname] = {}, {}
        for system in systems:
            sm = system_metrics(
                full[system], test.seen, rows, targets, config.ks, config.k, config.n_boot, config.seed,
                [sampled[r] for r in range(len(test))], cand_scores.get(system, full[system]),
            )
            metrics[sname][system], per_user[sname][system] = sm.metrics, sm.per_user_ndcg
    paired: dict[str, dict[str, dict[str, float]]] = {}
    if config.blend:
        for sname in slices:
            paired[sname] = {
                s: paired_bootstrap(per_user[sname][BLEND], per_user[sname][s], config.n_boot, config.seed)
                for s in systems
                if s != BLEND
            }
    return metrics, per_user, paired


def _retrieval(config: EvalConfig, scores: Mapping[str, np.ndarray], match: np.ndarray | None) -> dict[str, tuple[np.ndarray, int]]:
    """The blend's retrievers: name -> (scores [U, I], top-N)."""
    bc = config.blend_config
    tops = (("ease", bc.ease_top), ("itemknn", bc.itemknn_top), ("popularity", bc.popularity_top))
    out = {n: (scores[n], top) for n, top in tops if top > 0}
    if match is not None and bc.matcher_top > 0:
        out["matcher"] = (match, bc.matcher_top)
    return out


def _fit_blend(
    data: PreparedData, config: EvalConfig, cf_names: Sequence[str], matcher: EmbeddingMatcher | None,
    *, extra_matchers: Mapping[str, EmbeddingMatcher], cold: np.ndarray, timings: dict[str, float],
) -> tuple[RankerBag, dict[str, Any]]:
    """The blend's LambdaMART models on the valid window (CF and popularity fit on train), averaged."""
    started = time.perf_counter()
    bc = config.blend_config
    valid = load_window(data, config.protocol, "valid", ("train",))
    valid_scores = cf_scores(valid, data.n_items, data.users.height, config, cf_names, cold)
    for name, other in extra_matchers.items():
        valid_scores[name] = matcher_scores(other, valid.history)
    match_v = matcher_scores(matcher, valid.history) if matcher is not None else None
    cands_v = candidate_union(_retrieval(config, valid_scores, match_v), valid.seen)
    extra_v = retriever_extras(valid_scores, (*bc.features_from, *bc.matchers_from), valid.seen)
    blocks_v, names = window_features(data, valid, cands_v, matcher, extra=extra_v, config=config.feature_config, drop_items=cold)
    blocks_v, names = _without(blocks_v, names, bc.drop_features)
    started = _stage(timings, "blend_valid_features", started)
    trained = train_blend(blocks_v, names, cands_v, valid.targets, bc)
    _stage(timings, "blend_train", started)
    meta = {"feature_names": list(names), "feature_config": config.feature_config.to_dict()}
    return RankerBag([Ranker(b, meta, threads=bc.lambdamart.threads) for b in trained.boosters]), {
        "trained_on": f"{config.protocol} valid window (CF and popularity fit on train)",
        "valid_users": len(valid),
        "groups": trained.groups,
        "best_iteration": trained.best_iteration,
        "valid_candidate_recall": trained.candidate_recall,
        "importance": dict(list(trained.importance.items())[:20]),
        "features": list(names),
    }


def _without(blocks: list[np.ndarray], names: tuple[str, ...], drop: Sequence[str]) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """The feature blocks without the columns `drop` names (BlendConfig.drop_features)."""
    if not drop:
        return blocks, names
    unknown = [n for n in drop if n not in names]
    if unknown:
        raise ConfigError(f"drop_features: no feature {unknown[0]!r} (the blend's features: {', '.join(names)})")
    keep = [j for j, n in enumerate(names) if n not in set(drop)]
    return [b[:, keep] for b in blocks], tuple(names[j] for j in keep)


def _run_blend(
    data: PreparedData,
    config: EvalConfig,
    test: Window,
    test_scores: dict[str, np.ndarray],
    *,
    sampled: list[np.ndarray],
    matcher_name: str | None,
    matcher: EmbeddingMatcher | None,
    extra_matchers: Mapping[str, EmbeddingMatcher],
    ranker: Ranker | RankerBag | None,
    cold: np.ndarray,
    timings: dict[str, float],
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """-> (full-ranking scores [U, I] with -inf outside the union, scores on union + sampled, info)."""
    bc = config.blend_config
    info: dict[str, Any] = {"features_from": [*bc.features_from, *bc.matchers_from]}
    if ranker is None:
        ranker, trained_info = _fit_blend(
            data, config, [s for s in CF_SYSTEMS if s in test_scores], matcher, extra_matchers=extra_matchers,
            cold=cold, timings=timings,
        )
        info.update(trained_info)
    else:
        info.update({"trained_on": f"given ranker {getattr(ranker, 'path', None)}", "features": list(ranker.feature_names)})
    started = time.perf_counter()
    match_t = test_scores[matcher_name] if matcher_name is not None else None
    cands_t = candidate_union(_retrieval(config, test_scores, match_t), test.seen)
    hits = sum(int(np.isin(t, c).sum()) for c, t in zip(cands_t, test.targets, strict=True))
    info["test_candidate_recall"] = hits / max(1, sum(len(t) for t in test.targets))
    info["mean_candidates"] = float(np.mean([len(c) for c in cands_t]))
    info["retrievers"] = {n: top for n, (_, top) in _retrieval(config, test_scores, match_t).items()}
    extras = retriever_extras(test_scores, (*bc.features_from, *bc.matchers_from), test.seen)
    extra_t = {k: v for k, v in extras.items() if k in set(ranker.feature_names)}
    scored = [np.union1d(c, s) for c, s in zip(cands_t, sampled, strict=True)]
    blocks_t, names_t = window_features(
        data, test, scored, matcher, extra=extra_t, config=ranker.feature_config, drop_items=cold,
        context_names=ranker.context_names,
    )
    blocks_t, names_t = _without(blocks_t, names_t, tuple(n for n in bc.drop_features if n not in ranker.feature_names))
    full = np.full((len(test), data.n_items), -np.inf, np.float32)
    cand = np.full((len(test), data.n_items), -np.inf, np.float32)
    for u in range(len(test)):
        s = np.asarray(ranker.score(Features(blocks_t[u], names_t)), np.float64)
        cand[u, scored[u]] = s
        in_union = np.isin(scored[u], cands_t[u])
        full[u, scored[u][in_union]] = s[in_union]
    _stage(timings, "blend_test", started)
    return full, cand, info


# --------------------------------------------------------------------------------------------------
# Score export
# --------------------------------------------------------------------------------------------------


def top_scores(result: EvalResult, data: PreparedData, system: str, top: int = 100) -> pl.DataFrame:
    """One system's test-window scores, top-`top` unseen items per user: user_id, item_id, rank, score."""
    scores = result.scores[system]
    ranked = top_k(scores, top, exclude=result.seen)
    values = np.take_along_axis(scores, ranked, 1)
    keep = np.isfinite(values)
    rows = np.repeat(np.arange(len(ranked)), ranked.shape[1]).reshape(ranked.shape)[keep]
    user_ids = data.users["user_id"].cast(pl.Utf8).to_numpy()[result.users[rows]]
    item_ids = data.items["item_id"].cast(pl.Utf8).to_numpy()[ranked[keep]]
    rank = np.broadcast_to(np.arange(1, ranked.shape[1] + 1), ranked.shape)[keep]
    return pl.DataFrame(
        {"user_id": user_ids, "item_id": item_ids, "rank": rank.astype(np.int32), "score": values[keep].astype(np.float32)}
    )


def write_scores(result: EvalResult, data: PreparedData, out_dir: Path | str, top: int = 100, prefix: str = "scores") -> dict[str, Path]:
    """<out_dir>/<prefix>_<system>.parquet for every system; returns system -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for system in result.systems:
        path = out_dir / f"{prefix}_{system}.parquet"
        top_scores(result, data, system, top).write_parquet(path)
        paths[system] = path
    return paths
