"""Tiny scoring artifacts shared by tests and benchmarks: an exported registry version + a ranker.

Built once per session by fixtures (they take seconds): the tiny random BERT matcher exported to
ONNX with its catalogue embedding store, and a LightGBM ranker trained on match scores from a cheap
stand-in user tower (same feature names as the ONNX tower's, so it is a valid, if slightly
mismatched, tiny model). Needs torch (only to build the artifacts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl


def build_scoring_artifacts(base: Path, prepared_dir: Path, seed: int = 3, rounds: int = 40) -> dict[str, Path]:
    """-> {"registry", "ranker", "data", "base"}: registry with one version (current), ranker dir."""
    from recsys.data.prepared import PreparedData
    from recsys.features import EmbeddingMatcher, mean_pool_encoder
    from recsys.scoring.store import EmbeddingStore
    from tests.test_export import make_tiny_checkpoint
    from training.export import ExportConfig, export_to_registry
    from training.ranker import RankerConfig, train_ranker

    base.mkdir(parents=True, exist_ok=True)
    ckpt = make_tiny_checkpoint(base / "ckpt", seed=seed)
    version, _ = export_to_registry(ckpt, base / "reg", ExportConfig(), data=prepared_dir)
    data = PreparedData.load(prepared_dir)
    store = EmbeddingStore.load(base / "reg" / "versions" / version / "embeddings")
    emb = np.asarray(store.matrix[store.positions(data.items["item_id"].cast(pl.Utf8).to_list())])
    train_ranker(
        data,
        base / "ranker",
        EmbeddingMatcher(emb, mean_pool_encoder(emb)),
        RankerConfig(threads=2, num_rounds=rounds),
    )
    return {"registry": base / "reg", "ranker": base / "ranker", "data": prepared_dir, "base": base, "ckpt": ckpt}
