"""The matcher trainer's settings: what is learned (`MatcherModelConfig`) and how the run goes (`RunConfig`).

    TrainConfig(data, out, model=MatcherModelConfig(...), run=RunConfig(...))

MatcherModelConfig: the starting weights (base model or warm start), the data protocol, history and
text lengths, what is trained (LoRA, top layers, frozen encoder, item head), the loss and its
negatives. RunConfig: epochs, learning rates, batch size, device and threads, seeds, checkpointing
(step budget, saves, resume), early stopping, evaluation and logging. Both are frozen and validated
at construction. `TrainConfig.to_dict` writes the nested form into training reports and resume
state; `TrainConfig.from_dict` reads it back, and also the flat dicts written before the split
(every field name is unique across the two parts), so an older checkpoint still warm-starts.
No torch here: `recsys train matcher --help` stays light.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from recsys.errors import ConfigError

PROTOCOLS = ("global", "loo", "tail")


def _check(obj: Any, checks: dict[str, bool]) -> None:
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(f"invalid matcher training settings: {', '.join(f'{k}={getattr(obj, k)!r}' for k in bad)}")


@dataclass(frozen=True)
class MatcherModelConfig:
    """What is learned, from what: model, data and loss settings."""

    base_model: str | None = None  # None: all-MiniLM-L6-v2 (offline), or the warm start's encoder
    warm_start: str | None = None  # continue from an earlier checkpoint directory
    protocol: str = "global"  # train/valid/test split of the prepared data
    max_history: int = 20
    max_text_tokens: int = 64
    weight_by_strength: bool = True  # weight each pair's loss by its event strength
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    train_layers: int = 0  # >0: train only the top N transformer layers (embeddings + rest frozen)
    freeze_encoder: bool = False  # train only the item head and the user tower (encoder outputs cached)
    item_head: int = 0  # >0: residual MLP head (this hidden width) after the item tower's pooling
    head_dropout: float = 0.0  # share of items per step that skip the item head (text-only embedding)
    dropout: float = 0.1  # user tower
    temperature: float = 0.05
    hard_negatives: int = 0  # per pair, from neg_item_idx
    logq: bool = False
    cache_negatives: int = 0  # extra catalogue negatives per step, encoded with gradient (>= n_items: all)
    user_tower: str = "pooling"  # "sequential": causal transformer, next item at every position (frozen encoder)
    sequence_blocks: int = 1  # the sequential tower's transformer blocks (1: as good a blend as 2, half the serving cost)
    item_ids: bool = False  # learned per-item ID residual on the item vectors of trained items (sequential tower)
    id_dropout: float = 0.0  # share of items per step whose vector skips the ID residual (text-only)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol must be global, loo or tail, got {self.protocol!r}")
        _check(self, {
            "temperature": self.temperature > 0,
            "max_history": self.max_history >= 1,
            "max_text_tokens": self.max_text_tokens >= 4,
            "hard_negatives": self.hard_negatives >= 0,
            "cache_negatives": self.cache_negatives >= 0,
            "dropout": 0 <= self.dropout < 1,
            "lora_r": self.lora_r >= 1,
            "item_head": self.item_head >= 0,
            "head_dropout": 0 <= self.head_dropout < 1 and (self.head_dropout == 0 or self.item_head > 0),
            "user_tower": self.user_tower == "pooling" or (self.user_tower == "sequential" and self.freeze_encoder),
            "sequence_blocks": self.sequence_blocks >= 1,
            "item_ids": not self.item_ids or self.user_tower == "sequential",
            "id_dropout": 0 <= self.id_dropout < 1 and (self.id_dropout == 0 or self.item_ids),
            "freeze_encoder": not self.freeze_encoder or (self.item_head > 0 and not self.lora and self.train_layers == 0),
        })


@dataclass(frozen=True)
class RunConfig:
    """How the run goes: optimisation, devices, seeds, checkpointing, early stopping, evaluation, logging."""

    epochs: int = 3
    batch_size: int = 256  # pairs per step (per process under torchrun)
    lr: float = 5e-5  # encoder (or LoRA adapters)
    head_lr: float = 1e-3  # user tower and item head
    id_lr: float = 0.0  # the ID residual of --item-ids (0: head_lr)
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of total steps
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    cache_refresh: int = 200  # steps between full cache refreshes (0: only at validation)
    encode_chunk: int = 128
    layer_cache: bool = True  # with train_layers: cache the frozen layers' outputs, run only the top N
    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # bf16 autocast when on CUDA
    threads: int = 0  # torch intra-op threads (0: torch default)
    resume: bool = False
    max_steps: int = 0  # stop after this many steps in total (0: no limit)
    save_every: int = 0  # also save resume state every N steps (0: each epoch)
    patience: int = 2  # early stopping: epochs without a better validation NDCG@eval_k
    eval_k: int = 10
    zero_shot: bool = True  # evaluate the untrained model and popularity first
    eval_test: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self, {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 2,
            "lr": self.lr > 0,
            "head_lr": self.head_lr > 0,
            "id_lr": self.id_lr >= 0,
            "warmup": 0 <= self.warmup < 1,
        })


@dataclass(frozen=True)
class TrainConfig:
    data: str  # prepared dataset directory
    out: str  # checkpoint directory
    model: MatcherModelConfig = field(default_factory=MatcherModelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def flatten(raw: dict[str, Any]) -> dict[str, Any]:
        """A saved config, nested (`to_dict`) or flat (written before the split) -> one flat dict of
        field names: the form overrides are merged in (every name is unique across the two parts)."""
        flat = {k: v for k, v in raw.items() if k not in ("model", "run")}
        return flat | dict(raw.get("model") or {}) | dict(raw.get("run") or {})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """The nested form of `to_dict` or a flat one (see `flatten`). Unknown keys (settings of other
        versions) are ignored."""
        flat = cls.flatten(raw)
        model = {f.name: flat[f.name] for f in fields(MatcherModelConfig) if f.name in flat}
        run = {f.name: flat[f.name] for f in fields(RunConfig) if f.name in flat}
        return cls(data=str(flat["data"]), out=str(flat["out"]), model=MatcherModelConfig(**model), run=RunConfig(**run))
