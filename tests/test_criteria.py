"""Stopping criteria and gradient statistics: unit checks of service/engine/criteria.py, then every criterion
triggered by a constructed in-process job and reported with the right value."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyak.contract.spec import StoppingSpec
from polyak.contract.wire import JobState, StopReason
from polyak.service.engine.criteria import PRECEDENCE, EpochOutcome, GradientStats, Stopper, relative_change
from polyak.service.engine.trainer import Hooks, initial_weights

ALL_CRITERIA = ["target_loss", "weight_change", "gradient", "early_stopping", "max_steps", "max_epochs"]


def criterion(metrics, name):
    found = [c for c in metrics.criteria if c.name == name]
    assert len(found) == 1, (name, metrics.criteria)
    return found[0]


# -- GradientStats, relative_change, Stopper -----------------------------------------------------
def test_gradient_stats_against_a_direct_computation():
    rng = np.random.default_rng(0)
    gs = rng.standard_normal((7, 11)) + 3.0
    stats = GradientStats(11)
    assert stats.summary() == (None, None)
    for g in gs:
        stats.add(g)
    gbar = gs.mean(axis=0)
    norm, noise = stats.summary()
    assert norm == pytest.approx(np.linalg.norm(gbar), rel=1e-12)
    assert noise == pytest.approx(np.sqrt(np.mean(np.sum((gs - gbar) ** 2, axis=1))), rel=1e-10)
    stats.reset()
    assert stats.summary() == (None, None)
    stats.add(gs[0])
    assert stats.summary() == (pytest.approx(np.linalg.norm(gs[0])), pytest.approx(0.0, abs=1e-6))


@pytest.mark.parametrize("steps", [1, 31, 32, 33, 100])
def test_gradient_stats_of_float32_gradients(steps):
    """float32 gradients are summed in float32 blocks folded into a float64 total: same figures."""
    rng = np.random.default_rng(steps)
    gs = (rng.standard_normal((steps, 50)) + 0.5).astype(np.float32)
    stats = GradientStats(50)
    stats.add(rng.standard_normal(50).astype(np.float32))  # a previous epoch, then reset
    stats.reset()
    for g in gs:
        stats.add(g)
    g64 = gs.astype(np.float64)
    gbar = g64.mean(axis=0)
    np.testing.assert_allclose(stats.total, g64.sum(axis=0), rtol=1e-5, atol=1e-5)
    norm, noise = stats.summary()
    assert norm == pytest.approx(np.linalg.norm(gbar), rel=1e-5)
    if steps > 1:
        assert noise == pytest.approx(np.sqrt(np.mean(np.sum((g64 - gbar) ** 2, axis=1))), rel=1e-4)
    stats.add(gs[0].astype(np.float64))  # mixing dtypes keeps every gradient
    np.testing.assert_allclose(stats.total, g64.sum(axis=0) + g64[0], rtol=1e-5, atol=1e-5)
    assert stats.count == steps + 1


def test_gradient_stats_of_identical_gradients_have_no_noise():
    stats = GradientStats(3)
    for _ in range(5):
        stats.add(np.array([1e3, -2e3, 5e2]))
    norm, noise = stats.summary()
    assert norm == pytest.approx(np.linalg.norm([1e3, -2e3, 5e2]))
    assert noise < 1e-3 * norm  # never NaN from a slightly negative difference of squares


def test_relative_change():
    a, b = np.array([3.0, 4.0]), np.array([3.0, 4.5])
    assert relative_change(b, a) == pytest.approx(0.5 / 5.0)
    assert relative_change(a, a) == 0.0
    assert relative_change(a, np.zeros(2)) == math.inf
    assert relative_change(np.zeros(2), np.zeros(2)) == 0.0
    assert relative_change(b.astype(np.float32), a) == pytest.approx(0.1, rel=1e-6)


def outcome(epoch=1, step=10, train_loss=1.0, val_loss=None, weight_change=0.5, grad=1.0):
    return EpochOutcome(epoch, step, train_loss, val_loss, weight_change, grad)


def test_stopper_reports_every_configured_criterion_in_precedence_order():
    spec = StoppingSpec(
        max_epochs=5,
        max_steps=100,
        weight_change_tol=1e-3,
        grad_tol=1e-2,
        warmup_steps=20,
        target_loss=0.1,
        patience=2,
    )
    criteria, stop = Stopper(spec).check(outcome())
    assert [c.name for c in criteria] == ALL_CRITERIA == list(PRECEDENCE)
    assert stop is None and not any(c.met for c in criteria)
    values = {c.name: (c.value, c.threshold) for c in criteria}
    assert values == {
        "target_loss": (1.0, 0.1),
        "weight_change": (0.5, 1e-3),
        "gradient": (1.0, 1e-2),
        "early_stopping": (0, 2),
        "max_steps": (10, 100),
        "max_epochs": (1, 5),
    }
    only_default, _ = Stopper(StoppingSpec()).check(outcome())
    assert [c.name for c in only_default] == ["max_epochs"]


def test_stopper_precedence_convergence_before_budgets():
    spec = StoppingSpec(max_epochs=1, target_loss=2.0, weight_change_tol=1.0)
    criteria, stop = Stopper(spec).check(outcome())
    assert all(c.met for c in criteria)
    assert stop == StopReason.TARGET_LOSS


def test_gradient_criterion_waits_for_warmup():
    s = Stopper(StoppingSpec(grad_tol=1.0, warmup_steps=50))
    assert not s.check(outcome(step=49, grad=0.1))[0][0].met
    criteria, stop = s.check(outcome(step=50, grad=0.1))
    assert criteria[0].met and stop == StopReason.GRADIENT


def test_early_stopping_counts_epochs_without_improvement_beyond_min_delta():
    s = Stopper(StoppingSpec(patience=2, min_delta=0.1))
    assert s.observe_validation(1, 1.0) is True
    assert s.observe_validation(2, 0.95) is False  # better, but not by more than min_delta
    assert s.epochs_without_improvement == 1
    assert s.observe_validation(3, 0.85) is True and s.best_epoch == 3 and s.best_val_loss == 0.85
    assert s.observe_validation(4, 0.9) is False
    assert s.observe_validation(5, 0.8) is False
    assert s.observe_validation(6, None) is False and s.epochs_without_improvement == 2
    criteria, stop = s.check(outcome(epoch=5))
    assert stop == StopReason.EARLY_STOPPING and criteria[0].value == 2
    tie = Stopper(StoppingSpec(patience=1))
    assert tie.observe_validation(1, 0.5) is True
    assert tie.observe_validation(2, 0.5) is False  # an equal loss is no improvement, even with min_delta 0
    assert tie.check(outcome(epoch=2))[1] == StopReason.EARLY_STOPPING
    restored = Stopper(StoppingSpec(patience=2, min_delta=0.1))
    restored.load_state(s.state())
    assert restored.state() == s.state() == {"best_val_loss": 0.85, "best_epoch": 3, "epochs_without_improvement": 2}


# -- constructed jobs ----------------------------------------------------------------------------
def test_max_epochs_zero_returns_the_initial_weights_exactly(make_spec, train_local):
    spec = make_spec({"stopping": {"max_epochs": 0}})
    result, _, _ = train_local(spec)
    assert result.state == JobState.SUCCEEDED and result.stop_reason == StopReason.MAX_EPOCHS
    assert result.metrics == []
    np.testing.assert_array_equal(result.weights, initial_weights(spec))
    assert result.weights.dtype == np.float64


def test_max_epochs(make_spec, train_local):
    result, _, _ = train_local(make_spec({"stopping": {"max_epochs": 3}}))
    assert result.stop_reason == StopReason.MAX_EPOCHS and result.state == JobState.SUCCEEDED
    assert [m.epoch for m in result.metrics] == [1, 2, 3]
    assert [criterion(m, "max_epochs").met for m in result.metrics] == [False, False, True]
    assert [m.stop for m in result.metrics] == [None, None, StopReason.MAX_EPOCHS]
    last = criterion(result.metrics[-1], "max_epochs")
    assert (last.value, last.threshold) == (3, 3)


def test_max_steps_mid_epoch_is_exact(make_spec, train_local, replay):
    spec = make_spec({"stopping": {"max_steps": 7, "max_epochs": 100}})  # 150 rows, batch 32: 5 steps per epoch
    calls = []

    class Counting:
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def step(self, batch):
            calls.append(len(batch))
            self.engine.step(batch)

    result, ds, _ = train_local(spec, engine_wrapper=Counting)
    assert calls == [32, 32, 32, 32, 22, 32, 32]
    assert result.stop_reason == StopReason.MAX_STEPS and result.state == JobState.SUCCEEDED
    last = result.metrics[-1]
    assert len(result.metrics) == 2 and last.step == 7 and last.samples_seen == 150 + 64
    c = criterion(last, "max_steps")
    assert (c.value, c.threshold, c.met) == (7, 7, True)
    assert not criterion(result.metrics[0], "max_steps").met
    np.testing.assert_allclose(result.weights, replay(spec, ds, 7)["W"], rtol=1e-10, atol=1e-12)


def test_max_steps_zero(make_spec, train_local):
    spec = make_spec({"stopping": {"max_steps": 0}})
    result, _, _ = train_local(spec)
    assert result.stop_reason == StopReason.MAX_STEPS and result.metrics == []
    np.testing.assert_array_equal(result.weights, initial_weights(spec))


def test_weight_change_with_a_tiny_step(make_spec, train_local):
    spec = make_spec({"optimizer": {"lr": 1e-7}, "stopping": {"weight_change_tol": 1e-4, "max_epochs": 10}})
    result, _, _ = train_local(spec)
    assert result.stop_reason == StopReason.WEIGHT_CHANGE and result.state == JobState.SUCCEEDED
    assert len(result.metrics) == 1
    W0 = initial_weights(spec)
    expected = np.linalg.norm(result.weights - W0) / np.linalg.norm(W0)
    c = criterion(result.metrics[0], "weight_change")
    assert 0 < c.value < 1e-4 and c.met and c.threshold == 1e-4
    assert c.value == pytest.approx(expected, rel=1e-9)
    assert result.metrics[0].weight_change == c.value


def test_weight_change_stops_at_the_first_epoch_below_tol(make_spec, train_local, replay):
    reference, ds, _ = train_local(make_spec({"stopping": {"max_epochs": 6}}))
    spec6 = make_spec({"stopping": {"max_epochs": 6}})
    steps = [m.step for m in reference.metrics]  # 5, 10, ... ,30
    r = replay(spec6, ds, steps[-1])
    W_at = [r["weights"][0]] + [r["weights"][t] for t in steps]
    values = [m.weight_change for m in reference.metrics]
    for e in range(6):  # ||W_e - W_{e-1}|| / ||W_{e-1}||, from the independent replay
        expect = np.linalg.norm(W_at[e + 1] - W_at[e]) / np.linalg.norm(W_at[e])
        assert values[e] == pytest.approx(expect, rel=1e-8), e
    tol = min(values[1:]) * 1.0001
    first = next(e for e, v in enumerate(values, start=1) if v < tol)
    assert first > 1
    result, _, _ = train_local(make_spec({"stopping": {"max_epochs": 6, "weight_change_tol": tol}}))
    assert result.stop_reason == StopReason.WEIGHT_CHANGE and len(result.metrics) == first
    assert [criterion(m, "weight_change").met for m in result.metrics] == [False] * (first - 1) + [True]
    assert criterion(result.metrics[-1], "weight_change").value == values[first - 1]


@pytest.mark.parametrize("warmup, stop_epoch", [(4, 2), (5, 3)])
def test_gradient_criterion_respects_warmup(make_spec, train_local, replay, warmup, stop_epoch):
    # 150 rows, batch 75: 2 steps per epoch, so t = 2, 4, 6 after epochs 1, 2, 3
    spec = make_spec({"batch": {"size": 75}, "stopping": {"grad_tol": 1e6, "warmup_steps": warmup, "max_epochs": 10}})
    result, ds, _ = train_local(spec)
    assert result.stop_reason == StopReason.GRADIENT and len(result.metrics) == stop_epoch
    r = replay(spec, ds, 2 * stop_epoch)
    for e, m in enumerate(result.metrics):
        c = criterion(m, "gradient")
        gbar = np.mean(r["grads"][2 * e : 2 * e + 2], axis=0)
        assert c.value == pytest.approx(np.linalg.norm(gbar), rel=1e-9)
        assert c.value < c.threshold  # small all along ...
        assert c.met == (m.step >= warmup)  # ... but only met from T0 on
    assert result.metrics[-1].stop == StopReason.GRADIENT


def test_target_loss(make_spec, train_local, replay):
    reference, ds, _ = train_local(make_spec({"stopping": {"max_epochs": 5}}))
    losses = [m.train_loss for m in reference.metrics]
    r = replay(make_spec({"stopping": {"max_epochs": 5}}), ds, 25)
    for e in range(5):  # the epoch's train_loss is the mean of its minibatch losses
        assert losses[e] == pytest.approx(r["losses"][r["epoch_of_step"] == e].mean(), rel=1e-9)
    target = losses[2]
    first = next(e for e, v in enumerate(losses, start=1) if v <= target)
    result, _, _ = train_local(make_spec({"stopping": {"max_epochs": 5, "target_loss": target}}))
    assert result.stop_reason == StopReason.TARGET_LOSS and len(result.metrics) == first
    c = criterion(result.metrics[-1], "target_loss")
    assert (c.value, c.threshold, c.met) == (losses[first - 1], target, True)


def test_early_stopping_keeps_the_best_weights(make_spec, train_local):
    base = {"data": {"validation_fraction": 0.3}, "optimizer": {"lr": 2.0}}
    reference, _, _ = train_local(make_spec({**base, "stopping": {"max_epochs": 25}}))
    val = [m.val_loss for m in reference.metrics]
    patience, min_delta = 3, 0.005
    best, best_epoch, waited, stop_epoch = math.inf, None, 0, None
    for e, v in enumerate(val, start=1):  # the rule, written out independently
        if v < best - min_delta:
            best, best_epoch, waited = v, e, 0
        else:
            waited += 1
        if waited >= patience:
            stop_epoch = e
            break
    assert stop_epoch is not None and best_epoch > 1, val

    spec = make_spec({**base, "stopping": {"max_epochs": 25, "patience": patience, "min_delta": min_delta}})
    result, _, _ = train_local(spec)
    assert result.stop_reason == StopReason.EARLY_STOPPING and result.state == JobState.SUCCEEDED
    assert len(result.metrics) == stop_epoch
    c = criterion(result.metrics[-1], "early_stopping")
    assert (c.value, c.threshold, c.met) == (patience, patience, True)
    assert [criterion(m, "early_stopping").met for m in result.metrics[:-1]] == [False] * (stop_epoch - 1)
    at_best, _, _ = train_local(make_spec({**base, "stopping": {"max_epochs": best_epoch}}))
    at_stop, _, _ = train_local(make_spec({**base, "stopping": {"max_epochs": stop_epoch}}))
    np.testing.assert_array_equal(result.best_weights, at_best.weights)
    np.testing.assert_array_equal(result.weights, at_stop.weights)  # the last weights are kept too
    assert not np.array_equal(result.best_weights, result.weights)


def test_divergence_names_the_epoch_and_step(make_spec, train_local, replay):
    spec = make_spec(
        {
            "model": {"layers": [10, 1], "loss": "mse"},
            "data": {"source": "sklearn", "name": "diabetes", "standardize": True},
            "optimizer": {"method": "heavy_ball", "lr": 1e30, "alpha": 0.5},
            "batch": {"size": 16},  # 442 rows: 28 steps per epoch
            "stopping": {"max_epochs": 5},
        }
    )
    with np.errstate(all="ignore"):
        r = replay(spec, make_spec_dataset(spec), 28)
        result, _, _ = train_local(spec)
    bad = np.flatnonzero(~np.isfinite(r["losses"]))
    assert bad.size, r["losses"]
    n_step = int(bad[0]) + 1  # 1-based step whose loss is the first non-finite one
    assert n_step > 2, n_step
    assert result.state == JobState.FAILED and result.stop_reason == StopReason.DIVERGED
    assert f"diverged at epoch 1, step {n_step}" in result.error
    assert np.isfinite(result.weights).all()
    assert result.metrics == []


def make_spec_dataset(spec):
    from polyak.workers.data import load_dataset

    return load_dataset(spec.data, spec.model)


@pytest.mark.parametrize("after_steps", [8, 5])
def test_cancel_keeps_the_last_weights(make_spec, train_local, after_steps):
    calls = {"n": 0}

    def should_cancel():
        calls["n"] += 1
        return calls["n"] > after_steps  # asked before every step

    spec = make_spec({"stopping": {"max_epochs": 10}})
    result, _, _ = train_local(spec, hooks=Hooks(should_cancel=should_cancel))
    assert result.state == JobState.CANCELLED and result.stop_reason == StopReason.CANCELLED
    same_steps, _, _ = train_local(make_spec({"stopping": {"max_epochs": 10, "max_steps": after_steps}}))
    np.testing.assert_array_equal(result.weights, same_steps.weights)
    assert result.metrics[-1].step == after_steps
    if after_steps % 5:  # cancelled mid-epoch: that partial epoch is reported, with stop = cancelled
        assert result.metrics[-1].stop == StopReason.CANCELLED


def test_every_configured_criterion_is_reported_every_epoch(make_spec, train_local):
    spec = make_spec(
        {
            "data": {"validation_fraction": 0.2},
            "stopping": {
                "max_epochs": 3,
                "max_steps": 10**6,
                "weight_change_tol": 1e-12,
                "grad_tol": 1e-12,
                "warmup_steps": 0,
                "target_loss": -1.0,
                "patience": 50,
            },
        }
    )
    result, _, _ = train_local(spec)
    assert len(result.metrics) == 3
    for m in result.metrics:
        assert [c.name for c in m.criteria] == ALL_CRITERIA
        c = {x.name: x for x in m.criteria}
        assert c["target_loss"].value == m.train_loss and c["target_loss"].threshold == -1.0
        assert c["weight_change"].value == m.weight_change and c["weight_change"].threshold == 1e-12
        assert c["gradient"].value == m.grad_avg_norm and c["gradient"].threshold == 1e-12
        assert c["early_stopping"].threshold == 50
        assert c["max_steps"].value == m.step and c["max_steps"].threshold == 10**6
        assert c["max_epochs"].value == m.epoch and c["max_epochs"].threshold == 3
        assert all(not x.met for name, x in c.items() if name != "max_epochs")
    assert result.stop_reason == StopReason.MAX_EPOCHS
