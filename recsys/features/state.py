"""The feature state: everything the features know, learned from the events applied so far.

`FeatureState` holds everything learned from events strictly before some time T, as NumPy arrays
indexed by item_idx / user_idx plus sorted sparse maps (`SparseMap`) for user x category, user x tag,
user x item and item x item (co-visitation) counts, and a per-user ring buffer of recent
interactions (the user history the matcher and co-visitation read).

* `apply(events)` adds a batch of events, vectorised. Building from scratch is `apply(all events)`
  on an empty state, so "incremental == rebuild" holds by construction for batches split at strict
  time boundaries (tested).
* `replay(events, times)` is the one point-in-time loop (ranker training and evaluation): it applies
  only the events strictly before each request time and yields the requests that see one state.
* `compute` (see compute.py) turns the state into one request's features.

Windowed popularity/activity are exponentially decayed counts, value(t) = sum_i exp(-(t - t_i)/tau),
with tau = 1d / 7d / 30d: exactly updatable per event, exact at any query time, and needing no event
buffer for expiry (a hard sliding window would). Each row keeps its own reference time, so an update
only touches the rows it changes.

Interactions: positive events (strength > 0) of one (user, item, request_id) are one interaction
(a click -> cart -> purchase funnel counts once, at its first time, with its strongest event), as in
`recsys prepare`; events without a request_id are each their own interaction. Popularity, CTR
numerators, histories and co-visitation count interactions; category/tag affinities sum the strength
of every positive event. A funnel event whose interaction already left the user's last
`max_history` interactions starts a new one (rare; the only way batching can change the state).

Serialisation: `save(dir)` writes state.npz (arrays, loaded with allow_pickle=False) + state.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.data.prepared import Histories
from recsys.errors import InputError, ModelError
from recsys.features.catalogue import (
    DAY_US,
    NEVER,
    NOT_YET,
    Catalogue,
    EventBatch,
    FeatureConfig,
    context_vocabulary,
    to_us,
)
from recsys.features.compute import compute as compute_features
from recsys.features.compute import layout
from recsys.features.compute import mask_unseen_items as mask_unseen
from recsys.features.sparse import AddPlan, SparseMap

STATE_FORMAT = 3  # 2 added the directed transition map `trans`; 3 dropped it again (no gain)
# Formats `load` reads: their maps are this format's, and a format-2 file's `trans.*` arrays are ignored.
READABLE_FORMATS = (1, 2, 3)

def _run_starts(*keys: np.ndarray) -> np.ndarray:
    """Indices where any of the (already sorted) key arrays changes value; always includes 0."""
    n = len(keys[0])
    change = np.zeros(n, dtype=bool)
    if n:
        change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def _grow(array: np.ndarray, n: int, fill: Any) -> np.ndarray:
    """Pad axis 0 of `array` to length n with `fill` (users appear as the stream goes on)."""
    if len(array) >= n:
        return array
    pad = np.full((n - len(array), *array.shape[1:]), fill, dtype=array.dtype)
    return np.concatenate([array, pad])



# --------------------------------------------------------------------------------------------------

_ITEM_ARRAYS = (
    "item_count",
    "item_decay",
    "item_decay_ref",
    "item_impr",
    "item_clicks",
    "item_first_us",
    "item_last_us",
)
_USER_ARRAYS = (
    "user_count",
    "user_decay",
    "user_decay_ref",
    "user_impr",
    "user_clicks",
    "user_strength",
    "user_last_us",
    "hist_item",
    "hist_code",
    "hist_strength",
    "hist_ts",
    "hist_req",
)
_SPARSE = ("user_cat", "user_tag", "user_item", "user_item_impr", "covis")
_USER_FILL: dict[str, Any] = {
    "user_decay_ref": NEVER,
    "user_last_us": NEVER,
    "hist_item": -1,
    "hist_code": -1,
    "hist_ts": NEVER,
    "hist_req": -1,
}


@dataclass
class FeatureState:
    """Everything the features know, learned from the events applied so far (see module doc).

    Item arrays [n_items] (decay: [n_items, W]); user arrays [n_users] (decay [n_users, W]; history
    ring buffer [n_users, H], most recent first, -1 padded); sparse maps keyed (row, col).
    """

    config: FeatureConfig
    catalogue: Catalogue
    context_vocab: dict[str, list[str]]
    item_count: np.ndarray
    item_decay: np.ndarray
    item_decay_ref: np.ndarray
    item_impr: np.ndarray
    item_clicks: np.ndarray
    item_first_us: np.ndarray
    item_last_us: np.ndarray
    user_count: np.ndarray
    user_decay: np.ndarray
    user_decay_ref: np.ndarray
    user_impr: np.ndarray
    user_clicks: np.ndarray
    user_strength: np.ndarray
    user_last_us: np.ndarray
    hist_item: np.ndarray
    hist_code: np.ndarray
    hist_strength: np.ndarray
    hist_ts: np.ndarray
    hist_req: np.ndarray
    user_cat: SparseMap = field(default_factory=SparseMap)
    user_tag: SparseMap = field(default_factory=SparseMap)
    user_item: SparseMap = field(default_factory=SparseMap)
    user_item_impr: SparseMap = field(default_factory=SparseMap)
    covis: SparseMap = field(default_factory=SparseMap)
    global_impr: float = 0.0
    global_clicks: float = 0.0
    as_of_us: int = int(NEVER)  # latest event time applied
    n_users: int = 0  # users known (user arrays may hold spare capacity beyond this)

    # ---------------------------------------------------------------- construction

    @classmethod
    def empty(
        cls,
        catalogue: Catalogue,
        n_users: int = 0,
        config: FeatureConfig | None = None,
        context_vocab: Mapping[str, Sequence[str]] | None = None,
    ) -> FeatureState:
        config = config or FeatureConfig()
        n, w, h = catalogue.n_items, len(config.decay_days), config.max_history
        return cls(
            config=config,
            catalogue=catalogue,
            context_vocab={k: list(v) for k, v in (context_vocab or {}).items()},
            item_count=np.zeros(n),
            item_decay=np.zeros((n, w)),
            item_decay_ref=np.full(n, NEVER, np.int64),
            item_impr=np.zeros(n),
            item_clicks=np.zeros(n),
            item_first_us=np.full(n, NOT_YET, np.int64),
            item_last_us=np.full(n, NEVER, np.int64),
            user_count=np.zeros(n_users),
            user_decay=np.zeros((n_users, w)),
            user_decay_ref=np.full(n_users, NEVER, np.int64),
            user_impr=np.zeros(n_users),
            user_clicks=np.zeros(n_users),
            user_strength=np.zeros(n_users),
            user_last_us=np.full(n_users, NEVER, np.int64),
            hist_item=np.full((n_users, h), -1, np.int32),
            hist_code=np.full((n_users, h), -1, np.int8),
            hist_strength=np.zeros((n_users, h), np.float32),
            hist_ts=np.full((n_users, h), NEVER, np.int64),
            hist_req=np.full((n_users, h), -1, np.int64),
            n_users=n_users,
        )

    @classmethod
    def build(
        cls,
        items: pl.DataFrame,
        events: pl.DataFrame,
        before: Any = None,
        config: FeatureConfig | None = None,
        n_users: int = 0,
    ) -> FeatureState:
        """State from the prepared items and events, using only events with timestamp < `before`
        (all when None). Context vocabularies come from every event's context columns (the values a
        request can carry, not outcomes)."""
        config = config or FeatureConfig()
        catalogue = Catalogue.from_items(items, config.item_numeric)
        if config.item_numeric is None:
            config = FeatureConfig.from_dict({**config.to_dict(), "item_numeric": catalogue.numeric_names})
        vocab, config = context_vocabulary(events, config)
        state = cls.empty(catalogue, n_users, config, vocab)
        frame = events.sort("timestamp", maintain_order=True)
        if before is not None:
            frame = frame.filter(pl.col("timestamp").dt.epoch("us") < to_us(before))
        state.apply(EventBatch.from_frame(frame))
        return state

    @property
    def n_items(self) -> int:
        return self.catalogue.n_items

    def _ensure_users(self, n: int) -> None:
        if n > len(self.user_count):
            capacity = max(n, int(len(self.user_count) * 1.25) + 16)  # amortised growth for streams
            for name in _USER_ARRAYS:
                setattr(self, name, _grow(getattr(self, name), capacity, _USER_FILL.get(name, 0)))
        self.n_users = max(self.n_users, n)

    def forget_users(self, rows: np.ndarray) -> None:
        """Reset user rows to a brand-new user's state (bounded user state reuses evicted rows:
        recsys.serving.users). Item-side statistics the users contributed are kept."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return
        for name in _USER_ARRAYS:
            getattr(self, name)[rows] = _USER_FILL.get(name, 0)
        for sparse in (self.user_cat, self.user_tag, self.user_item, self.user_item_impr):
            sparse.drop_rows(rows)

    def defer_merges(self) -> None:
        """Sparse maps leave their delta merges to `prepare_merges` / `install_merges` (the follower)."""
        for name in _SPARSE:
            getattr(self, name).defer_merges = True

    def prepare_merges(self) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
        """The sparse maps' due delta merges, built without changing the state (requests may read it)."""
        merges = {name: getattr(self, name).prepare_merge() for name in _SPARSE}
        return {name: merge for name, merge in merges.items() if merge is not None}

    def install_merges(self, merges: Mapping[str, tuple[int, np.ndarray, np.ndarray]]) -> None:
        """Swap prepared merges in (under the writer's lock; O(1) each)."""
        for name, merge in merges.items():
            getattr(self, name).install_merge(merge)

    # ---------------------------------------------------------------- updates

    def apply(self, events: EventBatch | pl.DataFrame) -> None:
        """Add a batch of events (any order inside the batch; batches in time order). Vectorised."""
        batch = events if isinstance(events, EventBatch) else EventBatch.from_frame(events)
        if not len(batch):
            return
        self._seen(batch.user_idx, batch.item_idx, batch.ts_us)
        exposure = np.flatnonzero(batch.strength <= 0)
        self._count_impressions(batch.user_idx[exposure], batch.item_idx[exposure])
        pos = batch.take(np.flatnonzero(batch.strength > 0))
        if not len(pos):
            return
        # Strength-weighted affinities and seen counts: every positive event.
        np.add.at(self.user_strength, pos.user_idx, pos.strength)
        np.maximum.at(self.item_last_us, pos.item_idx, pos.ts_us)
        np.maximum.at(self.user_last_us, pos.user_idx, pos.ts_us)
        self.user_item.add(pos.user_idx, pos.item_idx)
        cat = self.catalogue.category[pos.item_idx]
        has_cat = cat >= 0
        self.user_cat.add(pos.user_idx[has_cat], cat[has_cat], pos.strength[has_cat])
        ptr = self.catalogue.tag_indptr
        n_tags = ptr[pos.item_idx + 1] - ptr[pos.item_idx]
        if n_tags.sum():
            rows = np.repeat(np.arange(len(pos)), n_tags)
            offsets = np.arange(len(rows)) - np.repeat(np.cumsum(n_tags) - n_tags, n_tags)
            tags = self.catalogue.tag_ids[ptr[pos.item_idx][rows] + offsets]
            self.user_tag.add(pos.user_idx[rows], tags, pos.strength[rows])
        self._apply_interactions(self._new_interactions(pos))

    def apply_impressions(
        self, user_idx: np.ndarray, item_idx: np.ndarray, ts_us: np.ndarray, prepared: AddPlan | None = None
    ) -> None:
        """Impressions [n] (served lists): exactly `apply` of the same events with strength 0, without
        an EventBatch (no request keys, strengths or event codes to compute: none of them is read).
        `prepared`: user_item_impr.prepare_add(user_idx, item_idx), built outside the writer's lock."""
        if not len(item_idx):
            return
        self._seen(user_idx, item_idx, ts_us)
        self._count_impressions(user_idx, item_idx, prepared)

    def _seen(self, user_idx: np.ndarray, item_idx: np.ndarray, ts_us: np.ndarray) -> None:
        """What every event changes: checks its indices, makes room for its user, item first-seen, as-of."""
        if item_idx.min() < 0 or item_idx.max() >= self.n_items:
            bad = int(item_idx[(item_idx < 0) | (item_idx >= self.n_items)][0])
            raise InputError(f"event for item_idx {bad}, outside the catalogue (0..{self.n_items - 1})")
        if user_idx.min() < 0:
            raise InputError(f"event for user_idx {int(user_idx.min())}: user indices must be >= 0")
        self._ensure_users(int(user_idx.max()) + 1)
        np.minimum.at(self.item_first_us, item_idx, ts_us)
        self.as_of_us = max(self.as_of_us, int(ts_us.max()))

    def _count_impressions(self, user_idx: np.ndarray, item_idx: np.ndarray, prepared: AddPlan | None = None) -> None:
        """Exposures (strength <= 0 events): impression counts of items, users, user x item, global."""
        if not len(item_idx):
            return
        np.add.at(self.item_impr, item_idx, 1.0)
        np.add.at(self.user_impr, user_idx, 1.0)
        if prepared is not None:
            self.user_item_impr.install_add(prepared)
        else:
            self.user_item_impr.add(user_idx, item_idx)
        self.global_impr += len(item_idx)

    def _new_interactions(self, pos: EventBatch) -> EventBatch:
        """Collapse positives to interactions; merge funnel events into interactions already in the
        history buffer. Returns the new interactions sorted by (user, time, item)."""
        # Runs of (user, item, request) sorted by strength: last = strongest, min ts = first time.
        solo = pos.request < 0
        group = np.where(solo, -2 - np.arange(len(pos)), pos.request)  # unique group for no-request events
        order = np.lexsort((pos.ts_us, pos.strength, group, pos.item_idx, pos.user_idx))
        p = pos.take(order)
        group = group[order]
        starts = _run_starts(p.user_idx, p.item_idx, group)
        last = np.append(starts[1:], len(p)) - 1
        inter = p.take(last)
        inter = EventBatch(
            inter.user_idx,
            inter.item_idx,
            np.minimum.reduceat(p.ts_us, starts),
            inter.strength,
            inter.event_code,
            inter.request,
        )
        # Merge into buffered interactions of the same (user, item, request).
        has_req = np.flatnonzero(inter.request >= 0)
        if len(has_req):
            users = inter.user_idx[has_req]
            match = (self.hist_item[users] == inter.item_idx[has_req, None]) & (
                self.hist_req[users] == inter.request[has_req, None]
            )
            merged = match.any(1)
            if merged.any():
                rows, slot = users[merged], match[merged].argmax(1)
                src = has_req[merged]
                stronger = inter.strength[src] > self.hist_strength[rows, slot]
                self.hist_code[rows[stronger], slot[stronger]] = inter.event_code[src[stronger]]
                self.hist_strength[rows[stronger], slot[stronger]] = inter.strength[src[stronger]]
                keep = np.ones(len(inter), dtype=bool)
                keep[src] = False
                inter = inter.take(np.flatnonzero(keep))
        return inter.take(np.lexsort((inter.item_idx, inter.ts_us, inter.user_idx)))

    def _decay_add(self, values: np.ndarray, refs: np.ndarray, rows: np.ndarray, ts: np.ndarray) -> None:
        """values[r] (decayed to refs[r]) += sum exp(-(ref_new - t)/tau) over events of row r."""
        taus = np.asarray(self.config.decay_days) * DAY_US
        uniq, inverse = np.unique(rows, return_inverse=True)
        latest = np.full(len(uniq), NEVER, np.int64)
        np.maximum.at(latest, inverse, ts)
        old = refs[uniq]
        new_ref = np.maximum(old, latest)
        age_old = np.where(old == NEVER, 0, new_ref - old).astype(np.float64)
        values[uniq] *= np.exp(-age_old[:, None] / taus)
        age_new = (new_ref[inverse] - ts).astype(np.float64)
        contrib = np.exp(-age_new[:, None] / taus)  # [b, W]
        for w in range(len(taus)):
            values[uniq, w] += np.bincount(inverse, weights=contrib[:, w], minlength=len(uniq))
        refs[uniq] = new_ref

    def _apply_interactions(self, new: EventBatch) -> None:
        if not len(new):
            return
        np.add.at(self.item_count, new.item_idx, 1.0)
        np.add.at(self.user_count, new.user_idx, 1.0)
        self._decay_add(self.item_decay, self.item_decay_ref, new.item_idx, new.ts_us)
        self._decay_add(self.user_decay, self.user_decay_ref, new.user_idx, new.ts_us)
        served = new.request >= 0  # outcome of a served slate: counts toward CTR
        np.add.at(self.item_clicks, new.item_idx[served], 1.0)
        np.add.at(self.user_clicks, new.user_idx[served], 1.0)
        self.global_clicks += float(served.sum())

        # Co-visitation: sequence = user's last `lag` buffered items (oldest first) + new ones.
        lag, h = self.config.covis_lag, self.config.max_history
        starts = _run_starts(new.user_idx)
        users = new.user_idx[starts]
        prev = self.hist_item[users, :lag][:, ::-1]  # [U, lag] chronological
        prev_ok = prev >= 0
        seq_user = np.concatenate([np.repeat(users, lag)[prev_ok.ravel()], new.user_idx])
        seq_item = np.concatenate([prev.ravel()[prev_ok.ravel()], new.item_idx])
        seq_new = np.concatenate([np.zeros(int(prev_ok.sum()), bool), np.ones(len(new), bool)])
        seq_pos = np.concatenate(
            [np.tile(np.arange(lag), len(users))[prev_ok.ravel()], lag + np.arange(len(new))]
        )
        order = np.lexsort((seq_pos, seq_user))
        seq_user, seq_item, seq_new = seq_user[order], seq_item[order], seq_new[order]
        a_parts, b_parts = [], []
        for k in range(1, lag + 1):
            ok = (seq_user[k:] == seq_user[:-k]) & seq_new[k:] & (seq_item[k:] != seq_item[:-k])
            a_parts.append(seq_item[:-k][ok])
            b_parts.append(seq_item[k:][ok])
        a, b = np.concatenate(a_parts), np.concatenate(b_parts)
        self.covis.add(np.concatenate([a, b]), np.concatenate([b, a]))

        # History ring buffers: prepend the user's new interactions (newest first), keep h.
        counts = np.diff(np.append(starts, len(new)))
        take = np.minimum(counts, h)
        j = np.arange(h)[None, :]
        from_new = j < take[:, None]
        new_src = (starts + counts - 1)[:, None] - j  # newest first
        old_src = np.clip(j - take[:, None], 0, h - 1)
        for name, values in (
            ("hist_item", new.item_idx),
            ("hist_code", new.event_code),
            ("hist_strength", new.strength),
            ("hist_ts", new.ts_us),
            ("hist_req", new.request),
        ):
            buf = getattr(self, name)
            old = np.take_along_axis(buf[users], old_src, 1)
            buf[users] = np.where(from_new, values[np.where(from_new, new_src, 0)].astype(buf.dtype), old)

    # ---------------------------------------------------------------- reading

    def history(self, user_idx: int, t: Any) -> Histories:
        """The user's interactions as of the state, ages relative to t: Histories [1, H]."""
        h = self.config.max_history
        if not 0 <= user_idx < self.n_users:
            return Histories(
                np.full((1, h), -1, np.int32), np.full((1, h), -1, np.int8), np.zeros((1, h), np.float32)
            )
        items = self.hist_item[user_idx : user_idx + 1]
        age = np.where(items >= 0, (to_us(t) - self.hist_ts[user_idx : user_idx + 1]) / 1e6, 0.0)
        return Histories(items.copy(), self.hist_code[user_idx : user_idx + 1].copy(), age.astype(np.float32))

    def feature_names(
        self, match: bool = True, context: Sequence[str] = (), extra: Sequence[str] = ()
    ) -> tuple[str, ...]:
        """Column names `compute` returns for these optional groups, in order."""
        return layout(
            tuple(self.config.decay_days), self.catalogue.numeric_names, match, tuple(sorted(context)), tuple(sorted(extra))
        )[0]

    # Features of one request (`recsys.features.compute.compute`); its one caller is the request
    # scorer, `recsys.scoring.request.RequestScorer`, which every path goes through.
    compute = compute_features

    @property
    def ctr_prior(self) -> float:
        """The smoothing prior of the CTR features: global clicks / impressions (NaN before any)."""
        return min(self.global_clicks / self.global_impr, 1.0) if self.global_impr > 0 else math.nan

    # Rows of a feature matrix as items without behaviour (`recsys.features.compute.mask_unseen_items`).
    mask_unseen_items = mask_unseen

    def replay(self, events: EventBatch, times: np.ndarray, refresh_us: int = 0) -> Iterator[np.ndarray]:
        """The point-in-time loop: request times [R] in ascending order -> yields runs of request
        positions that see one state, after applying exactly the `events` (sorted by time) strictly
        before their time. Events the state already holds (by time) are skipped. Mutates the state.

        refresh_us > 0 trades exactness for speed on very large logs: the state is brought up to a
        request's time only when `refresh_us` has passed since the last refresh, so features may be
        stale by up to that much but never see an event at or after the request time."""
        times = np.asarray(times, np.int64)
        stamps = events.ts_us
        done = int(np.searchsorted(stamps, self.as_of_us, side="right")) if self.as_of_us > NEVER else 0
        refreshed, start = int(NEVER), 0
        for r in range(len(times)):
            t = int(times[r])
            if t - refreshed < refresh_us:
                continue
            refreshed = t
            upto = int(np.searchsorted(stamps, t, side="left"))  # events strictly before t
            if upto > done:
                if r > start:
                    yield np.arange(start, r)
                    start = r
                self.apply(events.slice(done, upto))
                done = upto
        if len(times) > start:
            yield np.arange(start, len(times))

    def catch_up(self, events: EventBatch) -> None:
        """Apply the `events` (sorted by time) later than the state's last one."""
        self.apply(events.slice(int(np.searchsorted(events.ts_us, self.as_of_us, side="right")), len(events)))

    # ---------------------------------------------------------------- persistence

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the state by name (sparse maps as <name>.keys / <name>.values)."""
        out = {name: getattr(self, name) for name in _ITEM_ARRAYS}
        out.update({name: getattr(self, name)[: self.n_users] for name in _USER_ARRAYS})
        for name in _SPARSE:
            sparse: SparseMap = getattr(self, name)
            out[f"{name}.keys"], out[f"{name}.values"] = sparse.arrays()
        cat = self.catalogue
        out.update(
            {
                "catalogue.category": cat.category,
                "catalogue.tag_indptr": cat.tag_indptr,
                "catalogue.tag_ids": cat.tag_ids,
                "catalogue.numeric": cat.numeric,
                "catalogue.created_us": cat.created_us,
            }
        )
        return out

    def save(self, directory: Path | str) -> Path:
        """Write state.npz + state.json into `directory` (no pickle)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = self.arrays()
        np.savez(directory / "state.npz", **arrays)
        meta = {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "context_vocab": self.context_vocab,
            "categories": list(self.catalogue.categories),
            "tags": list(self.catalogue.tags),
            "numeric_names": list(self.catalogue.numeric_names),
            "global_impr": self.global_impr,
            "global_clicks": self.global_clicks,
            "as_of_us": self.as_of_us,
        }
        (directory / "state.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: Path | str) -> FeatureState:
        directory = Path(directory)
        try:
            meta = json.loads((directory / "state.json").read_text())
            npz = np.load(directory / "state.npz", allow_pickle=False)
            arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(
                f"cannot read feature state in {directory}: {exc}. Rebuild it with recsys train ranker"
            ) from exc
        if meta.get("format") not in READABLE_FORMATS:
            raise ModelError(
                f"feature state {directory} has format {meta.get('format')}, this code reads formats "
                f"{list(READABLE_FORMATS)}: retrain with recsys train ranker (or serve it with the version that wrote it)"
            )
        catalogue = Catalogue(
            category=arrays["catalogue.category"],
            categories=tuple(meta["categories"]),
            tag_indptr=arrays["catalogue.tag_indptr"],
            tag_ids=arrays["catalogue.tag_ids"],
            tags=tuple(meta["tags"]),
            numeric=arrays["catalogue.numeric"],
            numeric_names=tuple(meta["numeric_names"]),
            created_us=arrays["catalogue.created_us"],
        )
        state = cls.empty(catalogue, 0, FeatureConfig.from_dict(meta["config"]), meta["context_vocab"])
        for name in (*_ITEM_ARRAYS, *_USER_ARRAYS):
            setattr(state, name, arrays[name])
        state.n_users = len(state.user_count)
        for name in _SPARSE:
            setattr(state, name, SparseMap(arrays[f"{name}.keys"], arrays[f"{name}.values"]))
        state.global_impr, state.global_clicks = float(meta["global_impr"]), float(meta["global_clicks"])
        state.as_of_us = int(meta["as_of_us"])
        return state

