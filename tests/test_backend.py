"""workers/backend.py: device choice, and the CuPy path equal to the NumPy one (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from polyak.contract.network import param_count
from polyak.workers.backend import Backend, DeviceError, get_backend, gpu_available, to_numpy
from polyak.workers.mlp import MLP, init_params

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="no GPU visible (CuPy missing or no CUDA device)")


def test_cpu_is_numpy():
    b = get_backend("cpu")
    assert isinstance(b, Backend) and b.xp is np and b.device == "cpu"
    assert "NumPy" in b.describe()
    a = b.asarray([1, 2, 3], dtype=np.float32)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32


def test_auto_picks_what_is_there():
    b = get_backend("auto")
    assert b.device == ("gpu" if gpu_available() else "cpu")
    assert get_backend().device == b.device


@pytest.mark.skipif(gpu_available(), reason="a GPU is visible, so cluster.device gpu is legal here")
def test_gpu_without_a_gpu_is_a_device_error():
    with pytest.raises(DeviceError) as e:
        get_backend("gpu")
    msg = str(e.value)
    assert "no GPU" in msg and "cluster.device" in msg and "cpu" in msg


def test_unknown_device_is_rejected_by_name():
    with pytest.raises(DeviceError, match="cluster.device.*auto, cpu or gpu.*'tpu'"):
        get_backend("tpu")


def test_to_numpy_does_not_copy_host_arrays():
    a = np.arange(4.0)
    assert to_numpy(a) is a


# -- the CuPy path -------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_cupy_gradient_equals_numpy(activation, loss):
    gpu = get_backend("gpu")
    cp = gpu.xp
    layers = [20, 32, 16, 4]
    rng = np.random.default_rng(0)
    W = init_params(layers, 1.0, rng, np, np.float64)
    X = rng.standard_normal((64, 20))
    Y = rng.integers(0, 4, size=64) if loss == "cross_entropy" else rng.standard_normal((64, 4))
    g_np, l_np, n_np = MLP(layers, activation, loss, np, np.float64).loss_and_grad(W, X, Y)
    g_cp, l_cp, n_cp = MLP(layers, activation, loss, cp, np.float64).loss_and_grad(
        cp.asarray(W), cp.asarray(X), cp.asarray(Y)
    )
    assert type(g_cp).__module__.startswith("cupy")
    assert n_cp == n_np
    np.testing.assert_allclose(to_numpy(g_cp), g_np, rtol=1e-10, atol=1e-10 * np.abs(g_np).max())
    assert l_cp == pytest.approx(l_np, rel=1e-10)
    lv_np, c_np, _ = MLP(layers, activation, loss, np, np.float64).evaluate(W, X, Y)
    lv_cp, c_cp, _ = MLP(layers, activation, loss, cp, np.float64).evaluate(cp.asarray(W), cp.asarray(X), cp.asarray(Y))
    assert lv_cp == pytest.approx(lv_np, rel=1e-10) and c_cp == c_np


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["sgd", "heavy_ball", "nesterov"])
def test_cupy_rules_equal_numpy(method):
    from polyak.service.engine.optim import RULES

    cp = get_backend("gpu").xp
    rng = np.random.default_rng(1)
    W, u = rng.standard_normal(100), np.zeros(100)
    Wc, uc = cp.asarray(W), cp.asarray(u)
    for _ in range(20):
        g = rng.standard_normal(100)
        RULES[method](W, u, g, 0.3, 0.2)
        RULES[method](Wc, uc, cp.asarray(g), 0.3, 0.2)
    np.testing.assert_allclose(to_numpy(Wc), W, rtol=1e-12, atol=1e-12)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["sgd", "heavy_ball", "nesterov", "adagrad", "rmsprop", "adam"])
def test_cupy_optimizer_equals_numpy_with_schedule_and_weight_decay(method):
    """The parameter server's whole update (rule, buffers, scratch, schedule, decay) on CuPy arrays."""
    from polyak.contract.spec import OptimizerSpec
    from polyak.service.engine.optim import BUFFERS, Optimizer, new_state

    cp = get_backend("gpu").xp
    layers = [6, 5, 3]
    spec = OptimizerSpec(method=method, lr=0.05, alpha=0.3, weight_decay=1e-3, schedule="inverse_time",
                         decay_steps=10)
    rng = np.random.default_rng(2)
    W0 = rng.standard_normal(param_count(layers))
    cpu, gpu = Optimizer(spec, layers), Optimizer(spec, layers)
    s_cpu, s_gpu = new_state(W0, np, BUFFERS[method]), new_state(W0, cp, BUFFERS[method])
    for _ in range(25):
        g = rng.standard_normal(W0.shape)
        cpu.apply(s_cpu, cpu.regularize(g.copy(), s_cpu.W))
        gpu.apply(s_gpu, gpu.regularize(cp.asarray(g), s_gpu.W))
    assert type(s_gpu.W).__module__.startswith("cupy")
    np.testing.assert_allclose(to_numpy(s_gpu.W), s_cpu.W, rtol=1e-12, atol=1e-12)
    for name in BUFFERS[method]:
        np.testing.assert_allclose(to_numpy(s_gpu.buffers[name]), s_cpu.buffers[name], rtol=1e-12, atol=1e-12)


@needs_gpu
@pytest.mark.gpu
def test_cupy_training_equals_numpy_training(make_spec, train_local):
    base = {"cluster": {"dtype": "float64"}, "stopping": {"max_epochs": 3}}
    cpu, _, _ = train_local(make_spec({**base, "cluster": {"device": "cpu", "dtype": "float64"}}))
    gpu, _, engine = train_local(make_spec({**base, "cluster": {"device": "gpu", "dtype": "float64"}}))
    assert engine.backend.device == "gpu"
    np.testing.assert_allclose(gpu.weights, cpu.weights, rtol=1e-9, atol=1e-10)
    assert [m.train_loss for m in gpu.metrics] == pytest.approx([m.train_loss for m in cpu.metrics], rel=1e-9)
