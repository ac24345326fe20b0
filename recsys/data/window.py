"""Training windows: which interactions an artifact learnt from, and the refusal to score them.

Every trained artifact records its window in its manifest (the matcher checkpoint in
`training_window.json`, copied into the export and the registry version; the blender in its
`windows`): the prepared dataset (path and content id), the split protocol, the splits it fitted on,
the dataset's global cutoffs, the time span and count of those interactions, and the windows of
whatever it was warm-started from (`inherited`).

Whatever scores a window (evaluate, publish's blender, retrain's comparison) calls `check_window`,
which counts the scored interactions the artifact trained on and refuses (exit 2) when there are any.
Same dataset: exact, by the split columns of pairs.parquet. Another dataset whose training dataset
still exists: exact, by (user_id, item_id, timestamp). Training dataset gone: conservative, every
scored interaction inside the training span counts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import polars as pl

from recsys.data.prepared import SPLIT_COLUMN, PreparedData, _check_protocol
from recsys.errors import InputError
from recsys.files import sha256_file, write_json_atomic

WINDOW_FILE = "training_window.json"
KEYS = ("user_id", "item_id", "timestamp")


@lru_cache(maxsize=32)
def _dataset_id_cached(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(Path(path))[:20]


def dataset_id(root: Path | str) -> str:
    """Content id of a prepared dataset: the hash of its pairs.parquet (every split reads from it)."""
    pairs = Path(root) / "pairs.parquet"
    stat = pairs.stat()
    return _dataset_id_cached(str(pairs.resolve()), stat.st_mtime_ns, stat.st_size)


def _pairs(root: Path) -> pl.LazyFrame:
    return pl.scan_parquet(root / "pairs.parquet")


def training_window(data: PreparedData, protocol: str, splits: Sequence[str] = ("train",), *,
                    inherited: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The window of an artifact fitted on `splits` of `protocol` in `data` (plus `inherited` windows)."""
    column = SPLIT_COLUMN[_check_protocol(protocol)]
    span = (
        _pairs(data.root).filter(pl.col(column).is_in(list(splits)))
        .select(pl.col("timestamp").min().alias("first"), pl.col("timestamp").max().alias("last"), pl.len().alias("n"))
        .collect()
        .row(0, named=True)
    )
    return {
        "dataset": str(data.root.resolve()),
        "dataset_id": dataset_id(data.root),
        "protocol": protocol,
        "splits": list(splits),
        "cutoffs": data.manifest.get("cutoffs"),
        "first": str(span["first"]),
        "last": str(span["last"]),
        "interactions": int(span["n"]),
        "inherited": [dict(w) for w in inherited],
    }


def write_window(directory: Path, window: Mapping[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / WINDOW_FILE, dict(window))


def read_window(directory: Path | str) -> dict[str, Any] | None:
    """The window recorded in a checkpoint directory; None when it has none (an untrained base model)."""
    path = Path(directory) / WINDOW_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def describe(window: Mapping[str, Any]) -> str:
    return (f"the {'+'.join(window['splits'])} split of the {window['protocol']} protocol of {window['dataset']} "
            f"({window['interactions']:,} interactions, {window['first']} .. {window['last']})")


def _scored(data: PreparedData, protocol: str, split: str) -> pl.LazyFrame:
    return _pairs(data.root).filter(pl.col(SPLIT_COLUMN[_check_protocol(protocol)]) == split)


def _with_keys(root: Path, frame: pl.LazyFrame) -> pl.LazyFrame:
    users = pl.scan_parquet(root / "users.parquet").select("user_idx", "user_id")
    items = pl.scan_parquet(root / "items.parquet").select("item_idx", "item_id")
    return frame.join(users, on="user_idx").join(items, on="item_idx").select(*KEYS)


def _overlap_one(window: Mapping[str, Any], data: PreparedData, protocol: str, split: str) -> tuple[int, str]:
    """(scored interactions the window trained on, how that was counted)."""
    if not window.get("interactions"):
        return 0, "exact"
    scored = _scored(data, protocol, split)
    trained_col = SPLIT_COLUMN[window["protocol"]]
    if window["dataset_id"] == dataset_id(data.root):
        n = scored.filter(pl.col(trained_col).is_in(window["splits"])).select(pl.len()).collect().item()
        return int(n), "exact"
    source = Path(window["dataset"])
    if (source / "pairs.parquet").is_file() and dataset_id(source) == window["dataset_id"]:
        trained = _with_keys(source, _pairs(source).filter(pl.col(trained_col).is_in(window["splits"])))
        n = _with_keys(data.root, scored).join(trained.unique(), on=list(KEYS)).select(pl.len()).collect().item()
        return int(n), "exact, by (user_id, item_id, timestamp)"
    first, last = (pl.Series([window[k]]).str.to_datetime(time_zone="UTC").item() for k in ("first", "last"))
    n = scored.filter(pl.col("timestamp").is_between(first, last)).select(pl.len()).collect().item()
    return int(n), f"bounded by time: the training dataset {source} is gone or changed"


def window_overlap(window: Mapping[str, Any], data: PreparedData, protocol: str, split: str) -> tuple[int, str]:
    """Scored interactions of (`protocol`, `split`) in `data` that `window` (or a window it inherited) trained on."""
    total, how = 0, "exact"
    for part in (window, *window.get("inherited", ())):
        n, part_how = _overlap_one(part, data, protocol, split)
        total += n
        how = part_how if n else how
    return total, how


def check_window(window: Mapping[str, Any] | None, data: PreparedData, protocol: str, splits: Sequence[str], *,
                 what: str, fix: str) -> None:
    """Refuse (InputError, exit 2) when `what` was trained on interactions of the scored windows."""
    if window is None:
        return
    for split in splits:
        n, how = window_overlap(window, data, protocol, split)
        if n:
            total = _scored(data, protocol, split).select(pl.len()).collect().item()
            raise InputError(
                f"{what} was trained on {describe(window)}, which overlaps the window being scored, the "
                f"{split} split of the {protocol} protocol of {data.root} ({n:,} of its {total:,} interactions "
                f"were training data; counted {how}): its scores there are not out-of-sample. Fix: {fix}"
            )


def version_window(version_dir: Path | str) -> dict[str, Any] | None:
    """The matcher training window recorded in an export / registry version's manifest.json."""
    path = Path(version_dir) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    window = manifest.get("training_window")
    return dict(window) if window else None
