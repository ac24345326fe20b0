"""What one served variant runs: a registry version's matcher + a LightGBM ranker, hot-swappable.

A `ServingModel` is immutable once built; a reload builds a new one beside the old (integrity check,
ONNX sessions, catalogue embeddings, a warm-up request) and `ModelHolder.swap` replaces the reference
in one assignment. Requests take the reference once at their start, so in-flight ones finish on the
model they began with, and a version that fails any load step never becomes visible.

The ranker comes from `<version dir>/ranker/` when the export put one there (matcher and blender
versioned together), else from the directory given with `--ranker`.

A `BaselineModel` is what an experiment config's `baseline: popularity | random` ranker serves: no
ONNX, no LightGBM, scores straight from the live feature state (`engine.rank_baseline`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import numpy as np

from recsys.data.prepared import Histories
from recsys.errors import ModelError
from recsys.features import EmbeddingMatcher, FeatureState
from recsys.ranker import Ranker
from recsys.registry import Registry
from recsys.scoring.matcher import MatcherRuntime, tower_encoder
from recsys.scoring.request import RequestScorer

log = logging.getLogger(__name__)

CONTROL = "control"
RANKER_SUBDIR = "ranker"


@dataclass(frozen=True)
class ItemCatalogue:
    """The catalogue the feature state indexes: ids[item_idx], texts[item_idx], id -> item_idx."""

    ids: tuple[str, ...]
    texts: tuple[str, ...]
    index: dict[str, int] = field(repr=False)

    @classmethod
    def from_lists(cls, ids: Sequence[str], texts: Sequence[str]) -> ItemCatalogue:
        return cls(tuple(ids), tuple(texts), {item: i for i, item in enumerate(ids)})

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """item_idx per id, -1 for items the catalogue does not know."""
        return np.fromiter(map(self.index.get, ids, itertools.repeat(-1)), np.int64, len(ids))


class TextCache:
    """Bounded LRU of cold-item embeddings by text (the same new item shows up in many requests)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> np.ndarray | None:
        with self._lock:
            vector = self._data.get(text)
            if vector is not None:
                self._data.move_to_end(text)
            return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        if not self.capacity:
            return
        with self._lock:
            self._data[text] = vector
            self._data.move_to_end(text)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)


@dataclass
class ServingModel:
    version: str
    runtime: MatcherRuntime
    ranker: Ranker
    item_emb: np.ndarray  # [n_items, D] float32, item_idx order, C-contiguous (exact search)
    extra_names: tuple[str, ...]  # ranker features that callers pass per candidate
    loaded_at: float
    cold_cache: TextCache
    ranker_path: Path
    matcher: EmbeddingMatcher  # catalogue embeddings + the ONNX user tower (`tower_encoder`)
    initial_state: FeatureState | None = None
    _scorer: RequestScorer | None = field(default=None, repr=False)

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self.runtime.user_encoder.info.active)

    def scorer(self, state: FeatureState) -> RequestScorer:
        """The one request path over `state` (the live one in the service, the saved one in batch);
        built once per state (the service's live state object lives as long as the server)."""
        scorer = self._scorer
        if scorer is None or scorer.state is not state:
            scorer = self._scorer = RequestScorer(state, ranker=self.ranker, matcher=self.matcher, extra_names=self.extra_names)
        return scorer

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Cold items: texts -> [n, D] through the ONNX item tower (one length-bucketed pass)."""
        return self.runtime.item_encoder.encode(list(texts))


@dataclass(frozen=True)
class BaselineModel:
    """A model-free ranker (`baseline: popularity` or `random` in an experiment config).

    popularity: score = the item's decayed interaction count (the ranker feature item_pop_7d, or
    the decay window closest to 7 days) in the live feature state, as of the request time;
    random: a uniform draw seeded by (user_id, request_id), so a retried request gets the same list."""

    kind: str  # "popularity" | "random"
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        """What the response's model_version and the exposure log say served the list."""
        return f"baseline:{self.kind}"


AnyModel: TypeAlias = ServingModel | BaselineModel


class ModelHolder:
    """An atomically replaceable reference to the model a variant (or experiment ranker) serves."""

    def __init__(self, model: AnyModel) -> None:
        self._model = model

    @property
    def current(self) -> AnyModel:
        return self._model

    def swap(self, model: AnyModel) -> AnyModel:
        old, self._model = self._model, model  # one reference assignment: atomic under the GIL
        return old


class VariantRouter(Protocol):
    """The A/B hook: which variant label (and so which model) serves this request. Must be cheap, pure
    and deterministic per (user, request, context) so a user sees a consistent variant. The context is
    the request's (targeting keys, `session_id` for session units); `recsys.experiments.router.
    ExperimentRouter` implements it."""

    def __call__(
        self, user_id: str, request_id: str, context: Mapping[str, Any] | None = None
    ) -> tuple[str, AnyModel]: ...


class SingleVariantRouter:
    """Default: every request goes to one variant ("control"), the registry's current version."""

    def __init__(self, holders: dict[str, ModelHolder], variant: str = CONTROL) -> None:
        self.holders = holders
        self.variant = variant

    def __call__(
        self, user_id: str, request_id: str, context: Mapping[str, Any] | None = None
    ) -> tuple[str, AnyModel]:
        return self.variant, self.holders[self.variant].current


def load_model(
    registry: Registry,
    version: str | None,
    catalogue: ItemCatalogue,
    state: FeatureState | None,
    *,
    ranker_dir: Path | None = None,
    provider: str = "auto",
    precision: str = "fp32",
    threads: int = 1,
    cold_cache: int = 10_000,
) -> ServingModel:
    """Build a model from a registry version; any problem is a ModelError/InputError naming it.

    `state` is the live feature state the model must fit; None (first load) loads the ranker's saved
    state and returns it as `model.initial_state` for the server to adopt."""
    started = time.perf_counter()
    registered = registry.load(version)  # sha256 of every file; refuses a broken version
    runtime = MatcherRuntime.from_version(registered, provider, precision, threads, verify=False)
    own = registered.path / RANKER_SUBDIR
    path = own if own.is_dir() else ranker_dir
    if path is None:
        raise ModelError(
            f"model version {registered.version} has no {RANKER_SUBDIR}/ directory and no --ranker was "
            f"given: train one with `recsys train ranker --matcher {registered.path}` and pass --ranker"
        )
    ranker = Ranker.load(path, threads=1)  # concurrency comes from requests, not OpenMP
    if not ranker.uses_match:
        raise ModelError(f"ranker {path} was trained without match scores: retrain it with --matcher")
    initial = None
    if state is None:
        state = initial = ranker.load_state()
    if ranker.feature_config != state.config:
        raise ModelError(
            f"ranker {path} uses feature config {ranker.feature_config.to_dict()}, the live feature "
            f"state {state.config.to_dict()}: restart the server to change feature definitions"
        )
    if state.n_items != len(catalogue.ids):
        raise ModelError(
            f"ranker {path} has a feature state over {state.n_items} items, the catalogue has "
            f"{len(catalogue.ids)}: serve it with the prepared dataset it was trained on (--data)"
        )
    emb = runtime.item_embeddings(list(catalogue.ids), dict(zip(catalogue.ids, catalogue.texts, strict=True)))
    if not np.isfinite(emb).all():
        raise ModelError(f"model version {registered.version} produced non-finite item embeddings")
    builtin = set(state.feature_names(True, ranker.context_names))
    item_emb = np.ascontiguousarray(emb, np.float32)
    model = ServingModel(
        version=registered.version,
        runtime=runtime,
        ranker=ranker,
        item_emb=item_emb,
        extra_names=tuple(n for n in ranker.feature_names if n not in builtin),
        loaded_at=time.time(),
        cold_cache=TextCache(cold_cache),
        ranker_path=path,
        matcher=EmbeddingMatcher(item_emb, tower_encoder(item_emb, runtime.user_encoder)),
        initial_state=initial,
    )
    _warm_up(model, catalogue)
    log.info(
        "loaded model %s (ranker %s, %d items, dim %d) in %.2fs",
        registered.version,
        path,
        len(emb),
        emb.shape[1],
        time.perf_counter() - started,
    )
    return model


def _warm_up(model: ServingModel, catalogue: ItemCatalogue) -> None:
    """Run both towers once: a model that cannot score is refused at load, not on traffic."""
    empty = Histories(np.full((1, 4), -1, np.int32), np.full((1, 4), -1, np.int8), np.zeros((1, 4), np.float32))
    user = model.matcher.user_vectors(empty)
    cold = model.encode_texts([catalogue.texts[0] if catalogue.texts else "warm up"])
    if user.shape != (1, model.item_emb.shape[1]) or cold.shape != user.shape:
        raise ModelError(
            f"model {model.version}: towers disagree on the embedding size "
            f"(user {list(user.shape)}, item {list(cold.shape)}, catalogue {list(model.item_emb.shape)})"
        )
    if not (np.isfinite(user).all() and np.isfinite(cold).all()):
        raise ModelError(f"model {model.version}: the towers produce non-finite embeddings")
