"""Data made in memory rather than read: scikit-learn's bundled datasets and seeded synthetic ones."""

from __future__ import annotations

import numpy as np

from polyak.contract.choices import SKLEARN_DATASETS
from polyak.contract.spec import DataSpec


def has_class_labels(data: DataSpec) -> bool:
    """Whether the dataset's targets are class ids: known from the spec, before any data is made."""
    if data.source == "sklearn":
        return SKLEARN_DATASETS[data.name][1] is not None
    return data.name == "classification"


def sklearn_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    return getattr(datasets, f"load_{name}")(return_X_y=True)  # every name of SKLEARN_DATASETS has a loader


def regression_with_condition(n: int, d: int, kappa: float, noise: float, rng: np.random.Generator):
    """Linear data whose feature covariance has condition number kappa: MSE is a kappa-conditioned
    quadratic."""
    scales = kappa ** (-0.5 * np.linspace(0.0, 1.0, d))  # std per principal direction, from 1 to 1/sqrt(kappa)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    X = (rng.standard_normal((n, d)) * scales) @ rotation.T  # (n, d), covariance Q diag(scales^2) Q^T
    w_true = rng.standard_normal(d)
    y = X @ w_true + noise * rng.standard_normal(n)
    return X, y


def synthetic_dataset(spec: DataSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 7919])
    if spec.name == "regression":
        return regression_with_condition(spec.n_samples, spec.n_features, spec.condition_number, spec.noise, rng)
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
    return X, y
