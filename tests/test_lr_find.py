"""`polyak lr-find`: the range test and the curvature estimates against independent references (NumPy's
eigenvalues of the explicit Hessian, torch's Hessian-vector products, real training runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import LOCAL_IRIS, deep_merge

from polyak.cli import cli
from polyak.contract.spec import parse_spec
from polyak.service.engine.local_engine import LocalEngine
from polyak.service.engine.optim import RULES
from polyak.service.engine.trainer import initial_weights, run
from polyak.service.engine.tuning import (
    LANCZOS_TOL,
    curvature,
    fd_hvp,
    fd_step,
    load_problem,
    range_test,
    stable_lr,
    steepest,
)
from polyak.workers.data import load_dataset, prepare

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUADRATIC = EXAMPLES / "quadratic_heavy_ball.yaml"
DIGITS = EXAMPLES / "digits.yaml"


def quadratic_hessian(spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, A, y) of MATH.md's mse for a [d, 1] model: L(w, b) = (1/n) ||A [w; b] - y||^2, A = [X 1], so
    H = (2/n) A^T A, plus weight_decay on the weights (not the bias). X as training sees it."""
    ds = load_dataset(spec.data, spec.model)
    A = np.hstack([ds.X_train, np.ones((ds.n_train, 1))])
    decay = np.r_[np.full(A.shape[1] - 1, spec.optimizer.weight_decay), 0.0]
    return 2.0 / ds.n_train * A.T @ A + np.diag(decay), A, ds.y_train[:, 0]


def ema(losses, beta=0.98):
    """fastai's smoothed loss: a_t = beta a_(t-1) + (1 - beta) l_t from a_0 = 0, reported a_t / (1 - beta^t)."""
    weights = beta ** np.arange(len(losses))[::-1]  # the weight of each l_s in a_t, s = 1..t
    return np.array([(1 - beta) * weights[-t:] @ losses[:t] / (1 - beta**t) for t in range(1, len(losses) + 1)])


def find(spec, steps=200):
    problem = load_problem(spec)
    W0 = initial_weights(spec).astype(np.float64)
    return range_test(spec, problem, W0, steps), curvature(spec, problem, W0)


@pytest.mark.parametrize("changes", [
    {},
    # standardized features and L2: the Hessian of the loss the trainer actually minimizes changes with both
    {"data": {"standardize": True}, "optimizer": {"weight_decay": 0.05}},
])
def test_quadratic_extreme_eigenvalues_match_numpy(changes):
    spec = parse_spec(deep_merge(yaml.safe_load(QUADRATIC.read_text()), changes))
    H, _, _ = quadratic_hessian(spec)
    eig = np.linalg.eigvalsh(H)
    _, curv = find(spec, steps=20)
    assert curv.lambda_max == pytest.approx(eig[-1], rel=0.05)
    assert curv.lambda_min == pytest.approx(eig[0], rel=0.05)
    assert curv.kappa == pytest.approx(eig[-1] / eig[0], rel=0.05)
    assert curv.gd_lr_bound == pytest.approx(2 / eig[-1], rel=0.05)
    assert curv.full_batch and "full batch" in curv.batch


def test_polyak_parameters_from_curvature_train_as_fast_as_the_hand_set_ones(train_local):
    spec = parse_spec(QUADRATIC)
    H, _, _ = quadratic_hessian(spec)
    L, mu = np.linalg.eigvalsh(H)[[-1, 0]]
    _, curv = find(spec, steps=20)
    lr, alpha = curv.heavy_ball["lr"], curv.heavy_ball["alpha"]
    # MATH.md: momentum 1 - alpha = ((sqrt k - 1)/(sqrt k + 1))^2, alpha * eta = 4/(sqrt L + sqrt mu)^2
    k = L / mu
    assert 1 - alpha == pytest.approx(((np.sqrt(k) - 1) / (np.sqrt(k) + 1)) ** 2, rel=0.05)
    assert alpha * lr == pytest.approx(4 / (np.sqrt(L) + np.sqrt(mu)) ** 2, rel=0.05)

    hand_set, _, _ = train_local(spec)
    derived_spec = parse_spec(deep_merge(spec.model_dump(), {"optimizer": {"lr": lr, "alpha": alpha}}))
    derived, _, _ = train_local(derived_spec)
    assert hand_set.stop_reason == derived.stop_reason == "target_loss"
    assert derived.metrics[-1].train_loss <= 1e-8
    assert derived.metrics[-1].step <= 1.1 * hand_set.metrics[-1].step


def test_mlp_lambda_max_matches_torch_hvp_power_iteration(torch_ref):
    torch = torch_ref.torch
    spec = parse_spec(deep_merge(yaml.safe_load(DIGITS.read_text()), {"cluster": {"dtype": "float64"}}))
    W0 = initial_weights(spec).astype(np.float64)
    _, curv = find(spec, steps=20)

    ds = load_dataset(spec.data, spec.model)
    m = spec.model
    model = torch_ref.model(m.layers, m.activation, W0)
    params = list(model.parameters())  # weight, bias per layer: polyak's flat layout
    loss = torch_ref.loss(m.loss, model(torch.from_numpy(ds.X_train)), ds.y_train)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    v = torch.randn(grad.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small products: on a busy shared CPU more threads only wait for each other
    try:
        for _ in range(60):  # converged to 1e-9 by 20 here
            v = v / v.norm()
            Hv = torch.cat([h.reshape(-1) for h in torch.autograd.grad(grad @ v, params, retain_graph=True)])
            rayleigh, v = float(v @ Hv), Hv
    finally:
        torch.set_num_threads(threads)
    assert curv.lambda_max == pytest.approx(rayleigh, rel=0.05)
    assert curv.lambda_min is None and curv.kappa is None and curv.heavy_ball is None


def relative_error(estimate, exact) -> float:
    return float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact))


def test_the_finite_difference_step_holds_hessian_vector_products_to_the_lanczos_tolerance(torch_ref):
    """fd_hvp at fd_step's h against exact products: the closed form H v on the quadratic example, torch's
    double backward on the digits MLP (relu). Lanczos stops at a relative residual of LANCZOS_TOL, so the
    products must be closer than that; a 1e4x larger step puts relu kinks inside +-h v and misses by far.
    (On the quadratic every step is exact, its gradient being linear: only a non-quadratic loss holds h.)"""
    v = np.random.default_rng(11).standard_normal(21)
    v /= np.linalg.norm(v)
    spec = parse_spec(QUADRATIC)
    H, _, _ = quadratic_hessian(spec)
    problem = load_problem(spec)
    W0 = initial_weights(spec).astype(np.float64)
    Hv = fd_hvp(lambda V: problem.grad(V)[0], W0, fd_step(W0))(v)
    assert relative_error(Hv, H @ v) < LANCZOS_TOL

    torch = torch_ref.torch
    spec = parse_spec(deep_merge(yaml.safe_load(DIGITS.read_text()), {"cluster": {"dtype": "float64"}}))
    problem, W0, m = load_problem(spec), initial_weights(spec).astype(np.float64), spec.model
    ds = load_dataset(spec.data, spec.model)
    model = torch_ref.model(m.layers, m.activation, W0)
    params = list(model.parameters())  # weight, bias per layer: polyak's flat layout
    loss = torch_ref.loss(m.loss, model(torch.from_numpy(ds.X_train)), ds.y_train)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    v = np.random.default_rng(12).standard_normal(W0.size)
    v /= np.linalg.norm(v)
    exact = torch.cat([h.reshape(-1) for h in torch.autograd.grad(grad @ torch.from_numpy(v), params)]).numpy()
    hvp = {f: fd_hvp(lambda V: problem.grad(V)[0], W0, f * fd_step(W0)) for f in (1, 1e4)}
    assert relative_error(hvp[1](v), exact) < LANCZOS_TOL
    assert relative_error(hvp[1e4](v), exact) > 100 * LANCZOS_TOL


def test_the_range_test_takes_the_trainers_batches_in_the_trainers_order(make_spec):
    """The rows of each range-test step are those the trainer hands the engine at the same step, across epochs
    whose batch size grows (a seed other than the default, so the order is not a fixed one by accident)."""
    spec = make_spec({"model": {"seed": 7}, "batch": {"size": 16, "growth": 1.5}, "stopping": {"max_epochs": 6}})
    info = prepare(spec.data, spec.model)
    trained = []

    class Recording:
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def step(self, batch):
            trained.append(np.array(batch))
            self.engine.step(batch)

    run(spec, info, Recording(LocalEngine(spec, info, initial_weights(spec))))
    problem = load_problem(spec, info=info)
    assert problem.full_batch
    tested, grad = [], problem.grad

    def recording_grad(W, idx=None):
        tested.append(np.array(idx))
        return grad(W, idx)

    problem.grad = recording_grad
    range_test(spec, problem, initial_weights(spec).astype(np.float64), steps=len(trained))
    first_epochs = -(-info.n_train // 16) + -(-info.n_train // 24)  # two epochs, batches of 16 then 24
    assert first_epochs < len(tested) <= len(trained)
    for t, rows in enumerate(tested):
        np.testing.assert_array_equal(rows, trained[t], err_msg=f"step {t}")


def test_range_test_replays_the_update_rule_and_stops_when_the_loss_blows_up():
    """Plain GD on the quadratic, replayed with NumPy's closed-form gradient 2/n A^T (A W - y): the same losses,
    and a stop at the first step whose smoothed loss passes 4x its minimum (GD diverges past 2/lambda_max)."""
    spec = parse_spec(deep_merge(yaml.safe_load(QUADRATIC.read_text()), {"optimizer": {"method": "sgd"}}))
    _, A, y = quadratic_hessian(spec)
    test, curv = find(spec, steps=200)
    W = initial_weights(spec).astype(np.float64)
    losses = []
    for eta in np.geomspace(1e-6, 10, 200):
        r = A @ W - y
        losses.append(r @ r / len(y))
        W = W - eta * (2 / len(y)) * A.T @ r
    s = ema(np.array(losses))
    stop = next(t for t in range(200) if s[t] > 4 * s[: t + 1].min())
    assert len(test.losses) == stop + 1 and "4x its minimum" in test.stopped
    np.testing.assert_allclose(test.smoothed, ema(np.array(test.losses)), rtol=1e-12)
    # Past the bound what grows is the top eigen-direction, which steps near 1/lambda_max had cut to rounding
    # noise: there the two runs agree only in kind, not in digits.
    stable = np.asarray(test.lrs) < curv.gd_lr_bound
    np.testing.assert_allclose(np.asarray(test.losses)[stable], np.asarray(losses)[: stop + 1][stable], rtol=1e-9)
    assert test.lrs[-1] > curv.gd_lr_bound  # it blew up only past the curvature's bound
    assert test.suggested_lr < curv.gd_lr_bound


@pytest.mark.parametrize("method", ["sgd", "heavy_ball", "nesterov"])
def test_stable_lr_is_where_the_update_rule_stops_converging(method):
    """optim's own rules on f(w) = lambda w^2 / 2: just under the bound they converge, just over it they grow."""
    lam, alpha = 2.5, 0.3
    bound = stable_lr(method, alpha, lam)

    def final_size(lr):
        W, u = np.ones(1), np.zeros(1)
        for _ in range(3000):
            W, u = RULES[method](W, u, lam * W, lr, alpha)
        return abs(W[0])

    assert final_size(0.98 * bound) < 1e-3
    assert final_size(1.02 * bound) > 1e3


def test_steepest_finds_the_fastest_fall():
    lrs = np.geomspace(1e-6, 10, 200)
    curve = 2.0 - np.tanh(np.log(lrs / 1e-2))  # falls fastest at lr = 1e-2
    assert lrs[steepest(lrs, curve)] == pytest.approx(1e-2, rel=0.1)
    assert steepest(lrs[:11], curve[:11]) is None  # too few points past the skipped ones


def test_range_test_suggestion_trains_digits(train_local):
    """The example spec with only optimizer.lr replaced (in-process: num_workers 0 does not change the math)."""
    spec = parse_spec(deep_merge(yaml.safe_load(DIGITS.read_text()), {"cluster": {"num_workers": 0}}))
    test, curv = find(spec)
    assert test.suggested_lr is not None and test.suggested_lr < curv.lr_bound
    tuned = parse_spec(deep_merge(spec.model_dump(), {"optimizer": {"lr": test.suggested_lr}}))
    result, _, _ = train_local(tuned)
    assert result.state == "succeeded"
    assert result.metrics[-1].val_accuracy >= 0.95


def lr_find(*args):
    return CliRunner().invoke(cli, ["lr-find", *map(str, args)])


def test_cli_json_has_both_estimates_with_nulls_where_they_do_not_apply(tmp_path):
    mlp = tmp_path / "iris.yaml"
    mlp.write_text(yaml.safe_dump(LOCAL_IRIS))
    result = lr_find(mlp, "--json", "--steps", "50")
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    assert set(found) == {"range_test", "curvature"}
    test, curv = found["range_test"], found["curvature"]
    assert test["suggested_lr"] > 0 and "steepest" in test["rule"] and len(test["lrs"]) == len(test["losses"])
    assert curv["lambda_max"] > 0 and curv["lr_bound"] > 0
    assert curv["lambda_min"] is None and curv["kappa"] is None and curv["heavy_ball"] is None

    found = json.loads(lr_find(QUADRATIC, "--json", "--steps", "20").stdout)
    assert set(found["curvature"]["heavy_ball"]) == {"lr", "alpha"} and found["curvature"]["kappa"] > 50


def test_cli_prints_the_estimates_and_polyak_yaml_and_plots(tmp_path):
    out = tmp_path / "lr.png"
    result = lr_find(QUADRATIC, "-o", out, "--steps", "20")
    assert result.exit_code == 0, result.stderr
    assert "lambda_max" in result.stdout and "steepest" in result.stdout
    pasted = yaml.safe_load(result.stdout[result.stdout.index("optimizer:"):])
    assert pasted["optimizer"]["method"] == "heavy_ball"
    assert pasted["optimizer"]["lr"] == pytest.approx(4.967, rel=1e-3)  # the example's hand-set values
    assert pasted["optimizer"]["alpha"] == pytest.approx(0.3245, rel=1e-3)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deep_merge(LOCAL_IRIS, {"optimizer": {"lr": -1}})))
    result = lr_find(bad)
    assert result.exit_code == 2 and "optimizer.lr" in result.stderr and "must be > 0" in result.stderr
    result = lr_find(QUADRATIC, "-o", tmp_path / "lr.txt")
    assert result.exit_code == 2 and "not an image type" in result.stderr
    result = lr_find(QUADRATIC, "-o", tmp_path / "missing" / "lr.png")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_large_data_uses_a_fixed_batch_of_the_training_rows_as_training_sees_them():
    spec = parse_spec(DIGITS)
    ds = load_dataset(spec.data, spec.model)  # standardized with all training rows' statistics
    problem = load_problem(spec, max_rows=100)
    np.testing.assert_allclose(problem.X, ds.X_train[:100], rtol=1e-12)
    np.testing.assert_array_equal(problem.y, ds.y_train[:100])
    assert not problem.full_batch and problem.describe().startswith("a fixed batch of 100 of the 1,438")
