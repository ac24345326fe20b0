"""Vetting a candidate model version where a crash cannot reach the caller.

LightGBM's text parser aborts or segfaults the whole process on some malformed model files (a
`model.txt` truncated mid-tree, then re-hashed into a manifest by a buggy publisher or a partial copy,
passes every sha256 check). A serving process must never be the first to parse such a file, so every
path that makes a version live runs two checks first:

* `check_model_text`: a cheap structural check of a LightGBM text model in pure Python (header
  fields, `tree_sizes` against the `Tree=` blocks byte for byte, each tree's arrays against its
  `num_leaves`, split features and child indices in range, `end of trees`, a whole parameters block,
  feature names). `Ranker.load` runs it before LightGBM sees the file, so even a direct load refuses
  a truncated or partial copy. It is a pre-filter, not a parser: a file can pass it and still abort
  LightGBM (e.g. a tree claiming categorical splits without their boundaries), which is what the
  child process is for.
* `vet_version`: a short-lived child process (`python -m recsys.candidate`) that verifies the
  version's hashes, loads every artifact the server would (ONNX towers, embedding store, LightGBM
  ranker through recsys' loader, feature state) and scores a fixed request. Exit 0 means the version
  loads and scores; exit 2 is a refusal with a message; death by a signal is reported by name.

Used by the admin `Reload` RPC, the `--watch-registry` watcher, experiment-config reloads, `recsys
publish` and `recsys models promote`. A refusal is a `ModelError` (gRPC FAILED_PRECONDITION, CLI
exit 2) and whatever was serving keeps serving.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recsys.errors import ModelError, RecsysError
from recsys.model_text import check_model_text

__all__ = ["check_model_text", "check_version", "vet_version"]


def _ranker_data(ranker: Path | None) -> Path | None:
    meta = ranker / "ranker.json" if ranker is not None else None
    if meta is None or not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text()).get("data")
    except ValueError:
        return None  # Ranker.load reports the broken file
    return Path(data) if data else None


def _score_full(
    registry: Any, version: str, *, ranker: Path, data: Path, provider: str, precision: str
) -> dict[str, Any]:
    """Load the version exactly as the server does and rank a fixed request (catalogue head, first user)."""
    import numpy as np
    import polars as pl

    from recsys.data.prepared import PreparedData
    from recsys.serving import engine
    from recsys.serving.model import ItemCatalogue, load_model
    from recsys.serving.validation import RankInput

    prepared = PreparedData.load(data)
    items = prepared.items.sort("item_idx")
    catalogue = ItemCatalogue.from_lists(
        items["item_id"].cast(pl.Utf8).to_list(), items["text"].cast(pl.Utf8).fill_null("").to_list()
    )
    users = prepared.users.sort("user_idx")["user_id"].cast(pl.Utf8).to_list()
    model = load_model(
        registry, version, catalogue, None, ranker_dir=ranker, provider=provider, precision=precision, threads=1,
        cold_cache=0,
    )
    assert model.initial_state is not None
    live = engine.LiveState(model.initial_state, users, catalogue)
    idx = np.arange(min(50, len(catalogue.ids)), dtype=np.int64)
    ids = [catalogue.ids[i] for i in idx]
    request = RankInput(
        request_id="smoke", user_id=users[0] if users else "smoke-user", item_ids=ids, texts=[""] * len(ids),
        extra={}, context={}, top_k=0, explain=False, time_us=time.time_ns() // 1000, history=None,
    )
    ranked = engine.rank(model, live, request, idx)
    if not np.isfinite(ranked.scores).all():
        raise ModelError(f"model version {version} scores a fixed request with non-finite values")
    return {"scored": len(idx), "ranker": str(model.ranker_path)}


def _score_parts(registered: Any, ranker: Path | None, provider: str, precision: str) -> dict[str, Any]:
    """Without the prepared dataset: load the towers and store, encode, and predict one ranker row."""
    import numpy as np

    from recsys.ranker import Ranker
    from recsys.scoring.matcher import MatcherRuntime

    runtime = MatcherRuntime.from_version(registered, provider, precision, 1, verify=False)
    item = runtime.item_encoder.encode(["a smoke-test item"])
    if not np.isfinite(item).all():
        raise ModelError(f"model version {registered.version}: the item tower produces non-finite embeddings")
    if ranker is None:
        return {"scored": 0, "ranker": None}
    model = Ranker.load(ranker, threads=1)
    row = np.zeros((1, len(model.feature_names)), np.float64)
    if not np.isfinite(model.score(row, model.feature_names)).all():
        raise ModelError(f"ranker {ranker} scores a zero row with non-finite values")
    return {"scored": 1, "ranker": str(ranker)}


def check_version(
    root: Path, version: str, *, ranker: Path | None, data: Path | None, provider: str = "cpu", precision: str = "fp32"
) -> dict[str, Any]:
    """What the child runs: hashes, structure, every artifact loaded, a fixed request scored."""
    from recsys.registry import Registry

    registry = Registry(root)
    registered = registry.load(version)  # sha256 of every file
    own = registered.path / "ranker"
    ranker = own if own.is_dir() else ranker
    if ranker is not None and (ranker / "model.txt").is_file():
        meta = json.loads((ranker / "ranker.json").read_text()) if (ranker / "ranker.json").is_file() else {}
        check_model_text(ranker / "model.txt", meta.get("feature_names"))
    data = data or _ranker_data(ranker)
    if ranker is not None and data is not None:
        result = _score_full(registry, version, ranker=ranker, data=data, provider=provider, precision=precision)
    else:
        result = _score_parts(registered, ranker, provider, precision)
    return {"version": version, **result}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys.candidate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--ranker", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args(argv)
    try:
        result = check_version(
            args.registry, args.version, ranker=args.ranker, data=args.data, provider=args.provider,
            precision=args.precision,
        )
    except RecsysError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except Exception as exc:  # anything else an artifact provokes (a manifest missing a key, ...)
        print(f"cannot load it: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------ parent side


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def vet_version(
    root: Path | str,
    version: str,
    *,
    ranker: Path | None = None,
    data: Path | None = None,
    provider: str = "cpu",
    precision: str = "fp32",
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run `check_version` in a child process; -> its summary, or ModelError (the caller's process is
    untouched whatever the version contains). InputError for a version that is not registered."""
    from recsys.registry import Registry

    Registry(root).path(version)  # unknown or not a version name: the caller's error, not the artifact's
    cmd = [sys.executable, "-m", "recsys.candidate", "--registry", str(root), "--version", version,
           "--provider", provider, "--precision", precision]
    for flag, value in (("--ranker", ranker), ("--data", data)):
        if value is not None:
            cmd += [flag, str(value)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ModelError(f"model version {version}: the load-and-score check did not finish in {timeout_s:.0f}s") from exc
    detail = " ".join(proc.stderr.strip().splitlines()[-3:])[-800:]
    if proc.returncode < 0:
        raise ModelError(
            f"model version {version} crashed the load-and-score check process ({_signal_name(proc.returncode)}): "
            f"it was not loaded here. Last output: {detail or 'none'}. Re-publish the version or serve another one."
        )
    if proc.returncode == 2:
        raise ModelError(f"model version {version} refused by the load-and-score check: {detail}")
    if proc.returncode != 0:
        raise ModelError(f"model version {version}: the load-and-score check failed (exit {proc.returncode}): {detail}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - started
    return result


if __name__ == "__main__":
    sys.exit(main())
