"""The parameter server's logic without Ray: combine gradient sums, update (W, u), keep epoch statistics.

The Ray actor (service/engine/parameter_server.py) and the in-process engine (service/engine/local_engine.py) are thin
shells over this class, so both compute exactly the same step.
"""

from __future__ import annotations

import math

import numpy as np

from polyak.contract.spec import JobSpec
from polyak.service.engine.criteria import GradientStats
from polyak.service.engine.engine import EpochFigures
from polyak.service.engine.optim import Optimizer, OptState, new_state
from polyak.workers.backend import to_numpy


class ServerCore:
    def __init__(self, spec: JobSpec, W0: np.ndarray, xp=np):
        self.xp = xp
        self.dtype = np.dtype(spec.cluster.dtype)
        self.optimizer = Optimizer(spec.optimizer, spec.model.layers)
        self.state = new_state(xp.asarray(W0, dtype=self.dtype), xp, self.optimizer.buffers)
        self.stats = GradientStats(self.state.W.shape[0], xp)
        self.step_losses: list[float] = []
        self.samples = 0
        self._g = xp.empty_like(self.state.W)  # g_B; grad_sum itself may be a read-only object-store view

    def apply(self, grad_sum, loss_sum: float, count: int) -> None:
        """One step of (26)+(27): g_B = grad_sum / count; the update never depends on how many parts."""
        g = self.xp.divide(grad_sum, count, out=self._g)  # (p,); in place when grad_sum is _g itself
        self.optimizer.regularize(g, self.state.W)
        sq_norm = self.stats.add(g)
        self.optimizer.apply(self.state, g)
        # A non-finite gradient marks the step as diverged even while its loss is still finite.
        self.step_losses.append(loss_sum / count if math.isfinite(sq_norm) else math.nan)
        self.samples += count

    def apply_parts(self, parts) -> None:
        """Sync mode: sum the K workers' (grad_sum, loss_sum, count) into one exact minibatch step."""
        parts = [part for part in parts if part[2] > 0]  # a shard may hold none of a step's rows
        if not parts:  # an empty round (the engine's warm-up) is not a step
            return
        grad_sum, loss_sum, count = parts[0]
        if len(parts) > 1:
            grad_sum = self.xp.add(grad_sum, parts[1][0], out=self._g)  # _g: the parts are read-only views
            for g, _, _ in parts[2:]:
                grad_sum += g
            loss_sum = sum(part[1] for part in parts)
            count = sum(part[2] for part in parts)
        self.apply(grad_sum, loss_sum, count)

    def end_epoch(self) -> EpochFigures:
        """The epoch's figures; resets the running sums for the next epoch."""
        grad_avg_norm, grad_noise = self.stats.summary()
        figures = EpochFigures(
            step_losses=np.asarray(self.step_losses, dtype=np.float64),
            samples=self.samples,
            step=self.state.step,
            last_lr=self.optimizer.lr(max(self.state.step - 1, 0)),
            grad_avg_norm=grad_avg_norm,
            grad_noise=grad_noise,
        )
        self.stats.reset()
        self.step_losses, self.samples = [], 0
        return figures

    def weights(self) -> np.ndarray:
        """A host copy of W that later steps cannot change."""
        W = to_numpy(self.state.W)
        return W.copy() if W is self.state.W else W

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, counters) of everything an update changes: what a checkpoint must hold."""
        arrays = {"W": self.weights(), **{k: to_numpy(b).copy() for k, b in self.state.buffers.items()}}
        return arrays, {"step": self.state.step, "version": self.state.version}

    def restore(self, arrays: dict[str, np.ndarray], counters: dict) -> None:
        """Back to these weights and buffers; a buffer the arrays lack (a fresh start) is zero."""
        xp = self.xp
        W = xp.asarray(arrays["W"], dtype=self.dtype).copy()
        buffers = {
            name: xp.asarray(arrays[name], dtype=self.dtype).copy() if name in arrays else xp.zeros_like(W)
            for name in self.optimizer.buffers
        }
        self.state = OptState(W=W, buffers=buffers, step=counters["step"], version=counters["version"])
        self.stats.reset()
        self.step_losses, self.samples = [], 0
