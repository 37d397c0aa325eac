"""scikit-learn estimators whose ``fit`` is a polyak job: ``PolyakClassifier`` and ``PolyakRegressor``.

``fit(X, y)`` builds the JobSpec the CLI would build for the same data and runs the same trainer: in this process
(``num_workers=0``) or on Ray (``num_workers=K``; a local Ray unless ``ray_address`` names a cluster), or as a job
of a polyak server (``server=URL``). In this process the trainer reads the arrays themselves (an in-memory
source: no table is built or written). Ray's workers get them as a ``.npy`` file in a temporary folder
(features, then the target column(s)), which every worker reads its own shard of, exactly as for a user's file;
a server, as an uploaded dataset. That folder is RAM-backed (/dev/shm) where the machine has one; on a Ray
cluster whose workers run on other nodes, ``scratch_dir`` must name a folder every node reads (shared storage),
or fit through a server.

Parameters follow scikit-learn's ``MLPClassifier`` where it has a name for the same thing (``hidden_layer_sizes``,
``activation``, ``batch_size``, ``max_iter``, ``tol``, ``early_stopping``, ``validation_fraction``,
``n_iter_no_change``, ``random_state``, ``warm_start``) and polyak's spec for the rest: ``method``, ``lr``,
``alpha`` (NOTE: heavy ball's alpha of MATH.md eq. (27), not scikit-learn's L2 penalty, which is
``weight_decay`` here), ``schedule``, ``batch_growth``, the lecture's two stopping rules (``weight_change_tol``,
``grad_tol``), ``num_workers``, ``mode``, ``device``, ``dtype``, ``ray_address``, ``tracking`` (the spec's
section: TensorBoard and/or MLflow), and ``server`` (a polyak
server's URL) with ``token``: the arrays are uploaded (``Client.upload``) and fit is a queued job there.

Stopping as in scikit-learn: with ``early_stopping``, ``validation_fraction`` of the rows are held out and training
stops after ``n_iter_no_change`` epochs without a validation-loss drop of ``tol`` (polyak's ``patience`` and
``min_delta``); without it, after ``n_iter_no_change`` epochs without a training-loss drop of ``tol``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from polyak.client.model import Model
from polyak.client.sdk import upload_table
from polyak.contract.errors import PolyakError
from polyak.contract.spec import JobSpec, parse_spec
from polyak.contract.wire import EpochMetrics, JobState

# Input dtypes kept as they come (a float32 X is not copied to float64); anything else becomes float64.
FLOATS = (np.float64, np.float32)
# scikit-learn's activation names, and polyak's own, to polyak's.
ACTIVATION_NAMES = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "sigmoid": "sigmoid"}


class TrainingFailed(PolyakError):
    """The job behind ``fit`` failed (diverged, or its data could not be used); the message is the job's."""


class _PolyakMLP(BaseEstimator):
    """What both estimators share: parameters, the job spec they make, and running it."""

    _loss = "cross_entropy"

    def __init__(
        self,
        hidden_layer_sizes=(100,),
        activation="relu",
        *,
        batch_size="auto",
        max_iter=200,
        tol=1e-4,
        early_stopping=False,
        validation_fraction=0.1,
        n_iter_no_change=10,
        random_state=None,
        warm_start=False,
        method="adam",
        lr=0.001,
        alpha=0.1,
        schedule="constant",
        weight_decay=0.0,
        batch_growth=1.0,
        weight_change_tol=None,
        grad_tol=None,
        standardize=False,
        num_workers=0,
        mode="sync",
        device="cpu",
        dtype="float64",
        ray_address=None,
        server=None,
        token=None,
        tracking=None,
        scratch_dir=None,
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.warm_start = warm_start
        self.method = method
        self.lr = lr
        self.alpha = alpha
        self.schedule = schedule
        self.weight_decay = weight_decay
        self.batch_growth = batch_growth
        self.weight_change_tol = weight_change_tol
        self.grad_tol = grad_tol
        self.standardize = standardize
        self.num_workers = num_workers
        self.mode = mode
        self.device = device
        self.dtype = dtype
        self.ray_address = ray_address
        self.server = server
        self.token = token
        self.tracking = tracking
        self.scratch_dir = scratch_dir

    # -- the job ------------------------------------------------------------------------------------------------
    def job_spec(self, n_rows: int, n_features: int, n_outputs: int, source: dict[str, str], *,
                 epochs: int | None = None, init_weights: str | None = None) -> JobSpec:
        """The spec ``fit`` runs for data of this shape in ``source`` (``{"source": "file", "path": ...}``, or an
        uploaded dataset); SpecError names a bad parameter by its spec field."""
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATION_NAMES)}, got {self.activation!r}")
        hidden = [self.hidden_layer_sizes] if np.isscalar(self.hidden_layer_sizes) else self.hidden_layer_sizes
        batch = min(200, n_rows) if self.batch_size == "auto" else self.batch_size
        held_out = self.early_stopping and epochs is None
        return parse_spec({
            "model": {"layers": [n_features, *map(int, hidden), n_outputs], "loss": self._loss,
                      "activation": ACTIVATION_NAMES[self.activation], "seed": self._seed()},
            "data": {**source, "standardize": self.standardize,
                     "validation_fraction": self.validation_fraction if held_out else 0.0},
            "optimizer": {"method": self.method, "lr": self.lr, "alpha": self.alpha, "schedule": self.schedule,
                          "weight_decay": self.weight_decay},
            "batch": {"size": batch, "growth": self.batch_growth},
            "stopping": {"max_epochs": self.max_iter if epochs is None else epochs,
                         "patience": self.n_iter_no_change if held_out else None,
                         "min_delta": self.tol if held_out else 0.0,
                         "weight_change_tol": self.weight_change_tol, "grad_tol": self.grad_tol},
            "cluster": {"num_workers": self.num_workers, "mode": self.mode, "device": self.device,
                        "dtype": self.dtype},
            "init_weights": init_weights,
            "tracking": self.tracking or {},
        })

    def _seed(self) -> int:
        if isinstance(self.random_state, (int, np.integer)) and self.random_state >= 0:
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(0, 2**31 - 1))

    def _train(self, X: np.ndarray, targets: np.ndarray, n_outputs: int, epochs: int | None = None) -> None:
        """Run the job on (X, targets) and keep its model and figures; ``epochs``: a fixed number (partial_fit)."""
        continuing = (self.warm_start or epochs is not None) and hasattr(self, "model_")
        if self.server is not None:
            if continuing:
                raise ValueError("warm_start and partial_fit continue from weights in this process: they run here "
                                 "or on Ray (ray_address), not through a server")
            self._train_on_server(X, targets, n_outputs)
            return
        from polyak.service.engine.trainer import Hooks, train_job, weights_file
        from polyak.workers.data import prepare
        from polyak.workers.readers.source import array_source

        with tempfile.TemporaryDirectory(prefix="polyak-fit-", dir=self.scratch_dir or _memory_folder()) as folder:
            data = Path(folder, "data.npy")
            # In this process the trainer reads the arrays themselves (a table written and read back cost more than a
            # fit's epoch); Ray's workers read their shards of the table, a file like any user's.
            source = None if self.num_workers else array_source(X, targets, self._loss == "cross_entropy", "fit's X, y")
            if source is None:
                np.save(data, upload_table(X, targets, self.dtype))
            start = None
            if continuing:
                start = str(Path(folder, "start.npz"))
                np.savez(start, **self.model_.weights)
            spec = self.job_spec(X.shape[0], X.shape[1], n_outputs, {"source": "file", "path": str(data)},
                                 epochs=epochs, init_weights=start)
            info = prepare(spec.data, spec.model, source)
            plateau = self._plateau(spec, epochs)
            hooks = Hooks(on_epoch=plateau.see if plateau else lambda m: None,
                          should_cancel=plateau.reached if plateau else lambda: False)
            # A diverging run overflows NumPy on its way to a non-finite loss, which the trainer reports as the
            # job's error (raised below): NumPy's own warnings would only say it again.
            with self._ray(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                result = train_job(spec, "estimator", hooks, info, source)
        if result.state == JobState.FAILED:
            raise TrainingFailed(result.error or "training failed")
        self.model_ = Model.from_arrays(weights_file(result.weights, spec, info))
        self._record(result.metrics, "n_iter_no_change" if plateau and plateau.reached() else result.stop_reason.value,
                     continuing)

    def _plateau(self, spec: JobSpec, epochs: int | None) -> _Plateau | None:
        """scikit-learn's stopping rule without early_stopping (polyak's spec has patience only on validation)."""
        return _Plateau(self.tol, self.n_iter_no_change) if not spec.stopping.patience and epochs is None else None

    def _train_on_server(self, X: np.ndarray, targets: np.ndarray, n_outputs: int) -> None:
        """The job queued on a polyak server: the arrays uploaded as a dataset, the epochs followed live (the
        plateau rule cancels the job; it stops within a step or two, not exactly at the epoch's end as here)."""
        from polyak.client.sdk import Client

        with Client(self.server, token=self.token) as client:
            dataset = client.upload(X, targets)
            spec = self.job_spec(X.shape[0], X.shape[1], n_outputs, {"source": "dataset", "name": dataset.id})
            job = client.submit(spec)
            plateau = self._plateau(spec, None)
            for m in job.stream():
                if plateau:
                    plateau.see(m)
                    if plateau.reached():
                        job.cancel()
            info = job.wait()
            if info.state == JobState.FAILED:
                raise TrainingFailed(info.error or "training failed")
            self.model_ = Model.from_arrays(job.weights("last"))
            stop = "n_iter_no_change" if plateau and plateau.reached() else (info.stop_reason or info.state).value
            self._record(job.metrics(), stop, continuing=False)
            self.job_id_ = job.id

    def _ray(self):
        """Ray for the job's workers, joined or started for this fit (and shut down after, if started here)."""
        import contextlib

        if not self.num_workers:
            return contextlib.nullcontext()
        from polyak.service.engine.placement import connect

        stack = contextlib.ExitStack()
        if connect(self.ray_address):
            import ray

            stack.callback(ray.shutdown)
        return stack

    def _record(self, metrics: list[EpochMetrics], stop_reason: str, continuing: bool) -> None:
        """scikit-learn's fitted figures, from the job's epochs (appended to when training continues)."""
        if not continuing or not hasattr(self, "loss_curve_"):
            self.loss_curve_, self.n_iter_ = [], 0
            self.validation_scores_ = [] if self.early_stopping else None
        self.loss_curve_ += [m.train_loss for m in metrics]
        if self.validation_scores_ is not None:
            self.validation_scores_ += [self._validation_score(m) for m in metrics]
        self.n_iter_ += len(metrics)
        self.best_loss_ = None if self.early_stopping else min(self.loss_curve_, default=None)
        self.stop_reason_ = stop_reason
        self.criteria_ = [c.model_dump() for c in metrics[-1].criteria] if metrics else []

    def _validation_score(self, m: EpochMetrics) -> float | None:
        return m.val_accuracy

    def to_onnx(self, path, opset: int = 17) -> str:
        """The fitted network as one ONNX graph (``Model.to_onnx``): raw features in, logits/values out."""
        check_is_fitted(self, "model_")
        return self.model_.to_onnx(path, opset)

    def _features(self, X, reset: bool) -> np.ndarray:
        return validate_data(self, X, reset=reset, dtype=FLOATS, ensure_all_finite=True)


def _memory_folder() -> str | None:
    """Where the table for the trainer goes by default: a RAM-backed folder when the machine has one."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class _Plateau:
    """scikit-learn's stopping rule without early_stopping: the training loss has not dropped by ``tol`` for
    ``patience`` epochs in a row."""

    def __init__(self, tol: float, patience: int):
        self.tol, self.patience = tol, patience
        self.best, self.stale = np.inf, 0

    def see(self, m: EpochMetrics) -> None:
        if m.train_loss is not None and m.train_loss < self.best - self.tol:
            self.stale = 0
        else:
            self.stale += 1
        if m.train_loss is not None:
            self.best = min(self.best, m.train_loss)

    def reached(self) -> bool:
        return self.stale >= self.patience


class PolyakClassifier(ClassifierMixin, _PolyakMLP):
    """A multi-layer perceptron classifier trained by polyak (softmax outputs, cross-entropy loss).

    Fitted attributes: ``classes_``, ``n_features_in_`` (and ``feature_names_in_`` for a DataFrame), ``model_``
    (the trained ``polyak.Model``), ``n_iter_``, ``loss_curve_`` (training loss per epoch), ``validation_scores_``
    (validation accuracy per epoch, with early_stopping), ``best_loss_``, ``stop_reason_``, ``criteria_`` (the
    last epoch's stopping criteria).
    """

    _loss = "cross_entropy"

    def fit(self, X, y):
        """Train on (X, y) from scratch, or from the current weights with ``warm_start``."""
        X, y = validate_data(self, X, y, reset=True, dtype=FLOATS, ensure_min_samples=2)
        check_classification_targets(y)
        classes = np.unique(y)
        if self.warm_start and hasattr(self, "classes_") and not np.array_equal(classes, self.classes_):
            raise ValueError(f"warm_start needs the classes of the first fit {self.classes_.tolist()}, "
                             f"got {classes.tolist()}")
        self.classes_ = classes
        self._train(X, np.searchsorted(self.classes_, y), max(2, len(self.classes_)))
        return self

    def partial_fit(self, X, y, classes=None):
        """One epoch over this batch, from the current weights (the lecture's online learning: a batch arrives, is
        used and is discarded). The first call needs ``classes``: every label the stream will hold."""
        first = not hasattr(self, "model_")
        if first and classes is None:
            raise ValueError("the first partial_fit needs classes=: every class label the data will hold")
        X, y = validate_data(self, X, y, reset=first, dtype=FLOATS)
        check_classification_targets(y)
        if first:
            self.classes_ = np.unique(classes)
        unknown = np.setdiff1d(y, self.classes_)
        if unknown.size:
            raise ValueError(f"y holds labels {unknown.tolist()} that are not in classes {self.classes_.tolist()}")
        self._train(X, np.searchsorted(self.classes_, y), max(2, len(self.classes_)), epochs=1)
        return self

    def decision_function(self, X) -> np.ndarray:
        """The network's logits (n, n_classes); for two classes the margin of the second over the first (n,)."""
        check_is_fitted(self, "model_")
        logits = self.model_.decision_function(self._features(X, reset=False))
        if len(self.classes_) == 2:
            return logits[:, 1] - logits[:, 0]
        return logits[:, : len(self.classes_)]

    def predict_proba(self, X) -> np.ndarray:
        """Softmax probabilities (n, n_classes), columns in the order of ``classes_``."""
        check_is_fitted(self, "model_")
        proba = self.model_.predict_proba(self._features(X, reset=False))
        if len(self.classes_) == 1:  # trained on one class with two outputs: it is certain
            return np.ones((proba.shape[0], 1))
        return proba

    def predict_log_proba(self, X) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        ids = self.model_.predict(self._features(X, reset=False))
        return self.classes_[np.minimum(ids, len(self.classes_) - 1)]


class PolyakRegressor(RegressorMixin, _PolyakMLP):
    """A multi-layer perceptron regressor trained by polyak (linear outputs, mean squared error).

    Fitted attributes as ``PolyakClassifier``'s (without ``classes_``); ``validation_scores_`` holds the negative
    validation MSE per epoch (higher is better, as scikit-learn's scores).
    """

    _loss = "mse"

    def fit(self, X, y):
        """Train on (X, y) from scratch, or from the current weights with ``warm_start``."""
        X, y = validate_data(self, X, y, reset=True, dtype=FLOATS, y_numeric=True, multi_output=True,
                             ensure_min_samples=2)
        self._train(X, y, 1 if y.ndim == 1 else y.shape[1])
        return self

    def partial_fit(self, X, y):
        """One epoch over this batch, from the current weights (online learning)."""
        X, y = validate_data(self, X, y, reset=not hasattr(self, "model_"), dtype=FLOATS, y_numeric=True,
                             multi_output=True)
        self._train(X, y, 1 if y.ndim == 1 else y.shape[1], epochs=1)
        return self

    def _validation_score(self, m: EpochMetrics) -> float | None:
        return None if m.val_loss is None else -m.val_loss

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        return self.model_.predict(self._features(X, reset=False))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
