"""A trained model for other runtimes: a torch module (``to_torch``) and an ONNX graph (``to_onnx``).

Both compute the model's ``decision_function`` from RAW features: its standardization first (when it has one),
then MATH.md's layers. torch and onnx are imported inside the function that needs each, so using a model
needs neither. ``Model.to_torch()`` and ``Model.to_onnx()`` call these.
"""

from __future__ import annotations

import json
import os

import numpy as np

from polyak.contract.errors import ModelError, one_line

_TORCH_ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid"}  # torch.nn module names
_ONNX_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}  # ONNX operator names


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
    """Write the model as one ONNX graph (float32): input ``input`` [N, m_0] of RAW features; Sub/Div by
    x_mean/x_std when the model standardizes; per layer Gemm (transB=1), then Relu/Tanh/Sigmoid on the hidden
    layers; outputs ``logits`` [N, m_L] and, for cross_entropy, ``probabilities`` = Softmax(axis=1).
    Checked with ``onnx.checker``. Needs polyak[onnx]. Returns the path written."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise ModelError("to_onnx needs the onnx package: pip install 'polyak[onnx]'") from None
    newest = onnx.defs.onnx_opset_version()
    if not 13 <= int(opset) <= newest:
        raise ModelError(f"opset must be in 13..{newest} (this onnx package), got {opset}")
    opsets = [helper.make_opsetid("", int(opset))]
    proto = helper.make_model(_onnx_graph(model), opset_imports=opsets, producer_name="polyak")
    proto.ir_version = helper.find_min_ir_version_for(opsets)  # loadable by older runtimes too
    proto.doc_string = model.describe()
    meta = {"layers": json.dumps(list(model.layers)), "activation": model.activation, "loss": model.loss}
    if model.spec is not None:
        meta["spec"] = json.dumps(model.spec)
    helper.set_model_props(proto, meta)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:  # a bug here, not the user's: say so plainly
        raise ModelError(f"the ONNX graph failed onnx.checker: {one_line(e)}") from None
    path = os.fspath(path)
    try:
        onnx.save(proto, path)
    except OSError as e:
        raise ModelError(f"cannot write {path}: {one_line(e)}") from None
    return path


def _onnx_graph(model):
    """The model's ONNX graph: its nodes, its float32 initializers, its input and outputs."""
    from onnx import TensorProto, helper, numpy_helper

    f32 = np.float32
    inits, nodes, h = [], [], "input"
    if model.standardizes:
        inits += [numpy_helper.from_array(model.x_mean.astype(f32), "x_mean"),
                  numpy_helper.from_array(model.x_std.astype(f32), "x_std")]
        nodes += [helper.make_node("Sub", ["input", "x_mean"], ["centered"], name="sub_mean"),
                  helper.make_node("Div", ["centered", "x_std"], ["standardized"], name="div_std")]
        h = "standardized"
    weights, L = model.weights, len(model.layers) - 1
    for l in range(1, L + 1):
        inits += [numpy_helper.from_array(np.ascontiguousarray(weights[f"W{l}"], dtype=f32), f"W{l}"),
                  numpy_helper.from_array(np.ascontiguousarray(weights[f"b{l}"], dtype=f32), f"b{l}")]
        z = "logits" if l == L else f"z{l}"
        nodes.append(helper.make_node("Gemm", [h, f"W{l}", f"b{l}"], [z], name=f"gemm{l}", transB=1))
        if l < L:
            nodes.append(helper.make_node(_ONNX_ACTIVATIONS[model.activation], [z], [f"h{l}"],
                                          name=f"{model.activation}{l}"))
            h = f"h{l}"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", model.n_outputs])]
    if model.loss == "cross_entropy":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", model.n_outputs]))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", model.n_features])]
    return helper.make_graph(nodes, "polyak_mlp", inputs, outputs, initializer=inits)
