"""The network of MATH.md ("Model"), shared by training (workers/mlp.py) and inference (client/model.py).

The flat-W layout (DESIGN.md, "Weights file"): for l = 1..L, W^(l) of shape (m_l, m_{l-1}) row-major, then
b^(l); a weights file holds the same arrays as W1, b1, ..., WL, bL. Per-layer arrays are views into the flat
vector, never copies, so the parameter server updates W with one vectorised rule and workers read it
without unpacking.

The forward pass ``x^(l) = phi(W^(l) x^(l-1) + b^(l))``, phi in {relu, tanh, sigmoid} on the hidden layers
and a linear output layer, is written once here, on an array module ``xp`` (NumPy, or CuPy on a GPU), into
buffers the caller owns: training and inference compute the same numbers with the same operations.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np


# -- the flat layout -----------------------------------------------------------------------------
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


# -- the forward pass ----------------------------------------------------------------------------
def activate_(z, activation: str, xp: ModuleType = np, mask=None):
    """The hidden activation in place: z becomes phi(z); returns z. relu with a ``mask`` buffer also records
    z > 0 there for the backward pass, and zeroes by multiplying with it (two cheap passes instead of
    maximum's one slow one). A NaN stays NaN (and -inf becomes NaN, not 0), so a diverging step still shows
    in its loss."""
    if activation == "relu":
        if mask is None:
            xp.maximum(z, 0, out=z)
        else:
            xp.greater(z, 0, out=mask)
            xp.multiply(z, mask, out=z)
    elif activation == "tanh":
        xp.tanh(z, out=z)
    else:  # sigmoid = 1 / (1 + exp(-z)); exp overflowing to inf gives the right limit 0
        xp.negative(z, out=z)
        with np.errstate(over="ignore"):
            xp.exp(z, out=z)
        z += 1
        xp.reciprocal(z, out=z)
    return z


def forward_pass(params, x, outs, activation: str, xp: ModuleType = np, masks=None) -> list:
    """Activations x^(1..L) of a batch ``x`` (n, m_0), written into ``outs`` (one (n, m_l) buffer per layer),
    which it returns; x^(L) = outs[-1] is the linear output f(x). ``params``: (W^(l), b^(l)) per layer, e.g.
    ``unflatten(W, layers)``. ``masks``: optional relu mask buffers of the hidden layers (``activate_``)."""
    a, last = x, len(params) - 1
    for l, ((Wl, bl), z) in enumerate(zip(params, outs, strict=True)):
        xp.matmul(a, Wl.T, out=z)  # (n, m_l)
        z += bl
        if l < last:
            activate_(z, activation, xp, None if masks is None else masks[l])
        a = z
    return outs
