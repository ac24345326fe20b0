"""SASRec (Kang & McAuley 2018) as a baseline system: `recsys train sasrec`.

Model: item ID embeddings (shared by input and output, inputs scaled by sqrt(D)), learned positions,
2 causal self-attention blocks of width 64 (training/sequential.py), final LayerNorm; the score of an
item is <state, item embedding>. Loss: full-softmax cross-entropy over every item at every position
of each user's training sequence (RecBole's CE loss; the pmixer reference uses one sampled negative
with BCE). Data: each user's positives in the protocol's train split in the dataset's order (time,
then the label-blind tie order of `recsys prepare`), the newest `max_length` + 1. Early stopping: full-
ranking NDCG@10 of the protocol's valid window (targets of the interaction(s) after train), items the
user had before it excluded. Seeded and deterministic on CPU.

Export: a directory that `recsys evaluate --sasrec DIR` scores with ONNX Runtime without torch
(recsys/evaluation/sequence.py): the user tower (the text matcher's ONNX signature, so the same
`UserEncoder` runs it), the item table, the item ids and the training window (leak refusals apply).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.data.prepared import PreparedData
from recsys.data.window import training_window, write_window
from recsys.errors import ConfigError, InputError, ModelError
from recsys.evaluation.metrics import per_user_metrics, top_k
from recsys.evaluation.sequence import KIND, ordered_histories, user_sequences
from recsys.files import check_output_path, replace_path, temp_path, write_json_atomic
from training.sequential import CausalEncoder, next_item_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SASRecConfig:
    protocol: str = "tail"
    dim: int = 64
    blocks: int = 2
    heads: int = 1
    max_length: int = 200
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 200
    patience: int = 20  # epochs without a better valid NDCG@10 (8 steps each on ML-100K: a noisy curve)
    budget_minutes: float = 0.0  # > 0: no new epoch after this much training time (the best epoch is kept)
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "blocks", "heads", "max_length", "batch_size", "epochs", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sasrec {name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ConfigError(f"sasrec dim {self.dim} must be a multiple of heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"sasrec dropout must be in [0, 1), got {self.dropout}")


class SASRec(nn.Module):
    """item table [n_items + 1, D] (last row = padding) + causal encoder."""

    def __init__(self, n_items: int, config: SASRecConfig) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, config.dim, padding_idx=n_items)
        nn.init.normal_(self.items.weight, std=config.dim**-0.5)
        with torch.no_grad():
            self.items.weight[n_items].zero_()
        self.encoder = CausalEncoder(config.dim, blocks=config.blocks, heads=config.heads,
                                     max_len=config.max_length, dropout=config.dropout)
        self.tower = SASRecTower(self.encoder, config.dim)

    @property
    def table(self) -> torch.Tensor:
        return self.items.weight[:-1]

    def states(self, hist: torch.Tensor, *, newest_only: bool = False) -> torch.Tensor:
        """hist [B, N] item_idx (most recent first, -1 pad) -> [B, N, D] states (`newest_only`: [B, D],
        position 0's)."""
        mask = hist >= 0
        emb = self.items(torch.where(mask, hist, self.items.num_embeddings - 1))
        return self.tower.states(emb, mask, newest_only=newest_only)


class SASRecTower(nn.Module):
    """The export: (hist_emb [B,N,D] = item table rows, hist_type, hist_age, hist_mask) -> user [B,D],
    the state at position 0 (the newest item); zero for an empty history. Type and age are unused."""

    def __init__(self, encoder: CausalEncoder, dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.scale = math.sqrt(dim)

    def states(self, hist_emb: torch.Tensor, mask: torch.Tensor, *, newest_only: bool = False) -> torch.Tensor:
        return self.encoder(hist_emb * self.scale, mask, newest_only=newest_only)

    def forward(self, hist_emb: torch.Tensor, hist_type: torch.Tensor, hist_age: torch.Tensor,
                hist_mask: torch.Tensor) -> torch.Tensor:
        # Type and age carry no information here, but the ONNX graph must keep the four inputs of the
        # user-tower contract (an unused input is pruned): they only confirm what the mask says.
        mask = hist_mask.bool() & (hist_type >= -1) & torch.isfinite(hist_age)
        out = self.states(hist_emb, mask, newest_only=True)
        return torch.where(mask[:, :1], out, torch.zeros_like(out))


def training_sequences(data: PreparedData, protocol: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) [S, length] most recent first, -1 padded: for each user with >= 2 training
    positives, input j = the item before target j."""
    seqs = user_sequences(data, protocol, ("train",))["items"].to_list()
    seqs = [np.asarray(s[-(length + 1):], np.int64) for s in seqs if len(s) >= 2]
    inputs = np.full((len(seqs), length), -1, np.int64)
    targets = np.full((len(seqs), length), -1, np.int64)
    for r, s in enumerate(seqs):
        n = len(s) - 1
        inputs[r, :n] = s[:-1][::-1]
        targets[r, :n] = s[1:][::-1]
    return inputs, targets


def length_batches(lengths: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Rows in batches of similar length (random within a length), batches in random order: padding to
    each batch's longest sequence then costs little (histories range from 2 to `max_length` items)."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[s : s + size] for s in range(0, len(order), size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class ValidSet:
    hist: torch.Tensor
    targets: list[np.ndarray]
    seen: list[np.ndarray]


def valid_set(data: PreparedData, protocol: str, length: int) -> ValidSet:
    frame = data.eval_set(protocol, "valid")
    if not frame.height:
        raise InputError(f"{data.root}: the {protocol} valid window has no users: SASRec early-stops on it")
    users = frame["user_idx"].to_numpy().astype(np.int64)
    cutoff = np.zeros(len(users), np.int64)  # ages are unused by SASRec
    hist = ordered_histories(data, protocol, "valid", users, cutoff, length)
    return ValidSet(torch.from_numpy(hist.item_idx.astype(np.int64)),
                    [np.asarray(t, np.int64) for t in frame["target_item_idx"].to_list()],
                    data.seen_items(frame, protocol, "valid"))


@torch.no_grad()
def valid_ndcg(model: SASRec, valid: ValidSet, k: int = 10, chunk: int = 256) -> float:
    model.eval()
    lengths = (valid.hist >= 0).sum(1).numpy()
    order = np.argsort(lengths, kind="stable")
    values = []
    for s in range(0, len(order), chunk):
        rows = order[s : s + chunk]
        hist = valid.hist[rows, : max(1, int(lengths[rows].max()))]
        user = model.states(hist, newest_only=True)
        scores = (user @ model.table.T).numpy()
        ranked = top_k(scores, k, exclude=[valid.seen[r] for r in rows])
        values.append(per_user_metrics(ranked, [valid.targets[r] for r in rows], k).ndcg)
    model.train()
    return float(np.concatenate(values).mean())


def fit(data: PreparedData, config: SASRecConfig) -> tuple[SASRec, dict[str, Any]]:
    """Train with early stopping; -> (best model, report)."""
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    inputs, targets = training_sequences(data, config.protocol, config.max_length)
    if not len(inputs):
        raise InputError(f"{data.root}: no user has 2 training positives in the {config.protocol} protocol")
    valid = valid_set(data, config.protocol, config.max_length)
    model = SASRec(data.n_items, config)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.98))
    rng = np.random.default_rng(config.seed)
    lengths = (inputs >= 0).sum(1)
    best, best_epoch, best_state, curve, stopped = -1.0, 0, None, [], "epochs"
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses = []
        for rows in length_batches(lengths, config.batch_size, rng):
            x, y = torch.from_numpy(inputs[rows]), torch.from_numpy(targets[rows])
            width = int((x >= 0).sum(1).max())  # pad to the batch's longest sequence
            loss = next_item_loss(model.states(x[:, :width]), y[:, :width], model.table)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        ndcg = valid_ndcg(model, valid)
        curve.append({"epoch": epoch, "loss": float(np.mean(losses)), "valid_ndcg@10": ndcg})
        log.info("sasrec epoch %d: loss %.4f, valid NDCG@10 %.4f", epoch, np.mean(losses), ndcg)
        if ndcg > best:
            best, best_epoch = ndcg, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= config.patience:
            stopped = "patience"
            break
        if config.budget_minutes and time.perf_counter() - started > config.budget_minutes * 60:
            stopped = "time budget"
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    report = {"best_epoch": best_epoch, "valid_ndcg@10": best, "epochs_run": len(curve), "stopped_by": stopped,
              "sequences": len(inputs),
              "train_seconds": round(time.perf_counter() - started, 1), "curve": curve}
    return model, report


def export(model: SASRec, data: PreparedData, config: SASRecConfig, report: dict[str, Any], out: Path) -> Path:
    """Write the artifact directory (temp + rename); the ONNX tower is checked against torch."""
    out = Path(out)
    check_output_path(out, ours=lambda p: (p / "manifest.json").is_file(), kind="SASRec model", inputs=[data.root])
    tmp = temp_path(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.eval()
    _export_tower(model.tower, tmp / "user_tower.onnx", config.dim)
    parity = tower_parity(model.tower, tmp / "user_tower.onnx", config.dim)
    if parity > 1e-4:
        raise ModelError(f"the SASRec ONNX export differs from torch by {parity:.2e} (tolerance 1e-4)")
    np.save(tmp / "item_embeddings.npy", model.table.detach().numpy().astype(np.float32))
    (tmp / "item_ids.json").write_text(json.dumps(data.items["item_id"].cast(str).to_list()))
    window = training_window(data, config.protocol, ("train",))
    write_window(tmp, window)
    write_json_atomic(tmp / "manifest.json", {
        "kind": KIND, "models": {"user": "user_tower.onnx"}, "embeddings": "item_embeddings.npy",
        "item_ids": "item_ids.json", "max_length": config.max_length, "dim": config.dim,
        "config": asdict(config), "training_window": window, "onnx_max_abs_diff": parity,
        "training": {k: v for k, v in report.items() if k != "curve"}, "curve": report["curve"],
    })
    replace_path(tmp, out)
    return out


def _export_tower(tower: SASRecTower, path: Path, dim: int) -> None:
    from training.export import _export

    emb = torch.randn(2, 5, dim)
    types = torch.tensor([[0, 1, 2, -1, -1], [3, 1, 0, 2, 4]], dtype=torch.long)
    mask = (types >= 0).long()
    names = ["hist_emb", "hist_type", "hist_age", "hist_mask"]
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "history"} for name in names}
    axes["user"] = {0: "batch"}
    _export(tower, (emb, types, torch.rand(2, 5) * 1e6, mask), path, names, ["user"], axes, 17)


def tower_parity(tower: nn.Module, path: Path, dim: int, seed: int = 0) -> float:
    """Max |ONNX - torch| of the user vector on random histories of other shapes than the trace."""
    from recsys.scoring.encoder import UserEncoder

    rng = np.random.default_rng(seed)
    encoder = UserEncoder(path, "cpu")
    worst = 0.0
    for b, n in ((3, 7), (1, 1), (4, 12)):
        emb = rng.standard_normal((b, n, dim)).astype(np.float32)
        lengths = rng.integers(0, n + 1, size=b)
        mask = np.arange(n)[None, :] < lengths[:, None]
        types = np.where(mask, rng.integers(0, 5, size=(b, n)), -1)
        ages = (rng.random((b, n)) * 1e6).astype(np.float32)
        emb = emb * mask[..., None]
        got = encoder.encode(emb, types, ages, mask)
        with torch.no_grad():
            ref = tower(torch.from_numpy(emb), torch.from_numpy(types), torch.from_numpy(ages),
                        torch.from_numpy(mask.astype(np.int64))).numpy()
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def train_sasrec(data_dir: Path | str, out: Path | str, config: SASRecConfig) -> dict[str, Any]:
    data = PreparedData.load(data_dir)
    model, report = fit(data, config)
    export(model, data, config, report, Path(out))
    return {k: v for k, v in report.items() if k != "curve"}
