"""Stopping criteria ("SGD does NOT converge" — the fixes) and the epoch's gradient statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from polyak.contract.spec import StoppingSpec
from polyak.contract.wire import Criterion, StopReason

# When several criteria are met in one epoch the job reports the first: convergence before budgets.
PRECEDENCE = ("target_loss", "weight_change", "gradient", "early_stopping", "max_steps", "max_epochs")


class GradientStats:
    """Running sums of one epoch's minibatch gradients: g-bar and the noise around it in O(p) memory.

    The sum of the g_B is kept in float64. Adding a float32 vector to a float64 one goes through NumPy's
    casting buffers and costs about ten same-type adds, so float32 gradients are first summed in a float32
    block of at most ``FOLD_EVERY`` of them, which is folded into the float64 total when full and before
    any read (its rounding error stays that of a short float32 sum)."""

    FOLD_EVERY = 32

    def __init__(self, p: int, xp=np):
        self.xp = xp
        self._total = xp.zeros(p, dtype=np.float64)
        self._block = None  # float32 partial sum, allocated on the first float32 gradient
        self._in_block = 0
        self.sq_norms = 0.0
        self.count = 0

    @property
    def total(self):
        """The sum of the gradients added since the last reset, float64."""
        self._fold()
        return self._total

    def _fold(self) -> None:
        if self._in_block:
            self._total += self._block
            self._in_block = 0

    def add(self, g) -> float:
        """Count one minibatch gradient; returns ||g||^2 (non-finite when the step diverged)."""
        if g.dtype == np.float64:
            self._total += g
        else:
            if self._block is None or self._block.dtype != g.dtype:
                self._fold()
                self._block = self.xp.empty_like(g)
            if self._in_block == 0:
                self._block[...] = g
            else:
                self._block += g
            self._in_block += 1
            if self._in_block == self.FOLD_EVERY:
                self._fold()
        sq_norm = float(self.xp.dot(g, g))
        self.sq_norms += sq_norm
        self.count += 1
        return sq_norm

    def summary(self) -> tuple[float | None, float | None]:
        """(||g-bar||, sqrt(mean_t ||g_B^t - g-bar||^2)); both None before any step."""
        if self.count == 0:
            return None, None
        total = self.total
        mean_sq_norm = float(self.xp.dot(total, total)) / self.count**2
        noise_sq = self.sq_norms / self.count - mean_sq_norm  # E||g_B||^2 - ||g-bar||^2
        return math.sqrt(mean_sq_norm), math.sqrt(max(noise_sq, 0.0))

    def reset(self) -> None:
        self._total[...] = 0
        self._in_block = 0
        self.sq_norms = 0.0
        self.count = 0


@dataclass
class EpochOutcome:
    """What the criteria look at after an epoch."""

    epoch: int  # 1-based: epochs completed
    step: int  # t, steps completed
    train_loss: float | None
    val_loss: float | None
    weight_change: float | None
    grad_avg_norm: float | None


@dataclass
class Stopper:
    """Checks every configured criterion each epoch; keeps the early-stopping state (checkpointed)."""

    spec: StoppingSpec
    best_val_loss: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0

    def observe_validation(self, epoch: int, val_loss: float | None) -> bool:
        """Track the best validation loss; True when this epoch is the new best."""
        if val_loss is None:
            return False
        if self.best_val_loss is None or val_loss < self.best_val_loss - self.spec.min_delta:
            self.best_val_loss, self.best_epoch, self.epochs_without_improvement = val_loss, epoch, 0
            return True
        self.epochs_without_improvement += 1
        return False

    def check(self, o: EpochOutcome) -> tuple[list[Criterion], StopReason | None]:
        s = self.spec
        found: dict[str, Criterion] = {}
        if s.target_loss is not None:
            met = o.train_loss is not None and o.train_loss <= s.target_loss
            found["target_loss"] = Criterion(name="target_loss", value=o.train_loss, threshold=s.target_loss, met=met)
        if s.weight_change_tol is not None:
            met = o.weight_change is not None and o.weight_change < s.weight_change_tol
            found["weight_change"] = Criterion(
                name="weight_change", value=o.weight_change, threshold=s.weight_change_tol, met=met
            )
        if s.grad_tol is not None:
            met = o.grad_avg_norm is not None and o.step >= s.warmup_steps and o.grad_avg_norm < s.grad_tol
            found["gradient"] = Criterion(name="gradient", value=o.grad_avg_norm, threshold=s.grad_tol, met=met)
        if s.patience is not None:
            found["early_stopping"] = Criterion(
                name="early_stopping",
                value=self.epochs_without_improvement,
                threshold=s.patience,
                met=self.epochs_without_improvement >= s.patience,
            )
        if s.max_steps is not None:
            found["max_steps"] = Criterion(
                name="max_steps", value=o.step, threshold=s.max_steps, met=o.step >= s.max_steps
            )
        found["max_epochs"] = Criterion(
            name="max_epochs", value=o.epoch, threshold=s.max_epochs, met=o.epoch >= s.max_epochs
        )
        criteria = [found[name] for name in PRECEDENCE if name in found]
        stop = next((StopReason(c.name) for c in criteria if c.met), None)
        return criteria, stop

    def state(self) -> dict:
        return {
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
        }

    def load_state(self, state: dict) -> None:
        self.best_val_loss = state["best_val_loss"]
        self.best_epoch = state["best_epoch"]
        self.epochs_without_improvement = state["epochs_without_improvement"]


def relative_change(W_now: np.ndarray, W_before: np.ndarray) -> float:
    """||W^t - W^{t-t'}|| / ||W^{t-t'}|| (inf when W^{t-t'} = 0 and W moved)."""
    diff = float(np.linalg.norm(W_now.astype(np.float64) - W_before))
    base = float(np.linalg.norm(W_before.astype(np.float64)))
    return diff / base if base > 0 else (0.0 if diff == 0 else math.inf)
