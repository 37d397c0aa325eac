"""client.model.Model: a weights file used on raw data, checked against independent references: a NumPy
forward pass written here, torch (to_torch), onnxruntime (to_onnx), and a job trained in this process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from polyak.client.model import _CHUNK_BYTES, Model
from polyak.contract.errors import ModelError, PolyakError

LAYERS = (7, 16, 12, 5)


def random_weights(layers, seed=0, dtype=np.float64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for l, (m_in, m_out) in enumerate(zip(layers[:-1], layers[1:], strict=True), start=1):
        out[f"W{l}"] = (rng.standard_normal((m_out, m_in)) * 1.5 / np.sqrt(m_in)).astype(dtype)
        out[f"b{l}"] = (rng.standard_normal(m_out) * 0.3).astype(dtype)
    return out


def reference_logits(weights, activation, X, x_mean=None, x_std=None) -> np.ndarray:
    """MATH.md's forward pass, written out plainly in float64."""
    a = np.asarray(X, np.float64)
    if x_mean is not None:
        a = (a - x_mean) / x_std
    L = len(weights) // 2
    for l in range(1, L + 1):
        z = a @ weights[f"W{l}"].astype(np.float64).T + weights[f"b{l}"]
        if l < L:
            z = {"relu": lambda v: np.maximum(v, 0), "tanh": np.tanh, "sigmoid": lambda v: 1 / (1 + np.exp(-v))}[
                activation
            ](z)
        a = z
    return a


def reference_proba(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def raw_inputs(n, d, seed=1):
    """Raw features far from standardized: offsets and scales per column."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * rng.uniform(0.5, 20, d) + rng.uniform(-50, 50, d)


def stats(X):
    return X.mean(axis=0), X.std(axis=0)


@pytest.fixture
def standardized_model():
    X = raw_inputs(300, LAYERS[0])
    mean, std = stats(X)
    W = random_weights(LAYERS)
    return Model(W, "tanh", "cross_entropy", mean, std), W, mean, std


# -- the forward pass against references ------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_predict_proba_equals_a_numpy_forward_pass(activation):
    X = raw_inputs(500, LAYERS[0])
    mean, std = stats(X[:200])
    W = random_weights(LAYERS, seed=2)
    m = Model(W, activation, "cross_entropy", mean, std)
    logits = reference_logits(W, activation, X, mean, std)
    np.testing.assert_allclose(m.decision_function(X), logits, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.forward(X), logits, rtol=0, atol=1e-12)
    proba = m.predict_proba(X)
    np.testing.assert_allclose(proba, reference_proba(logits), rtol=0, atol=1e-12)
    assert proba.dtype == np.float64 and proba.shape == (500, LAYERS[-1])
    np.testing.assert_array_equal(m.predict(X), logits.argmax(axis=1))
    assert m.predict(X).dtype == np.int64
    assert m.layers == LAYERS and m.n_features == 7 and m.n_outputs == 5


def test_mse_outputs_and_evaluate():
    W = random_weights((4, 8, 3), seed=3)
    X = raw_inputs(50, 4)
    m = Model(W, "relu", "mse")
    values = reference_logits(W, "relu", X)
    np.testing.assert_allclose(m.predict(X), values, rtol=0, atol=1e-12)
    assert m.predict(X).shape == (50, 3)
    y = values + np.random.default_rng(0).standard_normal(values.shape)
    ev = m.evaluate(X, y)
    assert ev["n"] == 50 and ev["accuracy"] is None
    assert ev["loss"] == pytest.approx(np.mean((values - y) ** 2), rel=1e-12)  # mean over samples AND outputs
    with pytest.raises(ModelError, match="predict_proba needs a cross_entropy model; this one is mse"):
        m.predict_proba(X)

    one = Model(random_weights((4, 6, 1), seed=4), "sigmoid", "mse")
    assert one.predict(X).shape == (50,)  # one output: a flat vector
    assert one.decision_function(X).shape == (50, 1)
    assert one.evaluate(X, one.predict(X))["loss"] == pytest.approx(0.0, abs=1e-20)


def test_cross_entropy_evaluate_matches_its_definition(standardized_model):
    m, W, mean, std = standardized_model
    X = raw_inputs(400, LAYERS[0], seed=5)
    y = np.random.default_rng(5).integers(0, LAYERS[-1], 400)
    logits = reference_logits(W, "tanh", X, mean, std)
    p = reference_proba(logits)
    ev = m.evaluate(X, y)
    assert ev["loss"] == pytest.approx(-np.mean(np.log(p[np.arange(400), y])), rel=1e-12)
    assert ev["accuracy"] == pytest.approx(np.mean(logits.argmax(axis=1) == y), abs=0)
    assert ev["n"] == 400
    assert m.evaluate(X, y.astype(np.float64))["loss"] == ev["loss"]  # integral float labels are class ids


def test_chunking_gives_the_same_results_as_one_chunk(standardized_model):
    m, _, _, _ = standardized_model
    X = raw_inputs(1003, LAYERS[0], seed=6)
    y = np.random.default_rng(6).integers(0, LAYERS[-1], 1003)
    whole = m.predict_proba(X), m.predict(X), m.evaluate(X, y)
    m.chunk_rows = 7  # 144 chunks, the last one short
    assert m._rows_per_chunk() == 7
    np.testing.assert_array_equal(m.predict_proba(X), whole[0])
    np.testing.assert_array_equal(m.predict(X), whole[1])
    ev = m.evaluate(X, y)
    assert ev["accuracy"] == whole[2]["accuracy"] and ev["loss"] == pytest.approx(whole[2]["loss"], rel=1e-13)


def test_chunks_are_bounded_for_wide_layers():
    m = Model(random_weights((3, 1_000_000, 2), seed=0), "relu", "cross_entropy", dtype=np.float32)
    assert m._rows_per_chunk() * 1_000_000 * 4 <= _CHUNK_BYTES
    assert Model(random_weights((3, 5, 2)), "relu", "cross_entropy")._rows_per_chunk() == Model.chunk_rows


def test_predicting_many_rows_holds_one_chunk_of_activations():
    import tracemalloc

    X = np.random.default_rng(0).standard_normal((100_000, 7))
    m = Model(random_weights((7, 256, 5), seed=0), "relu", "cross_entropy", X[:100].mean(0), X[:100].std(0))
    tracemalloc.start()
    try:
        ids = m.predict(X)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ids.shape == (100_000,)
    # the hidden layer's activations for every row would be 100_000 * 256 * 8 = 205 MB
    assert peak < 24 << 20, peak  # one chunk: 8 MiB of activations at most, and the 0.8 MB of ids


def test_float32_model_and_inputs():
    X = raw_inputs(600, LAYERS[0], seed=7)
    mean, std = stats(X)
    W = random_weights(LAYERS, seed=7)
    m64 = Model(W, "relu", "cross_entropy", mean, std)
    m32 = Model(W, "relu", "cross_entropy", mean, std, dtype=np.float32)
    p32 = m32.predict_proba(X.astype(np.float32))
    assert p32.dtype == np.float32
    np.testing.assert_allclose(p32, m64.predict_proba(X), rtol=0, atol=1e-5)
    np.testing.assert_allclose(m32.predict_proba(X), p32, rtol=0, atol=1e-6)  # float64 input, converted per chunk
    raw32 = Model(W, "relu", "cross_entropy", dtype=np.float32)  # no standardization: rows used in place
    np.testing.assert_allclose(
        raw32.decision_function(X.astype(np.float32)), reference_logits(W, "relu", X), rtol=1e-4, atol=1e-3
    )


# -- torch ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_to_torch_outputs_equal_decision_function(activation):
    X = raw_inputs(300, LAYERS[0], seed=8)
    mean, std = stats(X)
    m = Model(random_weights(LAYERS, seed=8), activation, "cross_entropy", mean, std)
    expected = m.decision_function(X)
    net = m.to_torch()
    assert isinstance(net, torch.nn.Sequential)
    assert type(net[0]).__name__ == "Standardize"
    assert sum(isinstance(mod, torch.nn.Linear) for mod in net) == len(LAYERS) - 1
    with torch.no_grad():
        out64 = net.double()(torch.from_numpy(X)).numpy()
        out32 = m.to_torch().float()(torch.from_numpy(X.astype(np.float32))).numpy()
    np.testing.assert_allclose(out64, expected, rtol=0, atol=1e-12)  # logits: no softmax in the module
    np.testing.assert_allclose(out32, expected, rtol=0, atol=1e-5 * max(1.0, np.abs(expected).max()))

    raw = Model(random_weights(LAYERS, seed=8), activation, "mse")
    assert not any(type(mod).__name__ == "Standardize" for mod in raw.to_torch())
    with torch.no_grad():
        np.testing.assert_allclose(
            raw.to_torch()(torch.from_numpy(X)).numpy(), raw.decision_function(X), rtol=0, atol=1e-12
        )


# -- ONNX ----------------------------------------------------------------------------------------------
def _run_onnx(path, X):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input": X.astype(np.float32)}), strict=True))


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_onnx_equals_predict_proba(tmp_path, activation):
    X = raw_inputs(1000, LAYERS[0], seed=9)
    mean, std = stats(X)
    m = Model(random_weights(LAYERS, seed=9), activation, "cross_entropy", mean, std)
    path = tmp_path / "model.onnx"
    assert m.to_onnx(path) == str(path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    act = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}[activation]
    assert ops == ["Sub", "Div", "Gemm", act, "Gemm", act, "Gemm", "Softmax"]
    assert model.opset_import[0].version == 17
    inp = model.graph.input[0]
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", LAYERS[0]]
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer)
    out = _run_onnx(path, X)
    assert set(out) == {"logits", "probabilities"}
    assert out["probabilities"].shape == (1000, LAYERS[-1])
    np.testing.assert_allclose(out["probabilities"], m.predict_proba(X), rtol=0, atol=1e-5)
    logits = m.decision_function(X)
    np.testing.assert_allclose(out["logits"], logits, rtol=0, atol=1e-5 * max(1.0, np.abs(logits).max()))


def test_onnx_mse_without_standardization(tmp_path):
    X = raw_inputs(1000, 6, seed=10)
    m = Model(random_weights((6, 20, 2), seed=10), "tanh", "mse")
    path = tmp_path / "reg.onnx"
    m.to_onnx(path)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Tanh", "Gemm"]
    out = _run_onnx(path, X)
    assert set(out) == {"logits"}
    expected = m.predict(X)
    np.testing.assert_allclose(out["logits"], expected, rtol=0, atol=1e-5 * max(1.0, np.abs(expected).max()))


def test_onnx_opset_out_of_range(tmp_path):
    m = Model(random_weights((3, 4, 2)), "relu", "cross_entropy")
    with pytest.raises(ModelError, match=r"opset must be in 13\.\.\d+ .*got 9"):
        m.to_onnx(tmp_path / "m.onnx", opset=9)


def test_onnx_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    m = Model(random_weights((3, 4, 2)), "relu", "cross_entropy")
    with pytest.raises(ModelError, match=r"needs the onnx package: pip install 'polyak\[onnx\]'"):
        m.to_onnx(tmp_path / "m.onnx")


# -- loading files -------------------------------------------------------------------------------------
def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_a_file_with_spec_and_stats(tmp_path):
    W = random_weights((5, 9, 3), seed=11)
    X = raw_inputs(40, 5, seed=11)
    mean, std = stats(X)
    spec = {
        "model": {"layers": [5, 9, 3], "activation": "sigmoid", "loss": "cross_entropy"},
        "data": {"standardize": True},
    }
    path = _save(tmp_path / "w.npz", **W, x_mean=mean, x_std=std, spec=np.array(json.dumps(spec)))
    m = Model.load(path)
    assert (m.activation, m.loss, m.layers) == ("sigmoid", "cross_entropy", (5, 9, 3))
    assert m.spec == spec and m.standardizes and m.assumed == ()
    np.testing.assert_allclose(
        m.predict_proba(X), reference_proba(reference_logits(W, "sigmoid", X, mean, std)), rtol=0, atol=1e-12
    )
    assert "assumed" not in m.describe() and "standardized" in m.describe()
    assert Model.load(path, activation="sigmoid").activation == "sigmoid"  # agreeing with the spec is fine
    with pytest.raises(ModelError, match=r"activation='relu' contradicts the file's spec \(model.activation = "):
        Model.load(path, activation="relu")
    m32 = Model.load(path, dtype=np.float32)
    assert m32.dtype == np.float32 and m32.predict(X).tolist() == m.predict(X).tolist()


def test_old_file_without_spec_is_a_raw_input_model(tmp_path):
    W = random_weights((4, 6, 3), seed=12)
    X = raw_inputs(30, 4, seed=12)
    path = _save(tmp_path / "old.npz", **W)
    m = Model.load(path)
    assert (m.activation, m.loss, m.spec, m.standardizes) == ("relu", "cross_entropy", None, False)
    assert set(m.assumed) == {"activation", "loss"}
    text = m.describe()
    assert "assumed: activation = relu, loss = cross_entropy" in text and "no spec" in text
    assert "raw" in text
    np.testing.assert_allclose(m.decision_function(X), reference_logits(W, "relu", X), rtol=0, atol=1e-12)

    told = Model.load(path, activation="tanh")
    assert told.activation == "tanh" and told.assumed == ("loss",)
    np.testing.assert_allclose(told.decision_function(X), reference_logits(W, "tanh", X), rtol=0, atol=1e-12)
    assert "assumed: loss = cross_entropy" in told.describe()
    mse = Model.load(path, activation="sigmoid", loss="mse")
    assert mse.assumed == () and "assumed" not in mse.describe() and mse.predict(X).shape == (30, 3)


def test_not_a_weights_file(tmp_path):
    npz = _save(tmp_path / "data.npz", X=np.zeros((3, 2)), y=np.zeros(3))
    with pytest.raises(
        ModelError,
        match=r"data\.npz is not a polyak weights file: it has no W1 and no b1 "
        r"\(it holds: X, y\)",
    ):
        Model.load(npz)
    only_w = _save(tmp_path / "w_only.npz", W1=np.zeros((2, 3)))
    with pytest.raises(ModelError, match=r"w_only\.npz is not a polyak weights file: it has no b1"):
        Model.load(only_w)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(ModelError, match=r"notes\.txt is not a polyak weights file: not an \.npz archive"):
        Model.load(text)
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(ModelError, match=r"a\.npy is not a polyak weights file: it holds one array"):
        Model.load(npy)
    with pytest.raises(ModelError, match=r"missing\.npz: no such file"):
        Model.load(tmp_path / "missing.npz")
    assert issubclass(ModelError, PolyakError)


def test_inconsistent_files(tmp_path):
    W = random_weights((4, 6, 3))
    bad = dict(W, W2=np.zeros((3, 5)))
    with pytest.raises(ModelError, match=r"inconsistent shapes: W2 has shape \(3, 5\) \(5 inputs\) but layer 1 has 6"):
        Model.load(_save(tmp_path / "a.npz", **bad))
    with pytest.raises(ModelError, match=r"inconsistent shapes: b1 has shape \(5,\), W1 \(6, 4\) needs \(6,\)"):
        Model.load(_save(tmp_path / "b.npz", **dict(W, b1=np.zeros(5))))
    with pytest.raises(ModelError, match=r"has W2 but no b2"):
        Model.load(_save(tmp_path / "c.npz", W1=W["W1"], b1=W["b1"], W2=W["W2"]))
    with pytest.raises(ModelError, match=r"arrays b3 do not belong to layers W1\.\.W2"):
        Model.load(_save(tmp_path / "d.npz", **W, b3=np.zeros(2)))
    with pytest.raises(ModelError, match=r"inconsistent shapes: x_mean has shape \(3,\), W1 takes 4 inputs"):
        Model.load(_save(tmp_path / "e.npz", **W, x_mean=np.zeros(3), x_std=np.ones(3)))
    with pytest.raises(ModelError, match=r"has x_mean without the other"):
        Model.load(_save(tmp_path / "f.npz", **W, x_mean=np.zeros(4)))
    spec = {"model": {"layers": [4, 7, 3], "activation": "relu", "loss": "cross_entropy"}}
    with pytest.raises(ModelError, match=r"the arrays make layers \[4, 6, 3\] but its spec says model.layers = \[4, 7"):
        Model.load(_save(tmp_path / "g.npz", **W, spec=np.array(json.dumps(spec))))
    spec["model"]["layers"] = [4, 6, 3]
    spec["data"] = {"standardize": True}
    with pytest.raises(ModelError, match=r"spec says data.standardize = true but the file has no x_mean/x_std"):
        Model.load(_save(tmp_path / "h.npz", **W, spec=np.array(json.dumps(spec))))
    with pytest.raises(ModelError, match=r"W2 holds 1 NaN/inf value\(s\)"):
        Model.load(_save(tmp_path / "i.npz", **dict(W, W2=_with_nan(W["W2"]))))
    with pytest.raises(ModelError, match=r"output layer has 1 unit; cross_entropy needs >= 2"):
        Model.load(_save(tmp_path / "j.npz", **random_weights((4, 1))))


def _with_nan(a):
    a = a.copy()
    a.flat[3] = np.nan
    return a


# -- input errors --------------------------------------------------------------------------------------
def test_input_errors(standardized_model):
    m, _, _, _ = standardized_model
    X = raw_inputs(20, LAYERS[0], seed=13)
    with pytest.raises(ModelError, match=r"X has 6 features per row but the model takes 7"):
        m.predict(X[:, :6])
    with pytest.raises(ModelError, match=r"X must be 2-D .*use X\.reshape\(1, -1\)"):
        m.predict(X[0])
    bad = X.copy()
    bad[4, 2], bad[11, 0], bad[12, 6] = np.nan, np.inf, -np.inf
    for rows in (8, 65536):  # the bad rows in the first and second chunks, or all in one
        m.chunk_rows = rows
        with pytest.raises(ModelError, match=r"^X has 3 row\(s\) with NaN or inf \(first: row 4\); drop or impute"):
            m.predict_proba(bad)
        with pytest.raises(ModelError, match=r"^X has 2 row\(s\) with NaN or inf \(first: row 3\)"):
            m.predict(bad[8:])
    m.chunk_rows = 65536
    m32 = Model(m.weights, "relu", "cross_entropy", dtype=np.float32)
    huge = X.copy()
    huge[6, 1] = 1e300
    with pytest.raises(ModelError, match=r"^X row 6 has values beyond float32's range: load the model with dtype="):
        m32.predict(huge)
    assert np.isfinite(m.decision_function(huge)).all()  # float64 (tanh): a finite input is computed
    y = np.random.default_rng(0).integers(0, 5, 20)
    y[7], y[9] = 5, -1
    with pytest.raises(ModelError, match=r"y has 2 label\(s\) outside 0\.\.4 .*first: row 7, label 5"):
        m.evaluate(X, y)
    with pytest.raises(ModelError, match=r"y has 19 labels but X has 20 rows"):
        m.evaluate(X, y[:19].clip(0, 4))
    with pytest.raises(ModelError, match=r"y must be class ids \(integers\); row 0 has"):
        m.evaluate(X, np.full(20, 0.5))
    assert m.predict(np.empty((0, 7))).shape == (0,)


def test_the_model_module_imports_no_service_worker_or_ray_code():
    code = (
        "import sys, polyak.client.model; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch', 'onnx') "
        "or m.startswith(('polyak.service', 'polyak.workers'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# -- a job trained in this process -------------------------------------------------------------------------
def test_a_trained_digits_job_scores_the_same_on_raw_rows(tmp_path):
    from polyak.contract.spec import parse_spec
    from polyak.service.engine.trainer import train_job, weights_file
    from polyak.workers.data import load_dataset, prepare

    spec = parse_spec(
        {
            "model": {"layers": [64, 32, 10], "activation": "relu", "loss": "cross_entropy", "seed": 4},
            "data": {"source": "sklearn", "name": "digits", "validation_fraction": 0.2, "standardize": True},
            "optimizer": {"method": "heavy_ball", "lr": 0.1, "alpha": 0.5},
            "batch": {"size": 64},
            "stopping": {"max_epochs": 8},
            "cluster": {"num_workers": 0, "device": "cpu", "dtype": "float64"},
        }
    )
    result = train_job(spec)
    info = prepare(spec.data, spec.model)
    path = tmp_path / "weights.npz"
    np.savez(path, **weights_file(result.weights, spec, info))
    last = result.metrics[-1]

    raw = load_dataset(spec.data.model_copy(update={"standardize": False}), spec.model)
    assert raw.X_val.shape == (info.n_val, 64) == (359, 64) and raw.X_val.max() > 10  # raw pixels 0..16, not z-scores
    m = Model.load(path)
    assert m.standardizes and m.assumed == ()
    ev = m.evaluate(raw.X_val, raw.y_val)
    assert ev["n"] == info.n_val
    assert last.val_accuracy > 0.9
    assert ev["accuracy"] == pytest.approx(last.val_accuracy, abs=1e-12)
    assert ev["loss"] == pytest.approx(last.val_loss, rel=1e-9)
    assert np.mean(m.predict(raw.X_val) == raw.y_val) == pytest.approx(last.val_accuracy, abs=1e-12)
    ev32 = Model.load(path, dtype=np.float32).evaluate(raw.X_val.astype(np.float32), raw.y_val)
    assert abs(ev32["accuracy"] - last.val_accuracy) <= 1 / info.n_val

    # the same weights without the standardization statistics: a model of raw inputs, and a much worse one
    arrays = dict(np.load(path, allow_pickle=False))
    del arrays["x_mean"], arrays["x_std"]
    weights = {k: v for k, v in arrays.items() if k != "spec"}
    no_stats = Model(weights, "relu", "cross_entropy")
    worse = no_stats.evaluate(raw.X_val, raw.y_val)
    assert worse["accuracy"] < last.val_accuracy - 0.1 and worse["loss"] > 5 * ev["loss"]
