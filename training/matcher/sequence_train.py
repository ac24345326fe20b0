"""Training the sequential user tower (`recsys train matcher --user-tower sequential --freeze-encoder`).

The matcher's trainer with another step: examples are windows of a user's training positives
(time, then the label-blind tie order of `recsys prepare`), `max_history` + 1 items, consecutive
windows sharing one item, so each training positive is a target once per epoch. The causal tower
(training/matcher/model.py `SequentialUserTower`) gives a state at every position of a window in one
pass, and each is trained against the next item: a softmax over every item with a training positive
(through the item head over the cached frozen-encoder output, with gradients, as the pooling tower's
frozen path), temperature, each target weighted by its event strength, the user's other known
positives masked (false negatives) and the same logQ term as the pooling tower (with every
trained item a column at every step, its inclusion probability is 1: the term is zero).
Ages are seconds before the window's last target, so the tower's gap features (time from each item to
the next event) equal serving's (time from each item to the next one, the newest to the request).
Validation, checkpoints, early stopping and the report are the matcher trainer's.
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.errors import ConfigError, InputError
from recsys.evaluation.sequence import user_sequences
from training.matcher.config import TrainConfig
from training.matcher.loss import inclusion_log_prob
from training.matcher.model import SequentialUserTower
from training.matcher.train import _scheduler, _Trainer
from training.sequential import next_item_loss


class SequenceWindows:
    """inputs/types/ages/targets/weights [W, N], most recent first (-1 / -1 / 0 / -1 / 0 padding):
    input j is the item before target j; users [W]."""

    def __init__(self, users: np.ndarray, inputs: np.ndarray, types: np.ndarray, ages: np.ndarray,
                 targets: np.ndarray, weights: np.ndarray) -> None:
        self.users, self.inputs, self.types, self.ages = users, inputs, types, ages
        self.targets, self.weights = targets, weights

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def build(cls, frame_rows: list[tuple[int, list[int], list[int], list[int], list[float]]], n: int) -> SequenceWindows:
        """frame_rows: (user, items, codes, ts µs, strength) per user, in order."""
        rows: list[tuple[int, slice, int]] = []  # (user, window of that user's arrays, user position)
        arrays = [tuple(np.asarray(a) for a in (items, codes, ts, strength)) for _, items, codes, ts, strength in frame_rows]
        for p, (user, items, *_rest) in enumerate(frame_rows):
            for end in range(len(items), 1, -n):  # newest window first; windows share one item
                rows.append((user, slice(max(0, end - n - 1), end), p))
        w = len(rows)
        out = cls(np.zeros(w, np.int64), np.full((w, n), -1, np.int64), np.full((w, n), -1, np.int64),
                  np.zeros((w, n), np.float32), np.full((w, n), -1, np.int64), np.zeros((w, n), np.float32))
        for r, (user, window, p) in enumerate(rows):
            item, code, stamp, weight = (a[window] for a in arrays[p])
            k = len(item) - 1
            out.users[r] = user
            out.inputs[r, :k] = item[:-1][::-1]
            out.types[r, :k] = code[:-1][::-1]
            out.ages[r, :k] = (stamp[-1] - stamp[:-1][::-1]) / 1e6
            out.targets[r, :k] = item[1:][::-1]
            out.weights[r, :k] = weight[1:][::-1]
        return out


class SequenceTrainer(_Trainer):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if self.lower is None or self.lower.ndim != 2:
            raise ConfigError("--user-tower sequential trains over the frozen encoder's cached output: add "
                              "--freeze-encoder and --item-head H")
        seqs = user_sequences(self.data, cfg.model.protocol, ("train",))
        self.windows = SequenceWindows.build(list(seqs.iter_rows()), self.mcfg.max_history)
        if not len(self.windows):
            raise InputError(f"{self.data.root}: no user has 2 training positives in the {cfg.model.protocol} protocol")
        self.steps_per_epoch = max(1, len(self.windows) // cfg.run.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.run.epochs
        if cfg.run.max_steps:
            self.total_steps = min(self.total_steps, cfg.run.max_steps)
        self.sched = _scheduler(self.opt, self.steps_per_epoch * cfg.run.epochs, cfg.run.warmup)
        self.columns = self.negative_pool  # every item with a training positive: each target is one
        self.log_q = None
        if cfg.model.logq:
            q = inclusion_log_prob(self.item_prob[self.columns], cfg.run.batch_size, 1.0)
            self.log_q = torch.from_numpy(q).to(self.device)

    def batch_rows(self, epoch: int, index: int) -> np.ndarray:
        perm = np.random.default_rng([self.cfg.run.seed, epoch]).permutation(len(self.windows))
        return perm[index * self.local_batch : (index + 1) * self.local_batch]

    def train_step(self, rows: np.ndarray, step: int) -> float:
        torch.manual_seed(self.cfg.run.seed * 1_000_003 + step * 101)  # dropout replays on resume
        win, dev = self.windows, self.device
        x = win.inputs[rows]
        width = max(1, int((x >= 0).sum(1).max()))
        x, targets = x[:, :width], win.targets[rows, :width]
        labels = np.where(targets >= 0, np.searchsorted(self.columns, np.maximum(targets, 0)), -1)
        # False negatives: the row user's other training positives and the window's own items.
        keys = win.users[rows, None] * self.n_items + self.columns[None, :]
        known = np.isin(keys, self.positives) | (x[:, :, None] == self.columns[None, None, :]).any(1)
        assert self.lower is not None
        # [n_items, D], with gradients through the head (and the ID residual with --item-ids)
        full = self.model.with_ids(self.model.item_tower.finish(self.lower), torch.arange(self.n_items, device=dev))
        padded = torch.cat([full, full.new_zeros(1, full.shape[1])])
        mask = torch.from_numpy(x >= 0).to(dev)
        emb = padded[torch.from_numpy(np.where(x < 0, self.n_items, x)).to(dev)]
        tower = self.model.user_tower
        assert isinstance(tower, SequentialUserTower)
        states = tower.states(
            emb, torch.from_numpy(win.types[rows, :width]).to(dev), torch.from_numpy(win.ages[rows, :width]).to(dev), mask
        )
        states = torch.nn.functional.normalize(states, dim=-1)
        exclude = torch.from_numpy(known).to(dev)[:, None, :].expand(-1, width, -1)
        loss = next_item_loss(
            states, torch.from_numpy(labels).to(dev), full[torch.from_numpy(self.columns).to(dev)],
            scale=1.0 / self.mcfg.temperature, log_q=self.log_q, exclude=exclude,
            weights=torch.from_numpy(win.weights[rows, :width]).to(dev),
        )
        self._optimise(loss)
        with torch.no_grad():
            self.cache[: self.n_items] = full.detach().float()
        return float(loss.detach())
