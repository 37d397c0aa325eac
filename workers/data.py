"""Datasets, the seeded train/validation split, standardization and sharding.

Everything is a deterministic function of the data spec and the seed, so a worker process that is
given (spec, shard k of K) rebuilds exactly its rows itself: shards are never shipped by the driver.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.spec import DataSpec, ModelSpec


class DataError(ValueError):
    """The data cannot be used as the spec asks; the message names the file or field."""


@dataclass(frozen=True)
class Dataset:
    X_train: np.ndarray  # (n, d)
    y_train: np.ndarray  # (n,) int class ids, or (n, k) float targets
    X_val: np.ndarray  # (n_val, d)
    y_val: np.ndarray
    classification: bool
    origin: str  # names the data in messages

    @property
    def n_train(self) -> int:
        return self.X_train.shape[0]

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]


# -- raw sources ---------------------------------------------------------------------------------
def _sklearn(name: str) -> tuple[np.ndarray, np.ndarray, bool]:
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "diabetes": datasets.load_diabetes,
    }[name]
    X, y = loader(return_X_y=True)
    return X, y, name != "diabetes"


def regression_with_condition(n: int, d: int, kappa: float, noise: float, rng: np.random.Generator):
    """Linear data whose feature covariance has condition number kappa: MSE is a kappa-conditioned
    quadratic."""
    scales = kappa ** (-0.5 * np.linspace(0.0, 1.0, d))  # std per principal direction, from 1 to 1/sqrt(kappa)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    X = (rng.standard_normal((n, d)) * scales) @ rotation.T  # (n, d), covariance Q diag(scales^2) Q^T
    w_true = rng.standard_normal(d)
    y = X @ w_true + noise * rng.standard_normal(n)
    return X, y


def _synthetic(spec: DataSpec, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    rng = np.random.default_rng([seed, 7919])
    if spec.name == "regression":
        X, y = regression_with_condition(spec.n_samples, spec.n_features, spec.condition_number, spec.noise, rng)
        return X, y, False
    from sklearn.datasets import make_classification

    informative = max(2, min(spec.n_features, int(np.ceil(np.log2(spec.n_classes))) + 3))
    X, y = make_classification(
        n_samples=spec.n_samples,
        n_features=spec.n_features,
        n_informative=min(informative, spec.n_features),
        n_redundant=0,
        n_classes=spec.n_classes,
        n_clusters_per_class=1 if spec.n_features < 4 else 2,
        flip_y=spec.noise,
        random_state=seed,
    )
    return X, y, True


def _table(path: Path, n_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """A .npy/.csv/.parquet table whose last ``n_targets`` columns are the targets."""
    if path.suffix == ".npy":
        table = np.load(path, allow_pickle=False)
    elif path.suffix == ".csv":
        try:
            table = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError:  # a header row of column names
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install 'polyak[parquet]')") from None
        table = np.column_stack([c.to_numpy(zero_copy_only=False) for c in pq.read_table(path).columns])
    if table.ndim != 2 or table.shape[1] <= n_targets:
        raise DataError(
            f"{path}: expected a 2-D table of features then {n_targets} target column(s), got {table.shape}"
        )
    return table[:, :-n_targets], table[:, -n_targets:].squeeze(axis=1) if n_targets == 1 else table[:, -n_targets:]


def _file(path_str: str, model: ModelSpec) -> tuple[np.ndarray, np.ndarray, bool]:
    path = Path(path_str)
    if not path.is_file():
        raise DataError(f"data.path: {path} does not exist or is not a file")
    classification = model.loss == "cross_entropy"
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in ("X", "y") if k not in f]
                if missing:
                    raise DataError(f"{path}: .npz needs arrays X and y; missing {', '.join(missing)} (has {list(f)})")
                X, y = f["X"], f["y"]
        elif path.suffix in (".npy", ".csv", ".parquet"):
            X, y = _table(path, 1 if classification else model.layers[-1])
        else:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .npz, .npy, .csv or .parquet")
    except DataError:
        raise
    except Exception as e:  # numpy/pyarrow raise many types for a corrupt file; the message is what matters
        raise DataError(f"{path}: cannot read data ({type(e).__name__}: {e})") from None
    return X, y, classification


# -- checks --------------------------------------------------------------------------------------
def _check(X, y, classification: bool, origin: str) -> tuple[np.ndarray, np.ndarray]:
    if not np.issubdtype(np.asarray(X).dtype, np.number):
        raise DataError(f"{origin}: X must be numeric, got dtype {np.asarray(X).dtype}")
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise DataError(f"{origin}: X must be 2-D (n, d), got shape {X.shape}")
    y = np.asarray(y)
    if y.ndim == 0:
        raise DataError(f"{origin}: y must hold one target per row of X, got a single value")
    if y.shape[0] != X.shape[0]:
        raise DataError(f"{origin}: X has {X.shape[0]} rows but y has {y.shape[0]}")
    if X.shape[0] < 2:
        raise DataError(f"{origin}: needs at least 2 samples, got {X.shape[0]}")
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise DataError(f"{origin}: X has NaN or inf values in {bad} row(s)")
    if not np.issubdtype(y.dtype, np.number) or not np.isfinite(y.astype(np.float64)).all():
        raise DataError(f"{origin}: y has NaN, inf or non-numeric values")
    if classification:
        if y.ndim != 1:
            raise DataError(f"{origin}: cross_entropy needs y of shape (n,) with class ids, got {y.shape}")
        if not np.all(y == np.round(y)):
            raise DataError(f"{origin}: cross_entropy needs integer class ids in y, found fractional values")
        y = y.astype(np.int64)
        if y.min() < 0:
            raise DataError(f"{origin}: labels must be in 0..k-1, found {int(y.min())}")
    else:
        y = y.astype(np.float64)
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2:
            raise DataError(f"{origin}: y must be (n,) or (n, k), got {y.shape}")
    return X, y


def check_fits(ds: Dataset, layers) -> None:
    """The first and last widths must match the data: both numbers go in the message."""
    if layers[0] != ds.n_features:
        raise DataError(f"model.layers[0] = {layers[0]} but {ds.origin} has {ds.n_features} features per sample")
    if ds.classification:
        k = int(max(ds.y_train.max(initial=0), ds.y_val.max(initial=0))) + 1
        if k > layers[-1]:
            raise DataError(
                f"model.layers[-1] = {layers[-1]} outputs but {ds.origin} has labels up to {k - 1} "
                f"(labels must be in 0..{layers[-1] - 1})"
            )
    elif ds.y_train.shape[1] != layers[-1]:
        raise DataError(f"model.layers[-1] = {layers[-1]} but {ds.origin} has {ds.y_train.shape[1]} target column(s)")


# -- the dataset a job trains on -----------------------------------------------------------------
def load_dataset(data: DataSpec, model: ModelSpec) -> Dataset:
    """Load, check, split (seeded) and standardize with training statistics. Cached per process; a data
    file is read again when it has changed on disk (the cache key holds its size and modification time)."""
    version = None
    if data.source == "file" and data.path:
        try:
            st = Path(data.path).stat()
            version = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            version = None  # _file reports the missing file
    return _load_cached(data.model_dump_json(), model.model_dump_json(), version)


@functools.lru_cache(maxsize=4)
def _load_cached(data_json: str, model_json: str, file_version: tuple | None = None) -> Dataset:
    data, model = (
        DataSpec.model_validate(json.loads(data_json)),
        ModelSpec.model_validate(json.loads(model_json)),
    )
    if data.source == "sklearn":
        X, y, classification = _sklearn(data.name)
        origin = f"sklearn dataset {data.name!r}"
    elif data.source == "synthetic":
        X, y, classification = _synthetic(data, model.seed)
        origin = f"synthetic {data.name} data"
    else:
        X, y, classification = _file(data.path, model)
        origin = data.path
    if classification != (model.loss == "cross_entropy"):
        kind = "class labels" if classification else "real-valued targets"
        raise DataError(f"model.loss = {model.loss} does not suit {origin}, which has {kind}")
    X, y = _check(X, y, classification, origin)
    perm = np.random.default_rng([model.seed, 1]).permutation(X.shape[0])
    n_val = int(round(data.validation_fraction * X.shape[0]))
    if data.validation_fraction > 0 and not 1 <= n_val < X.shape[0]:
        raise DataError(
            f"data.validation_fraction = {data.validation_fraction} leaves no training or no validation rows"
        )
    val, train = perm[:n_val], perm[n_val:]
    X_train, X_val = X[train], X[val]
    if data.standardize:
        mean, std = X_train.mean(axis=0), X_train.std(axis=0)
        std[std == 0] = 1.0  # a constant feature stays 0 instead of becoming NaN
        X_train, X_val = (X_train - mean) / std, (X_val - mean) / std
    ds = Dataset(X_train, y[train], X_val, y[val], classification, origin)
    check_fits(ds, model.layers)
    for a in (ds.X_train, ds.y_train, ds.X_val, ds.y_val):
        a.setflags(write=False)  # shared by the cache: nobody may change it in place
    return ds


def shard_bounds(n_train: int, num_shards: int) -> np.ndarray:
    """Row offsets of K contiguous shards of the (already shuffled) training set: shard k = [b[k], b[k+1])."""
    if num_shards < 1:
        raise ValueError(f"cluster.num_workers: must be >= 1 to shard, got {num_shards}")
    if num_shards > n_train:
        raise DataError(f"cluster.num_workers = {num_shards} is more than the {n_train} training samples")
    return np.linspace(0, n_train, num_shards + 1).round().astype(np.int64)


def load_shard(data: DataSpec, model: ModelSpec, shard: int, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of shard k, built by the caller itself from the spec."""
    ds = load_dataset(data, model)
    b = shard_bounds(ds.n_train, num_shards)
    return ds.X_train[b[shard] : b[shard + 1]], ds.y_train[b[shard] : b[shard + 1]]
