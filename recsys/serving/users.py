"""Bounded user state: user_id -> feature-state row, for at most `capacity` users.

A live server learns a row of user state (~2 KB plus its sparse affinities) for every new user an
event names; without a bound, a stream of one-off ids grows memory forever. `UserIndex` keeps at most
`capacity` users: when a batch of events brings new users beyond it, the least recently active users
(by the latest event time applied for them; ties by row, lowest first) that the batch does not
mention are evicted, their rows reset to a new user's state (`FeatureState.forget_users`) and reused.
The choice depends only on event times and the order of batches, so replicas folding the same event
log in the same batches evict the same users. A batch is never split: users it mentions are not
evicted for it, so one batch naming more users than the bound leaves the index over it until later
batches evict back down.

An evicted user is unknown again: Rank and Recommend serve it the cold-start path (the user tower's
learned cold-start vector, new-user features), exactly as for a user never seen; its next event
starts a fresh row. Item-side statistics it contributed (popularity, co-visitation, CTR) are kept.
History length per user is bounded by the feature config's `max_history` ring buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.features import NEVER, FeatureState


class UserIndex:
    def __init__(self, user_ids: Sequence[str], state: FeatureState, capacity: int | None = None) -> None:
        rows = max(len(user_ids), state.n_users)
        self.ids: list[str | None] = [*user_ids, *([None] * (rows - len(user_ids)))]
        self.rows = {u: i for i, u in enumerate(user_ids)}
        self.active = np.full(rows, NEVER, np.int64)
        self.active[: state.n_users] = state.user_last_us[: state.n_users]
        self.capacity = capacity
        self.free: list[int] = []  # rows of evicted users, reused lowest first
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, user_id: str, default: int = -1) -> int:
        return self.rows.get(user_id, default)

    def _victims(self, count: int, keep: set[int]) -> np.ndarray:
        """The `count` least recently active used rows outside `keep` (ties: lowest row)."""
        used = np.fromiter((r for r in self.rows.values() if r not in keep), np.int64)
        order = np.lexsort((used, self.active[used]))
        return np.sort(used[order[:count]])

    def _evict(self, rows: np.ndarray) -> None:
        for row in rows.tolist():
            uid = self.ids[row]
            assert uid is not None
            del self.rows[uid]
            self.ids[row] = None
            self.free.append(row)
        self.free.sort(reverse=True)  # pop() takes the lowest
        self.evicted += len(rows)

    def _admit(self, user_id: str) -> int:
        if self.free:
            row = self.free.pop()
            self.ids[row] = user_id
        else:
            row = len(self.ids)
            self.ids.append(user_id)
        self.rows[user_id] = row
        return row

    def assign(self, user_ids: Sequence[str], ts_us: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Rows for a batch's events (new users admitted, in order of first appearance) ->
        (rows [n], rows evicted to make room: reset them before applying the batch, new users)."""
        new = list(dict.fromkeys(u for u in user_ids if u not in self.rows))
        evicted = np.zeros(0, np.int64)
        over = len(self.rows) + len(new) - (self.capacity or len(self.rows) + len(new))
        if over > 0:
            mentioned = {self.rows[u] for u in set(user_ids) if u in self.rows}
            evicted = self._victims(over, mentioned)
            self._evict(evicted)
        for user_id in new:
            self._admit(user_id)
        rows = np.fromiter((self.rows[u] for u in user_ids), np.int64, len(user_ids))
        if len(self.active) < len(self.ids):
            self.active = np.concatenate([self.active, np.full(len(self.ids) - len(self.active), NEVER, np.int64)])
        np.maximum.at(self.active, rows, np.asarray(ts_us, np.int64))
        return rows, evicted, len(new)

    def trim(self) -> np.ndarray:
        """Evict down to capacity (a saved state with more users than the bound) -> rows evicted."""
        over = len(self.rows) - (self.capacity or len(self.rows))
        if over <= 0:
            return np.zeros(0, np.int64)
        evicted = self._victims(over, set())
        self._evict(evicted)
        return evicted
