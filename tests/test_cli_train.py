"""`polyak train` as a user runs it: a real process, its exit status, its output and its weights file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import yaml

from client.models import EpochMetrics
from client.spec import JobSpec, parse_spec

IRIS = {
    "model": {"layers": [4, 8, 3], "activation": "tanh", "seed": 1},
    "data": {"source": "sklearn", "name": "iris", "standardize": True, "validation_fraction": 0.2},
    "optimizer": {"method": "heavy_ball", "lr": 0.5, "alpha": 0.5},
    "batch": {"size": 16},
    "stopping": {"max_epochs": 4},
    "cluster": {"num_workers": 0, "device": "cpu"},
}


def write_spec(tmp_path, spec, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def polyak(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "service", "train", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def with_(section, **values):
    return {**IRIS, section: {**IRIS[section], **values}}


def test_train_writes_weights_and_streams_json_metrics(tmp_path):
    out = tmp_path / "w.npz"
    proc = polyak(write_spec(tmp_path, IRIS), "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [EpochMetrics.model_validate_json(line) for line in proc.stdout.splitlines()]
    assert [m.epoch for m in lines] == [1, 2, 3, 4]
    assert lines[-1].stop == "max_epochs" and lines[-1].val_accuracy is not None
    with np.load(out, allow_pickle=False) as w:
        shapes = {k: w[k].shape for k in w.files}
        spec = JobSpec.model_validate_json(str(w["spec"]))
    # The file is a model of raw inputs: layers, the spec it was trained with and (standardize: true) the
    # training rows' statistics.
    assert shapes == {"W1": (8, 4), "b1": (8,), "W2": (3, 8), "b2": (3,), "x_mean": (4,), "x_std": (4,), "spec": ()}
    assert spec == parse_spec(write_spec(tmp_path, IRIS)) and spec.data.standardize
    assert json.loads(proc.stderr.strip().splitlines()[-1])["state"] == "succeeded"


def test_train_on_a_local_ray_with_two_workers(tmp_path):
    spec = with_("cluster", num_workers=2, mode="sync")
    proc = polyak(write_spec(tmp_path, spec), "-o", tmp_path / "w.npz", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 4
    reference = polyak(write_spec(tmp_path, IRIS, "local.yaml"), "-o", tmp_path / "ref.npz")
    assert reference.returncode == 0
    with np.load(tmp_path / "w.npz") as a, np.load(tmp_path / "ref.npz") as b:
        assert str(a["spec"]) != str(b["spec"])  # num_workers differs
        for k in ("W1", "b1", "W2", "b2", "x_mean", "x_std"):  # float32, summed by two workers: up to rounding
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)


def one_line_error(proc) -> str:
    assert proc.returncode not in (0, None)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_a_bad_spec_is_one_line_naming_the_field(tmp_path):
    line = one_line_error(polyak(write_spec(tmp_path, with_("stopping", max_epochs=-1))))
    assert "stopping.max_epochs" in line and ">= 0" in line
    line = one_line_error(polyak(write_spec(tmp_path, with_("optimizer", momentum=0.9))))
    assert "optimizer.momentum" in line and "unknown key" in line


def test_bad_data_is_one_line_naming_the_file_and_the_problem(tmp_path):
    data = tmp_path / "data.npz"
    X = np.ones((10, 4))
    X[3, 2] = np.nan
    np.savez(data, X=X, y=np.zeros(10))
    spec = {**IRIS, "data": {"source": "file", "path": str(data)}}
    line = one_line_error(polyak(write_spec(tmp_path, spec)))
    assert str(data) in line and "NaN" in line
    spec["model"] = {**IRIS["model"], "layers": [5, 8, 3]}
    np.savez(data, X=np.ones((10, 4)), y=np.zeros(10))
    line = one_line_error(polyak(write_spec(tmp_path, spec)))
    assert "layers[0] = 5" in line and "4 features" in line


def test_divergence_is_a_failure_naming_epoch_and_step(tmp_path):
    spec = {**IRIS, "model": {"layers": [10, 1], "loss": "mse"}, "data": {"source": "sklearn", "name": "diabetes"},
            "optimizer": {"method": "sgd", "lr": 10.0}}
    out = tmp_path / "w.npz"
    line = one_line_error(polyak(write_spec(tmp_path, spec), "-o", out))
    assert "diverged at epoch 1, step" in line
    assert out.exists()  # the last finite weights are still written


def test_ctrl_c_cancels_and_still_writes_the_last_weights(tmp_path):
    spec = with_("stopping", max_epochs=100000)
    out = tmp_path / "w.npz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "train", str(write_spec(tmp_path, spec)), "-o", str(out), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    first = proc.stdout.readline()  # training is under way
    assert EpochMetrics.model_validate_json(first).epoch == 1
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    last = EpochMetrics.model_validate_json(stdout.splitlines()[-1])
    assert last.stop in (None, "cancelled")  # None: the cancel fell on an epoch boundary, no partial epoch
    assert json.loads(stderr.strip().splitlines()[-1])["state"] == "cancelled"
    assert "Traceback" not in stderr and "cancelling at the next step" in stderr
    with np.load(out) as w:
        assert set(w.files) == {"W1", "b1", "W2", "b2", "x_mean", "x_std", "spec"}
