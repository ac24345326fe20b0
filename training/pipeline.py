"""Publish one registry version holding everything the service needs: matcher + blender + checkpoint.

    <version>/manifest.json, item*.onnx, user.onnx, tokenizer.json, embeddings/   (training/export.py)
    <version>/ranker/       LightGBM blender trained against *this* exported matcher (recsys/ranker.py)
    <version>/checkpoint/   the torch checkpoint it was exported from, so a retrain can warm-start
                            from the production version itself

Why one mechanism: the blender learns from the match scores of one specific matcher, so the two must
be versioned, promoted and rolled back together. The ranker is trained against the *exported* ONNX
towers (through the serving runtime), not the torch model, so it sees the scores serving will produce.
Every file (ranker and checkpoint included) is hashed into the manifest, so a corrupted blender is
refused at load like a corrupted ONNX file.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recsys.candidate import vet_version
from recsys.data.prepared import PreparedData
from recsys.data.window import check_window, read_window, training_window
from recsys.errors import ModelError
from recsys.files import fault_point
from recsys.progress import Stages
from recsys.registry import FORMAT, MANIFEST, Registry, hash_files
from recsys.scoring.registry_matcher import registry_matcher
from training.export import ExportConfig, export_checkpoint
from training.ranker import RankerConfig, train_ranker

log = logging.getLogger(__name__)

RANKER_DIR = "ranker"
CHECKPOINT_DIR = "checkpoint"
# Resume state (optimizer, scheduler) and plots are not needed to warm-start: keep versions small.
_CHECKPOINT_SKIP = {"state", "training_curves.png"}
_PUBLISH_FIX = ("train the matcher on this dataset with --protocol global (it then learns only from the train "
                "window, before the blender's), or publish with the prepared dataset it was trained on.")


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy the model files of a matcher checkpoint (not its resume state)."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        if entry.name in _CHECKPOINT_SKIP or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name)
        else:
            shutil.copy2(entry, dst / entry.name)


def _files_under(root: Path, sub: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / sub).rglob("*") if p.is_file())


def quality_warnings(manifest: Mapping[str, Any], checkpoint: Path) -> list[str]:
    """Loud, recorded warnings when a published model loses to a trivial alternative on validation data:
    the blender to its own match_score feature (on its held-out request groups), the fine-tuned matcher
    to popularity (on the matcher's validation window, from its training report)."""
    out = []
    holdout = (manifest.get("ranker") or {}).get("metrics", {}).get("holdout", {})
    blend, match = holdout.get("ndcg@10/ranker"), holdout.get("ndcg@10/match_score")
    if blend is not None and match is not None and blend < match:
        out.append(f"the blender loses to its own match_score feature on its held-out request groups "
                   f"(NDCG@10 {blend:.4f} < {match:.4f}): serving the match score alone would rank better")
    report_path = checkpoint / "training_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        fine = (report.get("fine_tuned") or {}).get("valid") or {}
        pop = (report.get("popularity") or {}).get("valid") or {}
        for metric in ("recall@10", "ndcg@10"):
            if metric in fine and metric in pop and fine[metric] < pop[metric]:
                out.append(f"the fine-tuned matcher loses to popularity on the validation window "
                           f"({metric} {fine[metric]:.4f} < {pop[metric]:.4f}): train longer or on more data")
                break
    return out


def publish_version(
    checkpoint: Path | str,
    registry: Registry | Path | str,
    data: PreparedData | Path | str,
    *,
    ranker_config: RankerConfig | None = None,
    export_config: ExportConfig | None = None,
    promote: bool = False,
    extra: Mapping[str, Any] | None = None,
    ranker_init: Path | str | None = None,
) -> str:
    """Export `checkpoint`, train the blender against the staged export, register; -> version.

    `data` must be the prepared dataset the checkpoint was trained on: the matcher learnt from its
    global "train" window and the ranker learns from its "valid" window, so the match scores it sees
    are out-of-sample; a checkpoint whose recorded training window overlaps valid/test is refused. `extra` is merged into the manifest (e.g. retrain lineage). `ranker_init`: a
    previous blender (model.txt) the new one may continue from or keep (`train_ranker(init_model=)`,
    chosen on the blender's early-stopping holdout). Nothing is registered
    when any step fails; the staging directory is removed.
    """
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    prepared = data if isinstance(data, PreparedData) else PreparedData.load(data)
    checkpoint = Path(checkpoint)
    # The blender learns from the global valid window (early-stopped on its later part, tested on
    # test): the matcher must never have trained on them, or its match scores there are in-sample.
    check_window(read_window(checkpoint), prepared, "global", ("valid", "test"),
                 what=f"the matcher checkpoint {checkpoint}", fix=_PUBLISH_FIX)
    staging = registry.staging_dir()
    stages = Stages("publish", 4)  # recsys.progress: a bar on a terminal, silent otherwise
    try:
        stages.next("export ONNX towers + item embeddings, parity check")
        result = export_checkpoint(checkpoint, staging, export_config, prepared.root)
        # A provisional manifest, so the staged directory reads like a version (registry_matcher).
        provisional = {"format": FORMAT, "version": None, **result.manifest,
                       "files": hash_files(staging, result.hashed)}
        (staging / MANIFEST).write_text(json.dumps(provisional, indent=1))
        matcher = registry_matcher(staging, prepared)
        stages.next("train the LightGBM blender")
        trained = train_ranker(prepared, staging / RANKER_DIR, matcher, ranker_config,
                               matcher_ref=f"{RANKER_DIR}/.. (the matcher of this registry version)",
                               init_model=ranker_init)
        stages.next("register")
        copy_checkpoint(checkpoint, staging / CHECKPOINT_DIR)
        hashed = [*result.hashed, *_files_under(staging, RANKER_DIR), *_files_under(staging, CHECKPOINT_DIR)]
        manifest = {
            **result.manifest,
            "kind": "matcher+ranker",
            "ranker": {"path": RANKER_DIR, "best_iteration": trained.best_iteration, "metrics": trained.metrics,
                       "selection": trained.selection},
            "checkpoint": {"path": CHECKPOINT_DIR, "source": str(checkpoint.resolve())},
            "data": {"path": str(prepared.root.resolve()), "cutoffs": prepared.manifest.get("cutoffs"),
                     "rows": prepared.manifest.get("rows")},
            "windows": {"matcher": result.manifest.get("training_window"),
                        "blender": training_window(prepared, "global", ("valid",))},
            **(dict(extra) if extra else {}),
        }
        manifest["warnings"] = quality_warnings(manifest, staging / CHECKPOINT_DIR)
        fault_point("publish:staged")
        version = registry.register(staging, manifest, hashed)
    except BaseException:
        stages.close()
        registry.discard(staging)
        raise
    for warning in manifest["warnings"]:
        log.warning("%s: %s", version, warning)
    log.info("published %s (matcher + ranker + checkpoint) in %s", version, registry.root)
    try:  # the check `models promote` and the server's Reload run: a child process loads and scores it
        stages.next("load-and-score check in a child process")
        vet_version(registry.root, version, data=prepared.root)
    except ModelError as exc:
        raise ModelError(f"registered {version}, but it is not usable and was not promoted: {exc}") from exc
    finally:
        stages.close()
    if promote:
        registry.promote(version)
    return version
