"""A structural check of a LightGBM text model in pure Python, before LightGBM parses it.

LightGBM's text parser aborts or segfaults the process on some malformed files (a `model.txt`
truncated mid-tree passes every sha256 check once re-hashed into a manifest). `check_model_text`
checks the header fields, `tree_sizes` against the `Tree=` blocks byte for byte, each tree's arrays
against its `num_leaves`, split features and child indices, `end of trees`, the parameters block and
the feature names. `recsys.ranker.Ranker.load` runs it first; `recsys.candidate` (the child-process
vetting of a candidate version) re-exports it. Kept apart from both so neither imports the other.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from recsys.errors import ModelError

_HEADER_KEYS = ("version", "num_class", "num_tree_per_iteration", "max_feature_idx", "feature_names", "tree_sizes")
_TREE_RE = re.compile(rb"^Tree=(\d+)\n", re.M)
_NODE_ARRAYS = ("split_gain", "threshold", "decision_type", "internal_value", "internal_weight", "internal_count")
_LEAF_ARRAYS = ("leaf_weight", "leaf_count")
_END = b"end of trees"


def _bad(path: Path, problem: str) -> ModelError:
    return ModelError(
        f"{path} is not a complete LightGBM model ({problem}): it was truncated or damaged after training. "
        "Retrain it (recsys train ranker / recsys publish) or serve another version."
    )


def _fields(block: bytes) -> dict[str, str]:
    out = {}
    for line in block.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _ints(fields: dict[str, str], key: str, *, n: int, low: int, high: int, where: str, path: Path) -> None:
    try:
        values = [int(v) for v in fields.get(key, "").split()]
    except ValueError:
        raise _bad(path, f"{where}: {key} is not a list of integers") from None
    if len(values) != n or any(not low <= v <= high for v in values):
        raise _bad(path, f"{where}: {key} needs {n} values in [{low}, {high}]")


def _check_tree(block: bytes, index: int, n_features: int, path: Path) -> None:
    where = f"tree {index}"
    fields = _fields(block)
    try:
        leaves = int(fields["num_leaves"])
        values = [float(v) for v in fields["leaf_value"].split()]
    except (KeyError, ValueError):
        raise _bad(path, f"{where}: num_leaves / leaf_value missing or unreadable") from None
    if leaves < 1 or len(values) != leaves or not all(math.isfinite(v) for v in values):
        raise _bad(path, f"{where}: leaf_value needs {leaves} finite values")
    if leaves > 1:
        _ints(fields, "split_feature", n=leaves - 1, low=0, high=n_features - 1, where=where, path=path)
        for key in ("left_child", "right_child"):  # an internal node (1..L-2) or ~leaf (-L..-1)
            _ints(fields, key, n=leaves - 1, low=-leaves, high=leaves - 2, where=where, path=path)
        if "threshold" not in fields:
            raise _bad(path, f"{where}: threshold missing")
    # LightGBM refuses (by aborting) any per-node / per-leaf array of the wrong length.
    for keys, n in ((_NODE_ARRAYS, leaves - 1), (_LEAF_ARRAYS, leaves)):
        for key in keys:
            if key in fields and len(fields[key].split()) != n:
                raise _bad(path, f"{where}: {key} needs {n} values")


def check_model_text(path: Path | str, feature_names: Sequence[str] | None = None) -> int:
    """Structural check of a LightGBM text model (see the module docstring) -> its number of trees.
    Raises ModelError naming the file and the first problem; reads the file once, parses nothing
    with LightGBM."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    first = _TREE_RE.search(text)
    if not text.startswith(b"tree\n") or first is None:
        raise _bad(path, "no LightGBM header followed by trees")
    header = _fields(text[: first.start()])
    missing = [key for key in _HEADER_KEYS if key not in header]
    if missing:
        raise _bad(path, f"header lacks {', '.join(missing)}")
    try:
        n_features = int(header["max_feature_idx"]) + 1
        sizes = [int(s) for s in header["tree_sizes"].split()]
    except ValueError:
        raise _bad(path, "max_feature_idx / tree_sizes unreadable") from None
    names = header["feature_names"].split()
    if len(names) != n_features:
        raise _bad(path, f"{len(names)} feature names for max_feature_idx={n_features - 1}")
    if feature_names is not None and tuple(names) != tuple(feature_names):
        raise ModelError(f"{path} has features {names}, its ranker.json says {list(feature_names)}: the directory is inconsistent")
    position = first.start()
    for index, size in enumerate(sizes):
        block = text[position : position + size]
        if len(block) != size or not block.startswith(f"Tree={index}\n".encode()):
            raise _bad(path, f"tree {index} of {len(sizes)} is not where tree_sizes puts it")
        _check_tree(block, index, n_features, path)
        position += size
    tail = text[position:].lstrip(b"\n")
    if not tail.startswith(_END):
        raise _bad(path, f"'{_END.decode()}' does not follow the {len(sizes)} trees tree_sizes lists")
    # LightGBM also parses the parameters block and crashes on a cut one: it must be whole.
    if b"\nparameters:\n" not in tail or b"\nend of parameters\n" not in tail:
        raise _bad(path, "the parameters block after the trees is missing or cut ('end of parameters')")
    return len(sizes)


# ------------------------------------------------------------------------------------------ child process
