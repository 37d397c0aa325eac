"""An L-layer perceptron on one flat parameter vector W (MATH.md, "Model"): the lecture's init, and
training's forward and backward passes.

The flat-W layout and the forward pass are the contract's (polyak/contract/network.py), shared with the
trained model; this module adds the buffers a step reuses, the relu masks the backward pass reads, the loss
and its gradient. The gradient call returns the gradient SUM over the batch, the loss sum and the sample
count, so that shards held by different workers combine exactly:
g_B = (sum of the parts' gradient sums) / (sum of the parts' counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from polyak.contract.choices import ACTIVATIONS, LOSSES
from polyak.contract.network import forward_pass, param_count, unflatten


def init_params(layers, sigma: float, rng: np.random.Generator, xp: ModuleType = np, dtype=np.float32):
    """W^(l)_ij ~ N(0, sigma^2 / m_{l-1}), biases 0. Drawn with NumPy so CPU and GPU runs start equal."""
    flat = np.zeros(param_count(layers), dtype=np.float64)
    for (Wl, _), m_in in zip(unflatten(flat, layers), layers[:-1], strict=True):
        Wl[...] = rng.standard_normal(Wl.shape) * (sigma / np.sqrt(m_in))
    return xp.asarray(flat.astype(dtype))


@dataclass
class MLP:
    """Forward/backward of one architecture; owns reusable work buffers so a step allocates little."""

    layers: tuple[int, ...]
    activation: str = "relu"
    loss: str = "cross_entropy"
    xp: ModuleType = np
    dtype: type = np.float32
    _buffers: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.layers = tuple(int(m) for m in self.layers)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation: must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss: must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        self.dtype = np.dtype(self.dtype).type
        self.p = param_count(self.layers)

    # -- buffers ---------------------------------------------------------------------------------
    def _work(self, n: int):
        """Per-layer buffers for a batch of n rows: pre-activations/activations, deltas, and per hidden
        layer either relu's mask phi'(z) > 0 (bool, kept from the forward pass) or a float scratch."""
        if n not in self._buffers:
            if len(self._buffers) > 4:  # batch sizes grow with batch.growth: keep only recent ones
                self._buffers.pop(next(iter(self._buffers)))
            xp, dt = self.xp, self.dtype
            acts = [xp.empty((n, m), dtype=dt) for m in self.layers[1:]]
            deltas = [xp.empty((n, m), dtype=dt) for m in self.layers[1:]]
            hidden_dt = bool if self.activation == "relu" else dt
            scratch = [xp.empty((n, m), dtype=hidden_dt) for m in self.layers[1:-1]]
            self._buffers[n] = (acts, deltas, scratch)
        return self._buffers[n]

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, W, X, acts=None, masks=None):
        """Activations x^(1..L) of a batch; x^(L) is the linear output f(x) (contract/network.py).
        acts: optional output buffers; masks: optional relu mask buffers of the hidden layers."""
        if acts is None:
            acts = [self.xp.empty((X.shape[0], m), dtype=self.dtype) for m in self.layers[1:]]
        return forward_pass(unflatten(W, self.layers), X, acts, self.activation, self.xp, masks)

    # -- loss and gradient -----------------------------------------------------------------------
    def _output_delta(self, out, Y, delta):
        """Per-sample dLoss/d(output) into ``delta``; returns the loss SUM over the batch."""
        xp = self.xp
        n = out.shape[0]
        if self.loss == "cross_entropy":
            # softmax(z) - onehot(y), with log-sum-exp shifted by the row max so exp never overflows
            row_max = out.max(axis=1, keepdims=True)  # (n', 1)
            xp.subtract(out, row_max, out=delta)
            xp.exp(delta, out=delta)
            sums = delta.sum(axis=1)  # (n',)
            delta /= sums[:, None]
            rows = xp.arange(n)
            log_norm = xp.log(sums) + row_max[:, 0]
            loss_sum = (log_norm - out[rows, Y]).sum()
            delta[rows, Y] -= 1
        else:
            # mse = mean over outputs of (f - y)^2, so d/df = 2 (f - y) / m_L
            xp.subtract(out, Y, out=delta)
            loss_sum = (delta * delta).sum() / out.shape[1]
            delta *= 2.0 / out.shape[1]
        return loss_sum

    def _phi_prime_(self, a, d, scratch):
        """d *= phi'(z), with phi' written in terms of a = phi(z); relu's ``scratch`` is the forward mask."""
        xp = self.xp
        if self.activation == "relu":
            xp.multiply(d, scratch, out=d)
        elif self.activation == "tanh":
            xp.multiply(a, a, out=scratch)
            xp.subtract(1, scratch, out=scratch)
            d *= scratch
        else:
            xp.subtract(1, a, out=scratch)
            scratch *= a
            d *= scratch

    def loss_and_grad(self, W, X, Y, grad_out=None):
        """(gradient SUM over the batch (p,), loss SUM, count). ``grad_out``: optional (p,) buffer."""
        xp = self.xp
        n = X.shape[0]
        acts, deltas, scratch = self._work(n)
        self.forward(W, X, acts, scratch if self.activation == "relu" else None)
        grad = grad_out if grad_out is not None else xp.empty(self.p, dtype=self.dtype)
        params = unflatten(W, self.layers)
        grads = unflatten(grad, self.layers)
        loss_sum = self._output_delta(acts[-1], Y, deltas[-1])
        for l in range(len(params) - 1, -1, -1):
            d = deltas[l]  # (n', m_l)
            a_prev = acts[l - 1] if l > 0 else X  # (n', m_{l-1})
            gW, gb = grads[l]
            xp.matmul(d.T, a_prev, out=gW)  # (m_l, m_{l-1})
            xp.sum(d, axis=0, out=gb)  # (m_l,)
            if l > 0:
                xp.matmul(d, params[l][0], out=deltas[l - 1])  # (n', m_{l-1})
                self._phi_prime_(acts[l - 1], deltas[l - 1], scratch[l - 1])
        return grad, float(loss_sum), n

    # -- evaluation ------------------------------------------------------------------------------
    def predict(self, W, X, chunk: int = 8192):
        """Outputs f(x) (n, m_L), computed in chunks to bound memory."""
        parts = [self.forward(W, X[i : i + chunk])[-1] for i in range(0, X.shape[0], chunk)]
        return self.xp.concatenate(parts) if parts else self.xp.empty((0, self.layers[-1]), dtype=self.dtype)

    def evaluate(self, W, X, Y, chunk: int = 8192) -> tuple[float, int | None, int]:
        """(loss sum, correct predictions or None for mse, count) of a whole set."""
        xp = self.xp
        loss_sum, correct = 0.0, 0
        for i in range(0, X.shape[0], chunk):
            out = self.forward(W, X[i : i + chunk])[-1]
            y = Y[i : i + chunk]
            if self.loss == "cross_entropy":
                m = out.max(axis=1)
                lse = xp.log(xp.exp(out - m[:, None]).sum(axis=1)) + m  # (n,)
                loss_sum += float((lse - out[xp.arange(out.shape[0]), y]).sum())
                correct += int((out.argmax(axis=1) == y).sum())
            else:
                loss_sum += float(((out - y) ** 2).sum()) / out.shape[1]
        return loss_sum, (correct if self.loss == "cross_entropy" else None), int(X.shape[0])
