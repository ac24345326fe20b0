"""Sorted sparse count maps: the user x category / tag / item and item x item (co-visitation) counts.

Keys are `row << 32 | col` in one sorted int64 array, values beside it: a batch update is one merge,
a lookup one searchsorted, and a map saves as two arrays (no pickle).
"""

from __future__ import annotations

import numpy as np

_SHIFT = np.int64(32)  # SparseMap key = row << 32 | col (ids < 2**31)
_COL_MASK = np.int64((1 << 32) - 1)




class SparseMap:
    """(row, col) -> float64 as sorted unique int64 keys (row << 32 | col) and a value array.

    Updates merge a batch in O(nnz + b log b) (in-place adds for known keys, one np.insert for new
    ones); lookups are one searchsorted: no Python per key, and it saves as two arrays.
    """

    def __init__(self, keys: np.ndarray | None = None, values: np.ndarray | None = None) -> None:
        self.keys = np.zeros(0, np.int64) if keys is None else np.asarray(keys, np.int64)
        self.values = np.zeros(0, np.float64) if values is None else np.asarray(values, np.float64)

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def key(rows: np.ndarray | int, cols: np.ndarray | int) -> np.ndarray:
        return (np.asarray(rows, np.int64) << _SHIFT) | np.asarray(cols, np.int64)

    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray | float = 1.0) -> None:
        """values[(rows[j], cols[j])] += values[j] (duplicates summed)."""
        keys = self.key(rows, cols).ravel()
        if not len(keys):
            return
        weights = np.broadcast_to(np.asarray(values, np.float64), keys.shape)
        uniq, inverse = np.unique(keys, return_inverse=True)
        sums = np.bincount(inverse, weights=weights, minlength=len(uniq))
        pos = np.searchsorted(self.keys, uniq)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == uniq[found]
        self.values[pos[found]] += sums[found]
        new = ~found
        if new.any():
            self.keys = np.insert(self.keys, pos[new], uniq[new])
            self.values = np.insert(self.values, pos[new], sums[new])

    def drop_rows(self, rows: np.ndarray) -> None:
        """Remove every entry of `rows` (an evicted user's affinities)."""
        keep = ~np.isin(self.keys >> _SHIFT, np.asarray(rows, np.int64))
        if not keep.all():
            self.keys, self.values = self.keys[keep], self.values[keep]

    def get(self, rows: np.ndarray | int, cols: np.ndarray | int) -> np.ndarray:
        """Values for broadcast (rows, cols); 0 where absent. Shape of the broadcast."""
        keys = self.key(rows, cols)
        flat = keys.ravel()
        pos = np.minimum(np.searchsorted(self.keys, flat), max(len(self.keys) - 1, 0))
        if not len(self.keys):
            return np.zeros(keys.shape, np.float64)
        hit = self.keys[pos] == flat
        return np.where(hit, self.values[pos], 0.0).reshape(keys.shape)

    def get_row(self, row: int, cols: np.ndarray) -> np.ndarray:
        """Values of one row at cols [n]; 0 where absent. Searches only that row's slice of the keys."""
        base = int(row) << 32
        lo, hi = self.keys.searchsorted(base), self.keys.searchsorted(base + (1 << 32))
        if lo == hi:
            return np.zeros(len(cols), np.float64)
        keys = self.keys[lo:hi]
        want = np.asarray(cols, np.int64) | base
        pos = keys.searchsorted(want)
        np.minimum(pos, hi - lo - 1, out=pos)
        out = self.values[lo:hi][pos]
        out[keys[pos] != want] = 0.0
        return out

    def row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(cols, values) of one row, cols ascending."""
        lo, hi = np.searchsorted(self.keys, [np.int64(row) << _SHIFT, np.int64(row + 1) << _SHIFT])
        return (self.keys[lo:hi] & _COL_MASK).astype(np.int64), self.values[lo:hi]
