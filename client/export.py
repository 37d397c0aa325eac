"""A trained model for other runtimes: a torch module (``to_torch``) and an ONNX graph (``to_onnx``).

Both compute the model's ``decision_function`` from RAW features: its standardization first (when it has one),
then MATH.md's layers. torch and onnx are imported inside the function that needs each, so using a model
needs neither. ``Model.to_torch()`` and ``Model.to_onnx()`` call these.
"""

from __future__ import annotations

import os

import numpy as np

from polyak.contract.errors import ModelError, one_line
from polyak.contract.onnx import Network, onnx_bytes

_TORCH_ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid"}  # torch.nn module names


def to_torch(model, dtype=None):
    """A ``torch.nn.Sequential`` computing ``model.decision_function``: a ``Standardize`` module first when the
    model standardizes, then ``Linear`` layers with its weights and the activation modules between them.

    Its output is the LOGITS (cross_entropy) or values (mse): no softmax, as torch users expect
    (``torch.nn.CrossEntropyLoss`` takes logits; apply ``torch.softmax(out, dim=1)`` for probabilities).
    ``dtype``: the module's parameters; default the model's compute dtype (float64 by default, so the module
    reproduces ``decision_function`` exactly); ``.float()`` gives the usual float32 module. Needs torch.
    """
    try:
        import torch
        from torch import nn
    except ImportError:
        raise ModelError("to_torch needs torch: pip install torch") from None

    class Standardize(nn.Module):
        """(x - mean) / std with the training set's statistics; buffers, not parameters."""

        def __init__(self, mean, std):
            super().__init__()
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, x):
            return (x - self.mean) / self.std

    tdt = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}[
        np.dtype(dtype) if dtype is not None else model.dtype
    ]
    mods: list = []
    if model.standardizes:  # the statistics as the model computes with them: in its own dtype
        mean, std = model.x_mean.astype(model.dtype), model.x_std.astype(model.dtype)
        mods.append(Standardize(torch.tensor(mean, dtype=tdt), torch.tensor(std, dtype=tdt)))
    act = getattr(nn, _TORCH_ACTIVATIONS[model.activation])
    weights, L = model.weights, len(model.layers) - 1
    for l in range(1, L + 1):
        W, b = weights[f"W{l}"], weights[f"b{l}"]
        lin = nn.Linear(W.shape[1], W.shape[0], dtype=tdt)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        mods.append(lin)
        if l < L:
            mods.append(act())
    return nn.Sequential(*mods).eval()


def to_onnx(model, path, opset: int = 17) -> str:
    """Write the model as one ONNX graph (``polyak.contract.onnx``, which says what the graph is). Needs
    polyak[onnx]. Returns the path written."""
    net = Network(tuple(model.layers), model.activation, model.loss, model.weights,
                  model.x_mean if model.standardizes else None, model.x_std if model.standardizes else None,
                  model.spec, model.describe())
    data = onnx_bytes(net, opset)
    path = os.fspath(path)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise ModelError(f"cannot write {path}: {one_line(e)}") from None
    return path
