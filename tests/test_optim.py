"""service/engine/optim.py: the update rules against torch.optim.SGD and MATH.md, and what theory predicts."""

from __future__ import annotations

import numpy as np
import pytest

from polyak.contract.spec import OptimizerSpec
from polyak.service.engine.optim import RULES, Optimizer, OptState, heavy_ball, nesterov, new_state, sgd
from polyak.workers.mlp import MLP, init_params

LAYERS = [6, 8, 3]


@pytest.fixture(scope="module")
def problem():
    """An MLP, its initial W, training data and a fixed sequence of 50 minibatches of 16 rows."""
    rng = np.random.default_rng(2024)
    X = rng.standard_normal((200, LAYERS[0]))
    y = rng.integers(0, LAYERS[-1], size=200)
    batches = [rng.choice(200, size=16, replace=False) for _ in range(50)]
    W0 = init_params(LAYERS, 1.0, rng, np, np.float64)
    return MLP(LAYERS, "relu", "cross_entropy", np, np.float64), W0, X, y, batches


def mean_grad(mlp, W, X, y, idx):
    g, _, n = mlp.loss_and_grad(W, X[idx], y[idx])
    return g / n  # a new array: the MLP's buffer is not kept


def weight_mask(layers):
    """1 on every W^(l) entry, 0 on biases, built from the layout of DESIGN.md."""
    return np.concatenate(
        [np.r_[np.ones(m_out * m_in), np.zeros(m_out)] for m_in, m_out in zip(layers[:-1], layers[1:], strict=True)]
    )


# -- constant step: exactly torch.optim.SGD ------------------------------------------------------
@pytest.mark.parametrize(
    "method, lr, alpha",
    [("sgd", 0.3, 0.25), ("heavy_ball", 0.5, 0.1), ("heavy_ball", 0.2, 1.0), ("nesterov", 0.5, 0.1)],
)
def test_trajectory_equals_torch_sgd(problem, method, lr, alpha):
    import torch  # the dev extra installs it: a missing torch fails this reference test, never skips it

    mlp, W0, X, y, batches = problem
    opt = Optimizer(OptimizerSpec(method=method, lr=lr, alpha=alpha), LAYERS)
    state = new_state(W0)
    p = torch.nn.Parameter(torch.from_numpy(W0.copy()))
    if method == "sgd":
        reference = torch.optim.SGD([p], lr=lr, momentum=0.0)
    else:
        reference = torch.optim.SGD(
            [p], lr=alpha * lr, momentum=1 - alpha, dampening=0, nesterov=(method == "nesterov")
        )
    for t, idx in enumerate(batches, start=1):
        g = mean_grad(mlp, state.W, X, y, idx)  # the same g goes to both
        p.grad = torch.from_numpy(g.copy())
        opt.apply(state, g)
        reference.step()
        np.testing.assert_allclose(state.W, p.detach().numpy(), rtol=1e-12, atol=1e-13, err_msg=f"step {t}")
        if method != "sgd" and alpha < 1:
            # u is the displacement: torch keeps buf with W_{t+1} = W_t - lr * (g + momentum buf) etc.
            buf = reference.state[p]["momentum_buffer"].numpy()
            np.testing.assert_allclose(state.u, -alpha * lr * buf, rtol=1e-12, atol=1e-13)
    assert state.step == 50 and state.version == 50
    assert not np.allclose(state.W, W0)  # it did move


# -- schedules and weight decay: the lecture's form, written out by hand -------------------------
SCHEDULES = {
    "constant": ({}, lambda t: 0.4),
    "inverse_time": ({"decay_steps": 7}, lambda t: 0.4 / (1 + t / 7)),
    "inverse_power": ({"power": 0.75}, lambda t: 0.4 / (1 + t) ** 0.75),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("method", ["sgd", "heavy_ball", "nesterov"])
def test_schedule_and_weight_decay_follow_math_md(problem, method, schedule):
    mlp, W0, X, y, batches = problem
    extra, eta = SCHEDULES[schedule]
    alpha, wd = 0.3, 0.05
    spec = OptimizerSpec(method=method, lr=0.4, alpha=alpha, schedule=schedule, weight_decay=wd, **extra)
    opt = Optimizer(spec, LAYERS)
    state = new_state(W0)
    mask = weight_mask(LAYERS)
    W, u = W0.copy(), np.zeros_like(W0)
    for t, idx in enumerate(batches):
        g_raw = mean_grad(mlp, state.W, X, y, idx)
        assert opt.lr(t) == pytest.approx(eta(t), rel=1e-15)
        # MATH.md: g += weight_decay * W (weights only); eta_t scales only the new gradient
        g = g_raw + wd * mask * W
        if method == "sgd":
            W = W - eta(t) * g
        elif method == "heavy_ball":
            u = (1 - alpha) * u - alpha * eta(t) * g
            W = W + u
        else:
            u = (1 - alpha) * u - alpha * eta(t) * g
            W = W - alpha * eta(t) * g + (1 - alpha) * u
        g_p = g_raw.copy()
        opt.regularize(g_p, state.W)
        np.testing.assert_allclose(g_p, g, rtol=1e-12, atol=1e-15)
        opt.apply(state, g_p)
        np.testing.assert_allclose(state.W, W, rtol=1e-11, atol=1e-13, err_msg=f"step {t}")


def test_regularize_leaves_biases_alone_and_is_off_by_default():
    layers = [2, 3, 1]
    W = np.arange(1.0, 14.0)
    g = np.zeros(13)
    Optimizer(OptimizerSpec(weight_decay=0.5), layers).regularize(g, W)
    np.testing.assert_array_equal(g, 0.5 * W * weight_mask(layers))
    g = np.ones(13)
    Optimizer(OptimizerSpec(), layers).regularize(g, W)
    np.testing.assert_array_equal(g, np.ones(13))


# -- the rules themselves ------------------------------------------------------------------------
def test_heavy_ball_unrolled_identity():
    """W^{t+1} - W^t = -alpha eta sum_k (1 - alpha)^k g^{t-k}: weights that sum towards 1/alpha."""
    rng = np.random.default_rng(5)
    eta, alpha = 0.7, 0.2
    gs = rng.standard_normal((40, 9))
    W, u = np.zeros(9), np.zeros(9)
    for t in range(40):
        before = W.copy()
        heavy_ball(W, u, gs[t], eta, alpha)
        weights = (1 - alpha) ** np.arange(t + 1)  # k = 0..t
        expected = -alpha * eta * (weights[:, None] * gs[t::-1]).sum(axis=0)
        np.testing.assert_allclose(W - before, expected, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(u, W - before, rtol=0, atol=1e-15)  # u is the displacement
    assert weights.sum() == pytest.approx(1 / alpha, rel=1e-3)  # 1 - 0.8^40 of 1/alpha
    # a constant gradient: the step tends to -eta g (alpha eta times 1/alpha)
    W, u = np.zeros(1), np.zeros(1)
    for _ in range(300):
        heavy_ball(W, u, np.ones(1), eta, alpha)
    assert u[0] == pytest.approx(-eta, rel=1e-12)


@pytest.mark.parametrize("name", ["sgd", "heavy_ball", "nesterov"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rules_update_in_place_and_leave_g_alone(name, dtype):
    rng = np.random.default_rng(1)
    W, u, g = (rng.standard_normal(6).astype(dtype) for _ in range(3))
    W_id, u_id, g_copy = id(W), id(u), g.copy()
    W_before, u_before = W.copy(), u.copy()
    W2, u2 = RULES[name](W, u, g, 0.1, 0.5)
    assert id(W2) == W_id and id(u2) == u_id
    assert W.dtype == dtype and u.dtype == dtype
    np.testing.assert_array_equal(g, g_copy)
    assert not np.array_equal(W, W_before)
    if name == "sgd":
        np.testing.assert_array_equal(u, u_before)
        np.testing.assert_allclose(W, W_before - 0.1 * g_copy, rtol=1e-6)
    elif name == "heavy_ball":
        np.testing.assert_allclose(u, 0.5 * u_before - 0.05 * g_copy, rtol=1e-6)
        np.testing.assert_allclose(W, W_before + u, rtol=1e-6)
    else:
        np.testing.assert_allclose(u, 0.5 * u_before - 0.05 * g_copy, rtol=1e-6)
        np.testing.assert_allclose(W, W_before - 0.05 * g_copy + 0.5 * u, rtol=1e-6)
    assert {k: RULES[k] for k in ("sgd", "heavy_ball", "nesterov")} == {
        "sgd": sgd, "heavy_ball": heavy_ball, "nesterov": nesterov}


def test_heavy_ball_with_alpha_one_is_sgd():
    rng = np.random.default_rng(2)
    g = rng.standard_normal((10, 4))
    W1, u1 = np.zeros(4), np.zeros(4)
    W2, u2 = np.zeros(4), np.zeros(4)
    for gt in g:
        heavy_ball(W1, u1, gt, 0.3, 1.0)
        sgd(W2, u2, gt, 0.3)
    np.testing.assert_allclose(W1, W2, rtol=1e-14)


def test_new_state_copies_the_initial_weights():
    W0 = np.arange(5.0)
    s = new_state(W0)
    assert isinstance(s, OptState) and s.step == 0 and s.version == 0
    assert not np.shares_memory(s.W, W0) and not s.u.any()
    s.W += 1
    np.testing.assert_array_equal(W0, np.arange(5.0))


# -- what theory predicts: kappa = 100, GD ~ 0.98 per step, heavy ball ~ 0.82 ------------------
# Least squares on linear data with a kappa ~100 feature covariance: a quadratic with known extremes.
QUADRATIC = {
    "model": {"layers": [10, 1], "loss": "mse", "seed": 0},
    "data": {
        "source": "synthetic",
        "name": "regression",
        "n_samples": 400,
        "n_features": 10,
        "condition_number": 100,
        "noise": 0.0,
        "standardize": False,
    },
}


def _quadratic_run(make_spec, opt: dict, epochs: int):
    """Full-batch training of a linear model [d, 1] with mse on kappa-conditioned synthetic regression,
    through the real code path (trainer + LocalEngine); returns the weights after every step and W*."""
    from polyak.service.engine.local_engine import LocalEngine
    from polyak.service.engine.trainer import Hooks, initial_weights, run
    from polyak.workers.data import load_dataset, prepare

    spec = make_spec(
        {**QUADRATIC, "optimizer": opt, "batch": {"size": None}, "stopping": {"max_epochs": epochs}}
    )
    ds = load_dataset(spec.data, spec.model)
    info = prepare(spec.data, spec.model)
    engine = LocalEngine(spec, info, initial_weights(spec))
    trajectory = [engine.weights()]
    result = run(spec, info, engine, hooks=Hooks(on_epoch=lambda m: trajectory.append(engine.weights())))
    assert result.stop_reason == "max_epochs" and all(m.batch_size == 400 for m in result.metrics)
    A = np.column_stack([ds.X_train, np.ones(ds.n_train)])  # W = (w, b)
    W_star = np.linalg.lstsq(A, ds.y_train[:, 0], rcond=None)[0]
    return np.array(trajectory), W_star


def _hessian_extremes(make_spec):
    """L and mu of the mse Hessian (2/n) A^T A / m_L, A = [X, 1], of the data the job actually trains on."""
    from polyak.workers.data import load_dataset

    spec = make_spec(QUADRATIC)
    ds = load_dataset(spec.data, spec.model)
    A = np.column_stack([ds.X_train, np.ones(ds.n_train)])
    eig = np.linalg.eigvalsh(2.0 / ds.n_train * A.T @ A)
    return eig[-1], eig[0]


def test_heavy_ball_beats_gradient_descent_on_an_ill_conditioned_quadratic(make_spec):
    L, mu = _hessian_extremes(make_spec)
    kappa = L / mu
    assert 80 < kappa < 130  # the data is about as ill-conditioned as asked

    # GD with its best step 2 / (L + mu): sgd on the full batch
    gd, W_star = _quadratic_run(make_spec, {"method": "sgd", "lr": 2 / (L + mu)}, epochs=200)
    err_gd = np.linalg.norm(gd - W_star, axis=1)
    rate_gd = (err_gd[200] / err_gd[100]) ** (1 / 100)

    # heavy ball with Polyak's parameters
    q = (np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1)
    alpha = 1 - q**2
    step = 4 / (np.sqrt(L) + np.sqrt(mu)) ** 2  # alpha * eta
    hb, W_star_hb = _quadratic_run(make_spec, {"method": "heavy_ball", "lr": step / alpha, "alpha": alpha}, epochs=120)
    err_hb = np.linalg.norm(hb - W_star_hb, axis=1)
    rate_hb = (err_hb[120] / err_hb[20]) ** (1 / 100)

    print(
        f"\nkappa={kappa:.1f}: GD contraction {rate_gd:.4f} (theory {(kappa - 1) / (kappa + 1):.4f}), "
        f"heavy ball {rate_hb:.4f} (theory {q:.4f})"
    )
    assert rate_gd == pytest.approx((kappa - 1) / (kappa + 1), abs=0.003)
    assert 0.97 < rate_gd < 0.99
    assert rate_hb <= 0.85
    assert rate_hb >= q - 0.02  # no faster than theory allows
    assert rate_gd - rate_hb >= 0.1
    assert err_hb[120] < 1e-6 * err_hb[0] < err_gd[120]
