"""Sorted sparse count maps: the user x category / tag / item and item x item (co-visitation) counts.

Keys are `row << 32 | col` in sorted int64 arrays, values beside them: a lookup is a searchsorted, a
batch update no Python per key, and a map saves as two arrays (no pickle).

Two levels, as LSM trees (LevelDB, RocksDB) and Lucene's segment merging keep writes off the big
structure: a large sorted base and a small sorted delta holding only keys the base lacks. A batch
adds in place to keys either level holds and inserts its new keys into the delta, so a fold copies
the delta (bounded by a fraction of the base), not the whole map; the delta is merged into the base
once it outgrows max(MIN_DELTA, len(base) / DELTA_FRACTION). Amortised, a batch of b keys costs
O(b log b + |delta| + nnz * b_new / threshold) instead of O(nnz): served lists folded as impressions
every 0.25 s no longer copy a 10M-entry map per fold (bench/sparse.py). A server's follower goes
further: with `defer_merges` it builds the merged base outside the state's write lock
(`prepare_merge`, a read) and only swaps it in under the lock (`install_merge`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_SHIFT = np.int64(32)  # SparseMap key = row << 32 | col (ids < 2**31)
_COL_MASK = np.int64((1 << 32) - 1)
_EMPTY_KEYS = np.zeros(0, np.int64)
_EMPTY_VALUES = np.zeros(0, np.float64)


def _find(keys: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions of `want` in sorted `keys`, found mask)."""
    pos = np.searchsorted(keys, want)
    found = pos < len(keys)
    found[found] = keys[pos[found]] == want[found]
    return pos, found


def _merge(keys: np.ndarray, values: np.ndarray, more_keys: np.ndarray, more_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted union of two disjoint sorted key arrays (new arrays; the inputs are left as they are)."""
    if not len(more_keys):
        return keys, values
    pos = np.searchsorted(keys, more_keys)
    return np.insert(keys, pos, more_keys), np.insert(values, pos, more_values)


@dataclass
class AddPlan:
    """A prepared `SparseMap.add`: sums for keys the base holds (at base_pos), and either sums for keys
    the delta holds (at delta_pos) or the whole new delta (new keys inserted, sums added)."""

    version: int
    base_pos: np.ndarray
    base_sums: np.ndarray
    delta_pos: np.ndarray = field(default_factory=lambda: _EMPTY_KEYS)
    delta_sums: np.ndarray = field(default_factory=lambda: _EMPTY_VALUES)
    delta: tuple[np.ndarray, np.ndarray] | None = None


class SparseMap:
    """(row, col) -> float64 as sorted unique int64 keys (row << 32 | col) and values, in two levels
    (base + delta, disjoint keys; see the module docstring).

    `arrays()` gives the one sorted (keys, values) pair the map saves as, whatever its levels hold,
    so snapshots keep their format and old ones load as a base.
    """

    MIN_DELTA = 65_536  # the delta may always grow this far before a merge
    DELTA_FRACTION = 8  # ... or to len(base) / DELTA_FRACTION
    MERGE_BACKSTOP = 4  # with defer_merges, `add` still merges a delta this many limits large

    def __init__(self, keys: np.ndarray | None = None, values: np.ndarray | None = None) -> None:
        self._keys = _EMPTY_KEYS.copy() if keys is None else np.asarray(keys, np.int64)
        self._values = _EMPTY_VALUES.copy() if values is None else np.asarray(values, np.float64)
        self._dkeys, self._dvalues = _EMPTY_KEYS.copy(), _EMPTY_VALUES.copy()
        self.defer_merges = False  # the owner merges with prepare_merge / install_merge (the server's follower)
        self._version = 0  # bumped by every change: an install_merge prepared before one is refused

    def __len__(self) -> int:
        return len(self._keys) + len(self._dkeys)

    @staticmethod
    def key(rows: np.ndarray | int, cols: np.ndarray | int) -> np.ndarray:
        return (np.asarray(rows, np.int64) << _SHIFT) | np.asarray(cols, np.int64)

    @property
    def delta_limit(self) -> int:
        """Delta size beyond which `add` merges it into the base."""
        return max(self.MIN_DELTA, len(self._keys) // self.DELTA_FRACTION)

    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray | float = 1.0) -> None:
        """values[(rows[j], cols[j])] += values[j] (duplicates summed)."""
        plan = self.prepare_add(rows, cols, values)
        if plan is not None:
            self.install_add(plan)

    def prepare_add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray | float = 1.0) -> AddPlan | None:
        """`add`'s work that only reads the map: summing duplicates, finding keys in both levels and
        building the delta with the new keys inserted (the O(|delta|) copy). The map's only writer (the
        server's follower) runs it outside the state's write lock and `install_add`s the plan under it,
        as it does with merges. None when there is nothing to add."""
        keys = self.key(rows, cols).ravel()
        if not len(keys):
            return None
        weights = np.broadcast_to(np.asarray(values, np.float64), keys.shape)
        uniq, inverse = np.unique(keys, return_inverse=True)
        sums = np.bincount(inverse, weights=weights, minlength=len(uniq))
        pos, found = _find(self._keys, uniq)
        plan = AddPlan(self._version, pos[found], sums[found])
        if found.all():
            return plan
        uniq, sums = uniq[~found], sums[~found]
        pos, found = _find(self._dkeys, uniq)
        new = ~found
        if not new.any():
            plan.delta_pos, plan.delta_sums = pos, sums
            return plan
        at = pos[new]  # ascending (uniq is): an old delta entry at p moves to p + inserts at or before p
        plan.delta = (np.insert(self._dkeys, at, uniq[new]), np.insert(self._dvalues, at, sums[new]))
        moved = pos[found] + np.searchsorted(at, pos[found], side="right")
        plan.delta[1][moved] += sums[found]
        return plan

    def install_add(self, plan: AddPlan) -> None:
        """Apply a prepared add (O(keys found in the base) and a swap). Refused when the map changed
        since it was prepared (its one writer prepares and installs in turn; anything else is a bug)."""
        if plan.version != self._version:
            raise RuntimeError("SparseMap.install_add: the map changed since the add was prepared")
        self._version += 1
        self._values[plan.base_pos] += plan.base_sums
        if plan.delta is not None:
            self._dkeys, self._dvalues = plan.delta
            if len(self._dkeys) > self.delta_limit * (self.MERGE_BACKSTOP if self.defer_merges else 1):
                self.compact()
        elif len(plan.delta_pos):
            self._dvalues[plan.delta_pos] += plan.delta_sums

    def compact(self) -> None:
        """Merge the delta into the base (one O(nnz) copy)."""
        if len(self._dkeys):
            self.install_merge((self._version, *self.arrays()))

    def prepare_merge(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        """When the delta is over its limit: the merged base, built without changing the map (a read:
        requests may read the map meanwhile, so the O(nnz) copy need not hold a writer's lock), for
        `install_merge` to swap in. None when no merge is due."""
        if len(self._dkeys) <= self.delta_limit:
            return None
        return (self._version, *self.arrays())

    def install_merge(self, merge: tuple[int, np.ndarray, np.ndarray]) -> bool:
        """Swap in a prepared merge (O(1)); refused (False) when the map changed since it was prepared."""
        version, keys, values = merge
        if version != self._version:
            return False
        self._keys, self._values = keys, values
        self._dkeys, self._dvalues = _EMPTY_KEYS.copy(), _EMPTY_VALUES.copy()
        self._version += 1
        return True

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values): every entry as one sorted pair, the format a map saves as. Does not change
        the map (a snapshot reads it while requests read it too); the base itself when the delta is
        empty, else a merged copy."""
        return _merge(self._keys, self._values, self._dkeys, self._dvalues)

    def drop_rows(self, rows: np.ndarray) -> None:
        """Remove every entry of `rows` (an evicted user's affinities)."""
        rows = np.asarray(rows, np.int64)
        for keys_name, values_name in (("_keys", "_values"), ("_dkeys", "_dvalues")):
            keys = getattr(self, keys_name)
            keep = ~np.isin(keys >> _SHIFT, rows)
            if not keep.all():
                self._version += 1
                setattr(self, keys_name, keys[keep])
                setattr(self, values_name, getattr(self, values_name)[keep])

    def get(self, rows: np.ndarray | int, cols: np.ndarray | int) -> np.ndarray:
        """Values for broadcast (rows, cols); 0 where absent. Shape of the broadcast."""
        keys = self.key(rows, cols)
        flat = keys.ravel()
        out = np.zeros(flat.shape, np.float64)
        for level_keys, level_values in ((self._keys, self._values), (self._dkeys, self._dvalues)):
            if len(level_keys):
                pos, found = _find(level_keys, flat)
                out[found] += level_values[pos[found]]
        return out.reshape(keys.shape)

    def _row_slice(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of one row over both levels, keys ascending (views when one level holds it)."""
        base, top = int(row) << 32, (int(row) + 1) << 32
        lo, hi = self._keys.searchsorted(base), self._keys.searchsorted(top)
        keys, values = self._keys[lo:hi], self._values[lo:hi]
        if len(self._dkeys):
            dlo, dhi = self._dkeys.searchsorted(base), self._dkeys.searchsorted(top)
            if dhi > dlo and hi > lo:  # a few entries each: concatenate and sort beats two lookups
                keys = np.concatenate((keys, self._dkeys[dlo:dhi]))
                order = keys.argsort()
                keys, values = keys[order], np.concatenate((values, self._dvalues[dlo:dhi]))[order]
            elif dhi > dlo:
                keys, values = self._dkeys[dlo:dhi], self._dvalues[dlo:dhi]
        return keys, values

    def get_row(self, row: int, cols: np.ndarray) -> np.ndarray:
        """Values of one row at cols [n]; 0 where absent. Searches only that row's slice of each level."""
        keys, values = self._row_slice(row)
        if not len(keys):
            return np.zeros(len(cols), np.float64)
        want = np.asarray(cols, np.int64) | (int(row) << 32)
        pos = keys.searchsorted(want)
        np.minimum(pos, len(keys) - 1, out=pos)
        out = values[pos]
        out[keys[pos] != want] = 0.0
        return out

    def row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(cols, values) of one row, cols ascending."""
        keys, values = self._row_slice(row)
        return (keys & _COL_MASK).astype(np.int64), values
