"""Experiment tracking read back with the tools' own readers — TensorBoard's event accumulator, MLflow's client —
and compared with the job's own metrics and weights."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_iris
from sklearn.preprocessing import StandardScaler

from polyak import Model, PolyakClassifier
from polyak.contract.spec import parse_spec
from polyak.service.engine.trainer import Hooks, train_job


def digits_spec(tmp_path, **tracking):
    return parse_spec({"name": "tracked", "model": {"layers": [64, 16, 10]}, "cluster": {"num_workers": 0},
                       "data": {"validation_fraction": 0.2, "standardize": True},
                       "stopping": {"max_epochs": 4, "patience": 10}, "tracking": tracking})


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_epochs_figures_and_the_final_model(tmp_path):
    spec = digits_spec(tmp_path, tensorboard=str(tmp_path / "tb"))
    epochs = []
    result = train_job(spec, "job-1", Hooks(on_epoch=epochs.append))
    logged = scalars(tmp_path / "tb" / "job-1")
    for name in ("train_loss", "val_loss", "val_accuracy", "lr", "weight_change"):
        want = [(m.epoch, getattr(m, name)) for m in epochs]
        assert [step for step, _ in logged[name]] == [step for step, _ in want]
        np.testing.assert_allclose([v for _, v in logged[name]], [v for _, v in want], rtol=1e-6)  # float32
    patience = [(m.epoch, next(c.value for c in m.criteria if c.name == "early_stopping")) for m in epochs]
    np.testing.assert_allclose([v for _, v in logged["criteria/early_stopping"]], [v for _, v in patience])
    assert {v for _, v in logged["criteria/max_epochs_threshold"]} == {4.0}
    model = Model.load(tmp_path / "tb" / "job-1" / "weights.npz")
    final = {k: v for k, v in result_weights(result, spec).items() if k.startswith(("W", "b"))}
    for name, array in final.items():
        np.testing.assert_array_equal(model.weights[name], array)
    assert_onnx_is_the_model(tmp_path / "tb" / "job-1" / "model.onnx", model)


def result_weights(result, spec):
    from polyak.service.engine.trainer import weights_file
    from polyak.workers.data import prepare

    return weights_file(result.weights, spec, prepare(spec.data, spec.model))


def assert_onnx_is_the_model(path, model):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency")
    X = load_iris_like(model.n_features)
    (proba,) = ort.InferenceSession(str(path)).run(["probabilities"], {"input": X.astype(np.float32)})
    np.testing.assert_allclose(proba, model.predict_proba(X), atol=1e-5)


def load_iris_like(d: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 16, (50, d))


def test_mlflow_run_holds_params_metrics_artifacts_and_status(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    spec = digits_spec(tmp_path, mlflow=uri, experiment="digits")
    epochs = []
    train_job(spec, "job-2", Hooks(on_epoch=epochs.append))
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.run_name == "job-2" and run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == str(spec.optimizer.lr)
    assert run.data.params["model.layers"] == "[64, 16, 10]" and run.data.params["name"] == "tracked"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [(h.step, h.value) for h in history] == [(m.epoch, m.val_loss) for m in epochs]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["model.onnx", "weights.npz"]
    local = client.download_artifacts(run.info.run_id, "weights.npz", str(tmp_path))
    assert Model.load(local).layers == (64, 16, 10)


def test_a_spec_file_tracks_beside_itself_and_the_estimator_tracks_too(tmp_path):
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "s.yaml").write_text(yaml.safe_dump({"tracking": {"tensorboard": "runs"}}))
    assert parse_spec(folder / "s.yaml").tracking.tensorboard == os.path.join(folder, "runs")
    X, y = load_iris(return_X_y=True)
    clf = PolyakClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0,
                           tracking={"tensorboard": str(tmp_path / "tb")}).fit(StandardScaler().fit_transform(X), y)
    (run,) = (tmp_path / "tb").iterdir()
    np.testing.assert_allclose([v for _, v in scalars(run)["train_loss"]], clf.loss_curve_, rtol=1e-6)


def test_a_missing_tracking_package_is_one_line_before_training(tmp_path, monkeypatch):
    import sys

    from polyak.contract.errors import BadInput

    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(BadInput, match=r"tracking.tensorboard needs tensorboardX: pip install 'polyak\[tracking\]'"):
        train_job(digits_spec(tmp_path, tensorboard=str(tmp_path / "tb")), "job-3")
