"""A trained model, usable on raw data: ``Model.load("weights.npz").predict(X_raw)``.

NumPy only (no Ray, service or worker code; the exporters, client/export.py, import torch and onnx inside
the function that needs each). The weights file (DESIGN.md, "The weights file, and using a trained model")
holds ``W1, b1, ..., WL, bL`` (``Wl`` of shape (m_l, m_{l-1}), the convention of ``torch.nn.Linear.weight``),
and, from the version that wrote them, ``x_mean``/``x_std`` (float64 (m_0,), when the job standardized its
inputs) and ``spec`` (the JobSpec as JSON in a 0-d unicode array). The forward pass is MATH.md's "Model",
the one training computes (polyak/contract/network.py): ``x^(l) = phi(W^(l) x^(l-1) + b^(l))`` with phi in
{relu, tanh, sigmoid} on the hidden layers and a linear output layer; cross_entropy models read their
outputs through a softmax, mse models as values.

Every method takes RAW features: the model standardizes them with its own x_mean/x_std first. Rows go
through the network a chunk at a time (``chunk_rows``), so predicting a million rows holds one chunk's
activations per layer, never a million rows' worth.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from polyak.client import export
from polyak.contract.choices import ACTIVATIONS, LOSSES
from polyak.contract.errors import ModelError, one_line
from polyak.contract.network import forward_pass

DEFAULT_ACTIVATION, DEFAULT_LOSS = "relu", "cross_entropy"
_LAYER_KEY = re.compile(r"([Wb])([0-9]+)")
_CHUNK_BYTES = 8 << 20  # widest layer x chunk rows x itemsize stays under this: a chunk stays in cache


class Model:
    """An L-layer perceptron with its input standardization: predictions from raw features.

    ``Model(weights, activation, loss, x_mean=None, x_std=None, dtype=np.float64)``: ``weights`` maps
    ``W1, b1, ..., WL, bL`` to arrays; the network computes in ``dtype`` (float64, the default, or float32).
    ``Model.load(path)`` reads a weights file.
    """

    #: at most this many rows per chunk of the forward pass; fewer for wide layers (``_rows_per_chunk``: a chunk's
    #: widest activation stays under 8 MiB, in cache: 2674 rows for 784 float32 features)
    chunk_rows: int = 65536

    def __init__(
        self,
        weights: Mapping[str, Any],
        activation: str = DEFAULT_ACTIVATION,
        loss: str = DEFAULT_LOSS,
        x_mean=None,
        x_std=None,
        dtype=np.float64,
        *,
        spec: dict | None = None,
        source: str | None = None,
        assumed: tuple[str, ...] = (),
    ):
        where = source or "weights"
        if activation not in ACTIVATIONS:
            raise ModelError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if loss not in LOSSES:
            raise ModelError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        try:
            self.dtype = np.dtype(dtype)
        except TypeError:
            raise ModelError(f"dtype must be float64 or float32, got {dtype!r}") from None
        if self.dtype not in (np.float64, np.float32):
            raise ModelError(f"dtype must be float64 or float32, got {self.dtype}")
        for key in ("x_mean", "x_std", "spec"):
            if key in weights:
                raise ModelError(f"{where}: {key} is not a layer array: pass it as an argument, or use Model.load")
        self.activation, self.loss = activation, loss
        self._params = _layers_of(weights, where, self.dtype)
        self._layers = (self._params[0][0].shape[1], *(W.shape[0] for W, _ in self._params))
        if loss == "cross_entropy" and self._layers[-1] < 2:
            raise ModelError(
                f"{where}: the output layer has {self._layers[-1]} unit; cross_entropy needs >= 2 (one per class): "
                "is it an mse model? (loss='mse')"
            )
        self.x_mean, self.x_std = _stats_of(x_mean, x_std, self._layers[0], where)
        # the arithmetic's copies, in the compute dtype (the float64 originals stay in x_mean/x_std)
        self._mean = None if self.x_mean is None else self.x_mean.astype(self.dtype)
        self._std = None if self.x_std is None else self.x_std.astype(self.dtype)
        self.spec, self.source, self.assumed = spec, source, tuple(assumed)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path, activation: str | None = None, loss: str | None = None, dtype=np.float64) -> Model:
        """The model in a weights file (``np.load(allow_pickle=False)``).

        ``activation``/``loss`` are for files without a ``spec`` (written before polyak stored one): such a file
        is a model on raw inputs, with relu and cross_entropy unless told otherwise (``describe()`` says so).
        For a file with a spec they must agree with it, or be left out.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ModelError(f"{os.path.abspath(path)}: no such file")
        if os.path.isdir(path):
            raise ModelError(f"{path} is a directory, not a weights file (.npz)")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            raise ModelError(
                f"{path} is not a polyak weights file: not an .npz archive, so it has no W1, b1, ... arrays"
            ) from None
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ModelError(
                f"{path} is not a polyak weights file: it holds one array (a .npy), not an .npz with W1, b1, ..."
            )
        with loaded as npz:
            names = list(npz.files)
            missing = [k for k in ("W1", "b1") if k not in names]
            if missing:
                held = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "nothing"
                raise ModelError(
                    f"{path} is not a polyak weights file: it has no {' and no '.join(missing)} (it holds: {held})"
                )
            arrays = {}
            for name in names:
                try:
                    arrays[name] = npz[name]
                except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # e.g. an object array (pickle)
                    raise ModelError(f"{path}: array {name} cannot be read: {one_line(e)}") from None
        return cls.from_arrays(arrays, activation, loss, dtype, source=path)

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, np.ndarray],
        activation: str | None = None,
        loss: str | None = None,
        dtype=np.float64,
        source: str = "weights",
    ) -> Model:
        """The model in a weights file's arrays (what ``Job.weights()`` returns); see ``load``."""
        path, arrays = source, dict(arrays)
        if "W1" not in arrays or "b1" not in arrays:
            raise ModelError(f"{path} is not a polyak weights file: it has no W1/b1 (it holds: {', '.join(arrays)})")
        spec = _spec_of(arrays.pop("spec", None), path)
        x_mean, x_std = arrays.pop("x_mean", None), arrays.pop("x_std", None)
        weights = {k: v for k, v in arrays.items() if _LAYER_KEY.fullmatch(k)}
        assumed = []
        if spec is None:
            if activation is None:
                activation = DEFAULT_ACTIVATION
                assumed.append("activation")
            if loss is None:
                loss = DEFAULT_LOSS
                assumed.append("loss")
        else:
            model = spec.get("model") or {}
            for name, given in (("activation", activation), ("loss", loss)):
                stored = model.get(name)
                if stored is None:
                    raise ModelError(f"{path}: its spec has no model.{name}")
                if given is not None and given != stored:
                    raise ModelError(
                        f"{path}: {name}={given!r} contradicts the file's spec (model.{name} = {stored!r}); "
                        "leave it out"
                    )
            activation, loss = model["activation"], model["loss"]
            if (spec.get("data") or {}).get("standardize") and x_mean is None:
                raise ModelError(
                    f"{path}: its spec says data.standardize = true but the file has no x_mean/x_std, "
                    "so it cannot be used on raw inputs"
                )
        m = cls(weights, activation, loss, x_mean, x_std, dtype, spec=spec, source=path, assumed=tuple(assumed))
        if spec is not None:
            layers = (spec.get("model") or {}).get("layers")
            if layers is not None and tuple(layers) != m.layers:
                raise ModelError(
                    f"{path}: the arrays make layers {list(m.layers)} but its spec says model.layers = {list(layers)}"
                )
        return m

    # -- shape -----------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        """(m_0, ..., m_L): inputs, hidden widths, outputs."""
        return self._layers

    @property
    def n_features(self) -> int:
        return self._layers[0]

    @property
    def n_outputs(self) -> int:
        return self._layers[-1]

    @property
    def standardizes(self) -> bool:
        """True when the model standardizes its raw inputs with x_mean/x_std."""
        return self.x_mean is not None

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """Copies of W1, b1, ..., WL, bL in the compute dtype."""
        out = {}
        for l, (W, b) in enumerate(self._params, start=1):
            out[f"W{l}"], out[f"b{l}"] = W.copy(), b.copy()
        return out

    def describe(self) -> str:
        """What the model is, in a few lines; says which settings were assumed for a file without a spec."""
        head = "-".join(str(m) for m in self._layers)
        out = "softmax over the outputs (class ids)" if self.loss == "cross_entropy" else "linear outputs (values)"
        lines = [
            f"MLP {head}: {self.activation} hidden layers, {out}; loss {self.loss}; computes in {self.dtype}",
            "inputs: standardized with the stored x_mean/x_std" if self.standardizes else "inputs: used as given (raw)",
        ]
        if self.source:
            lines.append(f"from: {self.source}" + ("" if self.spec is not None else " (no spec stored)"))
        if self.assumed:
            said = ", ".join(f"{k} = {getattr(self, k)}" for k in self.assumed)
            lines.append(
                f"assumed: {said} (the file stores no spec; pass Model.load(path, activation=..., loss=...) if not)"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Model(layers={list(self._layers)}, activation={self.activation!r}, loss={self.loss!r}, "
            f"standardizes={self.standardizes}, dtype={self.dtype.name})"
        )

    # -- predictions -----------------------------------------------------------------------------
    def decision_function(self, X) -> np.ndarray:
        """Raw outputs f(x) of the linear output layer, (n, m_L) in the compute dtype: logits for cross_entropy."""
        X = self._check_X(X)
        out = np.empty((X.shape[0], self.n_outputs), self.dtype)
        for start, z in self._forward_chunks(X):
            out[start : start + len(z)] = z
        return out

    forward = decision_function

    def predict_proba(self, X) -> np.ndarray:
        """cross_entropy: softmax probabilities (n, m_L) in the compute dtype."""
        if self.loss != "cross_entropy":
            raise ModelError(f"predict_proba needs a cross_entropy model; this one is {self.loss}: use predict")
        X = self._check_X(X)
        out = np.empty((X.shape[0], self.n_outputs), self.dtype)
        for start, z in self._forward_chunks(X):
            _softmax_(z)
            out[start : start + len(z)] = z
        return out

    def predict(self, X) -> np.ndarray:
        """cross_entropy: class ids (n,) int64. mse: values (n, m_L), or (n,) when m_L == 1."""
        X = self._check_X(X)
        if self.loss == "cross_entropy":
            ids = np.empty(X.shape[0], np.int64)
            for start, z in self._forward_chunks(X):
                ids[start : start + len(z)] = z.argmax(axis=1)
            return ids
        values = self.decision_function(X)
        return values[:, 0] if self.n_outputs == 1 else values

    def evaluate(self, X, y) -> dict[str, Any]:
        """{"loss": mean loss (MATH.md: cross_entropy -log p(y_i); mse mean over samples and outputs),
        "accuracy": fraction of correct class ids, or None for mse, "n": rows}."""
        X = self._check_X(X)
        y = self._check_y(y, X.shape[0])
        if X.shape[0] == 0:
            raise ModelError("evaluate needs at least one row, got 0")
        loss_sum, correct = 0.0, 0
        for start, z in self._forward_chunks(X):
            t = y[start : start + len(z)]
            if self.loss == "cross_entropy":
                correct += int(np.count_nonzero(z.argmax(axis=1) == t))
                picked = z[np.arange(len(z)), t]
                loss_sum += float((_logsumexp(z) - picked).sum(dtype=np.float64))
            else:
                d = z - t
                loss_sum += float(np.einsum("ij,ij->", d, d, dtype=np.float64)) / self.n_outputs
        n = int(X.shape[0])
        return {"loss": loss_sum / n, "accuracy": correct / n if self.loss == "cross_entropy" else None, "n": n}

    # -- the forward pass, a chunk at a time ------------------------------------------------------------
    def _rows_per_chunk(self) -> int:
        return max(1, min(int(self.chunk_rows), _CHUNK_BYTES // (max(self._layers) * self.dtype.itemsize)))

    def _forward_chunks(self, X: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, outputs of rows [first, first + len)) per chunk. The outputs are a work buffer that the
        next chunk overwrites: callers use (or copy) them before asking for the next."""
        n = X.shape[0]
        rows = self._rows_per_chunk()
        dt = self.dtype
        direct = self.x_mean is None and X.dtype == dt  # feed X's own rows to the first matmul
        x_buf = None if direct else np.empty((min(rows, n), self.n_features), dt)
        acts = [np.empty((min(rows, n), W.shape[0]), dt) for W, _ in self._params]
        for start in range(0, n, rows):
            chunk = X[start : start + rows]
            r = len(chunk)
            if direct:
                a = chunk
            else:
                a = x_buf[:r]
                if self._mean is not None and chunk.dtype == dt:
                    np.subtract(chunk, self._mean, out=a)  # one pass fewer than copy, then subtract
                else:
                    with np.errstate(over="ignore"):  # beyond float32's range: inf, reported by _check_finite
                        np.copyto(a, chunk, casting="unsafe")  # any real dtype in; validated by _check_X
                    if self._mean is not None:
                        a -= self._mean
                if self._std is not None:
                    a /= self._std
            self._check_finite(a, X, start)
            yield start, forward_pass(self._params, a, [z[:r] for z in acts], self.activation)[-1]

    def _check_finite(self, a: np.ndarray, X: np.ndarray, start: int) -> None:
        """Rows [start, start + len(a)) of X, converted (and standardized) into ``a``: NaN or inf is an error."""
        # One sum is a cheap, exact test: any NaN or inf makes it non-finite (a finite overflow is a false alarm,
        # settled by the row-wise look that follows, which runs only then).
        with np.errstate(over="ignore", invalid="ignore"):
            total = a.sum()
        if np.isfinite(total):
            return
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        if not bad.size:
            return
        rows = self._rows_per_chunk()
        count, first = 0, None
        for i in range(start, X.shape[0], rows):  # the rows before ``start`` passed: count from here, in chunks
            raw_bad = np.flatnonzero(~np.isfinite(X[i : i + rows]).all(axis=1)) if X.dtype.kind == "f" else []
            if len(raw_bad):
                count += len(raw_bad)
                first = i + int(raw_bad[0]) if first is None else first
        if first is None:  # finite as given, infinite once converted to the compute dtype
            raise ModelError(
                f"X row {start + int(bad[0])} has values beyond {self.dtype}'s range: "
                "load the model with dtype=np.float64"
            )
        raise ModelError(f"X has {count} row(s) with NaN or inf (first: row {first}); drop or impute them")

    # -- input checks -------------------------------------------------------------------------------
    def _check_X(self, X) -> np.ndarray:
        if not isinstance(X, np.ndarray):  # a memmap is an ndarray: read chunk by chunk, never whole
            X = np.asarray(X)
        if X.dtype.kind not in "fiub":
            raise ModelError(f"X must hold numbers, got an array of dtype {X.dtype}")
        if X.ndim == 1 and X.shape[0] == self.n_features:
            raise ModelError(
                f"X must be 2-D (n rows, {self.n_features} features), got one row of shape {X.shape}: "
                "use X.reshape(1, -1)"
            )
        if X.ndim != 2:
            raise ModelError(f"X must be 2-D (n rows, {self.n_features} features), got shape {X.shape}")
        if X.shape[1] != self.n_features:
            raise ModelError(
                f"X has {X.shape[1]} features per row but the model takes {self.n_features} "
                f"(layers {list(self._layers)})"
            )
        return X

    def _check_y(self, y, n: int) -> np.ndarray:
        y = np.asarray(y)
        k = self.n_outputs
        if self.loss == "cross_entropy":
            if y.ndim == 2 and y.shape[1] == 1:
                y = y[:, 0]
            if y.ndim != 1:
                raise ModelError(f"y must be class ids of shape (n,), got shape {y.shape}")
            if y.dtype.kind == "f":
                if not np.isfinite(y).all():
                    bad = np.flatnonzero(~np.isfinite(y))
                    raise ModelError(f"y has {bad.size} NaN/inf label(s) (first: row {int(bad[0])})")
                frac = np.flatnonzero(y != np.round(y))
                if frac.size:
                    i = int(frac[0])
                    raise ModelError(f"y must be class ids (integers); row {i} has {y[i]!r}")
            elif y.dtype.kind not in "iub":
                raise ModelError(f"y must be class ids (integers), got an array of dtype {y.dtype}")
            if len(y) != n:
                raise ModelError(f"y has {len(y)} labels but X has {n} rows")
            bad = np.flatnonzero((y < 0) | (y > k - 1))
            if bad.size:
                i = int(bad[0])
                raise ModelError(
                    f"y has {bad.size} label(s) outside 0..{k - 1} (the model has {k} classes); "
                    f"first: row {i}, label {y[i].item()!r}"
                )
            return y.astype(np.int64, copy=False)
        if y.ndim == 1 and k == 1:
            y = y[:, None]
        if y.dtype.kind not in "fiub":
            raise ModelError(f"y must hold numbers, got an array of dtype {y.dtype}")
        if y.ndim != 2 or y.shape[1] != k:
            raise ModelError(f"y must have shape (n, {k}) for this mse model's {k} output(s), got shape {y.shape}")
        if len(y) != n:
            raise ModelError(f"y has {len(y)} rows but X has {n}")
        finite = np.isfinite(y).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ModelError(f"y has {bad.size} row(s) with NaN or inf (first: row {int(bad[0])})")
        return y.astype(self.dtype, copy=False)

    # -- export (client/export.py) -------------------------------------------------------------
    def to_torch(self, dtype=None):
        """A ``torch.nn.Sequential`` computing ``decision_function`` from raw features (``export.to_torch``)."""
        return export.to_torch(self, dtype)

    def to_onnx(self, path, opset: int = 17) -> str:
        """Write the model as one float32 ONNX graph on raw features (``export.to_onnx``); the path written."""
        return export.to_onnx(self, path, opset)


# -- helpers -------------------------------------------------------------------------------------------
def _layers_of(weights: Mapping[str, Any], where: str, dtype: np.dtype) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(W^(l), b^(l))] in ``dtype``, C-contiguous; every missing, extra or misshapen array named."""
    keys = set(weights)
    if "W1" not in keys or "b1" not in keys:
        missing = " and no ".join(k for k in ("W1", "b1") if k not in keys)
        raise ModelError(f"{where} is not a polyak weights file: it has no {missing}")
    L = 0
    while f"W{L + 1}" in keys:
        L += 1
    unknown = sorted(k for k in keys if not (_LAYER_KEY.fullmatch(k) and 1 <= int(k[1:]) <= L))
    if unknown:
        raise ModelError(
            f"{where}: arrays {', '.join(unknown)} do not belong to layers W1..W{L} (each layer l needs Wl and bl)"
        )
    params, m_prev = [], None
    for l in range(1, L + 1):
        if f"b{l}" not in keys:
            raise ModelError(f"{where}: has W{l} but no b{l}")
        W, b = np.asarray(weights[f"W{l}"]), np.asarray(weights[f"b{l}"])
        for name, a in ((f"W{l}", W), (f"b{l}", b)):
            if a.dtype.kind not in "fiu":
                raise ModelError(f"{where}: {name} must hold real numbers, got dtype {a.dtype}")
        if W.ndim != 2 or 0 in W.shape:
            raise ModelError(f"{where}: W{l} must be a non-empty 2-D (m_{l}, m_{l - 1}) array, got shape {W.shape}")
        if m_prev is not None and W.shape[1] != m_prev:
            raise ModelError(
                f"{where}: inconsistent shapes: W{l} has shape {W.shape} ({W.shape[1]} inputs) but layer {l - 1} "
                f"has {m_prev} outputs"
            )
        if b.shape != (W.shape[0],):
            raise ModelError(
                f"{where}: inconsistent shapes: b{l} has shape {b.shape}, W{l} {W.shape} needs ({W.shape[0]},)"
            )
        for name, a in ((f"W{l}", W), (f"b{l}", b)):
            bad = int(np.count_nonzero(~np.isfinite(a)))
            if bad:
                raise ModelError(f"{where}: {name} holds {bad} NaN/inf value(s) (the weights of a diverged job?)")
        params.append((np.ascontiguousarray(W, dtype=dtype), np.ascontiguousarray(b, dtype=dtype)))
        m_prev = W.shape[0]
    return params


def _stats_of(x_mean, x_std, m0: int, where: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    if x_mean is None and x_std is None:
        return None, None
    if x_mean is None or x_std is None:
        raise ModelError(f"{where}: has {'x_mean' if x_std is None else 'x_std'} without the other; both or neither")
    out = []
    for name, a in (("x_mean", x_mean), ("x_std", x_std)):
        a = np.asarray(a)
        if a.dtype.kind not in "fiu":
            raise ModelError(f"{where}: {name} must hold real numbers, got dtype {a.dtype}")
        if a.shape != (m0,):
            raise ModelError(f"{where}: inconsistent shapes: {name} has shape {a.shape}, W1 takes {m0} inputs")
        out.append(np.array(a, dtype=np.float64))
    mean, std = out
    if not np.isfinite(mean).all() or not (np.isfinite(std) & (std > 0)).all():
        raise ModelError(f"{where}: x_mean must be finite and x_std finite and > 0")
    return mean, std


def _spec_of(raw, path: str) -> dict | None:
    if raw is None:
        return None
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise ModelError(
            f"{path}: spec must be a 0-d unicode array holding JSON, got dtype {raw.dtype}, shape {raw.shape}"
        )
    try:
        spec = json.loads(str(raw[()]))
    except ValueError as e:
        raise ModelError(f"{path}: spec is not valid JSON: {one_line(e)}") from None
    if not isinstance(spec, dict):
        raise ModelError(f"{path}: spec must be a JSON object, got {type(spec).__name__}")
    return spec


def _softmax_(z: np.ndarray) -> None:
    """Row-wise softmax in place, shifted by the row max so exp never overflows."""
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1)
    return np.log(np.exp(z - m[:, None]).sum(axis=1)) + m
