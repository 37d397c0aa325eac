"""A sharded parameter server (cluster.num_servers S > 1) takes exactly the step one server takes.

The reference is the in-process loop (one ServerCore over the whole W, itself checked against torch elsewhere):
S cores over key ranges fed the slices of the same gradients must end bit-identical for every rule, with weight
decay cut at range bounds that split a layer's weights from its biases, and their epoch figures must combine to
the one core's. On Ray, sync jobs with S = 1, 2, 3 and K = 2 workers, over both sync paths, must equal the
in-process run to 1e-10 in every epoch's figures; a checkpoint of an S = 2 job resumes in S = 3 and S = 1 jobs;
a killed shard is recovered from the checkpoint. Async sharding is replayed in tests/test_async_replay.py.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import ray
from test_resume import Crash, DiesAtStep

from polyak.contract.errors import SpecError
from polyak.contract.network import param_count
from polyak.contract.spec import parse_spec
from polyak.service.engine import placement
from polyak.service.engine.local_engine import LocalEngine
from polyak.service.engine.optim import RULES
from polyak.service.engine.ps_core import ServerCore, combine_parts, shard_bounds
from polyak.service.engine.sync_engine import SyncRayEngine
from polyak.service.engine.trainer import Hooks, initial_weights, run
from polyak.workers.data import prepare

LAYERS = [4, 8, 3]  # p = 8 * 5 + 3 * 9 = 67: layer 1's weights W[0:32], biases W[32:40]; layer 2's W[40:64], W[64:67]
TIMING = {"job_id", "samples_per_second", "elapsed_seconds"}


def iris_spec(servers: int = 1, workers: int = 2, method: str = "adam", epochs: int = 2):
    return parse_spec({
        "model": {"layers": LAYERS, "activation": "tanh", "seed": 5},
        "data": {"source": "sklearn", "name": "iris", "validation_fraction": 0.2, "standardize": True},
        # a decaying step and weight decay: a shard that decays its biases, or steps with another t, shows
        "optimizer": {"method": method, "lr": 0.05, "alpha": 0.5, "schedule": "inverse_time", "decay_steps": 10,
                      "weight_decay": 0.01},
        "batch": {"size": 16},
        "stopping": {"max_epochs": epochs},
        "cluster": {"num_workers": workers, "num_servers": servers, "device": "cpu", "dtype": "float64"},
    })


def key_ranges(bounds: list[int]) -> list[tuple[int, int]]:
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def comparable(m) -> dict:
    return m.model_dump(mode="json", exclude=TIMING)


def assert_same_epochs(got, want) -> None:
    """Every epoch's figures (losses, grad_avg_norm, grad_noise, lr, norms, criteria) equal to 1e-10."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        g, w = comparable(g), comparable(w)
        assert g.keys() == w.keys()
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=0, abs=1e-10), (w["epoch"], key)
            elif key != "criteria":  # criteria hold the same figures, compared above
                assert g[key] == value, (w["epoch"], key)


def in_process(spec):
    local = parse_spec({**spec.model_dump(), "cluster": {**spec.cluster.model_dump(), "num_workers": 0,
                                                         "num_servers": 1}})
    info = prepare(local.data, local.model)
    return run(local, info, LocalEngine(local, info, initial_weights(local)), "t")


# -- the spec ---------------------------------------------------------------------------------------------------
def spec_error(cluster: dict) -> SpecError:
    with pytest.raises(SpecError) as e:
        parse_spec({"model": {"layers": LAYERS}, "cluster": cluster})
    return e.value


def test_num_servers_is_validated_up_front_in_one_line_naming_the_field():
    assert parse_spec({}).cluster.num_servers == 1
    assert parse_spec({"model": {"layers": LAYERS}, "cluster": {"num_servers": 67}}).cluster.num_servers == 67
    too_many = spec_error({"num_servers": 68})
    assert too_many.errors == [{"field": "cluster.num_servers",
                                "message": "must be <= the model's 67 parameters (one per shard at least), got 68"}]
    assert spec_error({"num_servers": 0}).errors == [{"field": "cluster.num_servers", "message": "must be >= 1, got 0"}]
    in_process_only = spec_error({"num_workers": 0, "num_servers": 2})
    assert [e["field"] for e in in_process_only.errors] == ["cluster.num_servers"]
    assert "num_workers >= 1" in str(in_process_only) and "\n" not in str(in_process_only)


# -- the math, in this process -----------------------------------------------------------------------------------
def test_shard_bounds_cover_w_once_in_near_equal_ranges():
    for p, S in ((67, 1), (67, 2), (67, 3), (67, 67), (10, 4)):
        b = shard_bounds(p, S)
        assert b[0] == 0 and b[-1] == p and len(b) == S + 1
        sizes = np.diff(b)
        assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("method", list(RULES))
def test_shards_over_key_ranges_take_the_step_one_server_takes(method):
    spec = iris_spec(method=method)
    rng = np.random.default_rng(7)
    p = param_count(LAYERS)
    W0 = rng.normal(size=p)
    steps = [[(rng.normal(size=p) * rng.integers(1, 5), float(rng.random()), int(rng.integers(1, 9)))
              for _ in range(2)] for _ in range(4)]
    whole = ServerCore(spec, W0)
    for parts in steps:
        whole.apply_parts(parts)
    figures = whole.end_epoch()
    # [0, 36, 67] cuts layer 1's biases, [0, 5, 40, 67] puts them alone with layer 2's weights
    for bounds in (shard_bounds(p, 2), shard_bounds(p, 3), [0, 36, 67], [0, 5, 40, 67], [0, 32, 40, 64, 67]):
        shards = [ServerCore(spec, W0[lo:hi], key_range=(lo, hi)) for lo, hi in key_ranges(bounds)]
        for parts in steps:
            for core, (lo, hi) in zip(shards, key_ranges(bounds), strict=True):
                core.apply_parts([(g[lo:hi].copy(), loss, n) for g, loss, n in parts])
        np.testing.assert_array_equal(np.concatenate([c.weights() for c in shards]), whole.weights())
        for name in whole.state.buffers:
            np.testing.assert_array_equal(np.concatenate([c.state.buffers[name] for c in shards]),
                                          whole.state.buffers[name])
        combined = combine_parts([c.take_part() for c in shards])
        np.testing.assert_array_equal(combined.step_losses, figures.step_losses)
        assert (combined.step, combined.samples, combined.last_lr) == (figures.step, figures.samples, figures.last_lr)
        assert combined.grad_avg_norm == pytest.approx(figures.grad_avg_norm, rel=1e-12)
        assert combined.grad_noise == pytest.approx(figures.grad_noise, rel=1e-10)


def test_a_non_finite_slice_marks_the_combined_step_as_diverged():
    spec = iris_spec(method="sgd")
    p = param_count(LAYERS)
    bounds = shard_bounds(p, 3)
    shards = [ServerCore(spec, np.zeros(hi - lo), key_range=(lo, hi)) for lo, hi in key_ranges(bounds)]
    for bad in (None, p - 1):  # a finite step, then one whose last coordinate (in shard 3 only) is inf
        g = np.ones(p)
        if bad is not None:
            g[bad] = np.inf
        for core, (lo, hi) in zip(shards, key_ranges(bounds), strict=True):
            core.apply(g[lo:hi].copy(), 3.0, 2)
    parts = [c.take_part() for c in shards]
    assert parts[0].step_losses.tolist() == [1.5, 1.5]  # shard 1 alone saw nothing wrong
    combined = combine_parts(parts)
    assert combined.step_losses[0] == 1.5 and math.isnan(combined.step_losses[1])
    assert not math.isfinite(combined.grad_avg_norm)


def test_shards_are_spread_over_the_alive_nodes_shard_0_on_the_drivers(monkeypatch):
    nodes = [{"NodeID": n, "Alive": alive} for n, alive in (("c", True), ("b", True), ("a", True), ("d", False))]
    monkeypatch.setattr(placement.ray, "nodes", lambda: nodes)
    assert placement.server_nodes("b", 5) == ["b", "a", "c", "b", "a"]
    monkeypatch.setattr(placement.ray, "nodes", lambda: [{"NodeID": "b", "Alive": True}])
    assert placement.server_nodes("b", 3) == ["b", "b", "b"]
    line = placement.describe_nodes("b", ["b", "a", "b"], ["a"], {"a": "10.0.0.1", "b": "10.0.0.2"}, [0, 5, 9, 12])
    assert line == ("parameter server shards 1,3 (W[0:5], W[9:12]) on b (10.0.0.2, the driver), shard 2 (W[5:9]) on "
                    "a (10.0.0.1); worker 1 on a (10.0.0.1)")


# -- on Ray ------------------------------------------------------------------------------------------------------
STEPS_PER_EPOCH = 8  # iris: 120 training rows, batches of 16


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("servers, method, path", [
    (1, "nesterov", "compiled"), (3, "rmsprop", "compiled"), (2, "heavy_ball", "channel"),
])
def test_sharded_sync_equals_the_in_process_loop(servers, method, path):
    spec = iris_spec(servers, method=method)
    info = prepare(spec.data, spec.model)
    engine = SyncRayEngine(spec, info, initial_weights(spec), sync_path=path)
    try:
        assert len(engine.servers) == servers and engine.bounds == shard_bounds(67, servers)
        assert engine.sync_path == path
        ranges = ", ".join(f"W[{lo}:{hi}]" for lo, hi in key_ranges(engine.bounds))
        shards = f"parameter server shards 1-{servers} ({ranges}) on " if servers > 1 else "parameter server on "
        assert shards in engine.describe()
        result = run(spec, info, engine, "t")
    finally:
        engine.close()
    reference = in_process(spec)
    assert_same_epochs(result.metrics, reference.metrics)
    np.testing.assert_allclose(result.weights, reference.weights, rtol=0, atol=1e-10)


@pytest.mark.usefixtures("ray_session")
def test_a_checkpoint_of_two_shards_resumes_in_three_shards_and_in_one(tmp_path):
    """An S = 2 job dies mid-epoch 3; its checkpoint (epoch 2) resumes on Ray with S = 3 and in-process (S = 1),
    and both end as the uninterrupted run: the file holds the whole W and buffers, whatever S wrote it."""
    spec = iris_spec(2, method="adam", epochs=4)
    reference = in_process(spec)
    info = prepare(spec.data, spec.model)
    first = SyncRayEngine(spec, info, initial_weights(spec))
    seen = []
    try:
        assert first.sync_path == "compiled"
        with pytest.raises(Crash):
            run(spec, info, DiesAtStep(first, 2 * STEPS_PER_EPOCH + 3), "t", Hooks(on_epoch=seen.append,
                                                                                  job_dir=tmp_path / "s2"))
    finally:
        first.close()
    assert_same_epochs(seen, reference.metrics[:2])
    shutil.copytree(tmp_path / "s2", tmp_path / "s1")
    three = parse_spec({**spec.model_dump(), "cluster": {**spec.cluster.model_dump(), "num_servers": 3}})
    engine = SyncRayEngine(three, info, initial_weights(three), sync_path="channel")
    try:
        resumed = run(three, info, engine, "t", Hooks(job_dir=tmp_path / "s2"))
    finally:
        engine.close()
    local = parse_spec({**spec.model_dump(), "cluster": {**spec.cluster.model_dump(), "num_workers": 0,
                                                         "num_servers": 1}})
    in_one = run(local, info, LocalEngine(local, info, initial_weights(local)), "t", Hooks(job_dir=tmp_path / "s1"))
    for result in (resumed, in_one):
        assert_same_epochs(result.metrics, reference.metrics[2:])
        np.testing.assert_allclose(result.weights, reference.weights, rtol=0, atol=1e-10)


@pytest.mark.usefixtures("ray_session")
def test_a_killed_server_shard_is_recovered_from_the_checkpoint_with_a_new_incarnation(tmp_path):
    spec = iris_spec(2, method="adam", epochs=4)
    info = prepare(spec.data, spec.model)
    engine = SyncRayEngine(spec, info, initial_weights(spec))
    calls, pids = {"n": 0}, []

    def should_cancel():
        calls["n"] += 1
        if calls["n"] == 2 * STEPS_PER_EPOCH + 3:  # mid-epoch 3: the checkpoint holds epoch 2
            pids.append(ray.get(engine.servers[1].pid.remote()))
            ray.kill(engine.servers[1], no_restart=False)
        return False

    try:
        incarnation = engine.incarnation
        result = run(spec, info, engine, "t", Hooks(should_cancel=should_cancel, job_dir=tmp_path))
        pids.append(ray.get(engine.servers[1].pid.remote()))
    finally:
        engine.close()
    assert pids[0] != pids[1] and engine.server_recoveries == 1  # the kill landed, and was survived
    assert engine.incarnation[0] == incarnation[0] and engine.incarnation[1] != incarnation[1]
    reference = in_process(spec)
    assert_same_epochs(result.metrics, reference.metrics)
    np.testing.assert_allclose(result.weights, reference.weights, rtol=0, atol=1e-10)
