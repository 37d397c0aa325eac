"""service/engine/schedules.py: step sizes eta_t and batch sizes n'_e against MATH.md's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyak.contract.spec import BatchSpec, OptimizerSpec
from polyak.service.engine.schedules import batch_size, constant, inverse_power, inverse_time, make_schedule

STEPS = [0, 1, 2, 9, 10, 99, 1000, 123456]


@pytest.mark.parametrize("t", STEPS)
def test_step_sizes_follow_the_formulas(t):
    assert constant(0.3)(t) == 0.3
    assert inverse_time(0.3, 50)(t) == pytest.approx(0.3 / (1 + t / 50), rel=1e-15)
    assert inverse_power(0.3, 0.6)(t) == pytest.approx(0.3 / (1 + t) ** 0.6, rel=1e-15)
    assert inverse_power(0.3, 1.0)(t) == pytest.approx(0.3 / (1 + t), rel=1e-15)


def test_known_values():
    assert inverse_time(1.0, 10)(10) == pytest.approx(0.5)
    assert inverse_time(1.0, 10)(30) == pytest.approx(0.25)
    assert inverse_power(1.0, 1.0)(3) == pytest.approx(0.25)
    assert inverse_power(2.0, 0.5)(3) == pytest.approx(1.0)
    for s in (inverse_time(1.0, 10), inverse_power(1.0, 0.75)):
        assert s(0) == 1.0  # every schedule starts at eta


@pytest.mark.parametrize(
    "spec, formula",
    [
        (OptimizerSpec(lr=0.2), lambda t: 0.2),
        (OptimizerSpec(lr=0.2, schedule="inverse_time", decay_steps=20), lambda t: 0.2 / (1 + t / 20)),
        (OptimizerSpec(lr=0.2, schedule="inverse_power", power=0.8), lambda t: 0.2 / (1 + t) ** 0.8),
    ],
    ids=["constant", "inverse_time", "inverse_power"],
)
def test_make_schedule_reads_the_spec(spec, formula):
    s = make_schedule(spec)
    for t in STEPS:
        assert s(t) == pytest.approx(formula(t), rel=1e-15)


def test_robbins_monro_partial_sums_grow_without_bound():
    """sum eta_t = inf and eta_t -> 0 for the decaying forms (power <= 1); a geometric sum stays finite."""
    t = np.arange(10**6, dtype=np.float64)
    for eta in (inverse_time(0.5, 100)(t), inverse_power(0.5, 1.0)(t), inverse_power(0.5, 0.6)(t)):
        sums = np.cumsum(eta)
        decades = sums[[10**3 - 1, 10**4 - 1, 10**5 - 1, 10**6 - 1]]
        # each decade of steps adds at least about eta * ln(10) (the harmonic series): no plateau
        assert np.all(np.diff(decades) > 0.9 * 0.5 * math.log(10))
        assert eta[-1] < 1e-2 * eta[0]  # -> 0
    geometric = np.cumsum(0.5 * 0.9 ** t[:1000])
    assert geometric[-1] - geometric[100] < 1e-3  # converges: the geometric step does not satisfy RM


# -- batch size ----------------------------------------------------------------------------------
def test_batch_size_without_growth_is_constant():
    b = BatchSpec(size=32)
    assert [batch_size(b, 1000, e) for e in range(5)] == [32] * 5


def test_batch_size_null_or_larger_than_n_is_the_full_batch():
    assert batch_size(BatchSpec(size=None), 250, 0) == 250
    assert batch_size(BatchSpec(size=None, growth=2.0), 250, 7) == 250
    assert batch_size(BatchSpec(size=250), 250, 0) == 250
    assert batch_size(BatchSpec(size=10_000), 250, 3) == 250


def test_batch_size_growth_follows_the_formula_and_is_capped():
    b = BatchSpec(size=10, growth=2.0, max_size=100)
    assert [batch_size(b, 1000, e) for e in range(6)] == [10, 20, 40, 80, 100, 100]
    # default cap is n
    b = BatchSpec(size=10, growth=3.0)
    assert [batch_size(b, 500, e) for e in range(6)] == [10, 30, 90, 270, 500, 500]
    # max_size above n is still capped by n
    b = BatchSpec(size=10, growth=10.0, max_size=10_000)
    assert batch_size(b, 777, 3) == 777
    # non-integer growth: min(max_size, round(n'_0 growth^e))
    b = BatchSpec(size=7, growth=1.3, max_size=50)
    expected = [min(50, round(7 * 1.3**e)) for e in range(12)]
    assert [batch_size(b, 10_000, e) for e in range(12)] == expected
    assert expected[-1] == 50 and expected[:3] == [7, 9, 12]


def test_a_grown_batch_stays_capped_long_after_growth_would_overflow_a_float():
    from polyak.contract.spec import BatchSpec
    from polyak.service.engine.schedules import batch_size

    spec = BatchSpec(size=16, growth=2.0)
    assert [batch_size(spec, 1000, e) for e in (0, 1, 5, 6, 7)] == [16, 32, 512, 1000, 1000]
    assert batch_size(spec, 1000, 5000) == 1000  # 2.0**5000 overflows a float
