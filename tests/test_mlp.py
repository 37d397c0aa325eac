"""workers/mlp.py: gradients against torch autograd and finite differences, init; the flat layout and the forward
pass it shares with the trained model (polyak/contract/network.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from polyak.contract.network import from_dict, layer_slices, param_count, to_dict, unflatten
from polyak.workers.mlp import MLP, init_params

ARCHS = {1: [5, 3], 2: [5, 7, 3], 3: [5, 7, 6, 3]}
TOL = {np.float32: 1e-5, np.float64: 1e-10}


def random_problem(layers, loss, n, seed, scale=1.0):
    """A flat W with non-zero biases, a batch X and targets Y (class ids or real values)."""
    rng = np.random.default_rng(seed)
    W = init_params(layers, 1.5 * scale, rng, np, np.float64)
    for _, bl in unflatten(W, layers):
        bl[...] = 0.3 * rng.standard_normal(bl.shape)
    X = rng.standard_normal((n, layers[0]))
    if loss == "cross_entropy":
        Y = rng.integers(0, layers[-1], size=n)
    else:
        Y = rng.standard_normal((n, layers[-1]))
    return W, X, Y


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# -- gradients vs torch autograd -----------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_gradient_equals_torch_autograd(activation, loss, dtype, depth, torch_ref):
    layers = ARCHS[depth]
    W, X, Y = random_problem(layers, loss, n=23, seed=depth * 100 + len(activation))
    mlp = MLP(layers, activation, loss, np, dtype)
    Xd = X.astype(dtype)
    Yd = Y if loss == "cross_entropy" else Y.astype(dtype)
    grad_sum, loss_sum, count = mlp.loss_and_grad(W.astype(dtype), Xd, Yd)

    # the reference sees exactly the values polyak saw (rounded to dtype), computed in float64
    ref_loss, ref_grad = torch_ref.loss_and_grad(
        layers, activation, loss, W.astype(dtype).astype(np.float64), Xd.astype(np.float64), Yd
    )
    assert count == 23
    assert grad_sum.dtype == dtype and grad_sum.shape == (param_count(layers),)
    assert rel_err(grad_sum / count, ref_grad) < TOL[dtype]
    assert abs(loss_sum / count - ref_loss) <= TOL[dtype] * max(1.0, abs(ref_loss))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_gradient_equals_central_finite_differences(activation, loss):
    layers = [3, 4, 3]
    W, X, Y = random_problem(layers, loss, n=6, seed=7)
    mlp = MLP(layers, activation, loss, np, np.float64)
    grad_sum, loss_sum, n = mlp.loss_and_grad(W, X, Y)
    grad = grad_sum.copy() / n

    def mean_loss(w):
        total, _, count = mlp.evaluate(w, X, Y)
        return total / count

    assert loss_sum / n == pytest.approx(mean_loss(W), rel=1e-12)
    eps = 1e-6
    fd = np.empty_like(W)
    for i in range(W.size):
        e = np.zeros_like(W)
        e[i] = eps
        fd[i] = (mean_loss(W + e) - mean_loss(W - e)) / (2 * eps)
    assert rel_err(grad, fd) < 1e-7


def test_loss_sum_matches_a_direct_formula():
    layers = [4, 5, 3]
    W, X, y = random_problem(layers, "cross_entropy", n=9, seed=1)
    mlp = MLP(layers, "tanh", "cross_entropy", np, np.float64)
    (W1, b1), (W2, b2) = unflatten(W, layers)
    z = np.tanh(X @ W1.T + b1) @ W2.T + b2
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    _, loss_sum, _ = mlp.loss_and_grad(W, X, y)
    assert loss_sum == pytest.approx(-np.log(p[np.arange(9), y]).sum(), rel=1e-12)

    _, Xr, Yr = random_problem(layers, "mse", n=9, seed=2)
    mse = MLP(layers, "tanh", "mse", np, np.float64)
    zr = np.tanh(Xr @ W1.T + b1) @ W2.T + b2
    _, loss_sum, _ = mse.loss_and_grad(W, Xr, Yr)
    # the sum over samples of the mean over outputs
    assert loss_sum == pytest.approx(((zr - Yr) ** 2).mean(axis=1).sum(), rel=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_shard_gradient_sums_combine_exactly(loss):
    layers = [6, 8, 4]
    W, X, Y = random_problem(layers, loss, n=40, seed=3)
    mlp = MLP(layers, "relu", loss, np, np.float64)
    g_all, l_all, n_all = mlp.loss_and_grad(W, X, Y)
    g_all = g_all.copy()
    parts = [mlp.loss_and_grad(W, X[a:b], Y[a:b]) for a, b in ((0, 13), (13, 40))]
    g_a, l_a, n_a = parts[0][0].copy(), parts[0][1], parts[0][2]
    g_b, l_b, n_b = parts[1]
    assert n_a + n_b == n_all == 40
    np.testing.assert_allclose(g_a + g_b, g_all, rtol=1e-12, atol=1e-12 * np.abs(g_all).max())
    assert l_a + l_b == pytest.approx(l_all, rel=1e-13)
    # and the combined mean is the union's mean gradient
    np.testing.assert_allclose((g_a + g_b) / (n_a + n_b), g_all / n_all, rtol=1e-12, atol=1e-14)


def test_grad_out_buffer_is_used_and_result_independent_of_it():
    layers = [3, 5, 2]
    W, X, Y = random_problem(layers, "cross_entropy", n=8, seed=4)
    mlp = MLP(layers, "relu", "cross_entropy", np, np.float64)
    buf = np.full(param_count(layers), 123.0)
    g, _, _ = mlp.loss_and_grad(W, X, Y, grad_out=buf)
    assert g is buf
    g2, _, _ = MLP(layers, "relu", "cross_entropy", np, np.float64).loss_and_grad(W, X, Y)
    np.testing.assert_array_equal(buf, g2)


def test_batch_size_changes_reuse_buffers_correctly(torch_ref):
    """Work buffers are cached per batch size: alternating sizes must not mix them up."""
    layers = [4, 6, 3]
    W, X, Y = random_problem(layers, "cross_entropy", n=30, seed=5)
    mlp = MLP(layers, "sigmoid", "cross_entropy", np, np.float64)
    for size in (30, 7, 30, 1, 11, 13, 17, 19, 7):
        g, loss_sum, n = mlp.loss_and_grad(W, X[:size], Y[:size])
        ref_loss, ref_grad = torch_ref.loss_and_grad(layers, "sigmoid", "cross_entropy", W, X[:size], Y[:size])
        assert rel_err(g / n, ref_grad) < 1e-10
        assert loss_sum / n == pytest.approx(ref_loss, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_sigmoid_and_cross_entropy_stay_finite_for_huge_logits(dtype, torch_ref):
    layers = [2, 3, 2]
    W = np.zeros(param_count(layers))
    (W1, b1), (W2, b2) = unflatten(W, layers)
    W1[...] = [[1e4, 0], [-1e4, 0], [0, 1e4]]  # hidden pre-activations ~ +-1e4: sigmoid saturates
    W2[...] = [[1.0, -1.0, 2.0], [-1.0, 1.0, 0.5]]
    X = np.array([[1.0, 1.0], [-1.0, -1.0], [0.5, -2.0]])
    y = np.array([0, 1, 1])
    mlp = MLP(layers, "sigmoid", "cross_entropy", np, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning leaks out either
        g, loss_sum, n = mlp.loss_and_grad(W.astype(dtype), X.astype(dtype), y)
    assert np.isfinite(g).all() and np.isfinite(loss_sum)
    ref_loss, ref_grad = torch_ref.loss_and_grad(layers, "sigmoid", "cross_entropy", W, X, y)
    assert loss_sum / n == pytest.approx(ref_loss, rel=1e-5)
    assert np.max(np.abs(g / n - ref_grad)) < 1e-5 * max(1.0, np.abs(ref_grad).max())

    # logits themselves ~ 1e4: log-sum-exp must not overflow; the wrong class costs ~2e4
    big = np.zeros(param_count([2, 2]))
    ((Wo, _),) = unflatten(big, [2, 2])
    Wo[...] = [[1e4, 0], [-1e4, 0]]
    ce = MLP([2, 2], "relu", "cross_entropy", np, dtype)
    Xb = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=dtype)
    yb = np.array([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g, loss_sum, n = ce.loss_and_grad(big.astype(dtype), Xb, yb)
        val_loss, correct, _ = ce.evaluate(big.astype(dtype), Xb, yb)
    assert np.isfinite(g).all()
    assert loss_sum == pytest.approx(2e4, rel=1e-6)  # 0 for the right class, 2e4 for the wrong one
    assert val_loss == pytest.approx(2e4, rel=1e-6) and correct == 1
    ref_loss, ref_grad = torch_ref.loss_and_grad([2, 2], "relu", "cross_entropy", big, Xb, yb)
    assert loss_sum / n == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(g / n, ref_grad, atol=1e-6)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_evaluate_and_predict_match_torch(loss, torch_ref):
    layers = [5, 7, 6, 3]
    W, X, Y = random_problem(layers, loss, n=50, seed=9)
    mlp = MLP(layers, "tanh", loss, np, np.float64)
    loss_sum, correct, n = mlp.evaluate(W, X, Y, chunk=16)  # several chunks, the last one partial
    assert n == 50
    assert loss_sum / n == pytest.approx(torch_ref.mean_loss(layers, "tanh", loss, W, X, Y), rel=1e-12)
    import torch

    with torch.no_grad():
        out = torch_ref.model(layers, "tanh", W)(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(mlp.predict(W, X, chunk=16), out, rtol=1e-12, atol=1e-12)
    if loss == "cross_entropy":
        assert correct == int((out.argmax(axis=1) == Y).sum())
    else:
        assert correct is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_training_and_the_trained_model_share_one_forward_pass(activation, dtype):
    """The trained model computes, bit for bit, the outputs the job computed (contract/network.py)."""
    from polyak.client.model import Model

    layers = [5, 9, 7, 3]
    W, X, _ = random_problem(layers, "mse", n=40, seed=11)
    W, X = W.astype(dtype), X.astype(dtype)
    trained = MLP(layers, activation, "mse", np, dtype)
    model = Model(to_dict(W, layers), activation, "mse", dtype=dtype)
    model.chunk_rows = 16  # chunks of the same rows: each row's outputs are the same operations
    np.testing.assert_array_equal(model.decision_function(X), trained.predict(W, X, chunk=16))
    relu_masks = [np.empty((40, m), bool) for m in layers[1:-1]]
    outs = trained.forward(W, X, masks=relu_masks if activation == "relu" else None)
    np.testing.assert_array_equal(outs[-1], model.decision_function(X))


# -- flat layout ---------------------------------------------------------------------------------
def test_param_count_formula_and_torch_parameter_count(torch_ref):
    for layers in ([5, 3], [64, 64, 10], [784, 256, 10], [3, 1, 4, 1, 5]):
        expected = sum(layers[i + 1] * (layers[i] + 1) for i in range(len(layers) - 1))
        assert param_count(layers) == expected
        model = torch_ref.model(layers, "relu", np.zeros(expected))
        assert sum(p.numel() for p in model.parameters()) == expected
    assert param_count([64, 64, 10]) == 64 * 65 + 10 * 65


def test_layer_slices_tile_the_vector_in_order():
    layers = [3, 4, 2]
    assert layer_slices(layers) == [(slice(0, 12), slice(12, 16)), (slice(16, 24), slice(24, 26))]


def test_to_dict_from_dict_round_trip_and_layout():
    layers = [3, 4, 2]
    W = np.arange(param_count(layers), dtype=np.float64)
    d = to_dict(W, layers)
    assert list(d) == ["W1", "b1", "W2", "b2"]
    assert d["W1"].shape == (4, 3) and d["b1"].shape == (4,) and d["W2"].shape == (2, 4) and d["b2"].shape == (2,)
    # Wl row-major then bl
    np.testing.assert_array_equal(d["W1"], np.arange(12).reshape(4, 3))
    np.testing.assert_array_equal(d["b1"], [12, 13, 14, 15])
    np.testing.assert_array_equal(d["W2"], np.arange(16, 24).reshape(2, 4))
    np.testing.assert_array_equal(d["b2"], [24, 25])
    back = from_dict(d, layers, np.float64)
    np.testing.assert_array_equal(back, W)
    assert from_dict(d, layers).dtype == np.float32
    # to_dict copies: changing the dict leaves W alone
    d["W1"][0, 0] = -1
    assert W[0] == 0


def test_unflatten_gives_views_not_copies():
    layers = [3, 4, 2]
    W = np.zeros(param_count(layers))
    (W1, b1), (W2, b2) = unflatten(W, layers)
    W1[1, 2] = 5.0
    b2[1] = 7.0
    assert W[1 * 3 + 2] == 5.0
    assert W[-1] == 7.0
    for a in (W1, b1, W2, b2):
        assert np.shares_memory(a, W)
    W[12] = 9.0  # and the other way round
    assert b1[0] == 9.0


def test_from_dict_errors_name_the_array_and_both_shapes():
    layers = [3, 4, 2]
    good = to_dict(np.zeros(param_count(layers)), layers)
    bad = dict(good, W2=np.zeros((4, 2)))
    with pytest.raises(ValueError) as e:
        from_dict(bad, layers)
    msg = str(e.value)
    assert "W2" in msg and "(4, 2)" in msg and "(2, 4)" in msg
    missing = {k: v for k, v in good.items() if k != "b1"}
    with pytest.raises(ValueError, match="b1"):
        from_dict(missing, layers)


def test_init_statistics():
    layers = [1000, 500, 200]
    sigma = 2.0
    W = init_params(layers, sigma, np.random.default_rng(0), np, np.float64)
    (W1, b1), (W2, b2) = unflatten(W, layers)
    # std of N(0, s^2) estimated from N samples has relative error ~ 1/sqrt(2N): 0.1% and 0.2% here
    assert W1.std() == pytest.approx(sigma / np.sqrt(1000), rel=0.01)
    assert W2.std() == pytest.approx(sigma / np.sqrt(500), rel=0.015)
    assert abs(W1.mean()) < 5 * sigma / np.sqrt(1000) / np.sqrt(W1.size)
    assert abs(W2.mean()) < 5 * sigma / np.sqrt(500) / np.sqrt(W2.size)
    assert not b1.any() and not b2.any()
    # seeded and dtype-respecting
    W32 = init_params(layers, sigma, np.random.default_rng(0), np, np.float32)
    assert W32.dtype == np.float32
    np.testing.assert_array_equal(W32, W.astype(np.float32))
    assert not np.array_equal(W, init_params(layers, sigma, np.random.default_rng(1), np, np.float64))


def test_bad_activation_or_loss_is_rejected_by_name():
    with pytest.raises(ValueError, match="model.activation.*relu, tanh, sigmoid.*'gelu'"):
        MLP([2, 2], "gelu")
    with pytest.raises(ValueError, match="model.loss.*'hinge'"):
        MLP([2, 2], "relu", "hinge")
