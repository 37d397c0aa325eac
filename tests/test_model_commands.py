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


# -- DATA read as the job read it: the stored spec's data.target ---------------------------------------------
def train_on(folder, path, target, model, lr):
    """A weights file trained by `polyak train` on the file at ``path``, its targets the named column(s)."""
    spec = {**IRIS, "model": model, "data": {"source": "file", "path": str(path), "target": target,
                                             "standardize": True}, "optimizer": {"lr": lr, "alpha": 0.5}}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = polyak("train", folder / "spec.yaml", "-o", folder / "w.npz")
    assert proc.returncode == 0, proc.stderr
    return folder / "w.npz"


@pytest.fixture(scope="module")
def csv_target_first(tmp_path_factory):
    """(weights, the CSV it trained on, X, y): iris with its class column first, under a header row."""
    from sklearn.datasets import load_iris

    folder = tmp_path_factory.mktemp("csv")
    X, y = load_iris(return_X_y=True)
    path = folder / "iris.csv"
    header = "species,sepal_length,sepal_width,petal_length,petal_width"
    np.savetxt(path, np.column_stack([y, X]), delimiter=",", header=header, comments="")
    weights = train_on(folder, path, "species", {"layers": [4, 8, 3], "activation": "tanh", "seed": 1}, lr=0.5)
    return weights, path, X, y


@pytest.fixture(scope="module")
def parquet_targets_in_the_middle(tmp_path_factory):
    """(weights, the parquet file it trained on, X, Y): two targets named in the middle, in reverse order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("parquet")
    rng = np.random.default_rng(4)
    X = rng.standard_normal((120, 5)) * [1, 3, 0.5, 2, 1] + [0, 5, -2, 1, 0]
    Y = np.column_stack([X @ rng.standard_normal(5), X[:, :2].sum(axis=1)]) + 0.1 * rng.standard_normal((120, 2))
    columns = {"x0": X[:, 0], "x1": X[:, 1], "y0": Y[:, 0], "x2": X[:, 2], "y1": Y[:, 1], "x3": X[:, 3],
               "x4": X[:, 4]}
    path = folder / "data.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=50)
    model = {"layers": [5, 8, 2], "activation": "relu", "loss": "mse", "seed": 3}
    weights = train_on(folder, path, ["y1", "y0"], model, lr=0.01)
    return weights, path, X, Y[:, ::-1]


@pytest.mark.parametrize("case", ["csv_target_first", "parquet_targets_in_the_middle"])
def test_evaluate_splits_data_by_the_stored_data_target(case, request):
    weights, path, X, y = request.getfixturevalue(case)
    proc = polyak("evaluate", weights, path, "--json")
    assert proc.returncode == 0, proc.stderr
    reference = Model.load(weights).evaluate(X, y)  # the arrays split correctly, by hand
    score = json.loads(proc.stdout)
    assert score["n"] == reference["n"] == len(X)
    assert score["loss"] == pytest.approx(reference["loss"], rel=1e-12)
    assert score["accuracy"] == reference["accuracy"]
    assert (score["accuracy"] is None) == (case == "parquet_targets_in_the_middle")


def test_predict_on_a_features_only_file_of_each_type(parquet_targets_in_the_middle, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    weights, _, X, _ = parquet_targets_in_the_middle
    expected = Model.load(weights).predict(X)
    np.savetxt(tmp_path / "X.csv", X, delimiter=",", header="x0,x1,x2,x3,x4", comments="")
    pq.write_table(pa.table({f"x{j}": X[:, j] for j in range(5)}), tmp_path / "X.parquet", row_group_size=40)
    np.savez(tmp_path / "X.npz", X=X)
    for name in ("X.csv", "X.parquet", "X.npz"):
        proc = polyak("predict", weights, tmp_path / name, "-o", tmp_path / f"{name}.npy")
        assert proc.returncode == 0, (name, proc.stderr)
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), expected)


def test_an_output_it_cannot_write_and_a_missing_data_file_exit_2(trained, tmp_path):
    weights, _, X, _ = trained
    np.save(tmp_path / "X.npy", X)
    cases = [
        (("predict", weights, tmp_path / "X.npy", "-o", tmp_path / "p.txt"), ["p.txt", ".npy or .csv"]),
        (("predict", weights, tmp_path / "nope.npy"), [str(tmp_path / "nope.npy"), "no such file"]),
        (("evaluate", weights, tmp_path / "nope.csv"), [str(tmp_path / "nope.csv"), "no such file"]),
    ]
    for args, words in cases:
        proc = polyak(*args)
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), (args, proc.stderr)
        assert all(w in errors[0] for w in words), (args, errors[0])
    assert not (tmp_path / "p.txt").exists()
