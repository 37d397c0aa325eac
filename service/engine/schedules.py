"""Step sizes eta_t as pure functions of the step t; the batch size n'_e and the batches of epoch e.

``epoch_batches`` is the one rule for which training rows each step of an epoch takes: the trainer hands its
batches to the engine, and lr-find's range test (service/engine/tuning.py) takes the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from polyak.contract.spec import BatchSpec, OptimizerSpec

Schedule = Callable[[int], float]


def constant(eta: float) -> Schedule:
    """eta_t = eta: SGD then wanders at a noise floor instead of converging."""
    return lambda t: eta


def inverse_time(eta: float, decay_steps: float) -> Schedule:
    """eta_t = eta / (1 + t / decay_steps): sum eta_t = inf, eta_t -> 0 (Robbins-Monro)."""
    return lambda t: eta / (1.0 + t / decay_steps)


def inverse_power(eta: float, power: float) -> Schedule:
    """eta_t = eta / (1 + t)^power; Robbins-Monro for 0.5 < power <= 1."""
    return lambda t: eta / (1.0 + t) ** power


def make_schedule(opt: OptimizerSpec) -> Schedule:
    if opt.schedule == "inverse_time":
        return inverse_time(opt.lr, opt.decay_steps)
    if opt.schedule == "inverse_power":
        return inverse_power(opt.lr, opt.power)
    return constant(opt.lr)


def batch_size(batch: BatchSpec, n: int, epoch: int) -> int:
    """n'_e = min(max_size, round(n'_0 * growth^e)), never more than n; null or >= n is full-batch GD."""
    if batch.size is None or batch.size >= n:
        return n
    cap = min(batch.max_size or n, n)
    if batch.growth > 1 and epoch * math.log(batch.growth) >= math.log(cap / batch.size):
        return cap  # growth**epoch itself would overflow a float after enough epochs
    return max(1, min(cap, round(batch.size * batch.growth**epoch)))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Every epoch visits each training row once, in a fresh order that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, 2, epoch]).permutation(n)


def epoch_batches(batch: BatchSpec, seed: int, epoch: int, n: int) -> Iterator[np.ndarray]:
    """The training rows of each step of epoch ``epoch``, in order: its order cut into n'_e rows a step (the
    last batch takes what is left), ceil(n / n'_e) steps."""
    size, order = batch_size(batch, n, epoch), epoch_order(seed, epoch, n)
    return (order[i * size : (i + 1) * size] for i in range(math.ceil(n / size)))
