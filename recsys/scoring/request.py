"""The one request path: R requests -> user vectors, match scores, features, LightGBM, ranked lists.

Every caller is a thin adapter over `RequestScorer`, so a (user, item, time) gets the same features
and score everywhere, and a feature changes in one place:

    service Rank / Recommend    R = 1 (recsys.serving.engine: ids, locks, validation, cold texts)
    batch scoring               R = a chunk's requests (recsys.batch.scorer)
    ranker training             R = the groups one `FeatureState.replay` step sees (training/ranker.py)
    evaluation                  R = the users one replay step sees (recsys.evaluation.evaluate)

Steps for a `RequestBatch` (candidates in CSR form: request r owns items[indptr[r]:indptr[r + 1]]):
one user-tower call for the batch (`EmbeddingMatcher.user_vectors`; a request's history override
replaces the stored history), row-wise match scores (catalogue embeddings; cold candidates: their
text vector, or 0.0, the neutral cosine, without text), `FeatureState.compute` per request (cold
candidates masked as items nobody has touched, `mask_unseen_items`), one LightGBM call for the
batch, one top-k per request (ties by position). `recommend` first retrieves each user's top
`retrieve_k` catalogue items by cosine (minus exclusions and, unless include_seen, items the user
interacted with) with the same user vectors, then scores them.

Contexts: with a ranker, every context it knows (None -> NaN where a request lacks one); extra
features: with a ranker, every extra feature it was trained on (NaN where not given).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from recsys.data.prepared import Histories
from recsys.errors import InputError, ModelError
from recsys.features import EmbeddingMatcher, Features, FeatureState
from recsys.ranker import Ranker
from recsys.scoring.explore import cold_slot_order
from recsys.scoring.topk import top_k

# Sources of a scored item (values of the proto enum ItemSource).
CATALOGUE, ENCODED, NO_TEXT = 1, 2, 3


@dataclass(frozen=True)
class RequestBatch:
    """R requests. users [R] user_idx (-1: unknown user), times [R] epoch µs, indptr [R + 1] into
    items [N] (item_idx; -1: not in the catalogue). Optional: contexts [R] dicts, extra name -> [N],
    histories [R] (None: the stored history), cold_vectors [m, D] for the cold candidates with text
    (has_text [N]), in candidate order."""

    users: np.ndarray
    times: np.ndarray
    indptr: np.ndarray
    items: np.ndarray
    contexts: Sequence[Mapping[str, Any]] | None = None
    extra: Mapping[str, np.ndarray] | None = None
    histories: Sequence[Histories | None] | None = None
    cold_vectors: np.ndarray | None = None
    has_text: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_lists(
        cls,
        users: Sequence[int] | np.ndarray,
        times: Sequence[int] | np.ndarray,
        candidates: Sequence[np.ndarray],
        **optional: Any,
    ) -> RequestBatch:
        """Per-request candidate arrays -> CSR."""
        sizes = np.asarray([len(c) for c in candidates], np.int64)
        items = np.concatenate([np.asarray(c, np.int64) for c in candidates]) if len(candidates) else np.zeros(0, np.int64)
        return cls(
            np.asarray(users, np.int64), np.asarray(times, np.int64),
            np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), items, **optional,
        )

    def select(self, start: int, stop: int) -> RequestBatch:
        """Requests start..stop-1 (a contiguous run, as `FeatureState.replay` yields them)."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return RequestBatch(
            users=self.users[start:stop],
            times=self.times[start:stop],
            indptr=self.indptr[start : stop + 1] - lo,
            items=self.items[lo:hi],
            contexts=None if self.contexts is None else self.contexts[start:stop],
            extra=None if self.extra is None else {k: v[lo:hi] for k, v in self.extra.items()},
            histories=None if self.histories is None else self.histories[start:stop],
        )


@dataclass
class ScoredBatch:
    """The scorer's output over N = all candidates of the batch (CSR as the input).

    scores [N] final (LightGBM) scores (empty without a ranker), match [N] match scores, source [N]
    CATALOGUE | ENCODED | NO_TEXT, features [N, F]; order[r]: positions into request r's candidates,
    best first, at most top_k; with explain, contributions[r] [k, F] and bias[r] [k]."""

    indptr: np.ndarray
    items: np.ndarray
    features: Features
    match: np.ndarray
    source: np.ndarray
    scores: np.ndarray
    order: list[np.ndarray]
    contributions: list[np.ndarray] | None = None
    bias: list[np.ndarray] | None = None

    def ranks(self) -> np.ndarray:
        """[N] 0-based rank of every candidate within its request (needs order over all candidates)."""
        rank = np.empty(len(self.items), np.int64)
        for r, order in enumerate(self.order):
            rank[self.indptr[r] + order] = np.arange(len(order))
        return rank


class RequestScorer:
    """A feature state + optional matcher and ranker: `features`, `score` and `recommend` batches.

    Without a ranker (ranker training, evaluation) it stops at features; context_names / extra_names
    default to the ranker's (None without a ranker: whatever the requests carry)."""

    def __init__(
        self,
        state: FeatureState,
        *,
        ranker: Ranker | None = None,
        matcher: EmbeddingMatcher | None = None,
        context_names: Sequence[str] | None = None,
        extra_names: Sequence[str] | None = None,
    ) -> None:
        if ranker is not None and ranker.uses_match and matcher is None:
            raise ModelError("this ranker was trained with match scores (match_score): pass a matcher")
        self.state = state
        self.ranker = ranker
        self.matcher = matcher if ranker is None or ranker.uses_match else None
        if context_names is None and ranker is not None:
            context_names = ranker.context_names
        self.context_names = None if context_names is None else tuple(context_names)
        if extra_names is None and ranker is not None:
            builtin = set(state.feature_names(True, ranker.context_names))
            extra_names = [n for n in ranker.feature_names if n not in builtin]
        self.extra_names = None if extra_names is None else tuple(extra_names)

    # ------------------------------------------------------------------------------ steps

    def histories(self, batch: RequestBatch) -> list[Histories]:
        """Each request's history: its override, else the state's as of its time."""
        given = batch.histories or [None] * len(batch)
        return [
            h if h is not None else self.state.history(int(u), int(t))
            for u, t, h in zip(batch.users, batch.times, given, strict=True)
        ]

    def user_vectors(self, histories: Sequence[Histories]) -> np.ndarray:
        """One user-tower call for the batch: [R, D]."""
        if self.matcher is None:
            return np.zeros((len(histories), 0), np.float32)
        if len(histories) <= 1:
            return self.matcher.user_vectors(histories[0]) if histories else np.zeros((0, self.matcher.dim), np.float32)
        stacked = Histories(
            np.concatenate([h.item_idx for h in histories]),
            np.concatenate([h.event_code for h in histories]),
            np.concatenate([h.age_s for h in histories]),
        )
        return self.matcher.user_vectors(stacked)

    def features(
        self, batch: RequestBatch, histories: Sequence[Histories] | None = None, vectors: np.ndarray | None = None
    ) -> tuple[Features, np.ndarray, np.ndarray]:
        """-> (Features [N, F], match [N] float64, source [N] int8) for every candidate of the batch."""
        histories = self.histories(batch) if histories is None else histories
        vectors = self.user_vectors(histories) if vectors is None else vectors
        source = self._sources(batch)
        extra = self._extra(batch)
        match = np.zeros(len(batch.items), np.float32)
        blocks: list[np.ndarray] = []
        names: tuple[str, ...] | None = None
        # Row of cold_vectors for each ENCODED candidate.
        cold_row = np.cumsum(source == ENCODED) - 1 if batch.cold_vectors is not None else None
        for r in range(len(batch)):
            lo, hi = int(batch.indptr[r]), int(batch.indptr[r + 1])
            if hi == lo:
                continue
            request_match = (
                self._match(batch, r, source=source, cold_row=cold_row, vectors=vectors) if self.matcher is not None else None
            )
            if request_match is not None:
                match[lo:hi] = request_match
            block = self._compute(
                batch, r, match=request_match, history=histories[r], extra={k: v[lo:hi] for k, v in extra.items()}
            )
            if names is not None and block.names != names:
                raise InputError(
                    f"request {r} has features {block.names}, the batch {names}: give every request the "
                    f"same context and extra keys"
                )
            names = block.names
            blocks.append(block.matrix)
        if names is None:  # no candidates at all
            context = self._context(batch, 0) if len(batch) else {}
            names = self.state.feature_names(self.matcher is not None, tuple(context), tuple(extra))
        matrix = (blocks[0] if len(blocks) == 1 else np.concatenate(blocks)) if blocks else np.zeros((0, len(names)), np.float32)
        return Features(matrix, names), match.astype(np.float64), source

    def _compute(
        self, batch: RequestBatch, r: int, *, match: np.ndarray | None, history: Histories, extra: Mapping[str, np.ndarray]
    ) -> Features:
        """FeatureState.compute for request r (its only caller); cold candidates masked."""
        lo, hi = int(batch.indptr[r]), int(batch.indptr[r + 1])
        items = batch.items[lo:hi]
        cold = np.flatnonzero(items < 0)
        features = self.state.compute(
            int(batch.users[r]), np.where(items >= 0, items, 0) if len(cold) else items, int(batch.times[r]),
            match_scores=match, history=history, context=self._context(batch, r), extra=extra,
        )
        self.state.mask_unseen_items(features, cold, in_catalogue=False)
        return features

    def _match(
        self, batch: RequestBatch, r: int, *, source: np.ndarray, cold_row: np.ndarray | None, vectors: np.ndarray
    ) -> np.ndarray:
        """Match scores [n] of request r: catalogue embeddings, cold text vectors, 0.0 without text."""
        assert self.matcher is not None
        lo, hi = int(batch.indptr[r]), int(batch.indptr[r + 1])
        items, user = batch.items[lo:hi], vectors[r]
        emb = self.matcher.item_embeddings
        if not len(items) or items.min() >= 0:
            return np.asarray(emb[items] @ user, np.float32)
        match = np.zeros(hi - lo, np.float32)
        known = items >= 0
        match[known] = emb[items[known]] @ user
        encoded = np.flatnonzero(source[lo:hi] == ENCODED)
        if len(encoded):
            if batch.cold_vectors is None or cold_row is None:
                raise InputError("cold candidates with text need their vectors (cold_vectors)")
            match[encoded] = batch.cold_vectors[cold_row[lo + encoded]] @ user
        return match

    def _sources(self, batch: RequestBatch) -> np.ndarray:
        known = batch.items >= 0
        source = np.where(known, CATALOGUE, NO_TEXT).astype(np.int8)
        if batch.has_text is not None:
            source[~known & batch.has_text] = ENCODED
        if batch.cold_vectors is not None and len(batch.cold_vectors) != int((source == ENCODED).sum()):
            raise InputError(f"{len(batch.cold_vectors)} cold vectors for {int((source == ENCODED).sum())} cold candidates with text")
        return source

    def _context(self, batch: RequestBatch, r: int) -> dict[str, Any]:
        given = batch.contexts[r] if batch.contexts is not None else {}
        if self.context_names is None:
            return dict(given)
        return {name: given.get(name) for name in self.context_names}

    def _extra(self, batch: RequestBatch) -> dict[str, np.ndarray]:
        given = dict(batch.extra or {})
        if self.extra_names is None:
            return given
        unknown = sorted(set(given) - set(self.extra_names))
        if unknown:
            raise InputError(f"unknown extra feature {unknown[0]!r}: this model takes {', '.join(self.extra_names) or 'none'}")
        n = len(batch.items)
        return {name: given[name] if name in given else np.full(n, np.nan) for name in self.extra_names}

    # ------------------------------------------------------------------------------ scoring

    def score(
        self, batch: RequestBatch, *, top_k: int = 0, explain: bool = False, vectors: np.ndarray | None = None,
        clock: Any = None,
    ) -> ScoredBatch:
        """Features, one LightGBM call, each request's list best first (top_k 0: all candidates; ties
        by position: a stable sort, as LightGBM's piecewise-constant scores tie often). `clock`: a
        stopwatch whose lap(stage) the service uses for its stage histograms (recsys.serving.latency)."""
        if self.ranker is None:
            raise ModelError("this scorer has no ranker: it computes features only")
        histories = self.histories(batch)
        vectors = self.user_vectors(histories) if vectors is None else vectors
        if clock is not None:
            clock.lap("user_tower")
        features, match, source = self.features(batch, histories, vectors)
        if clock is not None:
            clock.lap("features")
        scores = self.ranker.score(features) if len(features.matrix) else np.zeros(0)
        if clock is not None:
            clock.lap("lightgbm")
        order = []
        for r in range(len(batch)):
            lo, hi = int(batch.indptr[r]), int(batch.indptr[r + 1])
            ranked = (self._explore_order(batch, r, scores, match, source) if self.ranker.cold_slots
                      else np.argsort(-scores[lo:hi], kind="stable"))
            order.append(ranked[: hi - lo if top_k <= 0 else top_k])
        if clock is not None:
            clock.lap("topk")
        scored = ScoredBatch(batch.indptr, batch.items, features, match, source, np.asarray(scores, np.float64), order)
        if explain:
            self._explain(scored)
        return scored

    def _explore_order(self, batch: RequestBatch, r: int, scores: np.ndarray, match: np.ndarray,
                       source: np.ndarray) -> np.ndarray:
        """Request r's full order under the ranker's cold-item exploration (`recsys.scoring.explore`):
        of its first `cold_k` places the last `cold_slots` go to the candidates without behaviour
        (not in the catalogue, or no event in the state) that the matcher scores highest (text-less
        ones never), the rest keep the ranker's order."""
        assert self.ranker is not None
        lo, hi = int(batch.indptr[r]), int(batch.indptr[r + 1])
        items, s = batch.items[lo:hi], scores[lo:hi]
        cold = items < 0
        cold[~cold] = self.state.item_count[items[~cold]] == 0
        prior = np.where(source[lo:hi] == NO_TEXT, -np.inf, match[lo:hi]) if self.matcher is not None else np.full(hi - lo, -np.inf)
        k = min(self.ranker.cold_k, hi - lo)
        top = cold_slot_order(s, prior, cold, k=k, slots=min(self.ranker.cold_slots, k))
        rest = np.setdiff1d(np.arange(hi - lo), top)
        return np.concatenate([top, rest[np.argsort(-s[rest], kind="stable")]])

    def _explain(self, scored: ScoredBatch) -> None:
        """SHAP contributions of each request's served rows, one TreeSHAP call for the batch."""
        assert self.ranker is not None
        rows = np.concatenate([scored.indptr[r] + o for r, o in enumerate(scored.order)]).astype(np.int64)
        explanation = self.ranker.explain(Features(scored.features.matrix[rows], scored.features.names))
        bounds = list(itertools.pairwise(np.cumsum([0, *(len(o) for o in scored.order)])))
        scored.contributions = [explanation.contributions[a:b] for a, b in bounds]
        scored.bias = [explanation.bias[a:b] for a, b in bounds]

    def recommend(
        self,
        batch: RequestBatch,
        *,
        retrieve_k: int,
        top_k: int,
        exclude: Sequence[np.ndarray] | None = None,
        include_seen: bool = False,
        explain: bool = False,
    ) -> ScoredBatch:
        """Requests without candidates (batch.items empty, indptr zeros): retrieve each user's top
        `retrieve_k` by cosine, then score them as candidates with the same user vectors."""
        histories = self.histories(batch)
        vectors = self.user_vectors(histories)
        picked = [
            self.retrieve(vectors[r], int(batch.users[r]), histories[r], retrieve_k,
                          exclude=None if exclude is None else exclude[r], include_seen=include_seen)
            for r in range(len(batch))
        ]
        sizes = np.asarray([len(p) for p in picked], np.int64)
        retrieved = replace(
            batch,
            indptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            items=np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, np.int64),
            histories=histories,
        )
        return self.score(retrieved, top_k=top_k, explain=explain, vectors=vectors)

    def retrieve(
        self, vector: np.ndarray, user: int, history: Histories, k: int, *,
        exclude: np.ndarray | None = None, include_seen: bool = False,
    ) -> np.ndarray:
        """Exact top-k item_idx by cosine over the catalogue (one [n_items, D] @ [D] product) minus
        exclusions, best first."""
        if self.matcher is None:
            raise ModelError("retrieval needs a matcher")
        scores = self.matcher.item_embeddings @ vector
        return top_k(scores, k, exclusions(self.state, user, history, exclude=exclude, include_seen=include_seen))


def exclusions(
    state: FeatureState, user: int, history: Histories, *, exclude: np.ndarray | None, include_seen: bool
) -> np.ndarray:
    """item_idx never to recommend: `exclude`, and unless include_seen the items the user interacted
    with (stored) and the items of its history (stored or override)."""
    drop = [np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, np.int64)]
    if not include_seen:
        seen = state.user_item.row(user)[0] if user >= 0 else np.zeros(0, np.int64)
        drop += [seen, history.item_idx[history.item_idx >= 0].astype(np.int64)]
    return np.concatenate(drop).astype(np.int64)
