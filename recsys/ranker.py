"""LightGBM LambdaMART ranker at scoring time: load a text model, score, explain. No torch, no pickle.

A ranker directory (written by `recsys train ranker`, see training/ranker.py):
    model.txt        LightGBM text model (best iteration only)
    ranker.json      format, feature_names (column order), feature_config, params, label_gain,
                     best_iteration, metrics, data/matcher provenance
    importance.json  gain importance per feature
    feature_state/   FeatureState as of the end of the training data (state.npz + state.json)

The request path that builds the feature matrices and calls `Ranker.score` is
`recsys.scoring.request.RequestScorer`; the trainer is training/ranker.py (`train_lambdamart` is the
one LambdaMART fit, used by `train ranker`, publish, retrain and evaluate's blend).

Scoring checks the caller's feature names against the training ones, so a matrix built by other
feature code (or a model trained on other features) is refused with the missing/extra names, never
silently scored with shifted columns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from recsys.compat import require
from recsys.errors import ConfigError, InputError, ModelError
from recsys.features import FeatureConfig, Features, FeatureState
from recsys.features.compute import RETIRED_FEATURES
from recsys.model_text import check_model_text

RANKER_FORMAT = 1
MODEL_FILE = "model.txt"
META_FILE = "ranker.json"
IMPORTANCE_FILE = "importance.json"
STATE_DIR = "feature_state"

FeatureInput = Features | np.ndarray | Mapping[str, Any]


@dataclass(frozen=True)
class Explanation:
    """Per-candidate SHAP contributions: contributions [n, F] (feature order = names), bias [n];
    contributions.sum(1) + bias == the raw score (additivity)."""

    contributions: np.ndarray
    bias: np.ndarray
    names: tuple[str, ...]

    def top(self, row: int, k: int = 5) -> list[tuple[str, float]]:
        """The k features that moved candidate `row`'s score most, by |contribution|."""
        order = np.argsort(-np.abs(self.contributions[row]), kind="stable")[:k]
        return [(self.names[j], float(self.contributions[row, j])) for j in order]


class TreePredictor:
    """LightGBM's C predict on a row-major float32/float64 [n, F] matrix, without the Python wrapper's
    per-call work (a new predictor object, type checks, a float64 copy: ~70 us against ~10 us of tree
    traversal for 100 rows); the service pays it per request. Same C entry point and parameters as
    `Booster.predict`, so the scores are identical (tested). `threads` fixes LightGBM's OpenMP pool:
    1 in the service, where a 100-row predict takes ~0.1 ms on one thread but can take 20 ms with the
    default pool on a loaded machine (threads spin and wait); concurrency comes from requests."""

    def __init__(self, booster: Any, threads: int | None = None) -> None:
        import ctypes

        from lightgbm import basic

        self._ctypes, self._lib, self._check = ctypes, basic._LIB, basic._safe_call
        self._handle = booster._handle
        self._parameter = f"num_threads={threads}".encode() if threads else b""
        best = int(getattr(booster, "best_iteration", 0) or 0)
        self._iterations = best if best > 0 else -1  # Booster.predict's default

    def __call__(self, x: np.ndarray) -> np.ndarray:
        c = self._ctypes
        if x.dtype != np.float32:
            x = np.asarray(x, np.float64)
        x = np.ascontiguousarray(x)
        n, f = x.shape
        out = np.empty(n, np.float64)
        written = c.c_int64(0)
        self._check(
            self._lib.LGBM_BoosterPredictForMat(
                self._handle, x.ctypes.data_as(c.c_void_p), c.c_int(0 if x.dtype == np.float32 else 1),
                c.c_int32(n), c.c_int32(f), c.c_int(1), c.c_int(0), c.c_int(0), c.c_int(self._iterations),
                c.c_char_p(self._parameter), c.byref(written), out.ctypes.data_as(c.POINTER(c.c_double)),
            )
        )
        if written.value != n:
            raise ModelError(f"LightGBM returned {written.value} scores for {n} rows")
        return out


def _refuse_retired_features(directory: Path, names: Any) -> None:
    """A ranker trained on features this version no longer computes would fail every request on the
    missing columns: refuse it at load, naming them and the fix."""
    names = set(names) if isinstance(names, list) else set()
    for what, retired in RETIRED_FEATURES.items():
        read = [name for name in retired if name in names]
        if read:
            raise ModelError(
                f"{directory}: this ranker reads {', '.join(read)}, which this version no longer computes "
                f"({what}). Retrain it with recsys train ranker"
            )


class Ranker:
    """A trained LambdaMART blender: `score` and `explain` candidate feature matrices.

    `threads`: LightGBM's OpenMP threads per call (None: its default, all cores)."""

    def __init__(self, booster: Any, meta: dict[str, Any], path: Path | None = None, threads: int | None = None) -> None:
        self.booster = booster
        self.meta = meta
        self.path = path
        self.feature_names: tuple[str, ...] = tuple(meta["feature_names"])
        self.feature_config = FeatureConfig.from_dict(meta["feature_config"])
        self._index = {name: j for j, name in enumerate(self.feature_names)}
        self.context_names: tuple[str, ...] = tuple(n[4:] for n in self.feature_names if n.startswith("ctx_"))
        # Cold-item exploration recorded at training (`recsys train ranker --cold-slots N`): the last N
        # of every list's first cold_k places go to items without behaviour (recsys/scoring/explore.py).
        config = meta.get("config") or {}
        self.cold_slots, self.cold_k = int(config.get("cold_slots", 0)), int(config.get("cold_k", 10))
        self.threads = threads
        self._predict = TreePredictor(booster, threads)

    @classmethod
    def load(cls, directory: Path | str, threads: int | None = None) -> Ranker:
        directory = Path(directory)
        meta_path, model_path = directory / META_FILE, directory / MODEL_FILE
        for path in (meta_path, model_path):
            if not path.exists():
                raise ModelError(
                    f"{directory} is not a ranker directory: {path.name} is missing. "
                    f"Train one with: recsys train ranker --data PREPARED --out {directory}"
                )
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise ModelError(
                f"{meta_path} is not valid JSON ({exc}): retrain with recsys train ranker"
            ) from exc
        if meta.get("format") != RANKER_FORMAT:
            raise ModelError(f"{meta_path} has format {meta.get('format')}, this code reads {RANKER_FORMAT}")
        _refuse_retired_features(directory, meta.get("feature_names"))
        lgb = require("lightgbm")
        # LightGBM's parser can abort the process on a malformed file: check its structure first.
        check_model_text(model_path, meta.get("feature_names"))
        try:
            booster = lgb.Booster(model_file=str(model_path))
        except Exception as exc:  # LightGBM raises its own LightGBMError for corrupt files
            raise ModelError(f"cannot load {model_path}: {exc}. Retrain with recsys train ranker") from exc
        if tuple(booster.feature_name()) != tuple(meta["feature_names"]):
            raise ModelError(
                f"{model_path} and {meta_path} disagree on feature names: the directory is inconsistent"
            )
        return cls(booster, meta, directory, threads)

    def load_state(self) -> FeatureState:
        """The feature state saved beside the model (end of the training data)."""
        if self.path is None:
            raise ModelError("this ranker was not loaded from a directory, so it has no saved feature state")
        return FeatureState.load(self.path / STATE_DIR)

    @property
    def uses_match(self) -> bool:
        return "match_score" in self._index

    # ---------------------------------------------------------------- inputs

    def matrix(self, features: FeatureInput, names: Sequence[str] | None = None) -> np.ndarray:
        """Any feature input -> float [n, F] in the training column order, or a clear error.

        Features / (ndarray, names): columns are matched by name (reordered if needed);
        Mapping: name -> per-candidate values; ndarray without names: trusted to be in training order.
        Float32 matrices stay float32 (exact: LightGBM compares in double), others become float64.
        """
        if isinstance(features, Features):
            names = features.names
            features = features.matrix
            if names == self.feature_names and features.dtype in (np.float32, np.float64):
                return features  # the service's path: FeatureState.compute built it in this order
        if isinstance(features, Mapping):
            self._check_names(list(features))
            columns = [_column(name, features[name]) for name in self.feature_names]
            lengths = {len(c) for c in columns}
            if len(lengths) > 1:
                raise InputError(
                    f"feature columns have different lengths {sorted(lengths)}: one value per candidate"
                )
            return np.column_stack(columns) if columns else np.zeros((0, 0))
        array = np.asarray(features)
        if array.ndim != 2:
            raise InputError(
                f"feature matrix must be 2-d [n_candidates, n_features], got shape {array.shape}"
            )
        if names is None:
            if array.shape[1] != len(self.feature_names):
                raise ModelError(
                    f"feature matrix has {array.shape[1]} columns, the model was trained on "
                    f"{len(self.feature_names)} ({', '.join(self.feature_names)}): pass feature names"
                )
            names = self.feature_names
        names = list(names)
        if len(names) != array.shape[1]:
            raise InputError(f"{len(names)} feature names for a matrix with {array.shape[1]} columns")
        self._check_names(names)
        if array.dtype.kind not in "biuf":
            return np.column_stack([_column(n, array[:, names.index(n)]) for n in self.feature_names])
        order = [names.index(n) for n in self.feature_names]
        return np.asarray(array[:, order], dtype=np.float32 if array.dtype == np.float32 else np.float64)

    def _check_names(self, names: Sequence[str]) -> None:
        given = list(names)
        duplicates = sorted({n for n in given if given.count(n) > 1})
        if duplicates:
            raise InputError(f"feature {duplicates[0]!r} is given more than once")
        missing = [n for n in self.feature_names if n not in set(given)]
        extra = [n for n in given if n not in self._index]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing feature(s) {', '.join(repr(n) for n in missing)}")
            if extra:
                parts.append(f"unexpected feature(s) {', '.join(repr(n) for n in extra)}")
            raise ModelError(
                f"feature names differ from the ones this ranker was trained on: {'; '.join(parts)}. "
                f"Compute features with the same FeatureState config (and match scores, context and extra "
                f"features) the model was trained with, or retrain it."
            )

    # ---------------------------------------------------------------- scoring

    def score(self, features: FeatureInput, names: Sequence[str] | None = None) -> np.ndarray:
        """Raw LambdaMART scores [n] (higher = rank first; comparable within one request)."""
        x = self.matrix(features, names)
        if not len(x):
            return np.zeros(0)
        return self._predict(x)

    def explain(self, features: FeatureInput, names: Sequence[str] | None = None) -> Explanation:
        """SHAP (TreeSHAP, `pred_contrib=True`) contributions per candidate and feature."""
        x = self.matrix(features, names)
        kwargs = {"num_threads": self.threads} if self.threads else {}
        contrib = np.asarray(self.booster.predict(x, pred_contrib=True, **kwargs), dtype=np.float64)
        return Explanation(contrib[:, :-1], contrib[:, -1], self.feature_names)


# ------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class LambdaMARTParams:
    """The one LambdaMART parameter source. `recsys train ranker` / publish / retrain
    (`RankerConfig.lambdamart`, the CLI flags mapped onto it) holds one; so does evaluate's blend
    (`BlendConfig.lambdamart`, binary labels). The defaults are the request ranker's."""

    num_rounds: int = 500
    learning_rate: float = 0.05
    num_leaves: int = 7  # small trees + large leaves: request windows are small and labels noisy
    min_data_in_leaf: int = 50
    feature_fraction: float = 1.0  # < 1 adds seed-dependent variance that small windows cannot afford
    lambda_l2: float = 1.0
    early_stopping_rounds: int = 50
    label_gain: tuple[float, ...] = (0.0, 1.0, 3.0, 7.0, 15.0)  # by integer label
    eval_at: int = 10
    truncation_level: int | None = None  # lambdarank_truncation_level; None: LightGBM's default
    col_wise: bool = True  # histogram layout: force_col_wise, else force_row_wise
    seed: int = 0
    threads: int = 0  # 0 = LightGBM's default (all cores)

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"num_rounds must be >= 1, got {self.num_rounds}")

    def lgb_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [self.eval_at],
            "label_gain": list(self.label_gain),
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "feature_fraction_seed": self.seed,
            "lambda_l2": self.lambda_l2,
            "seed": self.seed,
            "deterministic": True,
            "force_col_wise" if self.col_wise else "force_row_wise": True,
            "num_threads": self.threads,
            "verbose": -1,
        }
        if self.truncation_level is not None:
            params["lambdarank_truncation_level"] = self.truncation_level
        return params


class GroupedRows(Protocol):
    """Rows of request groups in group order: matrix [R, F], labels [R] ints, sizes [G]."""

    matrix: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray


@dataclass
class RankingSet:
    matrix: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray


def data_reference(ranker_dir: Path, data_root: Path) -> dict[str, str]:
    """How a ranker records the prepared dataset it was trained on: the absolute path and the path
    relative to the ranker's own directory, so a registry moved together with its data (another
    mount point, another machine, another working directory) still finds it."""
    import os

    absolute = Path(data_root).resolve()
    return {"data": str(absolute), "data_relative": os.path.relpath(absolute, Path(ranker_dir).resolve())}


def recorded_data_dir(ranker_dir: Path) -> Path:
    """The prepared dataset a ranker was trained on (id maps, item texts), for serve and score without
    --data: the path relative to the ranker directory first, then the absolute path it recorded."""
    meta_path = Path(ranker_dir) / "ranker.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    tried = [Path(ranker_dir) / meta["data_relative"]] if meta.get("data_relative") else []
    tried += [Path(meta["data"])] if meta.get("data") else []
    for candidate in tried:
        if (candidate / "manifest.json").is_file():
            return candidate
    where = " or ".join(str(t) for t in tried) or f"nothing ({meta_path} records no dataset)"
    raise ConfigError(
        f"the prepared dataset the ranker in {ranker_dir} was trained on is not at {where}: pass --data PREPARED "
        f"(the dataset with its id maps and item texts), or keep the registry and the data side by side as published"
    )


def train_lambdamart(
    params: LambdaMARTParams,
    fit: GroupedRows,
    stop: GroupedRows,
    names: Sequence[str],
    *,
    init_model: Any = None,
) -> tuple[Any, int]:
    """The one LambdaMART fit: trees on `fit`, early stopping on NDCG@eval_at of `stop` (groups no
    tree is fit on). init_model (a Booster) continues it. -> (booster, best iteration; with
    init_model it counts the previous trees too, as LightGBM does)."""
    lgb = require("lightgbm")
    dfit = lgb.Dataset(fit.matrix, fit.labels, group=fit.sizes, feature_name=list(names), free_raw_data=False)
    dstop = lgb.Dataset(stop.matrix, stop.labels, group=stop.sizes, reference=dfit, free_raw_data=False)
    booster = lgb.train(
        params.lgb_params(),
        dfit,
        num_boost_round=params.num_rounds,
        init_model=init_model,
        valid_sets=[dstop],
        valid_names=["holdout"],
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, first_metric_only=True, verbose=False)],
    )
    return booster, int(booster.best_iteration or booster.current_iteration())


def grouped_ndcg(
    scores: np.ndarray,
    labels: np.ndarray,
    group_sizes: np.ndarray,
    k: int = 10,
    label_gain: Sequence[float] | None = None,
) -> np.ndarray:
    """NDCG@k per group (LightGBM's definition: gain = label_gain[label], 1/log2(rank+2) discount).

    scores/labels [R] in group order, group_sizes [G] -> [G]; groups without a positive get NaN.
    Ties are broken by position within the group (callers sort candidates by item_idx first).
    """
    labels = np.asarray(labels, np.int64)
    gain_table = np.asarray(
        label_gain if label_gain is not None else 2.0 ** np.arange(labels.max(initial=0) + 1) - 1
    )
    sizes = np.asarray(group_sizes, np.int64)
    g, width = len(sizes), int(sizes.max(initial=0))
    group = np.repeat(np.arange(g), sizes)
    col = np.arange(len(labels)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    s = np.full((g, width), -np.inf)
    gain = np.zeros((g, width))
    s[group, col] = scores
    gain[group, col] = gain_table[labels]
    discount = np.zeros(width)
    discount[: min(k, width)] = 1.0 / np.log2(np.arange(2, min(k, width) + 2))
    ranked = np.take_along_axis(gain, np.argsort(-s, axis=1, kind="stable"), 1)
    ideal = -np.sort(-gain, axis=1)
    dcg, idcg = ranked @ discount, ideal @ discount
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(idcg > 0, dcg / idcg, np.nan)


def _column(name: str, values: Any) -> np.ndarray:
    try:
        array = np.asarray(values)
        if array.dtype.kind in "USV":
            raise TypeError(f"got {array.dtype} values such as {array.reshape(-1)[:1].tolist()}")
        return np.asarray(array, dtype=np.float64).reshape(-1)  # objects holding numbers are fine
    except (TypeError, ValueError) as exc:
        raise InputError(f"feature {name!r} is not numeric ({exc}): pass numbers (NaN for missing)") from exc
