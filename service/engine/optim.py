"""The lecture's update rules and the optimizer state they act on.

A rule is ``(W, u, g, eta) -> (W, u)`` where u is the momentum buffer, a displacement W^t - W^{t-1}.
Rules write into W and u in place (they are the per-step hot path, and the parameter server owns its
buffers), and return them so they read like the pure functions of MATH.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from client.spec import OptimizerSpec
from service.engine.schedules import make_schedule
from workers.mlp import layer_slices

Rule = Callable[..., tuple]


def sgd(W, u, g, eta: float, alpha: float = 1.0):
    """W <- W - eta g. u is unused and returned as given."""
    W -= eta * g
    return W, u


def heavy_ball(W, u, g, eta: float, alpha: float):
    """(27): u <- (1 - alpha) u - alpha eta g;  W <- W + u."""
    u *= 1.0 - alpha
    u -= (alpha * eta) * g
    W += u
    return W, u


def nesterov(W, u, g, eta: float, alpha: float):
    """u <- (1 - alpha) u - alpha eta g;  W <- W - alpha eta g + (1 - alpha) u."""
    step = (alpha * eta) * g
    u *= 1.0 - alpha
    u -= step
    W -= step
    W += (1.0 - alpha) * u
    return W, u


RULES: dict[str, Rule] = {"sgd": sgd, "heavy_ball": heavy_ball, "nesterov": nesterov}


@dataclass
class OptState:
    """Everything an update changes: weights, momentum buffer, step count t, and the weights' version."""

    W: object  # (p,) array of the backend
    u: object  # (p,)
    step: int = 0
    version: int = 0


class Optimizer:
    """Binds a rule, a schedule and weight decay; ``apply`` advances an OptState by one gradient."""

    def __init__(self, spec: OptimizerSpec, layers):
        self.rule = RULES[spec.method]
        self.alpha = spec.alpha
        self.schedule = make_schedule(spec)
        self.weight_decay = spec.weight_decay
        self._weight_slices = [ws for ws, _ in layer_slices(layers)]

    def lr(self, step: int) -> float:
        return self.schedule(step)

    def regularize(self, g, W):
        """g += weight_decay * W on the weights (biases are not decayed)."""
        if self.weight_decay:
            for ws in self._weight_slices:
                g[ws] += self.weight_decay * W[ws]
        return g

    def apply(self, state: OptState, g) -> OptState:
        """One step with the mean gradient g (already regularized)."""
        self.rule(state.W, state.u, g, self.lr(state.step), self.alpha)
        state.step += 1
        state.version += 1
        return state


def new_state(W0, xp=np) -> OptState:
    W = xp.array(W0, copy=True)
    return OptState(W=W, u=xp.zeros_like(W))
