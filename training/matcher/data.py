"""Training inputs for the matcher: pre-tokenised item texts and positive pairs as NumPy arrays.

Item texts are tokenised once (no padding) and batched by length: a step sorts its unique items by
token count and pads each chunk only to that chunk's longest text (length bucketing), so short
titles do not pay for the longest description in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.data.prepared import PreparedData
from recsys.errors import InputError


@dataclass
class ItemTokens:
    """Token ids of every item text, item_idx order: ids[i] is a 1-D int64 array (CLS ... SEP)."""

    ids: list[np.ndarray]
    lengths: np.ndarray  # [n_items]
    pad_id: int

    @classmethod
    def build(cls, texts: list[str], tokenizer: Any, max_tokens: int) -> ItemTokens:
        enc = tokenizer(texts, truncation=True, max_length=max_tokens, padding=False)
        ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(ids=ids, lengths=np.array([len(x) for x in ids], dtype=np.int64), pad_id=int(pad))

    def chunks(self, items: np.ndarray, chunk: int, bucket: bool = True) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Split `items` into padded batches: [(positions in `items`, input_ids [c, T], mask [c, T])].

        With `bucket`, items are sorted by length first so each chunk pads to a similar length.
        """
        order = np.argsort(self.lengths[items], kind="stable") if bucket else np.arange(len(items))
        out = []
        for start in range(0, len(items), chunk):
            pos = order[start : start + chunk]
            seqs = [self.ids[i] for i in items[pos]]
            width = max(len(s) for s in seqs)
            input_ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(seqs), width), dtype=np.int64)
            for row, seq in enumerate(seqs):
                input_ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            out.append((pos, torch.from_numpy(input_ids), torch.from_numpy(mask)))
        return out

    def padding_efficiency(self, items: np.ndarray, chunk: int, bucket: bool) -> float:
        """Real tokens / padded tokens for encoding `items` in chunks (1.0 = no padding waste)."""
        order = np.argsort(self.lengths[items], kind="stable") if bucket else np.arange(len(items))
        lengths = self.lengths[items][order]
        padded = sum(len(c) * c.max() for c in np.split(lengths, range(chunk, len(lengths), chunk)) if len(c))
        return float(lengths.sum() / max(padded, 1))


@dataclass
class Pairs:
    """Positive (user, item) targets with their histories, as arrays (n rows).

    hist_item [n, N] (-1 pad), hist_type [n, N] (-1 pad), hist_age [n, N] seconds, weight [n],
    neg_offsets [n + 1] / neg_items: CSR of hard negatives (shown, not acted on) per row.
    """

    user: np.ndarray
    item: np.ndarray
    weight: np.ndarray
    hist_item: np.ndarray
    hist_type: np.ndarray
    hist_age: np.ndarray
    neg_offsets: np.ndarray
    neg_items: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, max_history: int, weight_by_strength: bool = True) -> Pairs:
        hist_item = _history(frame, "hist_item_idx", np.int64, max_history)
        if "neg_item_idx" in frame.columns:
            negs = frame["neg_item_idx"].fill_null([]).to_list()
        else:
            negs = [[] for _ in range(frame.height)]
        lens = np.array([len(x) for x in negs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in negs]) if lens.sum() else np.zeros(0, np.int64)
        strength = frame["strength"].to_numpy().astype(np.float32)
        weight = strength / strength.mean() if weight_by_strength and strength.mean() > 0 else np.ones_like(strength)
        return cls(
            user=frame["user_idx"].to_numpy().astype(np.int64),
            item=frame["item_idx"].to_numpy().astype(np.int64),
            weight=weight.astype(np.float32),
            hist_item=hist_item,
            hist_type=_history(frame, "hist_event_code", np.int64, max_history),
            hist_age=_history(frame, "hist_age_s", np.float32, max_history),
            neg_offsets=offsets,
            neg_items=flat,
        )

    def sample_hard_negatives(self, rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """Up to k hard negatives per row (with replacement), flattened; rows without any give none."""
        if k <= 0 or len(self.neg_items) == 0:
            return np.zeros(0, dtype=np.int64)
        start = self.neg_offsets[rows]
        count = self.neg_offsets[rows + 1] - start
        draw = start[:, None] + np.floor(rng.random((len(rows), k)) * count[:, None]).astype(np.int64)
        return self.neg_items[draw[count > 0].ravel()]


def _history(frame: pl.DataFrame, column: str, dtype: type, max_history: int) -> np.ndarray:
    if frame.height == 0:
        return np.zeros((0, max_history), dtype=dtype)
    arr: np.ndarray = np.array(frame[column].to_numpy(), dtype=dtype)  # a writable copy (torch.from_numpy)
    if arr.ndim == 1:  # list column of unequal lengths: pad by hand
        rows = frame[column].to_list()
        fill = 0 if column == "hist_age_s" else -1
        arr = np.full((len(rows), max_history), fill, dtype=dtype)
        for r, values in enumerate(rows):
            values = values[:max_history]
            arr[r, : len(values)] = values
    return arr[:, :max_history]


def load_pairs(data: PreparedData, protocol: str, split: str, max_history: int, weight_by_strength: bool = True) -> Pairs:
    frame = data.pairs(protocol, split)
    if frame.height == 0:
        raise InputError(
            f"the {split} split of protocol {protocol!r} in {data.root / 'pairs.parquet'} has no positive "
            f"pairs: nothing to train on. Check that the events have positive event types (click, purchase, "
            f"rating...) and that the split cutoffs leave data in {split}; or choose another --protocol."
        )
    return Pairs.from_frame(frame, max_history, weight_by_strength)


def item_texts(data: PreparedData) -> list[str]:
    texts = data.items.sort("item_idx")["text"].fill_null("").to_list()
    return [t if t.strip() else "[empty]" for t in texts]


def positive_keys(n_items: int, *parts: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Sorted unique user * n_items + item keys: the (user, item) pairs never used as negatives."""
    keys = [u.astype(np.int64) * n_items + i.astype(np.int64) for u, i in parts]
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
