"""The matcher checkpoint: this module owns its file names and both save and load.

    <dir>/item_encoder/             Hugging Face encoder + tokenizer (save_pretrained; LoRA merged)
    <dir>/user_tower.safetensors    user tower weights
    <dir>/item_head.safetensors     residual item head (when matcher_config.item_head > 0)
    <dir>/item_ids.safetensors      learned per-item ID residual (when matcher_config.item_id_rows > 0)
    <dir>/item_ids.json             the item id of each of its rows
    <dir>/matcher_config.json       MatcherConfig
    <dir>/state/                    a training run's resume state (model.safetensors, trainer_state.pt)
    <dir>/training_report.json      the run's report

`load_checkpoint` gives the trainable TwoTower (fine-tuning, warm starts, benchmarks); `load_towers`
gives both towers in eval mode with eager attention (exact, and the pattern ONNX Runtime's fusions
recognise) for `recsys export`. `save_state` / `load_state` keep a run resumable.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recsys.errors import InputError, ModelError
from recsys.files import write_json_atomic
from training.matcher.model import (
    ItemHead,
    ItemTower,
    MatcherConfig,
    TwoTower,
    load_encoder,
    make_user_tower,
    plain_encoder,
)

log = logging.getLogger(__name__)

ITEM_ENCODER_DIR = "item_encoder"
USER_TOWER_FILE = "user_tower.safetensors"
ITEM_HEAD_FILE = "item_head.safetensors"
ITEM_IDS_FILE = "item_ids.safetensors"
ITEM_KEYS_FILE = "item_ids.json"
CONFIG_FILE = "matcher_config.json"
STATE_DIR = "state"
STATE_WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
REPORT_FILE = "training_report.json"


def save_checkpoint(model: TwoTower, tokenizer: Any, out_dir: Path) -> None:
    """Write the checkpoint layout above."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = plain_encoder(model.item_tower.encoder)
    encoder.save_pretrained(out_dir / ITEM_ENCODER_DIR, safe_serialization=True)  # type: ignore[operator]
    tokenizer.save_pretrained(out_dir / ITEM_ENCODER_DIR)
    state = {k: v.detach().cpu().contiguous() for k, v in model.user_tower.state_dict().items()}
    save_file(state, str(out_dir / USER_TOWER_FILE))
    if model.item_tower.head is not None:
        head = {k: v.detach().cpu().contiguous() for k, v in model.item_tower.head.state_dict().items()}
        save_file(head, str(out_dir / ITEM_HEAD_FILE))
    if model.item_ids is not None:
        save_file({"weight": model.item_ids.weight.detach().cpu().contiguous()}, str(out_dir / ITEM_IDS_FILE))
        write_json_atomic(out_dir / ITEM_KEYS_FILE, model.item_ids.keys)
    model.config.save(out_dir / CONFIG_FILE)


def check_layout(path: Path) -> None:
    """InputError naming the first missing piece when `path` is not a checkpoint directory."""
    for needed in (ITEM_ENCODER_DIR, USER_TOWER_FILE, CONFIG_FILE):
        if not (path / needed).exists():
            raise InputError(
                f"{path} is not a matcher checkpoint: {path / needed} is missing. Point --checkpoint at the "
                f"directory written by `recsys train matcher` ({ITEM_ENCODER_DIR}/, {USER_TOWER_FILE}, {CONFIG_FILE})."
            )


def load_checkpoint(ckpt_dir: Path | str) -> tuple[TwoTower, Any]:
    """(model, tokenizer) from a checkpoint directory; InputError/ModelError if it is not one."""
    ckpt_dir = Path(ckpt_dir)
    config = MatcherConfig.load(ckpt_dir / CONFIG_FILE)
    encoder, tokenizer = load_encoder(str(ckpt_dir / ITEM_ENCODER_DIR))
    model = TwoTower(encoder, config)
    _load_user_tower(model.user_tower, ckpt_dir)
    if model.item_tower.head is not None:
        load_item_head(model.item_tower.head, ckpt_dir)
    if model.item_ids is not None:
        model.item_ids.keys, weight = load_item_ids(ckpt_dir, config.item_id_rows)
        model.item_ids.weight.data.copy_(weight)
    return model, tokenizer


def load_item_ids(ckpt_dir: Path, rows: int) -> tuple[list[str], torch.Tensor]:
    """(item id per row, ID residual [rows, D]) of a checkpoint trained with --item-ids, or a ModelError."""
    from safetensors.torch import load_file

    try:
        keys = [str(k) for k in json.loads((ckpt_dir / ITEM_KEYS_FILE).read_text())]
        weight = load_file(str(ckpt_dir / ITEM_IDS_FILE))["weight"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{ckpt_dir}: the ID residual ({ITEM_IDS_FILE}, {ITEM_KEYS_FILE}) cannot be loaded "
                         f"({CONFIG_FILE} has item_id_rows={rows}): {exc}") from exc
    if len(keys) != rows or weight.shape[0] != rows:
        raise ModelError(f"{ckpt_dir}: {ITEM_IDS_FILE} has {weight.shape[0]} rows and {ITEM_KEYS_FILE} {len(keys)} "
                         f"ids, {CONFIG_FILE} says item_id_rows={rows}: the checkpoint is inconsistent; retrain it")
    return keys, weight


def _load_user_tower(tower: torch.nn.Module, ckpt_dir: Path) -> None:
    from safetensors.torch import load_file

    try:
        tower.load_state_dict(load_file(str(ckpt_dir / USER_TOWER_FILE)))
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"{ckpt_dir / USER_TOWER_FILE} cannot be loaded: {exc}") from exc


def load_item_head(head: ItemHead, ckpt_dir: Path) -> None:
    """Load item_head.safetensors into `head`, or a ModelError naming the file."""
    from safetensors.torch import load_file

    path = ckpt_dir / ITEM_HEAD_FILE
    try:
        head.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"{path} cannot be loaded ({CONFIG_FILE} has item_head > 0): {exc}") from exc


@dataclass
class Checkpoint:
    """Both towers in eval mode, as `recsys export` reads them."""

    path: Path
    config: MatcherConfig
    item_tower: ItemTower
    user_tower: torch.nn.Module
    tokenizer_json: Path
    extra_config: dict[str, Any]
    item_ids: tuple[list[str], torch.Tensor] | None = None  # (ids, ID residual rows): baked into the store


def load_towers(path: Path | str) -> Checkpoint:
    """Both towers in eval mode; the encoder with eager attention. Trainer configs saved beside the
    checkpoint come back as `extra_config` (file stem -> JSON)."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(path)
    check_layout(path)
    config = MatcherConfig.load(path / CONFIG_FILE)
    encoder = AutoModel.from_pretrained(path / ITEM_ENCODER_DIR, attn_implementation="eager")
    if int(encoder.config.hidden_size) != config.dim:
        raise ModelError(f"{path}: encoder hidden size {encoder.config.hidden_size} != matcher dim {config.dim}")
    user = make_user_tower(config)
    _load_user_tower(user, path)
    tokenizer_json = path / ITEM_ENCODER_DIR / "tokenizer.json"
    if not tokenizer_json.exists():  # slow-tokenizer checkpoints: derive the fast one once
        fast = AutoTokenizer.from_pretrained(path / ITEM_ENCODER_DIR, use_fast=True)
        tokenizer_json = path / "tokenizer.export.json"
        fast.backend_tokenizer.save(str(tokenizer_json))
    extra = {}
    for other in sorted(path.glob("*.json")):
        if other.name not in (CONFIG_FILE, tokenizer_json.name, ITEM_KEYS_FILE):
            try:
                extra[other.stem] = json.loads(other.read_text())
            except ValueError:
                log.warning("ignoring unreadable %s", other)
    head = None
    if config.item_head > 0:  # residual MLP after pooling: part of the exported item tower
        head = ItemHead(config.dim, config.item_head)
        load_item_head(head, path)
    ids = load_item_ids(path, config.item_id_rows) if config.item_id_rows > 0 else None
    return Checkpoint(path, config, ItemTower(encoder, head).eval(), user.eval(), tokenizer_json, extra, ids)


def has_state(out_dir: Path) -> bool:
    return (out_dir / STATE_DIR / TRAINER_STATE).exists()


def save_state(out_dir: Path, model: torch.nn.Module, payload: dict[str, Any]) -> None:
    """The run's resume state: weights + `payload` (optimizer, scheduler, counters), the latter
    written to a temp file and renamed."""
    from safetensors.torch import save_model

    state_dir = out_dir / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(state_dir / STATE_WEIGHTS))
    torch.save(payload, state_dir / (TRAINER_STATE + ".tmp"))
    os.replace(state_dir / (TRAINER_STATE + ".tmp"), state_dir / TRAINER_STATE)


def load_state(out_dir: Path, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """Weights into `model`; -> the payload `save_state` wrote."""
    from safetensors.torch import load_model

    state_dir = out_dir / STATE_DIR
    load_model(model, str(state_dir / STATE_WEIGHTS), device=str(device))
    payload: dict[str, Any] = torch.load(state_dir / TRAINER_STATE, map_location=device, weights_only=False)
    return payload
