"""The Ray runtime: sync equals the in-process loop, async converges, faults are survived."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import numpy as np
import pytest
import ray
from ray.exceptions import RayActorError

from polyak.contract.spec import parse_spec
from polyak.contract.wire import EpochMetrics, JobState, StopReason
from polyak.service.engine import sync_engine
from polyak.service.engine.async_engine import AsyncRayEngine
from polyak.service.engine.checkpoint import load_checkpoint
from polyak.service.engine.placement import choose_sync_path, describe_nodes, worker_options
from polyak.service.engine.sync_engine import SyncRayEngine
from polyak.service.engine.trainer import CHECKPOINT, Hooks, TrainResult, initial_weights, make_engine, run
from polyak.workers.data import load_dataset, prepare
from polyak.workers.gradient_worker import GradientWorker

pytestmark = pytest.mark.usefixtures("ray_session")


def digits_spec(**overrides):
    spec = {
        "model": {"layers": [64, 32, 10], "seed": 3},
        "data": {"source": "sklearn", "name": "digits", "validation_fraction": 0.2, "standardize": True},
        "optimizer": {"method": "heavy_ball", "lr": 0.5, "alpha": 0.2},
        "batch": {"size": 100},
        "stopping": {"max_epochs": 3},
        "cluster": {"num_workers": 2, "device": "cpu", "dtype": "float64"},
    }
    for path, value in overrides.items():
        section, key = path.split(".")
        spec[section][key] = value
    return parse_spec(spec)


def train(spec, hooks=None, engine_hook=None):
    info = prepare(spec.data, spec.model)
    engine = make_engine(spec, info, initial_weights(spec))
    try:
        if engine_hook:
            hooks = engine_hook(engine)
        return run(spec, info, engine, "t", hooks)
    finally:
        engine.close()


@dataclass
class Run:
    """An undisturbed run and what its engine showed on the way: where its steps went, W after each epoch."""

    result: TrainResult | None = None
    described: str = ""
    compiled: bool = False
    epoch_weights: list = field(default_factory=list)


@pytest.fixture(scope="module")
def undisturbed():
    """undisturbed(**overrides) -> the Run of digits_spec(**overrides), trained once per module: several tests
    compare with the same undisturbed run, and each Ray run pays seconds of actor start-up and graph compiling."""
    runs: dict[tuple, Run] = {}

    def record(out: Run):
        def hook(engine):
            out.described = engine.describe()
            out.compiled = getattr(engine, "graph", None) is not None
            return Hooks(on_epoch=lambda m: out.epoch_weights.append(engine.weights().copy()))

        return hook

    def get(**overrides) -> Run:
        key = tuple(sorted(overrides.items()))
        if key not in runs:
            out = Run()
            out.result = train(digits_spec(**overrides), engine_hook=record(out))
            runs[key] = out
        return runs[key]

    return get


def test_sync_is_deterministic_and_equals_the_in_process_loop(undisturbed):
    local = undisturbed(**{"cluster.num_workers": 0}).result
    one = train(digits_spec(**{"cluster.num_workers": 1}))
    two = undisturbed().result
    again = train(digits_spec())  # a second run of its own: determinism is across runs
    np.testing.assert_array_equal(two.weights, again.weights)  # same spec and seed -> identical weights
    np.testing.assert_allclose(one.weights, local.weights, rtol=0, atol=1e-10)
    np.testing.assert_allclose(two.weights, local.weights, rtol=0, atol=1e-10)
    for a, b in zip(local.metrics, two.metrics, strict=True):
        assert a.step == b.step and a.samples_seen == b.samples_seen
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-12)
        assert a.grad_noise == pytest.approx(b.grad_noise, rel=1e-8)


def full_batch(k: int, runs) -> Run:
    """Full-batch GD on k workers for 6 epochs: one step an epoch."""
    return runs(**{"cluster.num_workers": k, "batch.size": None, "stopping.max_epochs": 6})


def test_full_batch_gd_trajectory_is_the_same_for_one_and_two_workers(undisturbed):
    per_epoch = {}
    for k in (1, 2):
        result = full_batch(k, undisturbed).result
        per_epoch[k] = [(m.train_loss, m.weight_norm) for m in result.metrics]
        assert [m.step for m in result.metrics] == [1, 2, 3, 4, 5, 6]  # full batch: one step per epoch
        assert all(m.batch_size == 1438 for m in result.metrics)
    np.testing.assert_allclose(per_epoch[1], per_epoch[2], rtol=1e-12)


def test_the_update_is_an_average_not_a_sum_of_worker_gradients(undisturbed):
    """If the server summed the K parts, K=2 would take twice the step of K=1 from the same W0."""
    w0 = initial_weights(digits_spec(**{"batch.size": None}))
    d1 = np.linalg.norm(full_batch(1, undisturbed).epoch_weights[0] - w0)  # after the first (full-batch) step
    d2 = np.linalg.norm(full_batch(2, undisturbed).epoch_weights[0] - w0)
    assert d2 == pytest.approx(d1, rel=1e-10)


def test_metrics_carry_every_field_of_the_design(replay, torch_ref):
    """Each figure of the last epoch against the torch replay of the same 45 steps (MATH.md's definitions)."""
    spec = digits_spec(**{"stopping.weight_change_tol": 1e-9})
    seen: list[EpochMetrics] = []
    result = train(spec, Hooks(on_epoch=seen.append))
    assert result.state == JobState.SUCCEEDED and result.stop_reason == StopReason.MAX_EPOCHS
    assert [m.epoch for m in seen] == [1, 2, 3]
    m = seen[-1]
    assert m.job_id == "t" and m.step == 3 * 15 and m.samples_seen == 3 * 1438 and m.batch_size == 100
    assert m.lr == 0.5
    ds = load_dataset(spec.data, spec.model)
    ref = replay(spec, ds, 45)
    np.testing.assert_allclose(result.weights, ref["W"], rtol=0, atol=1e-10)
    g = np.array(ref["grads"][30:45])  # epoch 3's steps
    g_bar = g.mean(axis=0)
    assert m.train_loss == pytest.approx(ref["losses"][30:45].mean(), rel=1e-10)
    assert m.grad_avg_norm == pytest.approx(np.linalg.norm(g_bar), rel=1e-9)
    assert m.grad_noise == pytest.approx(np.sqrt(np.mean(np.sum((g - g_bar) ** 2, axis=1))), rel=1e-6)
    W_before, W = ref["weights"][30], ref["weights"][45]
    assert m.weight_norm == pytest.approx(np.linalg.norm(W), rel=1e-10)
    assert m.weight_change == pytest.approx(np.linalg.norm(W - W_before) / np.linalg.norm(W_before), rel=1e-8)
    layers, model = spec.model.layers, spec.model
    assert m.val_loss == pytest.approx(
        torch_ref.mean_loss(layers, model.activation, model.loss, W, ds.X_val, ds.y_val), rel=1e-9)
    with torch_ref.torch.no_grad():
        out = torch_ref.model(layers, model.activation, W)(torch_ref.torch.from_numpy(ds.X_val)).numpy()
    assert m.val_accuracy == np.mean(out.argmax(axis=1) == ds.y_val)
    # The rate is this epoch's samples over this epoch's seconds, the same seconds elapsed_seconds adds up.
    assert m.samples_per_second * (m.elapsed_seconds - seen[1].elapsed_seconds) == pytest.approx(1438, rel=1e-9)
    assert 0 < seen[0].elapsed_seconds < seen[1].elapsed_seconds < m.elapsed_seconds
    assert m.staleness_mean is None and m.staleness_max is None  # sync steps are never stale
    assert [c.name for c in m.criteria] == ["weight_change", "max_epochs"]
    assert m.criteria[1].value == 3 and m.criteria[1].threshold == 3 and m.criteria[1].met
    assert m.stop == StopReason.MAX_EPOCHS


def test_async_converges_on_digits_and_reports_staleness():
    result = train(digits_spec(**{"cluster.mode": "async", "stopping.max_epochs": 8, "batch.size": 50}))
    assert result.state == JobState.SUCCEEDED
    last = result.metrics[-1]
    assert last.val_accuracy >= 0.9
    assert last.staleness_mean is not None and 0 <= last.staleness_mean <= last.staleness_max <= 4
    # every row of both shards is used once per epoch: t' = ceil(719/50) + ceil(719/50)
    assert [m.step for m in result.metrics][:2] == [15 + 15, 30 + 30]


def test_async_drops_gradients_older_than_max_staleness():
    result = train(digits_spec(**{"cluster.mode": "async", "cluster.max_staleness": 0, "batch.size": 20,
                                  "stopping.max_epochs": 2}))
    assert result.state == JobState.SUCCEEDED
    assert all(m.staleness_max == 0 for m in result.metrics)  # nothing older than 0 versions was applied
    assert sum(m.dropped_gradients for m in result.metrics) > 0  # two workers race: some pushes were stale
    assert result.metrics[-1].step == 2 * (36 + 36)  # dropped batches were recomputed, none lost


def killer(at_step: int, target):
    """A should_cancel hook that kills an actor of the engine just before the given step. It keeps the evidence
    that the kill landed: the actor's pid before the kill and after each later epoch, the engine itself."""

    def hook(engine):
        calls = {"n": 0}
        hook.engine, hook.incarnation, hook.pids = engine, engine.incarnation, []

        def should_cancel():
            calls["n"] += 1
            if calls["n"] == at_step:
                hook.pids.append(ray.get(target(engine).pid.remote()))
                ray.kill(target(engine), no_restart=False)
            return False

        def on_epoch(m):
            if hook.pids:
                hook.pids.append(ray.get(target(engine).pid.remote()))

        return Hooks(should_cancel=should_cancel, on_epoch=on_epoch, job_dir=hook.job_dir)

    return hook


def test_a_killed_worker_is_restarted_and_sync_weights_equal_an_undisturbed_run(tmp_path, undisturbed):
    spec = digits_spec(**{"stopping.max_epochs": 4})
    reference = undisturbed(**{"stopping.max_epochs": 4}).result
    hook = killer(at_step=20, target=lambda e: e.workers[1])
    hook.job_dir = tmp_path
    disturbed = train(spec, engine_hook=hook)
    assert disturbed.state == JobState.SUCCEEDED and len(disturbed.metrics) == 4
    assert len(hook.pids) == 4 and hook.pids[0] != hook.pids[1] == hook.pids[-1]  # one new process, kept
    assert hook.engine.worker_restarts == 1 and hook.engine.server_recoveries == 0
    np.testing.assert_array_equal(disturbed.weights, reference.weights)


def test_a_worker_failure_past_the_repair_budget_fails_the_job_in_one_line_and_keeps_the_checkpoint(
        tmp_path, monkeypatch):
    """The repair's give-up is a ClusterFault: the trainer's fatal path, not an exception out of the job."""
    monkeypatch.setattr(sync_engine, "MAX_REPAIRS_PER_EPOCH", 0)  # the first lost worker is one too many
    spec = digits_spec(**{"stopping.max_epochs": 4})
    hook = killer(at_step=20, target=lambda e: e.workers[1])  # step 5 of epoch 2 (15 steps an epoch)
    hook.job_dir = tmp_path
    result = train(spec, engine_hook=hook)
    assert result.state == JobState.FAILED and result.stop_reason == StopReason.ERROR
    assert result.error == ("gave up after 1 gradient worker failure(s) in one epoch (at most 0 are repaired) "
                            "(during epoch 2; weights and checkpoint of epoch 1 kept)")
    assert [m.epoch for m in result.metrics] == [1]
    arrays, meta = load_checkpoint(tmp_path / CHECKPOINT)
    assert meta["epoch"] == 1 and meta["step"] == 15
    np.testing.assert_array_equal(result.weights, arrays["W"])  # the job's weights are its last epoch's


def test_a_lost_parameter_server_is_restored_from_the_checkpoint(tmp_path, undisturbed):
    spec = digits_spec(**{"stopping.max_epochs": 4})
    reference = undisturbed(**{"stopping.max_epochs": 4}).result
    hook = killer(at_step=40, target=lambda e: e.ps)  # mid-epoch 3: the checkpoint holds epoch 2
    hook.job_dir = tmp_path
    disturbed = train(spec, engine_hook=hook)
    assert disturbed.state == JobState.SUCCEEDED
    assert [m.epoch for m in disturbed.metrics] == [1, 2, 3, 4]
    assert len(hook.pids) == 3 and hook.pids[0] != hook.pids[1] == hook.pids[-1]  # one new process, kept
    assert hook.engine.incarnation != hook.incarnation and hook.engine.server_recoveries == 1
    assert (tmp_path / CHECKPOINT).exists()
    np.testing.assert_allclose(disturbed.weights, reference.weights, rtol=0, atol=1e-12)


def test_async_goes_on_after_a_worker_is_killed_between_epochs(tmp_path):
    """Killed while idle, it restarts before its next pass; tests/test_async_replay.py kills one mid-pass."""
    spec = digits_spec(**{"cluster.mode": "async", "stopping.max_epochs": 3, "batch.size": 50})
    pids = []

    def hook(engine):
        def on_epoch(m):
            pids.append(ray.get(engine.workers[0].pid.remote()))
            if m.epoch == 1:
                ray.kill(engine.workers[0], no_restart=False)

        return Hooks(on_epoch=on_epoch, job_dir=tmp_path)

    result = train(spec, engine_hook=hook)
    assert result.state == JobState.SUCCEEDED and [m.epoch for m in result.metrics] == [1, 2, 3]
    assert pids[0] != pids[1] == pids[2]  # the kill landed: a new process held shard 1 for epochs 2 and 3
    assert result.metrics[-1].step == 3 * 30


def test_cancel_takes_effect_at_the_next_step_and_keeps_the_last_weights():
    calls = {"n": 0}

    def should_cancel():
        calls["n"] += 1
        return calls["n"] > 20  # 15 steps of epoch 1, then 5 of epoch 2

    result = train(digits_spec(**{"stopping.max_epochs": 10}), Hooks(should_cancel=should_cancel))
    assert result.state == JobState.CANCELLED and result.stop_reason == StopReason.CANCELLED
    assert [m.step for m in result.metrics] == [15, 20]
    assert result.metrics[-1].stop == StopReason.CANCELLED
    reference = train(digits_spec(**{"stopping.max_steps": 20, "cluster.num_workers": 0}))
    np.testing.assert_allclose(result.weights, reference.weights, rtol=0, atol=1e-10)


def test_engines_are_chosen_by_the_spec():
    info = prepare(digits_spec().data, digits_spec().model)
    for mode, cls in (("sync", SyncRayEngine), ("async", AsyncRayEngine)):
        spec = digits_spec(**{"cluster.mode": mode, "cluster.num_workers": 1})
        engine = make_engine(spec, info, initial_weights(spec))
        try:
            assert isinstance(engine, cls)
            worker = engine.worker_info[0]
            assert (worker["rows"], worker["val_rows"], worker["shard"]) == (1438, 359, 0)
            assert worker["node"] == engine.driver_node and worker["device"].startswith("cpu")
        finally:
            engine.close()


def test_more_workers_than_cpus_is_a_clear_error():
    spec = digits_spec(**{"cluster.num_workers": 64})
    with pytest.raises(ValueError, match=r"cluster.num_workers = 64 needs 64 CPUs but the Ray cluster has 2"):
        train(spec)


def test_gpu_without_gpus_is_a_clear_error():
    spec = digits_spec(**{"cluster.device": "gpu"})
    with pytest.raises(ValueError, match=r"cluster.device: gpu needs 2 GPU\(s\).*has 0"):
        train(spec)


def test_the_sync_path_follows_the_placement():
    assert choose_sync_path("a", ["a"], ["a", "a"])[0] == "compiled"
    assert choose_sync_path("a", ["a"], ["a", "b"]) == ("channel", "one part per node over TCP; the job spans 2 nodes")
    assert choose_sync_path("a", ["b"], ["b"])[0] == "channel"  # the driver elsewhere: no shared memory
    assert choose_sync_path("a", ["a", "b"], ["a", "a"])[0] == "channel"  # a server shard on another node
    line = describe_nodes("aaaaaaaa1", ["aaaaaaaa1"], ["aaaaaaaa1", "bbbbbbbb2", "bbbbbbbb2"],
                          {"aaaaaaaa1": "10.0.0.1", "bbbbbbbb2": "10.0.0.2"})
    assert line == ("parameter server on aaaaaaaa (10.0.0.1, the driver); worker 1 on aaaaaaaa (10.0.0.1, the driver), "
                    "workers 2,3 on bbbbbbbb (10.0.0.2)")


def test_validation_on_the_workers_equals_a_whole_set_evaluation(undisturbed):
    """Each worker evaluates its slice of the validation rows; the sums equal one evaluation of all of them."""
    from polyak.workers.mlp import MLP

    spec = digits_spec()  # two workers
    whole = load_dataset(spec.data, spec.model)
    result = undisturbed().result
    seen = result.metrics  # what on_epoch was given, epoch by epoch
    mlp = MLP(spec.model.layers, spec.model.activation, spec.model.loss, np, np.float64)
    loss_sum, correct, n = mlp.evaluate(result.weights, whole.X_val, whole.y_val)
    assert n == 359
    assert seen[-1].val_loss == pytest.approx(loss_sum / n, rel=1e-12)
    assert seen[-1].val_accuracy == correct / n


def test_a_worker_dead_in_rays_own_call_restarts_without_running_it_again_but_reruns_its_own_method():
    """A compiled graph runs its loop on a worker in Ray's ``__ray_call__``. Run again on the restarted worker, the
    loop read channels that had died with the old process, Ray aborted the process, restarted it and ran the loop
    again, for ever, while the graph's teardown waited for it (a parameter server lost while a graph started hung
    the job so). Now that call fails once; the worker's own call queued behind it runs on the new process."""
    spec = digits_spec(**{"cluster.num_workers": 1})
    info = prepare(spec.data, spec.model)
    options = worker_options(ray.get_runtime_context().get_node_id(), "cpu")
    worker = ray.remote(GradientWorker).options(**options).remote(spec.model_dump_json(), 0, 1, info.stats)

    def die(actor) -> None:  # local: pickled by value, as the worker cannot import this module
        os.kill(os.getpid(), signal.SIGKILL)

    try:
        first = ray.get(worker.pid.remote(), timeout=60)
        dies, queued = worker.__ray_call__.remote(die), worker.pid.remote()
        with pytest.raises(RayActorError):
            ray.get(dies, timeout=60)  # before: retried on every restart, it never ended (GetTimeoutError here)
        assert ray.get(queued, timeout=60) != first
        assert ray.get(worker.pid.remote(), timeout=60) == ray.get(queued)  # one restart, not a loop of them
    finally:
        ray.kill(worker, no_restart=True)
