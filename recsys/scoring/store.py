"""Item embedding store: one float32 (or float16) matrix + an id index, memory-mapped on load.

Layout of a store directory:
    index.json            format, dim, dtype, count, data file name, its sha256, ids, text hashes
    embeddings.<gen>.npy  [count, dim] raw .npy (loaded with mmap_mode='r', allow_pickle=False)

Known items are served from here, so only new or changed items ever go through the transformer.
Updates write a new generation file and then atomically replace index.json (the commit point):
readers see the old or the new store, never a mix, and processes still mapping the old file keep it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from recsys.errors import InputError, ModelError
from recsys.files import sha256_file, write_json_atomic

INDEX = "index.json"
FORMAT = 1
FIX = (
    "Rebuild it with `recsys export --checkpoint CKPT --registry DIR --data PREPARED`, or switch back to "
    "the previous version with `recsys models rollback --registry DIR`."
)


class TextEncoder(Protocol):
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class UpsertReport:
    added: int
    updated: int
    unchanged: int


class EmbeddingStore:
    """Read-only view of a store: `matrix` [n, D] (memory-mapped), `ids`, `position(ids)`."""

    def __init__(self, path: Path, index: dict[str, Any], matrix: np.ndarray) -> None:
        self.path = path
        self.meta = index
        self.matrix = matrix
        self.ids: list[str] = list(index["ids"])
        self.text_hashes: list[str | None] = list(index.get("text_hashes") or [None] * len(self.ids))
        self._pos = {item_id: i for i, item_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each id, -1 for unknown ids (new items to encode on the fly)."""
        return np.fromiter((self._pos.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))

    def get(self, ids: Sequence[str]) -> np.ndarray:
        pos = self.positions(ids)
        if (pos < 0).any():
            missing = [ids[i] for i in np.flatnonzero(pos < 0)[:5]]
            raise InputError(f"items not in the embedding store {self.path}: {missing}")
        return np.asarray(self.matrix[pos], dtype=np.float32)

    # --- building ---------------------------------------------------------------------------------

    @classmethod
    def write(
        cls,
        path: Path | str,
        ids: Sequence[str],
        vectors: np.ndarray,
        text_hashes: Sequence[str | None] | None = None,
        dtype: str = "float32",
        extra: dict[str, Any] | None = None,
    ) -> EmbeddingStore:
        """Write a store from vectors [n, D]; replaces an existing store at `path` atomically."""
        path = Path(path)
        if len(ids) != len(vectors):
            raise InputError(f"{len(ids)} ids but {len(vectors)} vectors")
        if len(set(ids)) != len(ids):
            raise InputError(f"item ids for the embedding store {path} are not unique")
        if dtype not in ("float32", "float16"):
            raise InputError(f"embedding dtype must be float32 or float16, got {dtype!r}")
        path.mkdir(parents=True, exist_ok=True)
        previous = cls._read_index(path) if (path / INDEX).exists() else None
        generation = int(previous["generation"]) + 1 if previous else 0
        data_name = f"embeddings.{generation}.npy"
        np.save(path / data_name, np.ascontiguousarray(vectors, dtype=dtype), allow_pickle=False)
        index = {
            "format": FORMAT,
            "generation": generation,
            "data": data_name,
            "sha256": sha256_file(path / data_name),
            "count": len(ids),
            "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
            "dtype": dtype,
            "extra": extra if extra is not None else (previous or {}).get("extra", {}),
            "ids": [str(i) for i in ids],
            "text_hashes": list(text_hashes) if text_hashes is not None else None,
        }
        write_json_atomic(path / INDEX, index)
        if previous and previous["data"] != data_name:
            (path / previous["data"]).unlink(missing_ok=True)  # mapped readers keep the old inode
        return cls.load(path, verify=False)

    @classmethod
    def build(
        cls,
        path: Path | str,
        encoder: TextEncoder,
        ids: Sequence[str],
        texts: Sequence[str],
        dtype: str = "float32",
        chunk: int = 8192,
    ) -> EmbeddingStore:
        """Encode the whole catalogue in chunks (bounded memory for the token arrays) and write it."""
        if len(ids) != len(texts):
            raise InputError(f"{len(ids)} ids but {len(texts)} texts")
        vectors = np.empty((len(texts), encoder.dim), dtype=np.float32)
        for start in range(0, len(texts), chunk):
            vectors[start : start + chunk] = encoder.encode(texts[start : start + chunk])
        return cls.write(path, ids, vectors, [text_hash(t) for t in texts], dtype)

    def upsert(self, encoder: TextEncoder, ids: Sequence[str], texts: Sequence[str]) -> UpsertReport:
        """Add new items and re-encode changed ones (text hash differs); untouched rows are copied.
        Refuses to re-encode an item whose row carries a learned ID part (`extra.with_id_part`, written
        by `recsys export` of a checkpoint trained with --item-ids): the text encoder alone would drop it."""
        if len(ids) != len(texts):
            raise InputError(f"{len(ids)} ids but {len(texts)} texts")
        hashes = [text_hash(t) for t in texts]
        pos = self.positions(ids)
        todo = [i for i, (p, h) in enumerate(zip(pos, hashes, strict=True)) if p < 0 or self.text_hashes[p] != h]
        baked = set(self.meta.get("extra", {}).get("with_id_part", ()))
        lose = [str(ids[i]) for i in todo if pos[i] >= 0 and str(ids[i]) in baked]
        if lose:
            raise InputError(
                f"{len(lose)} item(s) whose text changed carry a learned ID part in the embedding store {self.path} "
                f"(e.g. {lose[:5]}): re-encoding them text-only would drop it. Export the checkpoint again with the "
                f"new texts (recsys export --data PREPARED), or pass vectors you computed to upsert_vectors."
            )
        vectors = encoder.encode([texts[i] for i in todo]) if todo else np.empty((0, self.dim), np.float32)
        report = UpsertReport(
            added=int(sum(pos[i] < 0 for i in todo)),
            updated=int(sum(pos[i] >= 0 for i in todo)),
            unchanged=len(ids) - len(todo),
        )
        if todo:
            self._apply([str(ids[i]) for i in todo], vectors, [hashes[i] for i in todo])
        return report

    def upsert_vectors(self, ids: Sequence[str], vectors: np.ndarray) -> UpsertReport:
        """Add or overwrite rows with precomputed vectors (text hashes of those rows become unknown)."""
        pos = self.positions(ids)
        self._apply([str(i) for i in ids], np.asarray(vectors, np.float32), [None] * len(ids))
        return UpsertReport(added=int((pos < 0).sum()), updated=int((pos >= 0).sum()), unchanged=0)

    def _apply(self, ids: list[str], vectors: np.ndarray, hashes: Sequence[str | None]) -> None:
        if vectors.shape[1:] != (self.dim,):
            raise InputError(f"vectors must be [n, {self.dim}], got {list(vectors.shape)}")
        pos = self.positions(ids)
        new = pos < 0
        n_old = len(self.ids)
        matrix = np.empty((n_old + int(new.sum()), self.dim), dtype=np.float32)
        matrix[:n_old] = self.matrix
        all_ids = [*self.ids, *(i for i, is_new in zip(ids, new, strict=True) if is_new)]
        all_hashes = [*self.text_hashes, *(h for h, is_new in zip(hashes, new, strict=True) if is_new)]
        rows = pos.copy()
        rows[new] = np.arange(n_old, len(all_ids))
        matrix[rows] = vectors
        for r, h in zip(rows, hashes, strict=True):
            all_hashes[r] = h
        fresh = self.write(self.path, all_ids, matrix, all_hashes, self.meta["dtype"])
        self.__init__(fresh.path, fresh.meta, fresh.matrix)  # type: ignore[misc]

    # --- loading ----------------------------------------------------------------------------------

    @staticmethod
    def _read_index(path: Path) -> dict[str, Any]:
        index_path = path / INDEX
        if not index_path.is_file():
            raise ModelError(f"embedding store {path} has no {INDEX}. {FIX}")
        try:
            index = json.loads(index_path.read_text())
            _ = (index["data"], index["count"], index["dim"], index["dtype"], index["ids"], index["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"embedding store index {index_path} is unreadable or incomplete ({exc}). {FIX}") from exc
        return index

    @classmethod
    def load(cls, path: Path | str, verify: bool = True) -> EmbeddingStore:
        """Memory-map the matrix; check shape, dtype, id count and (with `verify`) the sha256."""
        path = Path(path)
        index = cls._read_index(path)
        data = path / index["data"]
        if not data.is_file():
            raise ModelError(f"embedding file {data} is missing. {FIX}")
        if verify and sha256_file(data) != index["sha256"]:
            raise ModelError(f"embedding file {data} is corrupt: its sha256 does not match {path / INDEX}. {FIX}")
        try:
            matrix = np.load(data, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:  # truncated data raises "mmap length is greater than file size"
            raise ModelError(f"embedding file {data} is corrupt or truncated ({exc}). {FIX}") from exc
        expected = (int(index["count"]), int(index["dim"]))
        if matrix.shape != expected or str(matrix.dtype) != index["dtype"] or len(index["ids"]) != expected[0]:
            raise ModelError(
                f"embedding file {data} holds {matrix.dtype}{list(matrix.shape)} but {path / INDEX} "
                f"describes {index['dtype']}{list(expected)} for {len(index['ids'])} ids. {FIX}"
            )
        return cls(path, index, matrix)
