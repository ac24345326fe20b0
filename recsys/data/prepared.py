"""The prepared dataset: what `recsys prepare --out DIR` writes and every later stage reads.

    manifest.json      schema version, inputs, config, cutoffs, row counts, validation report
    items.parquet      item_idx (i32, dense 0..n-1, row order), item_id, text, title, description,
                       tags, category, created_at, first_seen, <extra item attributes>
    users.parquet      user_idx (i32, dense), user_id, <user attributes>
    events.parquet     every clean event sorted by (user_idx, timestamp): user_idx, item_idx, user_id,
                       item_id, event_type, strength (f32), timestamp, value, request_id, position,
                       split_global, split_loo, split_tail ("train" | "valid" | "test"), <context>
    pairs.parquet      one row per positive event (strength > 0), the training/eval targets:
                       user_idx, item_idx, timestamp, event_type, strength, request_id, split_global,
                       split_loo, split_tail, hist_len (i16), hist_item_idx Array[i32, N],
                       hist_event_code Array[i8, N], hist_age_s Array[f32, N] (the user's N most
                       recent positives strictly before `timestamp`, most recent first, padded with
                       -1 / -1 / 0), neg_item_idx list[i32] (items impressed in the same request and
                       not acted on: hard negatives)
    eval/{protocol}_{split}.parquet   protocol in global|loo|tail, split in valid|test: one row per
                       user with targets in that window: user_idx, cutoff (the window start for that
                       user), hist_len, hist_* arrays as of the cutoff, target_item_idx list[i32],
                       target_strength list[f32]. The user's interactions in the earlier splits of
                       the protocol (train for valid, train + valid for test; ties at the cutoff second
                       included) are "seen" (`seen_items`) and excluded by full-ranking evaluators.

Splits: `split_global` uses global time cutoffs; `split_loo` marks each user's last positive as test
and the one before as valid; `split_tail` marks each user's last `tail_frac` of positives as test and
the `tail_frac / 2` before them as valid. Non-positive events (impressions) carry the split of their
timestamp (global) or "train" (per-user protocols, where they are never targets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.errors import InputError

PROTOCOLS = ("global", "loo", "tail")
SPLIT_COLUMN = {"global": "split_global", "loo": "split_loo", "tail": "split_tail"}
HISTORY_COLUMNS = ("hist_item_idx", "hist_event_code", "hist_age_s")


@dataclass(frozen=True)
class Histories:
    """Padded history arrays, most recent first: item_idx [n, N] (-1 pad), event_code [n, N]
    (-1 pad), age_s [n, N] float32 seconds before the target, mask [n, N] bool."""

    item_idx: np.ndarray
    event_code: np.ndarray
    age_s: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.item_idx >= 0

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> Histories:
        return cls(
            item_idx=frame["hist_item_idx"].to_numpy().astype(np.int32, copy=False),
            event_code=frame["hist_event_code"].to_numpy().astype(np.int8, copy=False),
            age_s=frame["hist_age_s"].to_numpy().astype(np.float32, copy=False),
        )


@dataclass
class PreparedData:
    root: Path
    manifest: dict[str, Any]
    items: pl.DataFrame
    users: pl.DataFrame

    @classmethod
    def load(cls, root: Path | str) -> PreparedData:
        root = Path(root)
        manifest_path = root / "manifest.json"
        if not manifest_path.exists():
            raise InputError(
                f"{root} is not a prepared dataset: {manifest_path} is missing. "
                f"Create one with: recsys prepare --events FILE --items FILE --out {root}"
            )
        manifest = json.loads(manifest_path.read_text())
        return cls(
            root=root,
            manifest=manifest,
            items=pl.read_parquet(root / "items.parquet"),
            users=pl.read_parquet(root / "users.parquet"),
        )

    @property
    def max_history(self) -> int:
        return int(self.manifest["config"]["max_history"])

    @property
    def n_items(self) -> int:
        return self.items.height

    def events(self) -> pl.LazyFrame:
        return pl.scan_parquet(self.root / "events.parquet")

    def pairs(self, protocol: str = "global", split: str = "train") -> pl.DataFrame:
        """Positive targets of one split; `protocol` picks the split column."""
        column = SPLIT_COLUMN[_check_protocol(protocol)]
        return pl.scan_parquet(self.root / "pairs.parquet").filter(pl.col(column) == split).collect()

    def eval_set(self, protocol: str = "global", split: str = "test") -> pl.DataFrame:
        path = self.root / "eval" / f"{_check_protocol(protocol)}_{split}.parquet"
        if not path.exists():
            raise InputError(f"evaluation set {path} is missing: rerun recsys prepare for {self.root}")
        return pl.read_parquet(path)

    def seen_items(self, eval_frame: pl.DataFrame, protocol: str, split: str) -> list[np.ndarray]:
        """Per eval row: item_idx of exactly the user's interactions in the splits before `split` of
        `protocol` (train for valid; train + valid for test), cutoff-second ties included."""
        column = SPLIT_COLUMN[_check_protocol(protocol)]
        earlier = {"valid": ["train"], "test": ["train", "valid"]}.get(split)
        if earlier is None:
            raise InputError(f"seen items are defined for the valid and test splits, not {split!r}")
        seen = (
            pl.scan_parquet(self.root / "pairs.parquet")
            .filter(pl.col(column).is_in(earlier))
            .join(eval_frame.lazy().select("user_idx"), on="user_idx", how="semi")
            .group_by("user_idx")
            .agg(pl.col("item_idx").unique().sort())
            .collect()
        )
        lookup = dict(zip(seen["user_idx"].to_list(), seen["item_idx"].to_list(), strict=True))
        return [np.asarray(lookup.get(u, []), dtype=np.int64) for u in eval_frame["user_idx"].to_list()]

    def item_popularity(self, before: Any = None) -> np.ndarray:
        """Count of positive events per item_idx (optionally only strictly before `before`)."""
        events = self.events().filter(pl.col("strength") > 0)
        if before is not None:
            events = events.filter(pl.col("timestamp") < before)
        counts = events.group_by("item_idx").len().collect()
        out = np.zeros(self.n_items, dtype=np.float64)
        out[counts["item_idx"].to_numpy()] = counts["len"].to_numpy()
        return out


def _check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown evaluation protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    return protocol
