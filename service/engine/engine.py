"""What the trainer asks of an engine: the ``Engine`` protocols, the figures an epoch hands back, the faults.

Three engines take the steps the trainer asks for: LocalEngine (in this process), SyncRayEngine and
AsyncRayEngine (on Ray). Every one is an ``Engine``; how an epoch's steps are taken sets them apart:

- ``TrainerDrivenEngine`` (``drives_steps = False``: LocalEngine, SyncRayEngine) — the trainer hands it each
  batch of the epoch's order, one ``step(batch)`` at a time;
- ``WorkerDrivenEngine`` (``drives_steps = True``: AsyncRayEngine) — its workers pass over their own shards,
  and ``run_epoch`` returns when they are done or cancelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


class ParameterServerLost(RuntimeError):
    """The parameter server died (or restarted) mid-epoch; its last checkpoint is the way back."""


class ClusterFault(RuntimeError):
    """The cluster cannot finish the job: a node was lost with no room left, a step never finished, or workers
    failed more often than an epoch repairs."""


@dataclass(frozen=True)
class EpochFigures:
    """What ``end_epoch()`` reports of the epoch just taken; the trainer turns it into EpochMetrics."""

    step_losses: np.ndarray  # (steps,) float64: each step's mean minibatch loss, in order; NaN: a non-finite gradient
    samples: int  # training rows the epoch's steps used
    step: int  # t after the epoch: the steps taken since W0
    last_lr: float  # eta of the epoch's last step
    grad_avg_norm: float | None  # ||g-bar||, the norm of the epoch's mean gradient; None without a step
    grad_noise: float | None  # sqrt(mean_t ||g_B^t - g-bar||^2); None without a step
    staleness_mean: float | None = None  # async only: versions between reading W and applying the update
    staleness_max: int | None = None
    dropped_gradients: int | None = None  # async only: pushes turned away as staler than max_staleness


class Engine(Protocol):
    """Every engine: the state between epochs, validation, checkpoints, faults, where it runs."""

    drives_steps: bool  # False: a TrainerDrivenEngine; True: a WorkerDrivenEngine
    recoverable: tuple[type[Exception], ...]  # a lost parameter server: recover(), then resume from the checkpoint
    fatal: tuple[type[Exception], ...]  # the cluster cannot go on (a lost node, no room): the job fails

    def describe(self) -> str:
        """One line: where the job runs and how its steps travel."""
        ...

    def end_epoch(self) -> EpochFigures:
        """The figures of the steps taken since the last end_epoch (or restore)."""
        ...

    def weights(self) -> np.ndarray:
        """W after the last step, on the host."""
        ...

    def evaluate(self, W: np.ndarray) -> tuple[float, int | None, int]:
        """(loss sum, correct or None for a regression, count) over the validation rows."""
        ...

    def checkpoint(self, path: str | Path, meta: dict) -> None:
        """Write the state of the last end_epoch (or restore) to ``path``, with ``meta`` beside it."""
        ...

    def restore(self, path: str | Path) -> dict:
        """Back to a checkpoint's state; returns its meta."""
        ...

    def recover(self) -> None:
        """After one of ``recoverable``: back to the initial weights (the trainer's checkpoint may follow)."""
        ...

    def close(self) -> None:
        """Release what the engine holds (Ray actors)."""
        ...


class TrainerDrivenEngine(Engine, Protocol):
    def step(self, batch: np.ndarray) -> None:
        """One exact minibatch step of (26) over these training rows."""
        ...


class WorkerDrivenEngine(Engine, Protocol):
    def run_epoch(self, epoch: int, batch_size: int, step_budget: int | None,
                  should_cancel: Callable[[], bool]) -> bool:
        """Let every worker pass over its shard once (at most ``step_budget`` steps); True when cancelled."""
        ...
