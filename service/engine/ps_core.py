"""The parameter server's logic without Ray: combine gradient sums, update (W, u), keep epoch statistics.

The Ray actor (service/engine/parameter_server.py) and the in-process engine (service/engine/local_engine.py) are thin
shells over this class, so both compute exactly the same step.

A sharded server (``cluster.num_servers`` S > 1) is S of these, each over one contiguous key range W[lo:hi] and the
same range of every buffer (``shard_bounds``). Every rule, weight decay included, acts coordinate by coordinate, so
S shards fed the slices of one gradient take exactly the step one server takes. The epoch's figures combine
exactly too (``combine_parts``): squared norms add over disjoint ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from polyak.contract.spec import JobSpec
from polyak.service.engine.criteria import GradientStats
from polyak.service.engine.engine import EpochFigures
from polyak.service.engine.optim import Optimizer, OptState, new_state
from polyak.workers.backend import to_numpy


def shard_bounds(p: int, num_servers: int) -> list[int]:
    """S + 1 offsets: shard s owns W[bounds[s]:bounds[s + 1]]; the ranges' sizes differ by at most one."""
    return [s * p // num_servers for s in range(num_servers + 1)]


@dataclass(frozen=True)
class EpochPart:
    """One server shard's share of an epoch's figures: what its key range saw, in sums that add over shards."""

    step_losses: np.ndarray  # (steps,): the same in every shard of a sync job, but NaN where its slice was not finite
    samples: int
    step: int
    last_lr: float
    total_sq: float  # ||sum over the epoch's steps of g_B||^2, over this range
    sq_norms: float  # sum over the epoch's steps of ||g_B||^2, over this range
    count: int  # steps this shard applied
    staleness: tuple[int, ...] = ()  # async: of each applied update
    dropped: int = 0  # async: pushes turned away as stale


def combine_parts(parts: list[EpochPart]) -> EpochFigures:
    """The epoch's figures from every shard's part (one part: a whole server's)."""
    first = parts[0]
    losses = np.array(first.step_losses, dtype=np.float64)
    for part in parts[1:]:  # a step diverged when any slice of its gradient did
        n = min(len(losses), len(part.step_losses))
        losses[:n][np.isnan(part.step_losses[:n])] = np.nan
    grad_avg_norm, grad_noise = gradient_summary(parts)
    staleness = [s for part in parts for s in part.staleness]
    dropped = sum(part.dropped for part in parts)
    asynchronous = bool(staleness or dropped)  # sync steps are never stale
    return EpochFigures(
        step_losses=losses, samples=first.samples, step=first.step, last_lr=first.last_lr,
        grad_avg_norm=grad_avg_norm, grad_noise=grad_noise,
        staleness_mean=float(np.mean(staleness)) if staleness else None,
        staleness_max=int(max(staleness)) if staleness else None,
        dropped_gradients=dropped if asynchronous else None,
    )


def gradient_summary(parts: list[EpochPart]) -> tuple[float | None, float | None]:
    """(||g-bar||, sqrt(mean_t ||g_B^t - g-bar||^2)) of GradientStats, over every shard's range: both squared
    norms are sums over coordinates, so each adds over disjoint ranges. None before any step."""
    counted = [part for part in parts if part.count]
    if not counted:
        return None, None
    mean_sq_norm = sum(part.total_sq / part.count**2 for part in counted)
    noise_sq = sum(part.sq_norms / part.count for part in counted) - mean_sq_norm  # E||g_B||^2 - ||g-bar||^2
    return math.sqrt(mean_sq_norm), math.sqrt(max(noise_sq, 0.0))


class ServerCore:
    def __init__(self, spec: JobSpec, W0: np.ndarray, xp=np, key_range: tuple[int, int] | None = None):
        """Over W0 = W[lo:hi] when ``key_range`` is (lo, hi): one shard of a sharded server."""
        self.xp = xp
        self.dtype = np.dtype(spec.cluster.dtype)
        self.optimizer = Optimizer(spec.optimizer, spec.model.layers, key_range)
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
        return combine_parts([self.take_part()])

    def take_part(self) -> EpochPart:
        """This range's share of the epoch's figures; resets the running sums for the next epoch."""
        total = self.stats.total
        part = EpochPart(
            step_losses=np.asarray(self.step_losses, dtype=np.float64),
            samples=self.samples,
            step=self.state.step,
            last_lr=self.optimizer.lr(max(self.state.step - 1, 0)),
            total_sq=float(self.xp.dot(total, total)),
            sq_norms=self.stats.sq_norms,
            count=self.stats.count,
        )
        self.stats.reset()
        self.step_losses, self.samples = [], 0
        return part

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
