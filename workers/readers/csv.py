"""``.csv``: a numeric table, optionally under a header row of column names; read whole (a row's position is
only known by reading every row before it). Targets are the ``data.target`` column(s), else the last column(s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from polyak.contract.errors import DataError
from polyak.workers.readers.source import ArraySource, array_source, split_columns


def open_csv(path: Path, origin: str, target, n_targets: int, classification: bool) -> ArraySource:
    try:
        table, names = np.loadtxt(path, delimiter=",", ndmin=2), None
    except ValueError:  # a header row of column names
        table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        with open(path) as f:
            names = [name.strip().strip("\"'") for name in f.readline().split(",")]
    if names is None and target is not None:
        raise DataError(
            f"{origin}: data.target = {target!r} names columns, but the file has no header row", "data.target"
        )
    n_columns = table.shape[1]
    if names is not None and len(names) != n_columns:
        raise DataError(f"{origin}: the header names {len(names)} columns but the rows have {n_columns}")
    features, targets = split_columns(names or list(range(n_columns)), target, n_targets, origin)
    y = table[:, targets]
    return array_source(table[:, features], y[:, 0] if classification else y, classification, origin)
