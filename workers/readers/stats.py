"""Standardization statistics of a source's features, in one streaming pass over any set of its rows."""

from __future__ import annotations

import numpy as np

from polyak.workers.readers.source import CHUNK_ROWS, Source


def feature_stats(source: Source, rows: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the features over ``rows`` in one streaming pass, float64, a group of columns at a time
    (statistics are per column; a columnar source reads each column once either way). Each chunk's mean and
    sum of squared deviations (M2) are merged with Chan et al.'s parallel formula: a sum of squares minus the
    squared mean would cancel catastrophically for features far from 0. std is the population std (ddof=0);
    a constant feature gets std 1.0, so it standardizes to 0 instead of NaN."""
    parts = [_column_stats(group, rows, chunk_rows) for _, _, group in source.column_groups()]
    return np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts])


def _column_stats(source: Source, rows: np.ndarray, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    count, mean, m2, shift = 0, np.zeros(source.n_features), np.zeros(source.n_features), None
    for _, X, _ in source.chunks(rows, np.float64, chunk_rows):
        # Merging chunk means of size |x| carries their rounding (eps * |x|) into M2 through the mean
        # differences; data shifted by a value near the mean has small chunk means, so the merge keeps float64's
        # digits even for a feature like 1e6 + N(0, 1). (x - shift rounds relative to the small difference.)
        shift = X.mean(axis=0) if shift is None else shift
        X -= shift  # in place: each chunk is a fresh float64 copy, and there is no room for three of them
        n_b, mean_b = len(X), X.mean(axis=0)
        X -= mean_b
        X *= X
        m2_b = X.sum(axis=0)
        delta, total = mean_b - mean, count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta**2 * (count * n_b / total)
        count = total
    if count == 0:
        raise ValueError(f"{source.origin}: feature statistics need at least one row")
    std = np.sqrt(m2 / count)
    std[std == 0] = 1.0
    return shift + mean, std
