"""``.npz``: arrays X and y, read whole (numpy cannot memory-map an archive member, which may be compressed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from polyak.contract.errors import DataError
from polyak.workers.readers.source import ArraySource, array_source


def open_npz(path: Path, origin: str, n_targets: int, classification: bool) -> ArraySource:
    """X and y; X alone when ``n_targets`` is 0 (features to predict on). y's own shape gives the targets."""
    wanted = ("X", "y") if n_targets else ("X",)
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in wanted if k not in f]
        if missing:
            arrays = "arrays X and y" if n_targets else "an array X"
            raise DataError(f"{origin}: .npz needs {arrays}; missing {', '.join(missing)} (has {list(f)})")
        X = f["X"]
        y = f["y"] if n_targets else np.empty((len(X), 0))
    return array_source(X, y, classification, origin)
