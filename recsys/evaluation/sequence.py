"""Sequential baselines (SASRec) in `recsys evaluate`: an exported artifact scored with ONNX Runtime.

A sequence artifact (`recsys train sasrec --out DIR`, written by training/sasrec.py) is a directory:

    manifest.json         kind "sasrec", models.user (the ONNX user tower), max_length, dim,
                          training_window (the window it learnt from: leak refusals apply), config
    user_tower.onnx       the user-tower signature of the text matcher (hist_emb, hist_type, hist_age,
                          hist_mask -> user), so the same `UserEncoder` runs it
    item_embeddings.npy   [n_items, D] the item ID embeddings, rows in item_ids.json order
    item_ids.json         the catalogue the embeddings belong to (aligned here by item_id)
    training_window.json

Its input is each user's ordered interaction sequence before the window (`ordered_histories`: the
positives of the protocol's earlier splits in the dataset's label-blind tie order, the newest
`max_length`), not the request path's 20-item point-in-time history: SASRec's own protocol.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.data.prepared import SPLIT_COLUMN, Histories, PreparedData, _check_protocol
from recsys.data.schema import EVENT_CODES
from recsys.errors import InputError
from recsys.features import EmbeddingMatcher

KIND = "sasrec"
EARLIER = {"valid": ("train",), "test": ("train", "valid")}


def user_sequences(data: PreparedData, protocol: str, splits: tuple[str, ...]) -> pl.DataFrame:
    """One row per user with positives in `splits`: user_idx, items, codes, ts (µs), strength lists in the
    dataset's order (time, then the label-blind tie order of `recsys prepare`)."""
    column = SPLIT_COLUMN[_check_protocol(protocol)]
    codes = pl.col("event_type").replace_strict(EVENT_CODES, default=-1, return_dtype=pl.Int8)
    return (
        pl.scan_parquet(data.root / "pairs.parquet")
        .filter(pl.col(column).is_in(list(splits)))
        .select("user_idx", "item_idx", codes.alias("code"), pl.col("timestamp").dt.epoch("us").alias("ts"), "strength")
        .group_by("user_idx", maintain_order=True)
        .agg(pl.col("item_idx").alias("items"), pl.col("code").alias("codes"), pl.col("ts"), pl.col("strength"))
        .collect()
    )


def ordered_histories(data: PreparedData, protocol: str, split: str, users: np.ndarray, cutoff_us: np.ndarray,
                      length: int) -> Histories:
    """[U, length] most-recent-first histories of `users` from their positives in the splits before
    `split` (train for valid; train + valid for test), ages in seconds before each cutoff."""
    if split not in EARLIER:
        raise InputError(f"ordered histories exist for the valid and test windows, not {split!r}")
    seqs = user_sequences(data, protocol, EARLIER[split])
    lookup = {u: r for r, u in enumerate(seqs["user_idx"].to_list())}
    items_l, codes_l, ts_l = seqs["items"].to_list(), seqs["codes"].to_list(), seqs["ts"].to_list()
    n = len(users)
    item = np.full((n, length), -1, np.int32)
    code = np.full((n, length), -1, np.int8)
    age = np.zeros((n, length), np.float32)
    for row, user in enumerate(np.asarray(users).tolist()):
        r = lookup.get(user)
        if r is None:
            continue
        take = min(length, len(items_l[r]))
        if not take:
            continue
        item[row, :take] = np.asarray(items_l[r][-take:], np.int32)[::-1]
        code[row, :take] = np.asarray(codes_l[r][-take:], np.int8)[::-1]
        age[row, :take] = np.maximum(cutoff_us[row] - np.asarray(ts_l[r][-take:], np.int64)[::-1], 0) / 1e6
    return Histories(item, code, age)


@dataclass
class SequenceSystem:
    """An exported sequence model over a catalogue: its matcher and how many past items it reads."""

    matcher: EmbeddingMatcher
    max_length: int
    manifest: dict[str, Any]

    @property
    def window(self) -> dict[str, Any] | None:
        window = self.manifest.get("training_window")
        return dict(window) if window else None

    def scores(self, data: PreparedData, protocol: str, split: str, users: np.ndarray, cutoff_us: np.ndarray) -> np.ndarray:
        """[U, n_items] scores of the `split` window's users (dot products, as SASRec is trained)."""
        hist = ordered_histories(data, protocol, split, users, cutoff_us, self.max_length)
        items = np.asarray(self.matcher.item_embeddings, np.float32)
        out = np.empty((len(users), len(items)), np.float32)
        for s in range(0, len(users), 512):
            rows = slice(s, s + 512)
            part = Histories(hist.item_idx[rows], hist.event_code[rows], hist.age_s[rows])
            out[rows] = self.matcher.user_vectors(part) @ items.T
        return out


def load_sequence_system(directory: Path | str, data: PreparedData) -> SequenceSystem:
    """A sequence artifact directory -> SequenceSystem over `data`'s catalogue (items it never saw
    get a zero embedding, so a zero score)."""
    from recsys.scoring.encoder import UserEncoder
    from recsys.scoring.matcher import tower_encoder

    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise InputError(f"--sasrec {directory} is not a sequence model directory: {path} is missing "
                         f"(write one with recsys train sasrec --out {directory})")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != KIND:
        raise InputError(f"--sasrec {directory}: manifest kind is {manifest.get('kind')!r}, expected {KIND!r} "
                         f"(write one with recsys train sasrec)")
    table = np.load(directory / manifest["embeddings"], allow_pickle=False).astype(np.float32)
    ids = json.loads((directory / manifest["item_ids"]).read_text())
    if len(ids) != len(table):
        raise InputError(f"{directory}: {len(table)} item embeddings but {len(ids)} item ids; re-export it")
    position = {str(i): r for r, i in enumerate(ids)}
    rows = np.array([position.get(str(i), -1) for i in data.items["item_id"].cast(pl.Utf8).to_list()], np.int64)
    emb = np.where((rows >= 0)[:, None], table[np.maximum(rows, 0)], 0.0).astype(np.float32)
    tower = UserEncoder(directory / manifest["models"]["user"], "cpu")
    return SequenceSystem(EmbeddingMatcher(emb, tower_encoder(emb, tower)), int(manifest["max_length"]), manifest)
