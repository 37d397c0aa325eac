"""ServerCore: the step both engines share."""

from __future__ import annotations

import math

import numpy as np

from client.spec import parse_spec
from service.engine.ps_core import ServerCore


def core(method="sgd", lr=0.5, **opt):
    spec = parse_spec({"model": {"layers": [3, 2]}, "optimizer": {"method": method, "lr": lr, **opt},
                       "cluster": {"num_workers": 0, "dtype": "float64"}})
    return ServerCore(spec, np.arange(8, dtype=np.float64))


def test_parts_are_averaged_by_their_total_count_and_empty_parts_ignored():
    c = core()
    parts = [(np.full(8, 6.0), 3.0, 3), (np.zeros(8), 0.0, 0), (np.full(8, 2.0), 1.0, 1)]
    c.apply_parts(parts)
    np.testing.assert_array_equal(c.weights(), np.arange(8) - 0.5 * 2.0)  # g_B = (6 + 2) / 4
    assert c.step_losses == [1.0] and c.samples == 4 and c.state.step == 1 and c.state.version == 1


def test_a_non_finite_gradient_marks_the_step_as_diverged_even_with_a_finite_loss():
    c = core()
    g = np.ones(8)
    c.apply(g, 2.0, 1)
    g[3] = np.inf
    c.apply(g, 2.0, 1)
    figures = c.end_epoch()
    assert figures["step_losses"][0] == 2.0 and math.isnan(figures["step_losses"][1])


def test_snapshot_and_restore_round_trip_the_whole_state():
    c = core("heavy_ball", alpha=0.5)
    for _ in range(3):
        c.apply(np.linspace(-1, 1, 8), 1.0, 2)
    arrays, counters = c.snapshot()
    fresh = core("heavy_ball", alpha=0.5)
    fresh.restore(arrays, counters)
    for x in (c, fresh):
        x.apply(np.ones(8), 1.0, 1)
    np.testing.assert_array_equal(c.weights(), fresh.weights())
    np.testing.assert_array_equal(c.state.u, fresh.state.u)
    assert (fresh.state.step, fresh.state.version) == (4, 4)


def test_a_round_in_which_no_worker_had_rows_is_not_a_step():
    c = core()
    c.apply_parts([(np.zeros(8), 0.0, 0), (np.zeros(8), 0.0, 0)])
    assert c.state.step == 0 and c.state.version == 0 and c.step_losses == []
    np.testing.assert_array_equal(c.weights(), np.arange(8))
