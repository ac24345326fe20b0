"""Callbacks around the matcher's training loop (the shape of LightGBM's callback.py).

The loop (`_Trainer.run`) only steps, validates and saves; what happens between steps and epochs is
here. `after_step(trainer, last_of_epoch)` returns True to end the epoch early; `after_epoch(trainer)`
runs after validation has chosen whether the epoch's model is the best (`trainer.improved`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.matcher.train import _Trainer

log = logging.getLogger(__name__)


class Callback:
    def after_step(self, trainer: _Trainer, last_of_epoch: bool) -> bool:
        return False

    def after_epoch(self, trainer: _Trainer) -> None:
        return None


class CacheRefresh(Callback):
    """Re-encode the catalogue into the no-grad cache every `every` steps (0: only at validation,
    which refreshes it anyway, hence never on an epoch's last step)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_step(self, trainer: _Trainer, last_of_epoch: bool) -> bool:
        if self.every and trainer.step % self.every == 0 and not last_of_epoch:
            trainer.refresh_cache()
        return False


class StepBudget(Callback):
    """Stop after `max_steps` steps in total (0: no limit); the run stays resumable."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def after_step(self, trainer: _Trainer, last_of_epoch: bool) -> bool:
        if self.max_steps and trainer.step >= self.max_steps:
            trainer.budget_reached = True
        return trainer.budget_reached


class PeriodicSave(Callback):
    """Save the resume state every `every` steps (0: only at epoch ends)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_step(self, trainer: _Trainer, last_of_epoch: bool) -> bool:
        if self.every and trainer.step % self.every == 0:
            trainer.save_state()
        return False


class EarlyStopping(Callback):
    """Finish after `patience` epochs without a better validation score (the evaluator's primary)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def after_epoch(self, trainer: _Trainer) -> None:
        if trainer.improved:
            trainer.bad_epochs = 0
            return
        trainer.bad_epochs += 1
        if trainer.bad_epochs >= self.patience:
            log.info("early stopping after epoch %d (best epoch %d)", trainer.epoch + 1, trainer.best_epoch)
            trainer.finished = True
