"""Fine-tuning loop for the two-tower matcher.

Per step (batch of B positive pairs):
  1. columns = unique(target items, sampled hard negatives, sampled catalogue negatives): each item
     is encoded once, with grad, in length-bucketed chunks. Every softmax column carries gradient:
     negatives read from a no-grad cache while the positives are fresh bias the item-side gradient
     (the positives' push towards the users is no longer balanced by the negatives' push away), and
     a warm-started matcher lost a third of its NDCG in 12 steps that way (issue #16, measured);
  2. user vectors come from the *cached* embeddings of history items (no encoder pass for B x N
     history items: the dominant cost otherwise); the cache is refreshed from the encoder every
     `cache_refresh` steps and at every validation, and rows of the step's columns are overwritten
     with their fresh embeddings after each step;
  3. in-batch softmax with temperature, false negatives masked (every known positive of the row's
     user), optional logQ correction by each column's inclusion probability.
Settings: `TrainConfig` = data and out dirs + `MatcherModelConfig` (what is learned) + `RunConfig` (how
the run goes), training/matcher/config.py. The loop is small: steps, then validation by the one evaluator (`RankingEvaluator`, whose primary
metric, NDCG@K, picks the checkpoint); cache refresh, the step budget, periodic saves and early
stopping are callbacks (training/matcher/callbacks.py, LightGBM's callback.py shape). The checkpoint
module (training/matcher/checkpoint.py) owns every file name, the best checkpoint and the resume
state. Resumable from out/state/ (weights, optimizer, scheduler, step, history); data order and
dropout are functions of (seed, step), so a resumed run replays the same batches. Benchmark-only step
modes (per-pair encoding, history with gradients, no bucketing) live in bench/matcher.py.
Distributed: under torchrun each rank trains on its shard with local in-batch negatives; DDP averages
gradients (gloo on CPU, nccl on GPU); item encoding for the cache/validation is sharded and gathered.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.data.prepared import PreparedData
from recsys.data.window import read_window, training_window, write_window
from recsys.errors import ConfigError, InputError, ModelError
from recsys.evaluation.baselines import Popularity
from training.matcher.callbacks import CacheRefresh, Callback, EarlyStopping, PeriodicSave, StepBudget
from training.matcher.checkpoint import (
    REPORT_FILE,
    STATE_DIR,
    has_state,
    load_checkpoint,
    load_state,
    save_checkpoint,
    save_state,
)
from training.matcher.config import MatcherModelConfig, RunConfig, TrainConfig
from training.matcher.data import ItemTokens, item_texts, load_pairs, positive_keys
from training.matcher.evaluate import (
    EvalSet,
    RankingEvaluator,
    autocast,
    encode_items,
    history_tensors,
    model_chunks,
)
from training.matcher.loss import false_negative_mask, in_batch_softmax, inclusion_log_prob
from training.matcher.model import (
    ItemHead,
    ItemIdResidual,
    TwoTower,
    build_model,
    find_layers,
    load_encoder,
    make_user_tower,
    resolve_base_model,
)

log = logging.getLogger(__name__)

REPORT = REPORT_FILE


@dataclass
class StepItems:
    """What one step encodes. columns [C]: the softmax's item columns; labels [B]: each row's target
    column; encode [E]: the item_idx sent through the encoder; col_pos [C]: each column's row of the
    encoder output."""

    columns: np.ndarray
    labels: np.ndarray
    encode: np.ndarray
    col_pos: np.ndarray


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=tdist.get_rank(), world=tdist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def _configure_trainable(model: TwoTower, cfg: MatcherModelConfig) -> None:
    """LoRA adapters or (top-N) full fine-tuning; the pooler is never used by mean pooling: frozen."""
    encoder = model.item_tower.encoder
    if cfg.lora:
        from peft import LoraConfig, get_peft_model
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets

        model_type = getattr(encoder.config, "model_type", "")
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(targets.get(model_type) or []) or "all-linear",
            **_lora_layers(encoder, cfg.train_layers),
        )
        model.item_tower.encoder = get_peft_model(encoder, lora)  # freezes every base weight
        return
    for name, p in encoder.named_parameters():
        p.requires_grad_("pooler" not in name and not cfg.freeze_encoder)
    if cfg.train_layers > 0:
        layers = find_layers(encoder)
        if layers is None:
            raise ModelError("--train-layers needs a BERT-family encoder with a recognisable layer list")
        for p in encoder.parameters():
            p.requires_grad_(False)
        for block in list(layers)[-cfg.train_layers :]:
            for p in block.parameters():
                p.requires_grad_(True)


def _lora_layers(encoder: nn.Module, train_layers: int) -> dict[str, Any]:
    """LoraConfig arguments putting adapters only on the top `train_layers` blocks (0: every block).
    With adapters on the top blocks only, the blocks below stay the pretrained ones, so their
    outputs are cached once per item text exactly as for --train-layers without LoRA."""
    if train_layers <= 0:
        return {}
    layers = find_layers(encoder)
    if layers is None:
        raise ModelError("--lora with --train-layers needs a BERT-family encoder with a recognisable layer list")
    first = max(0, len(layers) - train_layers)
    return {"layers_to_transform": list(range(first, len(layers)))}


def _optimizer(model: TwoTower, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, LayerNorm and embeddings-of-types; user tower at head_lr, the
    ID residual at id_lr (Adam moves every row a full step, however rarely its item is seen: a lower
    rate keeps rare items from memorising noise before the user tower has learned anything)."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = cfg.head_lr if name.startswith(("user_tower.", "item_tower.head.")) else cfg.lr
        if name.startswith("item_ids."):
            lr = cfg.id_lr or cfg.head_lr
        no_decay = p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith((".query", ".empty"))
        groups.setdefault((lr, 0.0 if no_decay else cfg.weight_decay), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()])


def _scheduler(opt: torch.optim.Optimizer, total: int, warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, int(total * warmup_frac))

    def factor(step: int) -> float:  # linear warmup, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _check_warm_start(ckpt: Path, cfg: TrainConfig, tokenizer: Any) -> None:
    """A warm start must keep the tokenizer the checkpoint was trained with."""
    if cfg.model.base_model is None:
        return
    _, base_tok = load_encoder(resolve_base_model(cfg.model.base_model))
    if base_tok.get_vocab() != tokenizer.get_vocab():
        raise ModelError(
            f"tokenizer mismatch: --warm-start {ckpt} was trained with a different tokenizer "
            f"({len(tokenizer)} tokens) than --base-model {cfg.model.base_model} ({len(base_tok)} tokens). "
            f"A warm start continues the checkpoint's own encoder: drop --base-model, or train from scratch."
        )


def _initial_model(cfg: TrainConfig, item_keys: list[str]) -> tuple[TwoTower, Any]:
    """The model to fine-tune: a warm-start checkpoint (run settings replaced) or a fresh build.
    `item_keys`: the training catalogue's item ids in item_idx order (the rows of --item-ids)."""
    model_kwargs = dict(
        temperature=cfg.model.temperature, dropout=cfg.model.dropout, max_history=cfg.model.max_history,
        max_text_tokens=cfg.model.max_text_tokens, user_tower=cfg.model.user_tower,
        sequence_blocks=cfg.model.sequence_blocks,
    )
    torch.manual_seed(cfg.run.seed)  # the user tower's (and LoRA's) initial weights
    if not cfg.model.warm_start:
        model, tokenizer = build_model(cfg.model.base_model, item_head=cfg.model.item_head, **model_kwargs)
    else:
        ckpt = Path(cfg.model.warm_start)
        model, tokenizer = load_checkpoint(ckpt)
        _check_warm_start(ckpt, cfg, tokenizer)
        other_tower = model.config.user_tower != cfg.model.user_tower or (
            cfg.model.user_tower == "sequential" and model.config.sequence_blocks != cfg.model.sequence_blocks)
        model.config = replace(model.config, **model_kwargs)  # type: ignore[arg-type]
        if other_tower:  # another user tower (kind or depth): keep the trained item tower, start a fresh user tower
            model.user_tower = make_user_tower(model.config)
        for module in model.user_tower.modules():
            if isinstance(module, nn.Dropout):
                module.p = cfg.model.dropout
        if cfg.model.item_head and model.item_tower.head is None:  # add a fresh (identity) head
            model.item_tower.head = ItemHead(model.config.dim, cfg.model.item_head)
            model.config = replace(model.config, item_head=cfg.model.item_head)
    _set_item_ids(model, cfg, item_keys)
    return model, tokenizer


def _set_item_ids(model: TwoTower, cfg: TrainConfig, item_keys: list[str]) -> None:
    """--item-ids: keep a warm start's ID residual when its rows are this catalogue's, else a fresh
    (zero) one; without --item-ids, none."""
    if not cfg.model.item_ids:
        model.item_ids = None
        model.config = replace(model.config, item_id_rows=0)
        return
    if model.item_ids is None or model.item_ids.keys != item_keys:
        model.item_ids = ItemIdResidual(len(item_keys), model.config.dim)
        model.item_ids.keys = list(item_keys)
    model.item_ids.dropout = cfg.model.id_dropout
    model.config = replace(model.config, item_id_rows=len(item_keys))


class _Trainer:
    """State of one training run (kept in one object so steps, eval and checkpointing share it)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        self.device = _pick_device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = _setup_distributed(self.device)
        self.bf16 = cfg.run.bf16 and self.device.type == "cuda"
        self.data = PreparedData.load(cfg.data)
        self.state_dir = self.out / STATE_DIR
        if cfg.model.freeze_encoder and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--freeze-encoder trains a small head over the whole catalogue per step: run it "
                              "in one process (it needs no torchrun)")
        if cfg.run.resume and not has_state(self.out):
            raise InputError(f"--resume: no saved training state in {self.state_dir}; start without --resume")

        # Cheap input checks first: a bad dataset should not wait for a model load.
        self.pairs = load_pairs(self.data, cfg.model.protocol, "train", cfg.model.max_history, cfg.model.weight_by_strength)
        if self.dist.main:  # what this checkpoint learns from: export, publish and evaluate check it
            inherited = read_window(cfg.model.warm_start) if cfg.model.warm_start else None
            write_window(self.out, training_window(self.data, cfg.model.protocol, inherited=[inherited] if inherited else []))
        model, tokenizer = _initial_model(cfg, [str(i) for i in self.data.items.sort("item_idx")["item_id"].to_list()])
        self.tokenizer = tokenizer
        _configure_trainable(model, cfg.model)
        model.item_tower.head_dropout = cfg.model.head_dropout
        self.model = model.to(self.device)
        self.mcfg = model.config
        self.n_items = self.data.n_items

        self.tokens = ItemTokens.build(item_texts(self.data), tokenizer, self.mcfg.max_text_tokens)
        if self.pairs.item.max() >= self.n_items:
            raise InputError(f"{self.data.root}: pairs reference item_idx beyond items.parquet; rerun recsys prepare")
        self.valid = RankingEvaluator(self._eval_set("valid"), cfg.run.eval_k, self.device)
        self.test = RankingEvaluator(self._eval_set("test") if cfg.run.eval_test else None, cfg.run.eval_k, self.device)
        self.positives = positive_keys(self.n_items, (self.pairs.user, self.pairs.item))
        counts = np.bincount(self.pairs.item, minlength=self.n_items).astype(np.float64)
        self.item_prob = counts / counts.sum()
        # Catalogue negatives come from items with a training positive: an item nobody has interacted
        # with yet carries no evidence against it, and using it as everyone's negative would teach the
        # towers to bury exactly the new items text matching exists for.
        self.negative_pool = np.flatnonzero(counts > 0)
        self.popularity = Popularity(counts)

        self.local_batch = cfg.run.batch_size
        self.steps_per_epoch = max(1, len(self.pairs) // (cfg.run.batch_size * self.dist.world))
        self.total_steps = self.steps_per_epoch * cfg.run.epochs
        if cfg.run.max_steps:
            self.total_steps = min(self.total_steps, cfg.run.max_steps)
        self.opt = _optimizer(self.model, cfg.run)
        self.sched = _scheduler(self.opt, self.steps_per_epoch * cfg.run.epochs, cfg.run.warmup)
        self.ddp: nn.Module = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.cache = torch.zeros(self.n_items + 1, self.mcfg.dim, device=self.device)
        self.lower: torch.Tensor | None = None
        if cfg.model.freeze_encoder and cfg.run.layer_cache:
            self.lower = self._frozen_pooled()
        elif cfg.model.train_layers > 0 and cfg.run.layer_cache:  # LoRA too: adapters only on the top layers
            self.lower = self._lower_states()
        self.step = 0
        self.epoch = 0
        self.best: float = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.finished = False
        self.improved = False
        self.budget_reached = False
        self.history: list[dict[str, Any]] = []
        self.losses: list[tuple[int, float]] = []
        self.report: dict[str, Any] = {}
        self.train_seconds = 0.0
        self.pairs_seen = 0

    def _lower_states(self) -> torch.Tensor:
        """[n_items, T_max, D] outputs of the frozen layers for every item, computed once: the frozen
        part of the encoder never changes, so each step only runs the top `train_layers` blocks."""
        self.model.top_layers = self.cfg.model.train_layers
        items = np.arange(self.n_items)
        width = int(self.tokens.lengths.max())
        lower = torch.zeros(self.n_items, width, self.mcfg.dim, device=self.device)
        with autocast(self.device, self.bf16):
            for pos, ids, mask in self.tokens.chunks(items, 256, bucket=True):
                states = self.model.lower_hidden_states(ids.to(self.device), mask.to(self.device))
                lower[torch.from_numpy(items[pos]).to(self.device), : ids.shape[1]] = states.float()
        return lower

    def _frozen_pooled(self) -> torch.Tensor:
        """[n_items, D] pooled output of the wholly frozen encoder: each step only runs the item head."""
        items = np.arange(self.n_items)
        pooled = torch.zeros(self.n_items, self.mcfg.dim, device=self.device)
        with autocast(self.device, self.bf16):
            for pos, ids, mask in self.tokens.chunks(items, 256, bucket=True):
                out = self.model.frozen_pooled(ids.to(self.device), mask.to(self.device))
                pooled[torch.from_numpy(items[pos]).to(self.device)] = out.float()
        return pooled

    # ---- evaluation -------------------------------------------------------------------------
    def _eval_set(self, split: str) -> EvalSet | None:
        try:
            ev = EvalSet.load(self.data, self.cfg.model.protocol, split, self.mcfg.max_history)
        except InputError:
            return None
        return ev if len(ev) else None

    def refresh_cache(self) -> torch.Tensor:
        """Encode every item (sharded across ranks, then gathered) into the cache; returns [n_items, D]."""
        items = np.arange(self.n_items)
        if self.dist.world == 1:
            emb = encode_items(self.model, self.tokens, items, self.device, bf16=self.bf16, lower=self.lower)
        else:
            import torch.distributed as tdist

            per = math.ceil(self.n_items / self.dist.world)
            mine = items[self.dist.rank * per : (self.dist.rank + 1) * per]
            local = torch.zeros(per, self.mcfg.dim, device=self.device)
            local[: len(mine)] = encode_items(self.model, self.tokens, mine, self.device, bf16=self.bf16, lower=self.lower)
            gathered = [torch.zeros_like(local) for _ in range(self.dist.world)]
            tdist.all_gather(gathered, local)
            emb = torch.cat(gathered)[: self.n_items]
        self.cache[: self.n_items] = emb
        return emb

    # ---- one step -----------------------------------------------------------------------------
    def batch_rows(self, epoch: int, index: int) -> np.ndarray:
        """Rows of this rank's `index`-th batch in `epoch`: a pure function of (seed, epoch)."""
        perm = np.random.default_rng([self.cfg.run.seed, epoch]).permutation(len(self.pairs))
        per_step = self.local_batch * self.dist.world
        chunk = perm[index * per_step : (index + 1) * per_step]
        return chunk[self.dist.rank :: self.dist.world]

    def train_step(self, rows: np.ndarray, step: int) -> float:
        cfg, pairs = self.cfg, self.pairs
        rng = np.random.default_rng([cfg.run.seed, step, self.dist.rank])
        torch.manual_seed(cfg.run.seed * 1_000_003 + step * 101 + self.dist.rank)  # dropout replays on resume
        targets = pairs.item[rows]
        hist = pairs.hist_item[rows]
        negs = pairs.sample_hard_negatives(rows, cfg.model.hard_negatives, rng)
        extra = np.zeros(0, dtype=np.int64)
        if cfg.model.cache_negatives > 0:
            pool = np.setdiff1d(self.negative_pool, np.concatenate([targets, negs]))
            extra = pool if cfg.model.cache_negatives >= len(pool) else rng.choice(pool, cfg.model.cache_negatives, replace=False)
        head_only = self.lower is not None and self.lower.ndim == 2
        if not head_only:  # catalogue negatives are encoded with the step's items: every column carries gradient
            negs, extra = np.concatenate([negs, extra]), extra[:0]
        plan = self.step_items(targets, negs, hist)
        columns, labels = plan.columns, plan.labels
        all_cols = np.concatenate([columns, extra])
        fn_mask = false_negative_mask(pairs.user[rows], all_cols, self.n_items, self.positives, hist)
        log_q = None
        if cfg.model.logq:
            uniform = min(1.0, cfg.model.cache_negatives / max(1, len(self.negative_pool)))
            log_q = torch.from_numpy(inclusion_log_prob(self.item_prob[all_cols], len(rows), uniform)).to(self.device)

        dev = self.device
        if head_only:
            return self._head_only_step(rows, all_cols, labels, fn_mask, log_q)
        chunks = model_chunks(
            self.tokens.chunks(plan.encode, cfg.run.encode_chunk, bucket=self.bucket), plan.encode, self.device, self.lower
        )
        history = history_tensors(self.cache, hist, pairs.hist_type[rows], pairs.hist_age[rows], dev)
        with autocast(dev, self.bf16):
            users, enc = self.encode_step([(x, mask) for _, x, mask in chunks], chunks, plan, history)
            items = enc[torch.from_numpy(plan.col_pos).to(dev)]
            loss = self._loss(users, items, rows, labels, fn_mask, log_q)
        self._optimise(loss)
        with torch.no_grad():  # fresh (train-mode) embeddings of this step's items keep the cache current
            self.cache[torch.from_numpy(columns).to(dev)] = items[: len(columns)].detach().float()
        return float(loss.detach())

    bucket = True  # length bucketing of each step's items (bench/matcher.py measures without)

    def step_items(self, targets: np.ndarray, negs: np.ndarray, hist: np.ndarray) -> StepItems:
        """Each unique item of the step once; history embeddings come from the no-grad cache.
        bench/matcher.py subclasses this to measure the naive alternatives."""
        columns = np.unique(np.concatenate([targets, negs]))
        return StepItems(columns, np.searchsorted(columns, targets), columns, np.arange(len(columns)))

    def encode_step(
        self, inputs: list[tuple[torch.Tensor, torch.Tensor]], chunks: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]],
        plan: StepItems, history: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (user vectors [B, D], encoder output [len(plan.encode), D] in plan.encode order)."""
        users, enc = self.ddp(inputs, *history)
        return users, _unbucket(enc, chunks, len(plan.encode))

    def _head_only_step(self, rows: np.ndarray, all_cols: np.ndarray, labels: np.ndarray, fn_mask: np.ndarray,
                        log_q: torch.Tensor | None) -> float:
        """Frozen encoder: the whole catalogue goes through the item head with gradients each step
        ([n_items, D] x a small MLP: cheap), so history embeddings and every negative carry gradients
        too. With a shared head every item moves at every step; a no-grad history cache would lag
        behind it and the user and item spaces drift apart (training loss rises, measured)."""
        pairs, dev = self.pairs, self.device
        assert self.lower is not None
        with autocast(dev, self.bf16):
            full = self.model.item_tower.finish(self.lower)  # [n_items, D]
            padded = torch.cat([full, full.new_zeros(1, full.shape[1])])
            hist = pairs.hist_item[rows]
            _, h_type, h_age, h_mask = history_tensors(self.cache, hist, pairs.hist_type[rows], pairs.hist_age[rows], dev)
            h_emb = padded[torch.from_numpy(np.where(hist < 0, self.n_items, hist)).to(dev)]
            users = self.model.user_tower(h_emb, h_type, h_age, h_mask)
            loss = self._loss(users, full[torch.from_numpy(all_cols).to(dev)], rows, labels, fn_mask, log_q)
        self._optimise(loss)
        with torch.no_grad():
            self.cache[: self.n_items] = full.detach().float()
        return float(loss.detach())

    def _loss(self, users: torch.Tensor, items: torch.Tensor, rows: np.ndarray, labels: np.ndarray,
              fn_mask: np.ndarray, log_q: torch.Tensor | None) -> torch.Tensor:
        """In-batch softmax of the step's users against its item columns, weighted by event strength."""
        dev = self.device
        return in_batch_softmax(
            users,
            items,
            torch.from_numpy(labels).to(dev),
            self.mcfg.temperature,
            torch.from_numpy(fn_mask).to(dev),
            log_q,
            torch.from_numpy(self.pairs.weight[rows]).to(dev),
        )

    def _optimise(self, loss: torch.Tensor) -> None:
        """One optimiser step: backward, clip the trainable parameters' gradients, step, schedule."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.run.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.run.max_grad_norm)
        self.opt.step()
        self.sched.step()

    # ---- state --------------------------------------------------------------------------------
    _COUNTERS = ("step", "epoch", "best", "best_epoch", "bad_epochs", "finished", "history", "losses", "report",
                 "train_seconds", "pairs_seen")

    def save_state(self) -> None:
        if self.dist.main:
            payload = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "config": self.cfg.to_dict()}
            save_state(self.out, self.model, payload | {key: getattr(self, key) for key in self._COUNTERS})

    def load_state(self) -> None:
        st = load_state(self.out, self.model, self.device)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        for key in self._COUNTERS:
            setattr(self, key, st[key])

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """A small loop; cache refresh, the step budget, periodic saves and early stopping are
        callbacks (LightGBM's callback.py shape), checkpoint choice the validation evaluator's."""
        cfg = self.cfg
        t_start = time.perf_counter()
        if cfg.run.resume:
            self.load_state()
            log.info("resumed from %s at step %d (epoch %d)", self.state_dir, self.step, self.epoch)
        self.resumed_at = self.step
        if not self.report:
            self.report = self._baselines() if cfg.run.zero_shot else {}
        if self.dist.main and not cfg.run.resume:
            save_checkpoint(self.model, self.tokenizer, self.out)  # a usable model exists from the start
        self.refresh_cache()
        self.model.train()
        callbacks: list[Callback] = [
            CacheRefresh(cfg.run.cache_refresh), StepBudget(cfg.run.max_steps), PeriodicSave(cfg.run.save_every),
            EarlyStopping(cfg.run.patience),
        ]
        while not self.finished and self.epoch < cfg.run.epochs:
            if not self._epoch(callbacks):  # the step budget ended it mid-epoch
                self.validate_and_select(partial=True)  # keep the best, save; --resume continues here
                self.save_state()
                break
            self.validate_and_select()
            for callback in callbacks:
                callback.after_epoch(self)
            self.epoch += 1
            self.finished = self.finished or self.epoch >= cfg.run.epochs
            self.save_state()
            if self.budget_reached:
                break
        self.finish(time.perf_counter() - t_start)
        return self.report

    def _epoch(self, callbacks: list[Callback]) -> bool:
        """The rest of the current epoch's steps; False when a callback stopped it before its end."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        first = self.step - self.epoch * self.steps_per_epoch
        bar = tqdm(
            range(first, self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{cfg.run.epochs}",
            disable=not (cfg.run.progress and self.dist.main), file=sys.stderr, dynamic_ncols=True,
        )
        with bar:
            for index in bar:
                t0 = time.perf_counter()
                rows = self.batch_rows(self.epoch, index)
                loss = self.train_step(rows, self.step)
                self.step += 1
                self.train_seconds += time.perf_counter() - t0
                self.pairs_seen += len(rows) * self.dist.world
                self.losses.append((self.step, loss))
                bar.set_postfix(loss=f"{loss:.3f}", pairs_s=f"{self.pairs_seen / max(self.train_seconds, 1e-9):.0f}")
                last = index + 1 == self.steps_per_epoch
                if any(callback.after_step(self, last) for callback in callbacks):
                    return last  # a budget reached on an epoch's last step still ends that epoch normally
        return True

    def validate_and_select(self, partial: bool = False) -> None:
        """Validate the current model, record a history row, save it if best (`self.improved`)."""
        item_emb = self.refresh_cache()
        metrics = self.valid(self.model, item_emb)
        start = self.history[-1]["step"] if self.history else 0
        recent = [v for s, v in self.losses if s > start]
        row: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step, "train_loss": float(np.mean(recent or [np.nan]))}
        if partial:
            row["partial"] = True
        row.update({f"valid_{k}": v for k, v in metrics.items() if k != "users"})
        self.history.append(row)
        score = metrics.get(self.valid.primary, float(self.step))  # no validation set: latest is best
        if self.dist.main:
            log.info("validation: %s", json.dumps(row))
        self.improved = score > self.best
        if self.improved:
            self.best, self.best_epoch = score, self.epoch + 1
            if self.dist.main:
                save_checkpoint(self.model, self.tokenizer, self.out)

    def _baselines(self) -> dict[str, Any]:
        """Zero-shot (pretrained encoder, untrained user tower ≈ mean of history) and popularity."""
        item_emb = self.refresh_cache()
        pop = self.popularity.scores
        return {
            "zero_shot": {"valid": self.valid(self.model, item_emb), "test": self.test(self.model, item_emb, ci=True)},
            "popularity": {"valid": self.valid.of_scores(pop), "test": self.test.of_scores(pop, ci=True)},
        }

    def finish(self, wall: float) -> None:
        cfg = self.cfg
        if self.dist.world > 1:
            import torch.distributed as tdist

            tdist.barrier()  # rank 0 has written the best checkpoint
        best, _ = load_checkpoint(self.out)
        best.to(self.device)
        item_emb = encode_items(best, self.tokens, np.arange(self.n_items), self.device, bf16=self.bf16)
        fine = {"valid": self.valid(best, item_emb), "test": self.test(best, item_emb, ci=True)}
        self.report.update(
            {
                "fine_tuned": fine,
                "best_epoch": self.best_epoch,
                "epochs_run": self.epoch,
                "steps": self.step,
                "history": self.history,
                "train_pairs": len(self.pairs),
                "n_items": self.n_items,
                "pairs_per_second": self.pairs_seen / max(self.train_seconds, 1e-9),
                "train_seconds": self.train_seconds,
                "wall_seconds_this_run": wall,
                "world_size": self.dist.world,
                "device": str(self.device),
                "bf16": self.bf16,
                "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                "config": cfg.to_dict(),
                "matcher_config": asdict(self.mcfg),
                "padding_efficiency": {
                    "bucketed": self.tokens.padding_efficiency(np.arange(self.n_items), cfg.run.encode_chunk, True),
                    "unbucketed": self.tokens.padding_efficiency(np.arange(self.n_items), cfg.run.encode_chunk, False),
                },
            }
        )
        if self.dist.main:
            (self.out / REPORT).write_text(json.dumps(self.report, indent=2, default=float))
            from training.matcher.report import plot_curves

            plot_curves(self.report, self.losses, self.out / "training_curves.png", cfg.run.eval_k)
        self.save_state()


def _unbucket(enc: torch.Tensor, chunks: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
    """Concatenated chunk outputs [n, D] back to the original item order."""
    order = torch.from_numpy(np.concatenate([pos for pos, _, _ in chunks])).to(enc.device)
    out = torch.empty_like(enc)
    out[order] = enc
    return out


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a matcher; returns the training report (also written to out/)."""
    if cfg.model.user_tower == "sequential":
        from training.matcher.sequence_train import SequenceTrainer

        trainer: _Trainer = SequenceTrainer(cfg)
    else:
        trainer = _Trainer(cfg)
    try:
        return trainer.run()
    finally:
        if trainer.dist.world > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


__all__ = ["TrainConfig", "train"]
