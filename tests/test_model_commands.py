"""`polyak predict / evaluate / export`: a trained weights file on raw data, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from polyak.client.model import Model
from polyak.contract.spec import parse_spec
from polyak.workers.data import load_dataset

IRIS = {
    "model": {"layers": [4, 16, 3], "activation": "tanh", "seed": 2},
    "data": {"source": "sklearn", "name": "iris", "standardize": True, "validation_fraction": 0.3},
    "optimizer": {"lr": 0.5, "alpha": 0.5},
    "batch": {"size": 16},
    "stopping": {"max_epochs": 6},
    "cluster": {"num_workers": 0, "device": "cpu", "dtype": "float64"},
}


def polyak(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "polyak", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(weights file, the job's last epoch metrics, raw validation rows X, y)."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "spec.yaml").write_text(yaml.safe_dump(IRIS))
    proc = polyak("train", folder / "spec.yaml", "-o", folder / "w.npz", "--json")
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.splitlines()[-1])
    raw = parse_spec({**IRIS, "data": {**IRIS["data"], "standardize": False}})
    ds = load_dataset(raw.data, raw.model)  # the same split, unstandardized: what a user has
    return folder / "w.npz", last, ds.X_val, ds.y_val


def test_evaluate_on_the_raw_validation_rows_reproduces_the_jobs_figures(trained, tmp_path):
    weights, last, X, y = trained
    np.save(tmp_path / "val.npy", np.column_stack([X, y]))
    proc = polyak("evaluate", weights, tmp_path / "val.npy", "--json")
    assert proc.returncode == 0, proc.stderr
    score = json.loads(proc.stdout)
    assert score["n"] == 45
    assert score["loss"] == pytest.approx(last["val_loss"], rel=1e-10)
    assert score["accuracy"] == pytest.approx(last["val_accuracy"], abs=1e-12)
    np.savez(tmp_path / "val.npz", X=X, y=y)  # the same rows as an .npz: the same score
    again = json.loads(polyak("evaluate", weights, tmp_path / "val.npz", "--json").stdout)
    assert again == score


def test_predict_writes_npy_and_csv_and_prints_without_o(trained, tmp_path):
    weights, _, X, _ = trained
    np.save(tmp_path / "X.npy", X)
    model = Model.load(weights)
    proc = polyak("predict", weights, tmp_path / "X.npy", "-o", tmp_path / "ids.npy")
    assert proc.returncode == 0 and "wrote 45 predictions" in proc.stdout, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), model.predict(X))
    proc = polyak("predict", weights, tmp_path / "X.npy", "-o", tmp_path / "p.csv", "--proba")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.loadtxt(tmp_path / "p.csv", delimiter=","), model.predict_proba(X), rtol=1e-7)
    printed = polyak("predict", weights, tmp_path / "X.npy").stdout.split()
    assert [int(v) for v in printed] == list(model.predict(X))


def test_export_writes_an_onnx_graph_that_onnxruntime_runs(trained, tmp_path):
    import onnxruntime

    weights, _, X, _ = trained
    proc = polyak("export", weights, "--onnx", tmp_path / "m.onnx")
    assert proc.returncode == 0 and "input 'input' [N, 4]" in proc.stdout, proc.stderr
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    logits, probabilities = session.run(None, {"input": X.astype(np.float32)})
    np.testing.assert_allclose(probabilities, Model.load(weights).predict_proba(X), atol=1e-5)


def test_bad_inputs_are_one_error_line(trained, tmp_path):
    weights, _, X, y = trained
    np.save(tmp_path / "three.npy", X[:, :3])
    bad = X.copy()
    bad[4, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    (tmp_path / "not.npz").write_bytes(b"hello")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    cases = [
        (("predict", weights, tmp_path / "three.npy"), ["3", "4", "feature"]),
        (("predict", weights, tmp_path / "nan.npy"), ["NaN", "row 4"]),
        (("predict", tmp_path / "not.npz", tmp_path / "three.npy"), ["not a polyak weights file"]),
        (("predict", tmp_path / "other.npz", tmp_path / "three.npy"), ["not a polyak weights file", "W1"]),
        (("predict", weights, tmp_path / "three.npy", "-o", tmp_path / "p.txt"), ["as .npy or .csv"]),
        (("evaluate", weights, tmp_path / "nope.npy"), ["no such file"]),
        (("predict", weights, tmp_path / "three.npy", "-o", tmp_path / "no" / "p.npy"), ["does not exist"]),
    ]
    for args, words in cases:
        proc = polyak(*args)
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and len(errors) == 1 and errors[0].startswith("error: "), (args, proc.stderr)
        assert all(w in errors[0] for w in words), (args, errors[0])
