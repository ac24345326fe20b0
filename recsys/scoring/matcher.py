"""The matcher at serving time: a registry version's towers, tokenizer and item store, torch-free.

Known items come from the precomputed store (no transformer pass); only unknown (cold-start) items
are encoded, and only when their text is given. Scores are cosines (both towers L2-normalise), as in
training. `tower_encoder` is the ONNX user tower over catalogue item embeddings: the user encoder of
every `EmbeddingMatcher` built from a registry version (the service's, the batch scorer's and
`recsys.scoring.registry_matcher`'s for `train ranker --matcher` and `evaluate --matcher`). This module
imports neither torch nor polars (tested with both blocked).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys.errors import InputError, ModelError
from recsys.registry import RegisteredVersion, Registry
from recsys.scoring.encoder import ItemEncoder, UserEncoder
from recsys.scoring.providers import CPU, TENSORRT, plan_providers
from recsys.scoring.store import EmbeddingStore

PRECISIONS = ("fp32", "int8", "fp16", "auto")


def choose_item_model(manifest: Mapping[str, Any], precision: str, primary: str) -> tuple[str, bool]:
    """-> (file name, TensorRT fp16 flag). TensorRT gets the plain export (it fuses itself and cannot
    run ORT's contrib ops); CPU/CUDA get the ORT-optimised graph or an accepted variant."""
    models: dict[str, str] = manifest["models"]["item"]
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "int8" if primary == CPU and "int8" in models else "fp16" if primary != CPU and "fp16" in models else "fp32"
    if primary == TENSORRT:
        if precision == "int8":
            raise InputError("int8 variants are for the CPU provider: use --precision fp32 or fp16 with TensorRT")
        return models.get("fp32_raw", models["fp32"]), precision == "fp16"
    if precision not in models:
        raise InputError(
            f"this model version has no accepted {precision} item model (has: {', '.join(sorted(models))}); "
            f"export with --{precision} or use --precision fp32"
        )
    return models[precision], False


@dataclass
class MatcherRuntime:
    item_encoder: ItemEncoder
    user_encoder: UserEncoder
    store: EmbeddingStore | None
    manifest: dict[str, Any]
    version: str | None = None
    _store_encoder: tuple[np.ndarray, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] | None = field(default=None, repr=False)

    @classmethod
    def from_version(
        cls,
        registered: RegisteredVersion,
        provider: str = "auto",
        precision: str = "fp32",
        threads: int | None = None,
        verify: bool = True,
        batch_size: int = 64,
    ) -> MatcherRuntime:
        """`verify` re-hashes the embedding store (the registry's load already checks everything)."""
        manifest = registered.manifest
        plan = plan_providers(provider)
        name, trt_fp16 = choose_item_model(manifest, precision, plan.providers[0])
        tok = manifest["tokenizer"]
        item = ItemEncoder(
            registered.file(name), registered.file(tok["file"]), int(tok["max_length"]), provider, threads, batch_size, trt_fp16
        )
        # The user tower is tiny; TensorRT would only add engine builds.
        user_provider = "cuda" if plan.providers[0] == TENSORRT else provider
        items = manifest["models"].get("user_items")  # the tower's history projection, when it has one
        user = UserEncoder(registered.file(manifest["models"]["user"]), user_provider, threads,
                           items_path=registered.file(items) if items else None)
        store = None
        if manifest.get("embeddings"):
            store = EmbeddingStore.load(registered.file(manifest["embeddings"]["path"]), verify=verify)
            if store.dim != item.dim:
                raise ModelError(f"embedding store {store.path} has dim {store.dim}, the item tower {item.dim}")
        return cls(item, user, store, manifest, registered.version)

    @classmethod
    def from_registry(cls, root: Path | str, version: str | None = None, verify: bool = True, **kwargs: Any) -> MatcherRuntime:
        """Load the current (or given) version; integrity-checked (all files, store included) unless
        verify=False."""
        return cls.from_version(Registry(root).load(version, verify=verify), verify=False, **kwargs)

    @property
    def dim(self) -> int:
        return self.item_encoder.dim

    @property
    def max_history(self) -> int:
        return int(self.manifest.get("training_config", {}).get("max_history", 20))

    def item_embeddings(self, ids: Sequence[str], texts: Mapping[str, str] | None = None) -> np.ndarray:
        """[n, D]: store rows for known items, on-the-fly encodings for unknown ones with text."""
        pos = self.store.positions(ids) if self.store is not None else np.full(len(ids), -1, np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        known = pos >= 0
        if known.any():
            assert self.store is not None
            out[known] = self.store.matrix[pos[known]]
        unknown = np.flatnonzero(~known)
        if len(unknown):
            missing = [ids[int(i)] for i in unknown if not texts or ids[int(i)] not in texts]
            if missing:
                raise InputError(f"unknown items without text (cannot encode them): {missing[:5]}")
            assert texts is not None
            out[unknown] = self.item_encoder.encode([texts[ids[int(i)]] for i in unknown])
        return out

    def user_embeddings_from_rows(self, hist_rows: np.ndarray, hist_type: np.ndarray, hist_age: np.ndarray) -> np.ndarray:
        """Vectorised path: hist_rows [B, N] store rows (-1 = padding), event codes, ages in seconds."""
        if self.store is None:
            raise ModelError("this model version has no item embedding store: export it with --data")
        matrix = self.store.matrix
        if self._store_encoder is None or self._store_encoder[0] is not matrix:  # built once per store matrix
            self._store_encoder = (matrix, tower_encoder(np.asarray(matrix, np.float32), self.user_encoder))
        return self._store_encoder[1](hist_rows, hist_type, hist_age)

    def user_embeddings(
        self,
        histories: Sequence[Sequence[str]],
        event_codes: Sequence[Sequence[int]],
        ages_s: Sequence[Sequence[float]],
    ) -> np.ndarray:
        """Histories as item ids (most recent first) -> [B, D]. Unknown ids are dropped."""
        n = max(1, min(self.max_history, max((len(h) for h in histories), default=1)))
        rows = np.full((len(histories), n), -1, dtype=np.int64)
        types = np.full((len(histories), n), -1, dtype=np.int64)
        ages = np.zeros((len(histories), n), dtype=np.float32)
        for b, (hist, codes, age) in enumerate(zip(histories, event_codes, ages_s, strict=True)):
            pos = self.store.positions(list(hist)[:n]) if self.store is not None else np.array([], np.int64)
            keep = np.flatnonzero(pos >= 0)
            rows[b, : len(keep)] = pos[keep]
            types[b, : len(keep)] = np.asarray(codes, dtype=np.int64)[keep]
            ages[b, : len(keep)] = np.asarray(age, dtype=np.float32)[keep]
        return self.user_embeddings_from_rows(rows, types, ages)

    @staticmethod
    def score(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """[B, D] x [n, D] -> cosine scores [B, n]."""
        return np.asarray(users, np.float32) @ np.asarray(items, np.float32).T


def tower_encoder(item_emb: np.ndarray, tower: UserEncoder) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Padded histories (item_idx [B, N], -1 pad; event codes; ages s) -> user embeddings [B, D]
    through the ONNX user tower over `item_emb` rows (through its history projection first, once
    here, when it has one). Empty histories get the tower's learned cold-start vector (unknown users)."""
    table = tower.history_table(item_emb)

    def encode(items: np.ndarray, codes: np.ndarray, ages: np.ndarray) -> np.ndarray:
        items = np.asarray(items, np.int64)
        mask = items >= 0
        hist = table[np.maximum(items, 0)] * mask[..., None]
        return tower.encode(hist, np.where(mask, codes, -1), np.where(mask, ages, 0.0), mask)

    return encode
