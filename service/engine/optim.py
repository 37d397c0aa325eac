"""The lecture's update rules and the optimizer state they act on.

A rule is ``(W, buffers..., g, eta, hyperparameters) -> (W, buffers...)``: heavy ball's u is a displacement
W^t - W^{t-1}; the adaptive rules keep running squares of the gradient (adagrad s, rmsprop v, adam m and
v). Rules write into W and their buffers in place (they are the per-step hot path, and the parameter
server owns its buffers), and return them so they read like the pure functions of MATH.md. A method holds
only the buffers it uses (``BUFFERS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from polyak.contract.network import layer_slices, param_count
from polyak.contract.spec import OptimizerSpec
from polyak.service.engine.schedules import make_schedule

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


def adagrad(W, s, g, eta: float, eps: float, scratch):
    """s <- s + g^2;  W <- W - eta g / (sqrt(s) + eps)   (torch.optim.Adagrad, lr_decay 0)."""
    s += np.multiply(g, g, out=scratch)
    _step_over_root(W, g, s, eta, eps, scratch)
    return W, s


def rmsprop(W, v, g, eta: float, rho: float, eps: float, scratch):
    """v <- rho v + (1 - rho) g^2;  W <- W - eta g / (sqrt(v) + eps)   (torch.optim.RMSprop, alpha = rho)."""
    v *= rho
    np.multiply(g, g, out=scratch)
    scratch *= 1.0 - rho
    v += scratch
    _step_over_root(W, g, v, eta, eps, scratch)
    return W, v


def _step_over_root(W, g, squares, eta: float, eps: float, scratch) -> None:
    """W <- W - eta g / (sqrt(squares) + eps), through the one scratch array."""
    np.sqrt(squares, out=scratch)
    scratch += eps
    np.divide(g, scratch, out=scratch)
    scratch *= eta
    W -= scratch


def adam(W, m, v, g, eta: float, beta1: float, beta2: float, eps: float, t: int, scratch):
    """m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    W <- W - eta (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), t = 1, 2, ...   (torch.optim.Adam)."""
    m *= beta1
    m += np.multiply(g, 1.0 - beta1, out=scratch)
    v *= beta2
    np.multiply(g, g, out=scratch)
    scratch *= 1.0 - beta2
    v += scratch
    # The same step with the bias corrections in two scalars, eta sqrt(b2c) / b1c * m / (sqrt(v) + eps sqrt(b2c)):
    # one pass over p fewer (each pass is about 1/13 of the update, which is memory-bound).
    root2 = math.sqrt(1.0 - beta2**t)
    np.sqrt(v, out=scratch)
    scratch += eps * root2
    np.divide(m, scratch, out=scratch)
    scratch *= eta * root2 / (1.0 - beta1**t)
    W -= scratch
    return W, m, v


RULES: dict[str, Rule] = {
    "sgd": sgd, "heavy_ball": heavy_ball, "nesterov": nesterov, "adagrad": adagrad, "rmsprop": rmsprop, "adam": adam,
}
# The named buffers each method keeps beside W (all of shape (p,), zero at the start).
BUFFERS: dict[str, tuple[str, ...]] = {
    "sgd": (), "heavy_ball": ("u",), "nesterov": ("u",), "adagrad": ("s",), "rmsprop": ("v",), "adam": ("m", "v"),
}


@dataclass
class OptState:
    """Everything an update changes: weights, the method's buffers, step count t, and the weights' version."""

    W: object  # (p,) array of the backend
    buffers: dict  # name -> (p,) array: u (heavy ball, nesterov); s (adagrad); v (rmsprop); m, v (adam)
    step: int = 0
    version: int = 0

    @property
    def u(self):
        """The momentum buffer of heavy ball and nesterov."""
        return self.buffers["u"]


class Optimizer:
    """Binds a rule, a schedule and weight decay; ``apply`` advances an OptState by one gradient."""

    def __init__(self, spec: OptimizerSpec, layers, key_range: tuple[int, int] | None = None):
        """``key_range`` (lo, hi): the rule acts on W[lo:hi] only, one shard of a sharded parameter server."""
        self.spec = spec
        self.method = spec.method
        self.rule = RULES[spec.method]
        self.buffers = BUFFERS[spec.method]
        self.alpha = spec.alpha
        self.schedule = make_schedule(spec)
        self.weight_decay = spec.weight_decay
        self._weight_slices = decayed_slices(layers, key_range)
        self._scratch = None  # the adaptive rules' one work array, made on first use

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
        eta, b, o = self.lr(state.step), state.buffers, self.spec
        if self.method in ("sgd", "heavy_ball", "nesterov"):
            self.rule(state.W, b.get("u"), g, eta, self.alpha)
        else:
            if self._scratch is None or self._scratch.shape != g.shape:
                self._scratch = np.empty_like(g) if isinstance(g, np.ndarray) else g.copy()
            if self.method == "adagrad":
                adagrad(state.W, b["s"], g, eta, o.eps, self._scratch)
            elif self.method == "rmsprop":
                rmsprop(state.W, b["v"], g, eta, o.rho, o.eps, self._scratch)
            else:
                adam(state.W, b["m"], b["v"], g, eta, o.beta1, o.beta2, o.eps, state.step + 1, self._scratch)
        state.step += 1
        state.version += 1
        return state


def decayed_slices(layers, key_range: tuple[int, int] | None = None) -> list[slice]:
    """The weights' (not the biases') slices of W[lo:hi], relative to lo: what weight decay acts on there."""
    lo, hi = key_range or (0, param_count(layers))
    out = []
    for ws, _ in layer_slices(layers):
        start, stop = max(ws.start, lo), min(ws.stop, hi)
        if start < stop:
            out.append(slice(start - lo, stop - lo))
    return out


def new_state(W0, xp=np, buffers: tuple[str, ...] = ("u",)) -> OptState:
    """A fresh state at W0: a copy of it, and zero buffers of the given names."""
    W = xp.array(W0, copy=True)
    return OptState(W=W, buffers={name: xp.zeros_like(W) for name in buffers})
