"""Ranking features: the one feature package, used through the one request scorer by ranker
training, evaluation, the gRPC service and batch scoring, so offline and online features cannot drift.

    sparse.py     `SparseMap`: sorted (row, col) -> count maps (affinities, co-visitation)
    catalogue.py  `FeatureConfig`, `Catalogue` (item attributes), `EventBatch`, time and id helpers
    state.py      `FeatureState`: what the events applied so far teach (`apply`), the point-in-time
                  loop (`replay`), histories, save/load
    compute.py    one request's features: (state, user, candidates [n], time) -> Features [n, F]
    match.py      `EmbeddingMatcher`: item embeddings + the one user-vector function

Point in time: the state never looks at an event it was not given, so ranker training and evaluation
replay the log in time order (`FeatureState.replay`) and apply only events with timestamp < the
request time before computing that request's features: exact point-in-time, with no window-start
approximation. `recsys.scoring.request.RequestScorer` is the only caller of `FeatureState.compute`.
"""

from __future__ import annotations

from recsys.features.catalogue import (
    DAY_US,
    MAX_CONTEXT_VALUES,
    NEVER,
    NOT_YET,
    Catalogue,
    EventBatch,
    FeatureConfig,
    context_vocabulary,
    request_keys,
    to_us,
)
from recsys.features.compute import MATCH_FEATURES, Features
from recsys.features.match import EmbeddingMatcher, UserEncoderFn, mean_pool_encoder
from recsys.features.sparse import SparseMap
from recsys.features.state import STATE_FORMAT, FeatureState

__all__ = [
    "DAY_US",
    "MATCH_FEATURES",
    "MAX_CONTEXT_VALUES",
    "NEVER",
    "NOT_YET",
    "STATE_FORMAT",
    "Catalogue",
    "EmbeddingMatcher",
    "EventBatch",
    "FeatureConfig",
    "FeatureState",
    "Features",
    "SparseMap",
    "UserEncoderFn",
    "context_vocabulary",
    "mean_pool_encoder",
    "request_keys",
    "to_us",
]
