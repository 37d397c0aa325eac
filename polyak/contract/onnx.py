"""What a weights file computes (``network.py``), as one ONNX graph: the one exporter, used by ``Model.to_onnx`` and
by experiment tracking (which logs a finished job's model without the SDK). onnx is imported inside, so the
contract itself needs only NumPy.

The graph (float32): input ``input`` [N, m_0] of RAW features; Sub/Div by x_mean/x_std when the model
standardizes; per layer Gemm (transB=1), then Relu/Tanh/Sigmoid on the hidden layers; outputs ``logits``
[N, m_L] and, for cross_entropy, ``probabilities`` = Softmax(axis=1). Checked with ``onnx.checker``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from polyak.contract.errors import ModelError, one_line

_ONNX_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}  # ONNX operator names


@dataclass(frozen=True)
class Network:
    """A trained network as the graph needs it: ``weights`` are W1, b1, ..., WL, bL."""

    layers: tuple[int, ...]
    activation: str
    loss: str
    weights: Mapping[str, np.ndarray]
    x_mean: np.ndarray | None = None
    x_std: np.ndarray | None = None
    spec: dict | None = None
    description: str = ""


def onnx_bytes(net: Network, opset: int = 17) -> bytes:
    """The checked ONNX model, serialized; ModelError for a missing onnx package or a bad opset."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise ModelError("ONNX export needs the onnx package: pip install 'polyak[onnx]'") from None
    newest = onnx.defs.onnx_opset_version()
    if not 13 <= int(opset) <= newest:
        raise ModelError(f"opset must be in 13..{newest} (this onnx package), got {opset}")
    opsets = [helper.make_opsetid("", int(opset))]
    proto = helper.make_model(_graph(net), opset_imports=opsets, producer_name="polyak")
    proto.ir_version = helper.find_min_ir_version_for(opsets)  # loadable by older runtimes too
    proto.doc_string = net.description
    meta = {"layers": json.dumps(list(net.layers)), "activation": net.activation, "loss": net.loss}
    if net.spec is not None:
        meta["spec"] = json.dumps(net.spec)
    helper.set_model_props(proto, meta)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:  # a bug here, not the user's: say so plainly
        raise ModelError(f"the ONNX graph failed onnx.checker: {one_line(e)}") from None
    return proto.SerializeToString()


def _graph(net: Network):
    """The nodes, the float32 initializers, the input and the outputs."""
    from onnx import TensorProto, helper, numpy_helper

    f32 = np.float32
    inits, nodes, h = [], [], "input"
    if net.x_mean is not None:
        inits += [numpy_helper.from_array(np.asarray(net.x_mean, f32), "x_mean"),
                  numpy_helper.from_array(np.asarray(net.x_std, f32), "x_std")]
        nodes += [helper.make_node("Sub", ["input", "x_mean"], ["centered"], name="sub_mean"),
                  helper.make_node("Div", ["centered", "x_std"], ["standardized"], name="div_std")]
        h = "standardized"
    L = len(net.layers) - 1
    for l in range(1, L + 1):
        inits += [numpy_helper.from_array(np.ascontiguousarray(net.weights[f"W{l}"], dtype=f32), f"W{l}"),
                  numpy_helper.from_array(np.ascontiguousarray(net.weights[f"b{l}"], dtype=f32), f"b{l}")]
        z = "logits" if l == L else f"z{l}"
        nodes.append(helper.make_node("Gemm", [h, f"W{l}", f"b{l}"], [z], name=f"gemm{l}", transB=1))
        if l < L:
            nodes.append(helper.make_node(_ONNX_ACTIVATIONS[net.activation], [z], [f"h{l}"],
                                          name=f"{net.activation}{l}"))
            h = f"h{l}"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", net.layers[-1]])]
    if net.loss == "cross_entropy":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", net.layers[-1]]))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", net.layers[0]])]
    return helper.make_graph(nodes, "polyak_mlp", inputs, outputs, initializer=inits)
