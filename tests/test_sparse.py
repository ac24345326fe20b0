"""SparseMap's two levels (sorted base + delta) against a dict reference, and its saved format."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from recsys.data.prepared import PreparedData
from recsys.features import EventBatch, FeatureState, SparseMap
from recsys.features.state import _SPARSE


def _reference_arrays(ref: dict[tuple[int, int], float]) -> tuple[np.ndarray, np.ndarray]:
    """The one sorted (keys, values) pair the single-array map held (and saved) for these entries."""
    keys = np.array(sorted((r << 32) | c for r, c in ref), np.int64)
    values = np.array([ref[(int(k) >> 32, int(k) & 0xFFFFFFFF)] for k in keys], np.float64)
    return keys, values


@pytest.mark.parametrize("seed", range(6))
def test_two_level_map_equals_a_dict_across_merges(seed: int) -> None:
    """Random add / drop_rows / get / get_row / row sequences with a tiny delta limit, so the delta is
    merged into the base many times; every read agrees with a dict after every step."""
    rng = np.random.default_rng(seed)
    sparse = SparseMap()
    sparse.MIN_DELTA, sparse.DELTA_FRACTION = int(rng.integers(1, 40)), int(rng.integers(2, 9))
    ref: dict[tuple[int, int], float] = defaultdict(float)
    n_rows, n_cols, merges, had_both = 30, 60, 0, 0
    for _ in range(150):
        op = rng.random()
        if op < 0.65:
            b = int(rng.integers(0, 40))
            rows, cols = rng.integers(0, n_rows, b), rng.integers(0, n_cols, b)
            values = rng.random(b) if rng.random() < 0.5 else 1.0
            before = len(sparse._dkeys)
            sparse.add(rows, cols, values)
            merges += len(sparse._dkeys) < before
            for j in range(b):
                ref[(int(rows[j]), int(cols[j]))] += float(values[j] if isinstance(values, np.ndarray) else values)
        elif op < 0.75:
            drop = rng.integers(0, n_rows, int(rng.integers(0, 4)))
            sparse.drop_rows(drop)
            for key in [k for k in ref if k[0] in set(drop.tolist())]:
                del ref[key]
        elif op < 0.8:
            sparse.compact()
        had_both += bool(len(sparse._keys) and len(sparse._dkeys))
        assert len(sparse) == len(ref)
        assert not np.isin(sparse._dkeys, sparse._keys).any()  # the levels stay disjoint
        rows, cols = rng.integers(-1, n_rows + 2, 50), rng.integers(0, n_cols + 3, 50)
        want = np.array([ref.get((int(r), int(c)), 0.0) for r, c in zip(rows, cols, strict=True)])
        np.testing.assert_allclose(sparse.get(rows, cols), want, rtol=1e-12)
        np.testing.assert_allclose(sparse.get(rows[:5, None], cols[None, :7]),
                                   [[ref.get((int(r), int(c)), 0.0) for c in cols[:7]] for r in rows[:5]], rtol=1e-12)
        row = int(rows[0])
        np.testing.assert_allclose(sparse.get_row(row, cols), [ref.get((row, int(c)), 0.0) for c in cols], rtol=1e-12)
        got_cols, got_values = sparse.row(row)
        want_cols = sorted(c for r, c in ref if r == row)
        np.testing.assert_array_equal(got_cols, want_cols)
        np.testing.assert_allclose(got_values, [ref[(row, c)] for c in want_cols], rtol=1e-12)
        keys, values = sparse.arrays()
        want_keys, want_values = _reference_arrays(ref)
        np.testing.assert_array_equal(keys, want_keys)
        np.testing.assert_allclose(values, want_values, rtol=1e-12)
    assert merges >= 3 and had_both >= 10  # the sequence crossed the limit and read both levels


def test_arrays_do_not_change_the_map_and_an_old_pair_loads_as_base() -> None:
    rng = np.random.default_rng(1)
    sparse = SparseMap()
    sparse.add(rng.integers(0, 20, 500), rng.integers(0, 50, 500))
    sparse.compact()
    sparse.add(rng.integers(0, 40, 300), rng.integers(0, 50, 300))
    assert len(sparse._dkeys)
    keys, values = sparse.arrays()
    assert len(sparse._dkeys) and len(keys) == len(sparse)  # a read, not a merge
    loaded = SparseMap(keys, values)  # what FeatureState.load builds from a snapshot, old or new
    cols = np.arange(55)
    for row in range(42):
        np.testing.assert_array_equal(loaded.get_row(row, cols), sparse.get_row(row, cols))


def _saved(directory: Path) -> dict[str, tuple[str, bytes]]:
    with np.load(directory / "state.npz", allow_pickle=False) as npz:
        return {name: (str(npz[name].dtype), npz[name].tobytes()) for name in npz.files}


def test_saved_state_is_the_same_with_a_delta_and_after_compaction(prepared_dir, tmp_path: Path) -> None:
    """A snapshot written while the maps hold a delta is, array for array, byte-identical to one written
    after merging it, and its pairs are the single sorted arrays the old one-level map saved."""
    data = PreparedData.load(prepared_dir)
    batch = EventBatch.from_frame(data.events().collect().sort("timestamp", maintain_order=True))
    state = FeatureState.build(data.items, data.events().collect().head(0))
    half = len(batch) // 2
    state.apply(batch.slice(0, half))
    maps = [getattr(state, name) for name in _SPARSE]
    for m in maps:
        m.compact()
    state.apply(batch.slice(half, len(batch)))
    assert all(len(m._keys) and len(m._dkeys) for m in maps)  # both levels hold entries
    state.save(tmp_path / "delta")
    for m in maps:
        keys, values = m.arrays()
        ref = {(int(k) >> 32, int(k) & 0xFFFFFFFF): float(v) for k, v in zip(keys, values, strict=True)}
        assert len(ref) == len(m) and np.array_equal(_reference_arrays(ref)[0], keys)
        m.compact()
    state.save(tmp_path / "compact")
    assert _saved(tmp_path / "delta") == _saved(tmp_path / "compact")
    assert (tmp_path / "delta" / "state.json").read_bytes() == (tmp_path / "compact" / "state.json").read_bytes()
    whole = _saved(FeatureState.build(data.items, data.events().collect()).save(tmp_path / "whole"))
    for name in _SPARSE:  # one fold (everything in one delta): the same keys, sums up to float order
        assert whole[f"{name}.keys"] == _saved(tmp_path / "compact")[f"{name}.keys"]


def test_deferred_merges_are_prepared_aside_and_refused_when_the_map_changed() -> None:
    """The follower's protocol: with defer_merges, add leaves a due merge to prepare_merge (no change
    to the map) and install_merge (refused when the map changed in between); a backstop still merges."""
    rng = np.random.default_rng(2)
    sparse = SparseMap()
    sparse.MIN_DELTA, sparse.defer_merges = 50, True
    sparse.add(rng.integers(0, 10, 80), rng.integers(0, 1000, 80))
    assert sparse.prepare_merge() is not None and not len(sparse._keys)  # due, not merged inline
    before = sparse.arrays()
    merge = sparse.prepare_merge()
    assert merge is not None and len(sparse._dkeys) == len(before[0])  # preparing changed nothing
    sparse.add(np.array([3]), np.array([5000]))
    assert not sparse.install_merge(merge)  # stale: would lose that add
    merge = sparse.prepare_merge()
    assert merge is not None and sparse.install_merge(merge)
    assert not len(sparse._dkeys) and sparse.get(3, 5000) == 1.0
    np.testing.assert_array_equal(sparse.arrays()[0], np.union1d(before[0], SparseMap.key(3, 5000)))
    sparse.add(rng.integers(0, 10, 1000), rng.integers(0, 10**6, 1000))  # > MERGE_BACKSTOP x the limit
    assert not len(sparse._dkeys)  # merged inline


def test_a_prepared_add_changes_nothing_until_installed_and_refuses_a_changed_map() -> None:
    """The follower prepares the served lists' user x item add outside the state's write lock (requests
    read the map meanwhile) and installs it under the lock: preparing must not touch the map, and a
    plan prepared before another change must not be installed."""
    rng = np.random.default_rng(3)
    sparse, plain = SparseMap(), SparseMap()
    for m in (sparse, plain):
        m.MIN_DELTA = 50
        m.add(np.arange(200) % 7, np.arange(200))  # base after a merge, then a delta
        m.add(np.arange(30) % 5, np.arange(1000, 1030))
    rows = np.concatenate([rng.integers(0, 9, 300), [0, 1, 2]])  # keys in the base, new ones and,
    cols = np.concatenate([rng.integers(0, 1100, 300), [1000, 1001, 1002]])  # last, three in the delta
    before = [a.copy() for a in (sparse._keys, sparse._values, sparse._dkeys, sparse._dvalues)]
    plan = sparse.prepare_add(rows, cols, 2.0)
    assert plan is not None and plan.delta is not None and len(plan.base_pos)
    for a, b in zip(before, (sparse._keys, sparse._values, sparse._dkeys, sparse._dvalues), strict=True):
        np.testing.assert_array_equal(a, b)
    sparse.install_add(plan)
    plain.add(rows, cols, 2.0)
    for a, b in zip(sparse.arrays(), plain.arrays(), strict=True):
        np.testing.assert_array_equal(a, b)
    stale = sparse.prepare_add(rows[:5], cols[:5])
    sparse.add(np.array([1]), np.array([1]))
    assert stale is not None
    with pytest.raises(RuntimeError, match="changed since"):
        sparse.install_add(stale)
