"""Serving-side scoring: ONNX Runtime encoders, provider choice, the item embedding store. No torch.

Submodules import onnxruntime/tokenizers lazily (through recsys.compat), so importing this package is
cheap and works where only the serving extras are installed.
"""

from __future__ import annotations

__all__ = ["EmbeddingStore", "ItemEncoder", "MatcherRuntime", "UserEncoder"]

from recsys.scoring.encoder import ItemEncoder, UserEncoder
from recsys.scoring.matcher import MatcherRuntime
from recsys.scoring.store import EmbeddingStore
