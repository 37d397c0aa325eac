"""ServerCore: the step both engines share."""

from __future__ import annotations

import math

import numpy as np

from polyak.contract.spec import parse_spec
from polyak.service.engine.ps_core import ServerCore


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
    assert figures.step_losses[0] == 2.0 and math.isnan(figures.step_losses[1])


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


# -- the parameter server's async bookkeeping (the class itself, in this process; W refs need Ray) ------------
def async_server(**opt):
    from polyak.service.engine.parameter_server import ParameterServer

    spec = parse_spec({"model": {"layers": [3, 2]},
                       "optimizer": {"method": "sgd", "lr": 0.5, "schedule": "inverse_time", "decay_steps": 2, **opt},
                       "cluster": {"num_workers": 2, "mode": "async", "max_staleness": 1, "dtype": "float64"}})
    server = ParameterServer(spec.model_dump_json(), 8, trace=True)
    server.restore({"W": np.arange(8, dtype=np.float64)}, {"step": 0, "version": 0})
    return server


def test_async_pushes_are_recorded_with_their_read_version_rows_and_step_size(ray_session):
    from polyak.service.engine.parameter_server import Join, Update
    from polyak.workers.gradient_worker import APPLIED, STALE

    server = async_server()
    server.begin_epoch(4, None)
    _, pass_0, version, _ = server.join_epoch(0)
    _, pass_1, _, _ = server.join_epoch(1)
    g = np.ones(8)
    assert server.push(2 * g, 1.0, 2, version, 0, pass_0, np.array([5, 7]))[:2] == (APPLIED, 1)
    assert server.push(g, 1.0, 1, version, 1, pass_1, np.array([3]))[:2] == (APPLIED, 2)  # one version old
    assert server.push(g, 1.0, 1, version, 1, pass_1, np.array([4]))[:2] == (STALE, 2)  # two: dropped
    # sgd, eta_t = 0.5 / (1 + t / 2): t = 0 then t = 1, each with g_B = 1
    np.testing.assert_array_equal(server.core.weights(), np.arange(8) - 0.5 - 0.5 / 1.5)
    handover = server.end_epoch()
    assert handover.figures.dropped_gradients == 1 and handover.figures.staleness_max == 1 and handover.rejoins == 0
    joins, updates = handover.trace[:2], handover.trace[2:]
    assert joins == [Join(4, 0, 0, 0), Join(4, 1, 0, 0)]
    assert [(u.epoch, u.shard, u.rows.tolist(), u.count, u.read_version, u.version, u.step, u.lr) for u in updates] \
        == [(4, 0, [5, 7], 2, 0, 1, 0, 0.5), (4, 1, [3], 1, 0, 2, 1, 0.5 / 1.5)]
    assert all(isinstance(u, Update) for u in updates) and server.end_epoch().trace == []  # handed over once


def test_a_restarted_worker_resumes_after_its_applied_batches_and_its_old_pass_is_turned_away(ray_session):
    from polyak.service.engine.parameter_server import Update
    from polyak.workers.gradient_worker import APPLIED, STOP

    server = async_server()
    server.begin_epoch(0, None)
    _, old_pass, version, _ = server.join_epoch(0)
    g = np.ones(8)
    for _ in range(2):
        _, version, _ = server.push(g, 1.0, 1, version, 0, old_pass, np.array([0]))
    done, new_pass, version, _ = server.join_epoch(0)  # the restarted worker
    assert done == 2 and new_pass != old_pass
    assert server.push(g, 1.0, 1, version, 0, old_pass, np.array([1]))[0] == STOP  # the dead pass's late push
    assert server.push(g, 1.0, 1, version, 0, new_pass, np.array([1]))[0] == APPLIED
    assert server.core.state.version == 3
    handover = server.end_epoch()
    assert handover.rejoins == 1
    assert [u.rows.tolist() for u in handover.trace if isinstance(u, Update)] == [[0], [0], [1]]


def test_stop_and_the_step_budget_turn_every_later_push_away(ray_session):
    from polyak.service.engine.parameter_server import Stop
    from polyak.workers.gradient_worker import APPLIED, STOP

    server = async_server()
    server.begin_epoch(0, 1)  # one step of budget
    _, p, version, _ = server.join_epoch(0)
    g = np.ones(8)
    assert server.push(g, 1.0, 1, version, 0, p, np.array([0]))[0] == APPLIED
    assert server.push(g, 1.0, 1, version + 1, 0, p, np.array([1]))[0] == STOP
    server.end_epoch()
    server.begin_epoch(1, None)
    _, p, version, _ = server.join_epoch(0)
    server.stop()
    assert server.push(g, 1.0, 1, version, 0, p, np.array([2]))[0] == STOP
    handover = server.end_epoch()
    assert server.core.state.version == 1 and handover.trace[-1] == Stop(1)
