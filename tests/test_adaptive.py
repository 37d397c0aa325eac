"""AdaGrad, RMSProp and Adam on the parameter server: torch.optim step for step (MATH.md, "Adaptive")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch  # the dev extra installs it: a missing torch fails here, it does not skip

from polyak.contract.errors import SpecError
from polyak.contract.spec import parse_spec
from polyak.service.engine.optim import BUFFERS
from polyak.service.engine.schedules import epoch_order
from polyak.service.engine.trainer import initial_weights, train_job
from polyak.workers.data import load_dataset

STEPS = 50


def spec_for(method: str, batch: int | None, weight_decay: float = 0.0, schedule: str = "constant", workers=0):
    return parse_spec({
        "model": {"layers": [13, 8, 3], "activation": "tanh", "seed": 4},
        "data": {"source": "sklearn", "name": "wine", "standardize": True},
        "optimizer": {"method": method, "lr": 0.01, "weight_decay": weight_decay, "schedule": schedule,
                      "decay_steps": 20, "beta1": 0.8, "beta2": 0.99, "rho": 0.9, "eps": 1e-6},
        "batch": {"size": batch},
        "stopping": {"max_steps": STEPS, "max_epochs": 1000},
        "cluster": {"num_workers": workers, "device": "cpu", "dtype": "float64"},
    })


def torch_trajectory(spec) -> np.ndarray:
    """The same steps with torch.optim on a torch MLP: weight decay on the weights' param group only, the
    schedule as a LambdaLR; returns the final weights in polyak's flat layout."""
    layers, o = spec.model.layers, spec.optimizer
    ds = load_dataset(spec.data, spec.model)
    W0 = initial_weights(spec).astype(np.float64)
    mods, start = [], 0
    for l, (m_in, m_out) in enumerate(zip(layers[:-1], layers[1:], strict=True)):
        lin = torch.nn.Linear(m_in, m_out, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W0[start : start + m_in * m_out].reshape(m_out, m_in)))
            lin.bias.copy_(torch.from_numpy(W0[start + m_in * m_out : start + m_in * m_out + m_out]))
        start += m_in * m_out + m_out
        mods += [lin] + ([torch.nn.Tanh()] if l < len(layers) - 2 else [])
    model = torch.nn.Sequential(*mods)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    groups = [{"params": [m.weight for m in linears], "weight_decay": o.weight_decay},
              {"params": [m.bias for m in linears], "weight_decay": 0.0}]
    opt = {
        "adagrad": lambda: torch.optim.Adagrad(groups, lr=o.lr, eps=o.eps),
        "rmsprop": lambda: torch.optim.RMSprop(groups, lr=o.lr, alpha=o.rho, eps=o.eps),
        "adam": lambda: torch.optim.Adam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps),
    }[o.method]()
    decay = (lambda t: 1 / (1 + t / o.decay_steps)) if o.schedule == "inverse_time" else (lambda t: 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    X, y = torch.from_numpy(ds.X_train), torch.from_numpy(ds.y_train)
    n = len(X)
    bs = n if spec.batch.size is None else spec.batch.size
    t, epoch = 0, 0
    while t < STEPS:
        order = torch.from_numpy(epoch_order(spec.model.seed, epoch, n))
        for i in range(math.ceil(n / bs)):
            if t == STEPS:
                break
            idx = order[i * bs : (i + 1) * bs]
            opt.zero_grad()
            torch.nn.CrossEntropyLoss()(model(X[idx]), y[idx]).backward()
            opt.step()
            schedule.step()
            t += 1
        epoch += 1
    return np.concatenate([p.detach().numpy().ravel() for m in linears for p in (m.weight, m.bias)])


@pytest.mark.parametrize("method", ["adagrad", "rmsprop", "adam"])
@pytest.mark.parametrize("batch, weight_decay, schedule", [
    (None, 0.0, "constant"),          # full batch
    (32, 0.0, "constant"),            # minibatch, the trainer's order on both sides
    (32, 0.05, "inverse_time"),       # with weight decay (weights only) and a schedule
])
def test_in_process_trajectories_equal_torch(method, batch, weight_decay, schedule):
    spec = spec_for(method, batch, weight_decay, schedule)
    result = train_job(spec)
    assert result.metrics[-1].step == STEPS
    np.testing.assert_allclose(result.weights, torch_trajectory(spec), rtol=0, atol=1e-10)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("method", ["adagrad", "rmsprop", "adam"])
def test_ray_sync_two_workers_equal_torch(method):
    spec = spec_for(method, 32, 0.05, "inverse_time", workers=2)
    np.testing.assert_allclose(train_job(spec).weights, torch_trajectory(spec), rtol=0, atol=1e-10)


@pytest.mark.usefixtures("ray_session")
def test_a_lost_parameter_server_restores_adams_moments_and_step(tmp_path):
    """Killed mid-epoch 3: the checkpoint of epoch 2 must carry m, v and t, or the resumed run differs."""
    import ray

    from polyak.service.engine.trainer import CHECKPOINT, Hooks, make_engine, run
    from polyak.workers.data import prepare

    spec = parse_spec({**spec_for("adam", 16, workers=2).model_dump(),
                       "stopping": {"max_epochs": 4, "max_steps": None}})
    undisturbed = train_job(spec)
    info = prepare(spec.data, spec.model)
    engine = make_engine(spec, info, initial_weights(spec))
    calls = {"n": 0}
    pid = ray.get(engine.ps.pid.remote())

    def should_cancel():
        calls["n"] += 1
        if calls["n"] == 2 * 9 + 4:  # 142 training rows / 16 = 9 steps an epoch: step 4 of epoch 3
            ray.kill(engine.ps, no_restart=False)
        return False

    try:
        disturbed = run(spec, info, engine, "t", Hooks(should_cancel=should_cancel, job_dir=tmp_path))
        restarted_pid = ray.get(engine.ps.pid.remote())
    finally:
        engine.close()
    assert restarted_pid != pid  # the kill landed
    assert [m.epoch for m in disturbed.metrics] == [1, 2, 3, 4]
    with np.load(tmp_path / CHECKPOINT) as f:
        assert {"m", "v"} <= set(f.files) and "u" not in f.files
    np.testing.assert_allclose(disturbed.weights, undisturbed.weights, rtol=0, atol=1e-12)


def test_each_method_holds_only_its_own_buffers():
    from polyak.service.engine.ps_core import ServerCore

    for method, names in BUFFERS.items():
        core = ServerCore(spec_for(method, 32) if method in ("adagrad", "rmsprop", "adam")
                          else parse_spec({"optimizer": {"method": method}}), np.zeros(10))
        assert tuple(core.state.buffers) == names
        arrays, _ = core.snapshot()
        assert set(arrays) == {"W", *names}


@pytest.mark.parametrize("field, value, words", [
    ("beta1", 1.0, "optimizer.beta1"), ("beta2", -0.1, "optimizer.beta2"), ("rho", 1.0, "optimizer.rho"),
    ("eps", 0.0, "optimizer.eps"),
])
def test_bad_values_name_the_field(field, value, words):
    with pytest.raises(SpecError) as e:
        parse_spec({"optimizer": {"method": "adam", field: value}})
    assert words in e.value.message


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("method", ["adagrad", "rmsprop", "adam"])
def test_async_mode_trains_with_each_adaptive_rule(method):
    spec = parse_spec({**spec_for(method, 16, workers=2).model_dump(),
                       "cluster": {"num_workers": 2, "mode": "async", "device": "cpu", "dtype": "float64"},
                       "data": {"source": "sklearn", "name": "wine", "standardize": True, "validation_fraction": 0.2},
                       "optimizer": {"method": method, "lr": 0.01}, "stopping": {"max_epochs": 15}})
    result = train_job(spec)
    first, last = result.metrics[0], result.metrics[-1]
    assert last.epoch == 15 and last.staleness_max is not None
    assert last.train_loss < 0.5 * first.train_loss and last.val_accuracy >= 0.85, (first, last)
