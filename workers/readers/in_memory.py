"""Data made in memory rather than read (workers/generated.py): scikit-learn's bundled datasets and seeded
synthetic ones, as a source like any other."""

from __future__ import annotations

from polyak.contract.spec import DataSpec, ModelSpec
from polyak.workers.generated import has_class_labels, sklearn_dataset, synthetic_dataset
from polyak.workers.readers.source import ArraySource, array_source, check_loss_suits


def origin_of(data: DataSpec) -> str:
    """How messages name generated data."""
    return f"sklearn dataset {data.name!r}" if data.source == "sklearn" else f"synthetic {data.name} data"


def open_generated(data: DataSpec, model: ModelSpec) -> ArraySource:
    """The dataset, made; a loss that does not suit it is refused before it is made."""
    classification = has_class_labels(data)
    check_loss_suits(model.loss, classification, origin_of(data))
    X, y = sklearn_dataset(data.name) if data.source == "sklearn" else synthetic_dataset(data, model.seed)
    return array_source(X, y, classification, origin_of(data))
