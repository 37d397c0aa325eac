"""The in-process engine's data: an in-memory X that already is the training part is held, not copied, and
checked as load_part checks every part (load_part is the reference)."""

from __future__ import annotations

import numpy as np
import pytest

from polyak.contract.errors import DataError
from polyak.service.engine.local_engine import held_part
from polyak.workers.data import load_part
from polyak.workers.readers.source import array_source

LAYERS = (5, 4, 3)


def arrays(dtype=np.float32, n=40):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, LAYERS[0])).astype(dtype), rng.integers(0, LAYERS[-1], n)


@pytest.mark.parametrize("classification", [True, False])
def test_every_row_in_the_jobs_dtype_is_held_as_it_is_and_equals_load_part(classification):
    X, y = arrays()
    targets = y if classification else np.column_stack([y, -y]).astype(np.float64)
    source = array_source(X, targets, classification, "fit's X, y")
    rows = np.random.default_rng(1).permutation(len(X))  # the training order: every row once
    held, loaded = held_part(source, rows, np.float32, None, LAYERS), load_part(source, rows, np.float32, None, LAYERS)
    assert held.X is X  # not a copy
    np.testing.assert_array_equal(held.X, loaded.X)
    np.testing.assert_array_equal(held.y, loaded.y)
    assert held.y.dtype == loaded.y.dtype and held.y.shape == loaded.y.shape


@pytest.mark.parametrize("rows, dtype, stats", [
    (np.arange(30), np.float32, None),                       # a validation split leaves some rows out
    (np.arange(40), np.float64, None),                       # another dtype
    (np.arange(40), np.float32, ([0.5] * 5, [2.0] * 5)),     # standardized
])
def test_anything_else_is_load_parts_copy(rows, dtype, stats):
    X, y = arrays()
    source = array_source(X, y, True, "fit's X, y")
    held, loaded = held_part(source, rows, dtype, stats, LAYERS), load_part(source, rows, dtype, stats, LAYERS)
    assert not np.shares_memory(held.X, X)
    np.testing.assert_array_equal(held.X, loaded.X)
    np.testing.assert_array_equal(held.y, loaded.y)


@pytest.mark.parametrize("spoil, message", [
    (lambda X, y: X.__setitem__((7, 2), np.nan), r"fit's X, y: X has NaN or inf values \(first in row 7\)"),
    (lambda X, y: y.__setitem__(3, 3), r"model.layers\[-1\] = 3 outputs but fit's X, y has labels up to 3"),
    (lambda X, y: y.__setitem__(5, -1), r"fit's X, y: labels must be in 0..k-1, found a negative one "
                                        r"\(first in row 5\)"),
])
def test_a_held_x_is_checked_as_load_part_checks_it(spoil, message):
    X, y = arrays()
    spoil(X, y)
    source = array_source(X, y, True, "fit's X, y")
    for read in (held_part, load_part):
        with pytest.raises(DataError, match=message):
            read(source, np.arange(len(X)), np.float32, None, LAYERS)
