"""Shared pytest fixtures.

The first section holds the numerical-core helpers (no Ray is started by anything in it). A Ray session
fixture, when one is added, belongs in its own section below.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

# ================================================================================================
# Core fixtures and helpers: pure NumPy / in-process, never start Ray
# ================================================================================================


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in, recursively for nested mappings; neither is changed."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# An in-process job on iris: tiny and fast, 150 samples, 4 features, 3 classes.
LOCAL_IRIS = {
    "model": {"layers": [4, 16, 3], "activation": "tanh", "loss": "cross_entropy", "seed": 3},
    "data": {"source": "sklearn", "name": "iris", "standardize": True},
    "optimizer": {"method": "heavy_ball", "lr": 0.5, "alpha": 0.5},
    "batch": {"size": 32},
    "stopping": {"max_epochs": 5},
    "cluster": {"num_workers": 0, "device": "cpu", "dtype": "float64"},
}


@pytest.fixture
def make_spec():
    """make_spec(overrides, base=LOCAL_IRIS) -> a parsed JobSpec."""
    from polyak.contract.spec import parse_spec

    def make(overrides: dict | None = None, base: dict = LOCAL_IRIS):
        return parse_spec(deep_merge(base, overrides or {}))

    return make


@pytest.fixture
def train_local():
    """train_local(spec, hooks=None, engine_wrapper=None) -> (TrainResult, dataset, engine), in-process."""
    from polyak.service.engine.local_engine import LocalEngine
    from polyak.service.engine.trainer import Hooks, initial_weights, run
    from polyak.workers.data import load_dataset, prepare

    def train(spec, hooks: Hooks | None = None, engine_wrapper=None):
        ds = load_dataset(spec.data, spec.model)
        info = prepare(spec.data, spec.model)
        engine = LocalEngine(spec, info, initial_weights(spec))
        if engine_wrapper is not None:
            engine = engine_wrapper(engine)
        result = run(spec, info, engine, job_id="test", hooks=hooks)
        return result, ds, engine

    return train


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


class TorchReference:
    """The same MLP in PyTorch, built from a flat W (Wl = torch.nn.Linear.weight): the reference."""

    ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid"}

    def __init__(self):
        import torch

        self.torch = torch

    def model(self, layers, activation, W, dtype=None):
        from polyak.contract.network import unflatten

        torch = self.torch
        dtype = dtype or torch.float64
        mods = []
        params = unflatten(np.asarray(W, dtype=np.float64), layers)
        for l, (Wl, bl) in enumerate(params):
            lin = torch.nn.Linear(Wl.shape[1], Wl.shape[0], dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(Wl))
                lin.bias.copy_(torch.from_numpy(bl))
            mods.append(lin)
            if l < len(params) - 1:
                mods.append(getattr(torch.nn, self.ACTIVATIONS[activation])())
        return torch.nn.Sequential(*mods)

    def loss(self, loss, out, Y):
        """Mean loss of a batch: CrossEntropyLoss / MSELoss with their default (mean) reduction."""
        torch = self.torch
        if loss == "cross_entropy":
            return torch.nn.CrossEntropyLoss()(out, torch.as_tensor(np.array(Y), dtype=torch.long))
        return torch.nn.MSELoss()(out, torch.as_tensor(np.array(Y), dtype=out.dtype))

    def loss_and_grad(self, layers, activation, loss, W, X, Y, dtype=None):
        """(mean loss, gradient of the mean loss as a flat float64 vector in polyak's layout)."""
        torch = self.torch
        dtype = dtype or torch.float64
        model = self.model(layers, activation, W, dtype)
        value = self.loss(loss, model(torch.as_tensor(np.array(X), dtype=dtype)), Y)
        value.backward()
        linears = [m for m in model if isinstance(m, torch.nn.Linear)]
        grads = [p.grad.double().numpy().ravel() for lin in linears for p in (lin.weight, lin.bias)]
        grad = np.concatenate(grads)
        return float(value.detach()), grad

    def mean_loss(self, layers, activation, loss, W, X, Y, dtype=None):
        torch = self.torch
        dtype = dtype or torch.float64
        with torch.no_grad():
            model = self.model(layers, activation, W, dtype)
            return float(self.loss(loss, model(torch.as_tensor(np.array(X), dtype=dtype)), Y))


@pytest.fixture(scope="session")
def torch_ref():
    """torch is in the dev extra: a missing torch fails every reference test, it never skips them."""
    return TorchReference()


class Replay:
    """An independent re-run of a job's first steps: torch autograd for the gradient and the loss, and
    MATH.md's formulas for step size, batch size, weight decay and the update, all in float64."""

    def __init__(self, torch_ref):
        self.ref = torch_ref

    def __call__(self, spec, dataset, steps: int) -> dict:
        from polyak.service.engine.schedules import epoch_order
        from polyak.service.engine.trainer import initial_weights

        layers, m = spec.model.layers, spec.model
        opt, b = spec.optimizer, spec.batch
        n = dataset.n_train
        X = dataset.X_train.astype(spec.cluster.dtype).astype(np.float64)
        y = dataset.y_train
        mask = np.concatenate(
            [np.r_[np.ones(o * i), np.zeros(o)] for i, o in zip(layers[:-1], layers[1:], strict=True)]
        )
        W = initial_weights(spec).astype(np.float64)
        u = np.zeros_like(W)
        out = {"weights": [W.copy()], "losses": [], "grads": [], "epoch_of_step": [], "batch_sizes": []}
        t, epoch = 0, 0
        while t < steps:
            if b.size is None or b.size >= n:
                bs = n
            else:
                bs = max(1, min(min(b.max_size or n, n), round(b.size * b.growth**epoch)))
            out["batch_sizes"].append(bs)
            order = epoch_order(m.seed, epoch, n)
            for i in range(-(-n // bs)):
                if t == steps:
                    break
                idx = order[i * bs : (i + 1) * bs]
                loss, g = self.ref.loss_and_grad(layers, m.activation, m.loss, W, X[idx], y[idx])
                g = g + opt.weight_decay * mask * W
                if opt.schedule == "inverse_time":
                    eta = opt.lr / (1 + t / opt.decay_steps)
                elif opt.schedule == "inverse_power":
                    eta = opt.lr / (1 + t) ** opt.power
                else:
                    eta = opt.lr
                a = opt.alpha
                if opt.method == "sgd":
                    W = W - eta * g
                elif opt.method == "heavy_ball":
                    u = (1 - a) * u - a * eta * g
                    W = W + u
                else:
                    u = (1 - a) * u - a * eta * g
                    W = W - a * eta * g + (1 - a) * u
                out["losses"].append(loss)
                out["grads"].append(g)
                out["epoch_of_step"].append(epoch)
                out["weights"].append(W.copy())
                t += 1
            epoch += 1
        out["W"] = W
        out["losses"] = np.array(out["losses"])
        out["epoch_of_step"] = np.array(out["epoch_of_step"])
        return out


@pytest.fixture(scope="session")
def replay(torch_ref):
    """replay(spec, dataset, steps) -> {W, weights (after each step), losses, grads, epoch_of_step,
    batch_sizes}."""
    return Replay(torch_ref)


# ================================================================================================
# Ray: one local session per test run, 2 CPUs, started only when a test asks for it
# ================================================================================================


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from polyak.service.engine.placement import connect

    started = connect(None, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()
