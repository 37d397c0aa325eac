"""What every reader shares: the ``Source`` interface, a source held in memory (``ArraySource``), and the
checks of a table against the spec: its columns split by ``data.target``, its size, its loss.

Every ``read`` validates each chunk as it goes (finite values, class ids), so a bad row is reported by its
global row number however large the source is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from polyak.contract.errors import DataError

CHUNK_ROWS = 65536
CHUNK_BYTES = 16 * 2**20  # of stored rows: the float64 copy a chunk becomes is 2-4x that, and transient


@dataclass(eq=False)
class Source:
    """One opened data source: its shape from metadata, and ``read`` for any subset of its rows."""

    origin: str  # names the data in every message
    n: int
    n_features: int
    n_targets: int  # 0: features only (a file to predict on)
    classification: bool  # targets are class ids (model.loss == "cross_entropy")
    nbytes_per_row: int  # as stored, for memory estimates

    def column_groups(self) -> list[tuple[int, int, Source]]:
        """(first, end, source of features [first, end)): the feature columns in groups that are best read one
        group at a time. One group, but for a wide columnar source (parquet keeps a reader per column)."""
        return [(0, self.n_features, self)]

    def read(self, rows: np.ndarray, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
        """(X (len(rows), d) in ``dtype``, y) for sorted, unique row numbers in [0, n); y is int64 (len,) class
        ids, or (len, n_targets) in ``dtype``. Peak memory is the output plus about one chunk."""
        rows = _checked_rows(rows, self.n)
        X = np.empty((len(rows), self.n_features), dtype)
        y = np.empty(len(rows), np.int64) if self.classification else np.empty((len(rows), self.n_targets), dtype)
        for pos, X_chunk, y_chunk in self.chunks(rows, dtype):
            X[pos : pos + len(X_chunk)] = X_chunk
            y[pos : pos + len(y_chunk)] = y_chunk
        return X, y

    def chunks(
        self, rows: np.ndarray, dtype=np.float64, chunk_rows: int = CHUNK_ROWS
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Validated (pos, X, y) chunks, in order, of at most ``chunk_rows`` rows (fewer for wide rows):
        X and y hold the data of ``rows[pos : pos + len(X)]``, typed as ``read`` returns them."""
        rows = _checked_rows(rows, self.n)
        chunk_rows = max(1, min(chunk_rows, CHUNK_BYTES // max(1, self.nbytes_per_row)))
        for pos, X_raw, y_raw in self._raw_chunks(rows, chunk_rows):
            yield (pos, *self._validated(rows[pos : pos + len(X_raw)], X_raw, y_raw, dtype))

    def _raw_chunks(self, rows: np.ndarray, chunk_rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(pos, X, y) as stored, y of shape (m, n_targets), for consecutive runs of ``rows``."""
        raise NotImplementedError

    def _validated(self, rows: np.ndarray, X, y, dtype) -> tuple[np.ndarray, np.ndarray]:
        # X is checked after the cast: a float64 value beyond float32's range becomes inf there.
        with np.errstate(over="ignore"):
            X = np.asarray(X, dtype=dtype)
        self._first_bad(~np.isfinite(X).all(axis=1), rows, "X has NaN or inf values")
        self._first_bad(~np.isfinite(y).all(axis=1), rows, "y has NaN or inf values")
        if not self.classification:
            return X, np.asarray(y, dtype=dtype)
        labels = y[:, 0]
        self._first_bad(
            labels != np.round(labels), rows, "cross_entropy needs integer class ids in y, found fractional values"
        )
        # Named by row and kind, never by value: an error message must not carry the file's contents.
        self._first_bad(labels < 0, rows, "labels must be in 0..k-1, found a negative one")
        return X, labels.astype(np.int64)

    def _first_bad(self, bad: np.ndarray, rows: np.ndarray, what: str) -> None:
        if bad.any():
            raise DataError(f"{self.origin}: {what} (first in row {rows[bad.argmax()]})")


def _checked_rows(rows, n: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or (len(rows) and (rows[0] < 0 or rows[-1] >= n or np.any(np.diff(rows) <= 0))):
        raise ValueError(f"rows must be sorted, unique row numbers in [0, {n}), got {rows!r}")
    return rows


# -- in memory: generated data, .npz, .csv -------------------------------------------------------
@dataclass(eq=False)
class ArraySource(Source):
    X: np.ndarray  # (n, d)
    y: np.ndarray  # (n, n_targets)

    def _raw_chunks(self, rows, chunk_rows):
        for pos in range(0, len(rows), chunk_rows):
            run = rows[pos : pos + chunk_rows]
            yield pos, self.X[run], self.y[run]


def array_source(X, y, classification: bool, origin: str) -> ArraySource:
    """A table held in memory, its arrays checked; ``y`` (n,) or (n, k), or (n, 0) for features only."""
    X, y = np.asarray(X), np.asarray(y)
    if not np.issubdtype(X.dtype, np.number):
        raise DataError(f"{origin}: X must be numeric, got dtype {X.dtype}")
    if X.ndim != 2:
        raise DataError(f"{origin}: X must be 2-D (n, d), got shape {X.shape}")
    if y.ndim == 0:
        raise DataError(f"{origin}: y must hold one target per row of X, got a single value")
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{origin}: y must be numeric, got dtype {y.dtype}")
    if y.shape[0] != X.shape[0]:
        raise DataError(f"{origin}: X has {X.shape[0]} rows but y has {y.shape[0]}")
    if classification and y.ndim != 1:
        raise DataError(f"{origin}: cross_entropy needs y of shape (n,) with class ids, got {y.shape}")
    if y.ndim > 2:
        raise DataError(f"{origin}: y must be (n,) or (n, k), got {y.shape}")
    y = y[:, None] if y.ndim == 1 else y
    return ArraySource(
        origin=origin,
        n=X.shape[0],
        n_features=X.shape[1],
        n_targets=y.shape[1],
        classification=classification,
        nbytes_per_row=X.itemsize * X.shape[1] + y.itemsize * y.shape[1],
        X=X,
        y=y,
    )


# -- the checks ----------------------------------------------------------------------------------
def check_n(n: int, origin: str) -> None:
    """Training needs a row to train on and one more (to validate, or to make a batch of more than one)."""
    if n < 2:
        raise DataError(f"{origin}: needs at least 2 samples, got {n}")


def check_loss_suits(loss: str, classification: bool, origin: str) -> None:
    """Class labels take cross_entropy, real-valued targets mse."""
    if classification != (loss == "cross_entropy"):
        kind = "class labels" if classification else "real-valued targets"
        raise DataError(f"model.loss = {loss} does not suit {origin}, which has {kind}", "model.loss")


def split_columns(names: list, target, n_targets: int, origin: str) -> tuple[list[int], list[int]]:
    """(feature, target) column indices: ``target`` names the target columns, or None for the last
    ``n_targets`` ones (none: every column is a feature)."""
    if target is None:
        if len(names) <= n_targets:
            raise DataError(
                f"{origin}: expected feature columns then {n_targets} target column(s), got {len(names)} column(s)"
            )
        return list(range(len(names) - n_targets)), list(range(len(names) - n_targets, len(names)))
    wanted = [target] if isinstance(target, str) else list(target)
    for name in wanted:
        if name not in names:
            raise DataError(
                f"data.target: column {name!r} is not in {origin}; it has columns {', '.join(map(str, names))}",
                "data.target",
            )
    targets = [names.index(name) for name in wanted]
    features = [i for i in range(len(names)) if i not in targets]
    if not features:
        raise DataError(f"{origin}: data.target names every column; no feature columns are left", "data.target")
    return features, targets
