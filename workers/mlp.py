"""An L-layer perceptron on one flat parameter vector W (MATH.md, "Model").

Layout (DESIGN.md, "Weights file"): for l = 1..L, W^(l) of shape (m_l, m_{l-1}) row-major, then b^(l).
Per-layer arrays are views into the flat vector, never copies, so the parameter server can update W
with one vectorised rule and the workers can read it without unpacking.

Forward and backward are written side by side. The gradient call returns the gradient SUM over the
batch, the loss sum and the sample count, so that shards held by different workers combine exactly:
g_B = (sum of the parts' gradient sums) / (sum of the parts' counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from polyak.contract.choices import ACTIVATIONS, LOSSES


def param_count(layers) -> int:
    """p = sum_l m_l (m_{l-1} + 1)."""
    return sum(m_out * (m_in + 1) for m_in, m_out in zip(layers[:-1], layers[1:], strict=True))


def layer_slices(layers) -> list[tuple[slice, slice]]:
    """(weight slice, bias slice) of the flat vector for each layer."""
    out, start = [], 0
    for m_in, m_out in zip(layers[:-1], layers[1:], strict=True):
        w_end = start + m_out * m_in
        out.append((slice(start, w_end), slice(w_end, w_end + m_out)))
        start = w_end + m_out
    return out


def unflatten(flat, layers) -> list[tuple]:
    """Views (W^(l) (m_l, m_{l-1}), b^(l) (m_l,)) into ``flat``; writing to them writes to ``flat``."""
    return [
        (flat[ws].reshape(m_out, m_in), flat[bs])
        for (ws, bs), m_in, m_out in zip(layer_slices(layers), layers[:-1], layers[1:], strict=True)
    ]


def init_params(layers, sigma: float, rng: np.random.Generator, xp: ModuleType = np, dtype=np.float32):
    """W^(l)_ij ~ N(0, sigma^2 / m_{l-1}), biases 0. Drawn with NumPy so CPU and GPU runs start equal."""
    flat = np.zeros(param_count(layers), dtype=np.float64)
    for (Wl, _), m_in in zip(unflatten(flat, layers), layers[:-1], strict=True):
        Wl[...] = rng.standard_normal(Wl.shape) * (sigma / np.sqrt(m_in))
    return xp.asarray(flat.astype(dtype))


def to_dict(flat: np.ndarray, layers) -> dict[str, np.ndarray]:
    """The weights file's arrays: W1, b1, ..., WL, bL."""
    out = {}
    for l, (Wl, bl) in enumerate(unflatten(np.asarray(flat), layers), start=1):
        out[f"W{l}"], out[f"b{l}"] = Wl.copy(), bl.copy()
    return out


def from_dict(arrays, layers, dtype=np.float32) -> np.ndarray:
    """Inverse of ``to_dict``; names each missing or misshapen array."""
    flat = np.zeros(param_count(layers), dtype=dtype)
    for l, (Wl, bl) in enumerate(unflatten(flat, layers), start=1):
        for name, view in ((f"W{l}", Wl), (f"b{l}", bl)):
            if name not in arrays:
                raise ValueError(f"weights file has no array {name} (model.layers = {list(layers)})")
            a = np.asarray(arrays[name])
            if a.shape != view.shape:
                raise ValueError(f"weights file: {name} has shape {a.shape}, model.layers needs {view.shape}")
            view[...] = a
    return flat


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
    def _phi_(self, z, mask=None):
        """Activation in place: z becomes phi(z). relu with a ``mask`` buffer also records z > 0 there for
        the backward pass, and zeroes by multiplying with it (two cheap passes instead of maximum's one slow
        one). A NaN stays NaN (and -inf becomes NaN, not 0), so a diverging step still shows in its loss."""
        xp = self.xp
        if self.activation == "relu":
            if mask is None:
                xp.maximum(z, 0, out=z)
            else:
                xp.greater(z, 0, out=mask)
                xp.multiply(z, mask, out=z)
        elif self.activation == "tanh":
            xp.tanh(z, out=z)
        else:  # sigmoid = 1 / (1 + exp(-z)); exp overflowing to inf gives the right limit 0
            xp.negative(z, out=z)
            with np.errstate(over="ignore"):
                xp.exp(z, out=z)
            z += 1
            xp.reciprocal(z, out=z)
        return z

    def forward(self, W, X, acts=None, masks=None):
        """Activations x^(1..L) of a batch; x^(L) is the linear output f(x).
        acts: optional output buffers; masks: optional relu mask buffers of the hidden layers."""
        xp = self.xp
        a = X  # (n', m_0)
        out = []
        params = unflatten(W, self.layers)
        for l, (Wl, bl) in enumerate(params):
            z = acts[l] if acts is not None else xp.empty((X.shape[0], Wl.shape[0]), dtype=self.dtype)
            xp.matmul(a, Wl.T, out=z)  # (n', m_l)
            z += bl
            if l < len(params) - 1:
                a = self._phi_(z, masks[l] if masks is not None else None)
            else:
                a = z
            out.append(a)
        return out

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
