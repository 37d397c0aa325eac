"""PolyakClassifier / PolyakRegressor: scikit-learn's own estimator checks, the tools scikit-learn users combine
them with, and the claim that fit runs the trainer the CLI runs (weights equal to `polyak train`'s)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_iris, make_regression
from sklearn.impute import SimpleImputer
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from polyak import Model, PolyakClassifier, PolyakRegressor
from polyak.estimators import TrainingFailed


@parametrize_with_checks([PolyakClassifier(), PolyakRegressor()])
def test_scikit_learns_estimator_checks(estimator, check):
    check(estimator)


def iris(labels=("setosa", "versicolor", "virginica")):
    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X), np.array(labels)[y]


def test_fit_keeps_labels_features_and_the_figures_of_every_epoch():
    X, y = iris()
    clf = PolyakClassifier(hidden_layer_sizes=(16,), max_iter=60, random_state=3, lr=0.01).fit(X, y)
    assert clf.classes_.tolist() == ["setosa", "versicolor", "virginica"]
    assert clf.n_features_in_ == 4 and clf.score(X, y) > 0.9
    assert set(clf.predict(X)) <= set(clf.classes_)
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    assert (clf.classes_[proba.argmax(axis=1)] == clf.predict(X)).all()
    assert clf.n_iter_ == len(clf.loss_curve_) and clf.loss_curve_[-1] < clf.loss_curve_[0]
    assert clf.best_loss_ == min(clf.loss_curve_) and clf.validation_scores_ is None
    assert isinstance(clf.model_, Model) and clf.model_.layers == (4, 16, 3)
    # The reported training loss is the model's own mean cross-entropy over the data (an independent evaluation,
    # up to the last epoch's steps: the figure is the epoch's mean over its batches).
    assert clf.model_.evaluate(X, np.searchsorted(clf.classes_, y))["loss"] == pytest.approx(
        clf.loss_curve_[-1], rel=0.2)


def test_early_stopping_holds_out_rows_and_stops_on_their_loss():
    X, y = iris()
    clf = PolyakClassifier(hidden_layer_sizes=(16,), max_iter=500, early_stopping=True, validation_fraction=0.2,
                           n_iter_no_change=5, tol=1e-3, lr=0.05, random_state=0).fit(X, y)
    assert clf.stop_reason_ == "early_stopping" and clf.n_iter_ < 500
    assert len(clf.validation_scores_) == clf.n_iter_ and max(clf.validation_scores_) > 0.85
    assert clf.best_loss_ is None
    assert {c["name"] for c in clf.criteria_} >= {"early_stopping", "max_epochs"}


def test_without_early_stopping_a_training_loss_plateau_stops_it():
    X, y = iris()
    clf = PolyakClassifier(hidden_layer_sizes=(8,), max_iter=10_000, n_iter_no_change=4, tol=0.05, lr=0.05,
                           random_state=0).fit(X, y)
    assert clf.stop_reason_ == "n_iter_no_change" and clf.n_iter_ < 10_000
    # scikit-learn's rule, replayed on the curve: an epoch counts when its loss is not below the best so far
    # by tol; the fit stopped at the first epoch where 4 counted in a row.
    best, count, stopped_at = np.inf, 0, None
    for epoch, loss in enumerate(clf.loss_curve_, start=1):
        count = count + 1 if loss > best - 0.05 else 0
        best = min(best, loss)
        if count == 4:
            stopped_at = epoch
            break
    assert stopped_at == clf.n_iter_


def test_fit_runs_the_trainer_the_cli_runs(tmp_path):
    """The estimator's spec, written as a file and trained by `polyak train`, gives the same weights."""
    X, y = iris()
    clf = PolyakClassifier(hidden_layer_sizes=(10,), max_iter=15, random_state=7, lr=0.02, method="heavy_ball",
                           alpha=0.2, batch_size=32).fit(X, y)
    data = tmp_path / "iris.npy"
    np.save(data, np.column_stack([X, np.searchsorted(clf.classes_, y)]))
    spec = clf.job_spec(len(X), 4, 3, {"source": "file", "path": str(data)})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    done = subprocess.run([sys.executable, "-m", "polyak", "train", str(tmp_path / "spec.yaml"), "-o",
                           str(tmp_path / "w.npz"), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cli = Model.load(tmp_path / "w.npz")
    for name, array in clf.model_.weights.items():
        np.testing.assert_array_equal(cli.weights[name], array)
    epochs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [e["train_loss"] for e in epochs] == clf.loss_curve_


@pytest.mark.usefixtures("ray_session")
def test_fit_on_ray_workers_equals_fit_in_this_process():
    X, y = iris()
    params = dict(hidden_layer_sizes=(12,), max_iter=8, random_state=1, lr=0.05, batch_size=30)
    local = PolyakClassifier(**params).fit(X, y)
    on_ray = PolyakClassifier(**params, num_workers=2).fit(X, y)
    for name, array in local.model_.weights.items():
        np.testing.assert_allclose(on_ray.model_.weights[name], array, rtol=0, atol=1e-10)
    np.testing.assert_allclose(on_ray.loss_curve_, local.loss_curve_, rtol=1e-10)


def test_fit_through_a_polyak_server_uploads_the_arrays_and_equals_fit_here(tmp_path):
    from test_service import Server

    X, y = iris()
    params = dict(hidden_layer_sizes=(10,), max_iter=12, random_state=5, lr=0.02, batch_size=25,
                  n_iter_no_change=100)
    here = PolyakClassifier(**params).fit(X, y)
    server = Server(tmp_path / "data", "--token", "s" * 32).start()
    try:
        there = PolyakClassifier(**params, server=server.url, token="s" * 32).fit(X, y)
        assert there.job_id_ and len(server.client("s" * 32).datasets()) == 1
    finally:
        server.stop_or_kill()
    for name, array in here.model_.weights.items():
        np.testing.assert_array_equal(there.model_.weights[name], array)
    assert there.loss_curve_ == here.loss_curve_ and there.n_iter_ == 12 and there.stop_reason_ == "max_epochs"
    np.testing.assert_array_equal(there.predict(X), here.predict(X))
    with pytest.raises(ValueError, match="warm_start and partial_fit .* not through a server"):
        there.partial_fit(X, y)


def table():
    """A DataFrame as real tabular data comes: numbers, a category, a string column and missing cells."""
    rng = np.random.default_rng(0)
    n = 400
    size = rng.normal(0, 1, n)
    colour = rng.choice(["red", "green", "blue"], n)
    shape = pd.Categorical(rng.choice(["round", "square"], n))
    logit = 2 * size + (colour == "red") * 2.5 - (shape == "square") * 1.5
    y = np.where(logit + rng.normal(0, 0.5, n) > 0.5, "yes", "no")
    X = pd.DataFrame({"size": size, "weight": rng.normal(5, 2, n), "colour": colour, "shape": shape})
    X.loc[rng.choice(n, 40, replace=False), "weight"] = np.nan
    return X, y


def tabular_pipeline(classifier):
    numeric = make_pipeline(SimpleImputer(), StandardScaler())
    columns = ColumnTransformer([("num", numeric, ["size", "weight"]),
                                 ("cat", OneHotEncoder(handle_unknown="ignore"), ["colour", "shape"])])
    return Pipeline([("columns", columns), ("mlp", classifier)])


def test_a_pipeline_on_a_dataframe_with_categories_and_missing_cells():
    X, y = table()
    ours = tabular_pipeline(PolyakClassifier(hidden_layer_sizes=(16,), max_iter=100, lr=0.01, random_state=0))
    theirs = tabular_pipeline(MLPClassifier(hidden_layer_sizes=(16,), max_iter=100, random_state=0))
    ours_score = cross_val_score(ours, X, y, cv=3).mean()
    theirs_score = cross_val_score(theirs, X, y, cv=3).mean()
    assert ours_score > 0.85 and ours_score >= theirs_score - 0.03, (ours_score, theirs_score)
    fitted = ours.fit(X, y)
    assert fitted.named_steps["mlp"].n_features_in_ == 2 + 3 + 2


def test_feature_names_from_a_dataframe_are_kept_and_checked():
    X, y = iris()
    frame = pd.DataFrame(X, columns=["sl", "sw", "pl", "pw"])
    clf = PolyakClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=0).fit(frame, pd.Series(y))
    assert clf.feature_names_in_.tolist() == ["sl", "sw", "pl", "pw"]
    with pytest.raises(ValueError, match="feature names"):
        clf.predict(frame[["pw", "pl", "sw", "sl"]])


def test_grid_search_and_clone():
    X, y = iris()
    base = PolyakClassifier(hidden_layer_sizes=(8,), max_iter=30, random_state=0)
    search = GridSearchCV(base, {"lr": [1e-4, 0.05], "hidden_layer_sizes": [(4,), (16,)]}, cv=3).fit(X, y)
    assert search.best_params_["lr"] == 0.05  # 30 epochs at 1e-4 barely move the weights
    assert search.best_score_ > 0.85
    twin = clone(base)
    assert twin.get_params() == base.get_params() and not hasattr(twin, "model_")


def test_pickled_estimators_predict_the_same():
    X, y = iris()
    clf = PolyakClassifier(hidden_layer_sizes=(8,), max_iter=20, random_state=0).fit(X, y)
    back = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(back.predict(X), clf.predict(X))
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))
    Xr, yr = make_regression(120, 5, noise=0.1, random_state=0)
    reg = PolyakRegressor(hidden_layer_sizes=(8,), max_iter=20, random_state=0).fit(Xr, yr / yr.std())
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(reg)).predict(Xr), reg.predict(Xr))


def test_warm_start_continues_from_the_fitted_weights():
    X, y = iris()
    clf = PolyakClassifier(hidden_layer_sizes=(8,), max_iter=10, random_state=0, warm_start=True, lr=0.01)
    clf.fit(X, y)
    first = clf.loss_curve_[:]
    clf.fit(X, y)
    assert clf.n_iter_ == 20 and clf.loss_curve_[:10] == first
    assert clf.loss_curve_[10] < first[0]  # it started where the first fit ended, not from a new init
    cold = PolyakClassifier(hidden_layer_sizes=(8,), max_iter=10, random_state=0, lr=0.01).fit(X, y)
    assert cold.loss_curve_ == first


def test_partial_fit_learns_from_a_stream_of_batches():
    X, y = iris()
    order = np.random.default_rng(0).permutation(len(X))
    clf = PolyakClassifier(hidden_layer_sizes=(16,), lr=0.01, batch_size=10, random_state=0)
    with pytest.raises(ValueError, match="first partial_fit needs classes="):
        clf.partial_fit(X[:10], y[:10])
    losses = []
    for _ in range(15):
        for batch in np.array_split(order, 5):
            clf.partial_fit(X[batch], y[batch], classes=np.unique(y))
        losses.append(clf.model_.evaluate(X, np.searchsorted(clf.classes_, y))["loss"])
    assert clf.n_iter_ == 75 and len(clf.loss_curve_) == 75
    assert losses[-1] < 0.5 * losses[0] and clf.score(X, y) > 0.85
    with pytest.raises(ValueError, match=r"labels \['other'\] that are not in classes"):
        clf.partial_fit(X[:2], np.array(["setosa", "other"]))


def test_regressor_fits_several_targets_and_scores_like_scikit_learn():
    X, Y = make_regression(300, 6, n_targets=2, noise=0.1, random_state=0)
    Y = Y / Y.std(axis=0)
    reg = PolyakRegressor(hidden_layer_sizes=(32,), max_iter=200, lr=0.01, random_state=0).fit(X, Y)
    assert reg.predict(X).shape == (300, 2)
    assert reg.score(X, Y) > 0.95
    residual = ((reg.predict(X) - Y) ** 2).sum() / ((Y - Y.mean(axis=0)) ** 2).sum()
    assert reg.score(X, Y) == pytest.approx(1 - residual, rel=1e-6)


def test_onnx_export_of_a_fitted_estimator(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency")
    X, y = iris()
    clf = PolyakClassifier(hidden_layer_sizes=(8,), max_iter=10, random_state=0).fit(X, y)
    path = clf.to_onnx(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path))
    (logits, proba) = session.run(["logits", "probabilities"], {"input": X.astype(np.float32)})
    np.testing.assert_allclose(proba, clf.predict_proba(X), atol=1e-5)


def test_a_diverged_fit_raises_with_the_jobs_message():
    X, y = iris()
    with pytest.raises(TrainingFailed, match="epoch"):
        PolyakClassifier(hidden_layer_sizes=(8,), method="sgd", lr=1e6, max_iter=50, n_iter_no_change=100,
                         random_state=0).fit(X * 1e3, y)


def test_bad_parameters_name_the_field():
    X, y = iris()
    with pytest.raises(ValueError, match="activation must be one of relu, tanh, logistic, sigmoid"):
        PolyakClassifier(activation="identity").fit(X, y)
    with pytest.raises(Exception, match=r"optimizer\.lr"):
        PolyakClassifier(lr=-1).fit(X, y)


def test_cross_validated_accuracy_is_scikit_learns():
    """The accuracy goal on breast_cancer: 5-fold accuracy within 0.01 of MLPClassifier on the same pipeline
    (bench/bench_estimator.py measures digits too, and the time)."""
    X, y = load_breast_cancer(return_X_y=True)
    ours = make_pipeline(StandardScaler(), PolyakClassifier(hidden_layer_sizes=(64,), max_iter=60, random_state=0))
    theirs = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), max_iter=60, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLPClassifier's ConvergenceWarning at 60 epochs
        theirs_score = cross_val_score(theirs, X, y, cv=5).mean()
    ours_score = cross_val_score(ours, X, y, cv=5).mean()
    assert ours_score >= theirs_score - 0.01, (ours_score, theirs_score)
