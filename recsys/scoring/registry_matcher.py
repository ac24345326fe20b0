"""A registry version as an `EmbeddingMatcher` over a prepared catalogue, for the offline callers of
the request path: `recsys train ranker --matcher`, publish, retrain and `recsys evaluate --matcher`.

Item embeddings [n_items, D] come from the version's store (text-encoded when missing) and the user
encoder is the ONNX user tower over them (`tower_encoder`), exactly as the service builds its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.prepared import PreparedData
from recsys.errors import InputError
from recsys.features import EmbeddingMatcher
from recsys.registry import RegisteredVersion
from recsys.scoring.matcher import MatcherRuntime, tower_encoder


def registry_matcher(version_dir: Path | str, data: PreparedData) -> EmbeddingMatcher:
    """A registry version directory (exported ONNX towers + embedding store) -> EmbeddingMatcher over
    the prepared catalogue: item embeddings [n_items, D] from the store (text-encoded when missing)
    and the ONNX user tower over them (`tower_encoder`, as the service)."""
    version_dir = Path(version_dir)
    manifest_path = version_dir / "manifest.json"
    if not manifest_path.exists():
        raise InputError(f"--matcher {version_dir} is not a registry version directory: {manifest_path} is missing")
    manifest = json.loads(manifest_path.read_text())
    runtime = MatcherRuntime.from_version(RegisteredVersion(version_dir.name, version_dir, manifest))
    ids = data.items["item_id"].cast(pl.Utf8).to_list()
    texts = dict(zip(ids, data.items["text"].to_list(), strict=True))
    item_emb = np.ascontiguousarray(runtime.item_embeddings(ids, texts), np.float32)
    return EmbeddingMatcher(item_emb, tower_encoder(item_emb, runtime.user_encoder))
