"""Async mode replayed: the parameter server's trace of a run on Ray, re-run in NumPy float64 from W0.

Each applied update is recomputed independently — the torch gradient of its rows at the W of the version it
was read at (the replay keeps every version it produced), MATH.md's step size and update rule — and the
replayed weights must equal the job's to 1e-12. The rows applied per epoch must be each training row once.
With a sharded server (S = 2) each shard's updates chain on their own: an update of shard s was computed at the
W its read versions of every shard make up, and steps shard s's key range with shard s's step size; each shard
applies each training row once per epoch.
Faults are injected by a gate between the workers and the server at an exact push, so each test knows the
fault happened mid-epoch, and asserts the evidence (pids, the engine's counters, the trace's joins).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest
import ray

from polyak.contract.spec import parse_spec
from polyak.contract.wire import JobState, StopReason
from polyak.service.engine.async_engine import AsyncRayEngine
from polyak.service.engine.parameter_server import Join, Restore, Stop, Update
from polyak.service.engine.ps_core import shard_bounds
from polyak.service.engine.trainer import CHECKPOINT, Hooks, initial_weights, run
from polyak.workers.data import load_dataset, prepare
from polyak.workers.gradient_worker import APPLIED

pytestmark = pytest.mark.usefixtures("ray_session")

BATCH = 8
ROWS_PER_SHARD = 60  # iris: 150 rows, 30 held out, two shards of 60
BATCHES_PER_SHARD = -(-ROWS_PER_SHARD // BATCH)  # 8: seven of 8 rows and one of 4
STEPS_PER_EPOCH = 2 * BATCHES_PER_SHARD


def iris_spec(max_staleness=4, servers=1, **stopping):
    return parse_spec({
        "model": {"layers": [4, 8, 3], "activation": "tanh", "seed": 5},
        "data": {"source": "sklearn", "name": "iris", "validation_fraction": 0.2, "standardize": True},
        # Momentum, a decaying step and weight decay: a misordered, mis-scaled or mis-timed update shows.
        "optimizer": {"method": "heavy_ball", "lr": 0.3, "alpha": 0.5, "schedule": "inverse_time",
                      "decay_steps": 20, "weight_decay": 1e-3},
        "batch": {"size": BATCH},
        "stopping": {"max_epochs": 3, **stopping},
        "cluster": {"num_workers": 2, "mode": "async", "max_staleness": max_staleness,
                    "dtype": "float64", "num_servers": servers},
    })


# -- the replay ----------------------------------------------------------------------------------------------
def eta(opt, t: int) -> float:
    if opt.schedule == "inverse_time":
        return opt.lr / (1 + t / opt.decay_steps)
    assert opt.schedule == "constant"
    return opt.lr


def replay(spec, torch_ref, trace) -> tuple[np.ndarray, list[list[Update]]]:
    """(W after the last update, per server shard the updates of the trajectory that W is the end of) from the
    trace alone.

    A Restore puts every shard back at a version it produced earlier (or W0): the updates after it are then off
    the trajectory, and later updates produce those versions again. Between Restores each shard's updates are
    replayed in its own order, an update once every shard has produced the versions it was read at."""
    model = spec.model
    ds = load_dataset(spec.data, spec.model)
    weights_only = np.concatenate([np.r_[np.ones(o * i), np.zeros(o)]
                                   for i, o in zip(model.layers[:-1], model.layers[1:], strict=True)])
    W0 = initial_weights(spec).astype(np.float64)
    bounds = shard_bounds(W0.size, spec.cluster.num_servers)
    ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
    # per shard: version -> (W, u, the updates that led there), of its key range
    history = [{0: (W0[lo:hi], np.zeros(hi - lo), [])} for lo, hi in ranges]
    at = [0] * len(ranges)  # the version each shard's replay stands at
    for segment in restored_segments(trace):
        at = [segment[0].version] * len(ranges)
        pending = [[r for r in segment[1:] if r.server == s] for s in range(len(ranges))]
        while any(pending):
            ready = [s for s, queue in enumerate(pending)
                     if queue and all(v <= at[r] for r, v in enumerate(queue[0].read_versions))]
            assert ready, "no update's read versions were ever produced"
            for s in ready:
                rec = pending[s].pop(0)
                assert rec.version == at[s] + 1, "updates must chain version by version"
                W_read = np.concatenate([history[r][v][0] for r, v in enumerate(rec.read_versions)])
                history[s][rec.version] = replay_update(spec, torch_ref, ds, rec, W_read, history[s][at[s]],
                                                        ranges[s], weights_only)
                at[s] = rec.version
    W = np.concatenate([history[s][v][0] for s, v in enumerate(at)])
    return W, [history[s][v][2] for s, v in enumerate(at)]


def restored_segments(trace) -> list[list]:
    """The trace cut at each Restore: [Restore, the updates after it]."""
    segments: list[list] = []
    for rec in trace:
        if isinstance(rec, Restore):
            segments.append([rec])
        elif isinstance(rec, Update):
            segments[-1].append(rec)
    return segments


def replay_update(spec, torch_ref, ds, rec: Update, W_read, state, key_range, weights_only):
    """The (W, u, path) of one shard after ``rec``, from its (W, u, path) before it: MATH.md's heavy ball."""
    model, opt = spec.model, spec.optimizer
    W, u, path = state
    lo, hi = key_range
    version = rec.version - 1
    assert rec.step == version
    assert rec.read_versions[rec.server] == rec.read_version
    assert 0 <= version - rec.read_version <= spec.cluster.max_staleness
    assert rec.count == len(rec.rows)
    _, g = torch_ref.loss_and_grad(model.layers, model.activation, model.loss, W_read,
                                   ds.X_train[rec.rows], ds.y_train[rec.rows])
    g = g[lo:hi] + opt.weight_decay * weights_only[lo:hi] * W  # MATH.md: the server adds decay with its own W
    step = eta(opt, version)
    assert rec.lr == pytest.approx(step, rel=1e-15)
    u = (1 - opt.alpha) * u - opt.alpha * step * g
    return W + u, u, [*path, rec]


def rows_by_epoch(path: list[Update]) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for rec in path:
        out.setdefault(rec.epoch, Counter()).update(rec.rows.tolist())
    return out


def assert_each_row_once_per_epoch(path: list[Update], epochs: int) -> None:
    every_row = Counter(range(2 * ROWS_PER_SHARD))
    per_epoch = rows_by_epoch(path)
    assert sorted(per_epoch) == list(range(epochs))
    for epoch, rows in per_epoch.items():
        assert rows == every_row, f"epoch {epoch}: rows twice {[r for r, c in rows.items() if c > 1]}, " \
                                  f"lost {sorted(set(every_row) - set(rows))}"


# -- running a job, with a fault at an exact push --------------------------------------------------------------
@ray.remote(num_cpus=0, max_concurrency=8)
class Gate:
    """Between the workers and the server: forwards every call, and once ``shard`` has had ``after`` pushes
    applied (counted over the whole run) does ``fault`` at its next push:

    kill_worker  -- forward it, then kill the worker before it hears the answer (applied, unacknowledged)
    kill_server  -- forward it, then kill the parameter server
    orphan_w     -- forward it, kill the parameter server and answer once it has restarted: the W the answer refers
                    to died with the server that owned it
    hold         -- hold it, and every later push of any shard, until ``release()`` (the test cancels meanwhile)
    late         -- kill the worker first, and forward its push only after the restarted worker has joined
    """

    def __init__(self, ps, worker, shard: int, after: int, fault: str):
        self.ps, self.worker, self.shard, self.after, self.fault = ps, worker, shard, after, fault
        self.applied = 0
        self.fired = False
        self.released = threading.Event()
        self.rejoined = threading.Event()
        self.joins = 0

    def join_epoch(self, shard):
        answer = ray.get(self.ps.join_epoch.remote(shard))
        if shard == self.shard:
            self.joins += 1
            if self.fired:
                self.rejoined.set()
        return answer

    def push(self, *args):
        shard = args[4]
        due = shard == self.shard and not self.fired and self.applied == self.after
        if self.fault == "hold" and (due or self.fired):
            self.fired = True
            assert self.released.wait(60), "the test never released the held pushes"
        elif due and self.fault == "late":
            self.fired = True
            ray.kill(self.worker, no_restart=False)
            assert self.rejoined.wait(60), "the killed worker never came back"
        answer = ray.get(self.ps.push.remote(*args))
        if shard == self.shard and answer[0] == APPLIED:
            self.applied += 1
            if due and self.fault in ("kill_worker", "kill_server", "orphan_w"):
                self.fired = True
                old = ray.get(self.ps.ping.remote())
                ray.kill(self.worker if self.fault == "kill_worker" else self.ps, no_restart=False)
                while self.fault == "orphan_w" and self.incarnation() in (None, old):
                    time.sleep(0.05)
        return answer

    def incarnation(self):
        try:
            return ray.get(self.ps.ping.remote())
        except ray.exceptions.RayActorError:
            return None

    def release(self):
        self.released.set()

    def fired_at(self):
        return self.fired, self.joins


class GatedEngine(AsyncRayEngine):
    gate = None
    gated = 0  # the server shard the gate stands before

    def pushes_to(self):
        servers = list(self.servers)
        if self.gate is not None:
            servers[self.gated] = self.gate
        return servers


def train_async(spec, fault=None, after=0, hooks=None, tmp_path=None, server=0):
    """(result, trace, engine facts) of an async run with trace=True; ``fault`` as Gate's, on shard 0's pushes to
    server shard ``server``."""
    info = prepare(spec.data, spec.model)
    engine = GatedEngine(spec, info, initial_weights(spec), trace=True)
    try:
        gated = engine.servers[server]
        pids = {"worker": ray.get(engine.workers[0].pid.remote()), "server": ray.get(gated.pid.remote())}
        incarnation = engine.incarnation
        if fault:
            engine.gate, engine.gated = Gate.remote(gated, engine.workers[0], 0, after, fault), server
        hooks = hooks(engine) if hooks else Hooks(job_dir=tmp_path)
        result = run(spec, info, engine, "t", hooks)
        facts = {
            "worker_pid_changed": ray.get(engine.workers[0].pid.remote()) != pids["worker"],
            "server_pid_changed": ray.get(gated.pid.remote()) != pids["server"],
            "incarnation_changed": engine.incarnation != incarnation,
            "worker_restarts": engine.worker_restarts,
            "server_recoveries": engine.server_recoveries,
            "server_W": np.concatenate(ray.get([s.current.remote(None) for s in engine.servers])),
            "gate": ray.get(engine.gate.fired_at.remote()) if fault else None,
        }
        return result, engine.trace, facts
    finally:
        engine.close()
        if engine.gate is not None:
            ray.kill(engine.gate)


def answer(method):
    """The actor's answer, None while it is down or restarting."""
    try:
        return ray.get(method.remote())
    except ray.exceptions.RayActorError:
        return None


def updates(trace) -> list[Update]:
    return [r for r in trace if isinstance(r, Update)]


def joins(trace, shard: int) -> list[Join]:
    return [r for r in trace if isinstance(r, Join) and r.shard == shard]


# -- the tests -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("servers", [1, 2])
def test_an_async_run_replays_exactly_from_its_trace(torch_ref, servers):
    spec = iris_spec(servers=servers)
    result, trace, facts = train_async(spec)
    assert result.state == JobState.SUCCEEDED
    assert [m.step for m in result.metrics] == [STEPS_PER_EPOCH * e for e in (1, 2, 3)]
    W, paths = replay(spec, torch_ref, trace)
    np.testing.assert_allclose(W, result.weights, rtol=0, atol=1e-12)
    assert len(updates(trace)) == servers * 3 * STEPS_PER_EPOCH
    for path in paths:  # every shard applied each batch once, so each row once per epoch
        assert len(path) == 3 * STEPS_PER_EPOCH
        assert_each_row_once_per_epoch(path, 3)
        # The workers really raced: some gradients were applied to weights newer than they were computed at.
        assert any(r.version - 1 > r.read_version for r in path)
    assert facts["worker_restarts"] == 0 and all(j.skipped == 0 for j in joins(trace, 0) + joins(trace, 1))


@pytest.mark.parametrize("servers", [1, 2])
def test_max_steps_in_async_applies_exactly_that_many_updates(torch_ref, servers):
    spec = iris_spec(max_steps=STEPS_PER_EPOCH + 5, servers=servers)
    result, trace, _ = train_async(spec)
    assert result.state == JobState.SUCCEEDED and result.stop_reason == StopReason.MAX_STEPS
    assert [m.step for m in result.metrics] == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 5]
    assert len(updates(trace)) == servers * (STEPS_PER_EPOCH + 5)  # each shard its budget
    W, paths = replay(spec, torch_ref, trace)
    np.testing.assert_allclose(W, result.weights, rtol=0, atol=1e-12)
    for path in paths:
        epoch_1 = rows_by_epoch(path)[1]
        assert sum(epoch_1.values()) == len(set(epoch_1)) > 0  # the cut epoch applied no row twice


def test_cancel_mid_epoch_stops_within_one_push_per_worker_and_keeps_the_last_weights(torch_ref):
    """From shard 0's 4th push of epoch 2 on, every push is held until the cancel: the epoch is surely under
    way, and the version at the cancel request is exact."""
    spec = iris_spec(max_epochs=10)
    at_cancel = {}

    def hooks(engine):
        def should_cancel():
            if not ray.get(engine.gate.fired_at.remote())[0]:
                return False
            at_cancel["version"] = ray.get(engine.ps.step_count.remote())
            engine.gate.release.remote()
            return True

        return Hooks(should_cancel=should_cancel)

    result, trace, facts = train_async(spec, "hold", after=BATCHES_PER_SHARD + 3, hooks=hooks)
    assert result.state == JobState.CANCELLED and result.stop_reason == StopReason.CANCELLED
    assert facts["gate"][0]  # the push was held: the cancel came mid-epoch
    [stop] = [r for r in trace if isinstance(r, Stop)]
    assert not [r for r in updates(trace) if r.version > stop.version]  # nothing applied once it arrived
    assert STEPS_PER_EPOCH + 3 <= at_cancel["version"] < 2 * STEPS_PER_EPOCH
    assert result.metrics[-1].step - at_cancel["version"] <= 2  # one push per worker at most
    assert result.metrics[-1].step == len(updates(trace)) < 2 * STEPS_PER_EPOCH
    np.testing.assert_array_equal(result.weights, facts["server_W"])  # the last version, nothing rolled back
    W, (path,) = replay(spec, torch_ref, trace)
    np.testing.assert_allclose(W, result.weights, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fault", ["kill_worker", "late"])
def test_a_worker_killed_mid_epoch_resumes_after_exactly_the_applied_batches(torch_ref, fault):
    """kill_worker: killed after its 4th push of epoch 2 was applied, before it heard so: the restart skips 4.
    late: killed before its 4th push reached the server, which arrives after the restart joined: the server
    turns it away, and the restart (which skipped 3) pushes that batch once. Staleness is allowed up to 50
    versions, so that staleness alone cannot be what turns the late push away."""
    spec = iris_spec(max_staleness=50)
    result, trace, facts = train_async(spec, fault, after=BATCHES_PER_SHARD + 3)
    assert result.state == JobState.SUCCEEDED
    assert facts["gate"] == (True, 4)  # three epochs' joins and the restart's
    assert facts["worker_pid_changed"] and facts["worker_restarts"] == 1
    skipped = 4 if fault == "kill_worker" else 3
    assert [(j.epoch, j.skipped) for j in joins(trace, 0)] == [(0, 0), (1, 0), (1, skipped), (2, 0)]
    assert [m.step for m in result.metrics] == [STEPS_PER_EPOCH * e for e in (1, 2, 3)]
    W, (path,) = replay(spec, torch_ref, trace)
    np.testing.assert_allclose(W, result.weights, rtol=0, atol=1e-12)
    assert_each_row_once_per_epoch(path, 3)


@pytest.mark.parametrize("servers, killed, fault", [(1, 0, "kill_server"), (2, 1, "kill_server"),
                                                    (1, 0, "orphan_w")])
def test_a_parameter_server_lost_mid_epoch_is_restored_from_the_checkpoint(torch_ref, tmp_path, servers, killed,
                                                                          fault):
    """Killed (server shard ``killed``) after shard 0's 4th update of epoch 2: the run goes back to epoch 1's
    checkpoint and redoes 2. orphan_w: the worker then reads a W whose owner, the old server, is gone (Ray's
    OwnerDiedError inside its pass; a two-node chaos run failed a job on it)."""
    spec = iris_spec(servers=servers)
    result, trace, facts = train_async(spec, fault, after=BATCHES_PER_SHARD + 3, tmp_path=tmp_path, server=killed)
    assert result.state == JobState.SUCCEEDED and [m.epoch for m in result.metrics] == [1, 2, 3]
    assert facts["gate"][0] and facts["server_pid_changed"] and facts["incarnation_changed"]
    assert facts["server_recoveries"] == 1
    # W0 at construction; W0 again when recovered; then the checkpoint of epoch 1.
    assert [r.version for r in trace if isinstance(r, Restore)] == [0, 0, STEPS_PER_EPOCH]
    assert (tmp_path / CHECKPOINT).exists()
    W, paths = replay(spec, torch_ref, trace)
    np.testing.assert_allclose(W, result.weights, rtol=0, atol=1e-12)
    for path in paths:
        assert len(path) == result.metrics[-1].step == 3 * STEPS_PER_EPOCH
        assert_each_row_once_per_epoch(path, 3)


def test_a_parameter_server_lost_after_an_epoch_never_lands_in_its_checkpoint(torch_ref, tmp_path):
    """Killed once epoch 2's figures are in, before its checkpoint is written: the checkpoint must hold epoch 2's
    state, not the restarted server's empty one, and epoch 3 must notice the restart before it trains on it."""
    spec = iris_spec()

    def hooks(engine):
        def on_epoch(m):  # the trainer reports an epoch, then checkpoints it
            if m.epoch == 2 and engine.server_recoveries == 0:
                ray.kill(engine.ps, no_restart=False)
                while answer(engine.ps.ping) in (None, engine.incarnation):  # until the new one answers
                    pass

        return Hooks(on_epoch=on_epoch, job_dir=tmp_path)

    result, trace, facts = train_async(spec, hooks=hooks)
    assert result.state == JobState.SUCCEEDED and [m.epoch for m in result.metrics] == [1, 2, 3]
    assert facts["server_pid_changed"] and facts["incarnation_changed"] and facts["server_recoveries"] == 1
    assert [r.version for r in trace if isinstance(r, Restore)] == [0, 0, 2 * STEPS_PER_EPOCH]
    W, (path,) = replay(spec, torch_ref, trace)
    np.testing.assert_allclose(W, result.weights, rtol=0, atol=1e-12)
    assert len(path) == 3 * STEPS_PER_EPOCH
    assert_each_row_once_per_epoch(path, 3)
