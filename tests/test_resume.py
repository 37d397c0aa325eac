"""A resumed job ends exactly as the same job run without interruption (float64: to 1e-12).

Every spec here is sync, float64, with validation data, early stopping and heavy-ball momentum, so what
a resume must carry over is all in play: W and the momentum buffer u, the step count (the lr schedule),
the early-stopping state, best.npz, and the per-epoch order of the rows. Three ways to be interrupted:

- the trainer (``run()``) stopped dead at a chosen step, then run again on the same job dir;
- ``polyak train --job-dir`` killed with SIGKILL, then run again with the same arguments;
- ``polyak serve`` killed with SIGKILL (with its Ray, as a crashed host loses it), then restarted on the
  same data dir: in-process, and on Ray with two workers.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml
from test_service import Server, descendants, wait_for

from polyak.contract.network import from_dict
from polyak.contract.wire import EpochMetrics, JobState, StopReason
from polyak.service.engine.checkpoint import load_checkpoint, load_npz
from polyak.service.engine.local_engine import LocalEngine
from polyak.service.engine.trainer import BEST_WEIGHTS, CHECKPOINT, Hooks, initial_weights, run
from polyak.workers.data import prepare

TIMING = {"job_id", "samples_per_second", "elapsed_seconds"}

# Iris, ~1 ms an epoch: val loss bottoms out at epoch 9, early stopping (patience 3) ends it at epoch 12.
IRIS_EARLY = {
    "data": {"validation_fraction": 0.3},
    "optimizer": {"method": "heavy_ball", "lr": 0.3, "alpha": 0.5, "schedule": "inverse_time", "decay_steps": 200},
    "batch": {"size": 4},
    "stopping": {"max_epochs": 60, "patience": 3},
}
# Digits one sample a step, ~0.15 s an epoch in-process: slow enough to kill a server mid-epoch;
# early stopping (patience 2) ends it at epoch 10, best epoch 8.
DIGITS_EARLY = {
    "model": {"layers": [64, 32, 10], "activation": "relu"},
    "data": {"name": "digits", "validation_fraction": 0.2},
    "optimizer": {"lr": 0.01},
    "batch": {"size": 1},
    "stopping": {"max_epochs": 60, "patience": 2},
}
# The same on two Ray workers: a step is a round trip to them, 0.1-0.5 s an epoch here.
RAY_EARLY = {**IRIS_EARLY, "cluster": {"num_workers": 2, "mode": "sync"}}


def comparable(m: EpochMetrics) -> dict:
    return m.model_dump(mode="json", exclude=TIMING)


def assert_same_history(got: list[EpochMetrics], want: list[EpochMetrics]) -> None:
    """Every epoch's losses, steps, norms, lr and criteria equal to 1e-12; timings aside."""
    assert [m.epoch for m in got] == [m.epoch for m in want]
    for g, w in zip(got, want, strict=True):
        assert_close(comparable(g), comparable(w), f"epoch {w.epoch}")


def assert_close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert got == pytest.approx(want, rel=0, abs=1e-12), where
    else:
        assert got == want, where


def best_epoch(history: list[EpochMetrics]) -> int:
    """The first epoch with the lowest validation loss: what best.npz holds."""
    return min(history, key=lambda m: m.val_loss).epoch


def early_stopping_value(m: EpochMetrics) -> int:
    return next(c.value for c in m.criteria if c.name == "early_stopping")


def assert_ends_as_uninterrupted(state, reason, history, W, best_W, reference) -> None:
    assert (state, reason) == (reference.state, reference.stop_reason) == (JobState.SUCCEEDED,
                                                                           StopReason.EARLY_STOPPING)
    assert_same_history(history, reference.metrics)
    assert best_epoch(history) == best_epoch(reference.metrics) < history[-1].epoch
    assert early_stopping_value(history[-1]) == early_stopping_value(reference.metrics[-1])
    np.testing.assert_allclose(W, reference.weights, rtol=0, atol=1e-12)
    np.testing.assert_allclose(best_W, reference.best_weights, rtol=0, atol=1e-12)


class Crash(BaseException):
    """The process dying: nothing of the trainer's runs after it (no finish, no weights written)."""


class DiesAtStep:
    """An engine that dies when asked for its ``at``-th step (counted from 1) of this run."""

    def __init__(self, engine, at: int):
        self.engine, self.at, self.steps = engine, at, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self, batch):
        self.steps += 1
        if self.steps == self.at:
            raise Crash
        self.engine.step(batch)


def train(spec, job_dir=None, dies_at: int | None = None):
    info = prepare(spec.data, spec.model)
    engine = LocalEngine(spec, info, initial_weights(spec))
    if dies_at is not None:
        engine = DiesAtStep(engine, dies_at)
    return run(spec, info, engine, hooks=Hooks(job_dir=job_dir))


def checkpointed_epoch(job_dir) -> int:
    return load_checkpoint(job_dir / CHECKPOINT)[1]["epoch"]


# -- run() on a job dir ----------------------------------------------------------------------------------------
STEPS_PER_EPOCH = math.ceil(105 / 4)  # iris, 30% validation, batch 4


@pytest.mark.parametrize(
    "dies_at",
    [
        STEPS_PER_EPOCH + 9,  # mid-epoch 2, one checkpoint behind it
        3 * STEPS_PER_EPOCH + 1,  # the first step of epoch 4: the checkpoint is the state to the step
        6 * STEPS_PER_EPOCH + 20,  # mid-epoch 7: best.npz is epoch 5's, one epoch without improvement
        10 * STEPS_PER_EPOCH + 5,  # mid-epoch 11, past the best epoch (9): best.npz and the patience count matter
    ],
)
def test_run_resumed_from_its_job_dir_ends_as_an_uninterrupted_run(make_spec, tmp_path, dies_at):
    spec = make_spec(IRIS_EARLY)
    reference = train(spec, tmp_path / "reference")
    with pytest.raises(Crash):
        train(spec, tmp_path / "job", dies_at)
    done = checkpointed_epoch(tmp_path / "job")
    assert done == (dies_at - 1) // STEPS_PER_EPOCH >= 1  # died mid-run, with epochs checkpointed behind it

    resumed = train(spec, tmp_path / "job")
    # The resumed run reports the epochs it trained; the ones before its checkpoint are the first run's.
    assert [m.epoch for m in resumed.metrics] == list(range(done + 1, len(reference.metrics) + 1))
    history = reference.metrics[:done] + resumed.metrics
    best_file = from_dict(load_npz(tmp_path / "job" / BEST_WEIGHTS), spec.model.layers, np.float64)
    assert_ends_as_uninterrupted(resumed.state, resumed.stop_reason, history, resumed.weights, best_file, reference)
    np.testing.assert_array_equal(resumed.best_weights, best_file)


# -- polyak train --job-dir ---------------------------------------------------------------------------------
def test_polyak_train_killed_and_rerun_on_its_job_dir_ends_as_an_uninterrupted_run(make_spec, tmp_path):
    spec = make_spec(DIGITS_EARLY)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    job_dir, out = tmp_path / "job", tmp_path / "w.npz"
    command = [sys.executable, "-m", "polyak", "train", str(spec_file), "-o", str(out), "--json",
               "--job-dir", str(job_dir)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for _ in range(2):  # epoch 2 reported: epoch 1's checkpoint is written
            assert EpochMetrics.model_validate_json(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(10)
    done = checkpointed_epoch(job_dir)
    assert not out.exists() and done >= 1

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    resumed = [EpochMetrics.model_validate_json(line) for line in rerun.stdout.splitlines()]
    reference = train(spec, tmp_path / "reference")
    assert resumed[0].epoch == done + 1
    with np.load(out) as w:
        W = from_dict(dict(w), spec.model.layers, np.float64)
    best_W = from_dict(load_npz(job_dir / BEST_WEIGHTS), spec.model.layers, np.float64)
    assert_ends_as_uninterrupted(JobState.SUCCEEDED, resumed[-1].stop, reference.metrics[:done] + resumed, W,
                                 best_W, reference)


# -- polyak serve, killed and restarted -------------------------------------------------------------------------
def crash(server: Server) -> None:
    """SIGKILL the server and every process below it (its local Ray): a host that lost power."""
    below = descendants(server.process.pid)
    server.kill()
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_mid_job_and_restart(tmp_path, spec, timeout: float):
    """Submit, SIGKILL the server once epoch 2 is reported (epoch 1's checkpoint is on disk), restart it on
    the same data dir, and let the job finish. Returns (server, job id, the checkpointed epoch); the
    caller stops the server."""
    data_dir = tmp_path / "data"
    server = Server(data_dir).start()
    try:
        job = server.client().submit(spec)
        wait_for(lambda: len(job.metrics()) >= 2, timeout=timeout, every=0.01)
    finally:
        crash(server)
    done = checkpointed_epoch(data_dir / "jobs" / job.id)
    server = Server(data_dir).start()
    return server, job.id, done


def assert_resumed_job_ends_as(client, job_id: str, done: int, reference, layers) -> None:
    info = client.job(job_id).wait(timeout=300)
    assert info.state == JobState.SUCCEEDED, info.error
    history = client.metrics(job_id)
    assert 1 <= done < len(history), "the kill must land after a checkpoint and before the end"
    W = from_dict(client.weights(job_id), layers, np.float64)
    best_W = from_dict(client.weights(job_id, "best"), layers, np.float64)
    assert info.epoch == history[-1].epoch
    assert_ends_as_uninterrupted(info.state, info.stop_reason, history, W, best_W, reference)


def test_in_process_job_resumed_after_the_server_is_killed_ends_as_an_uninterrupted_run(make_spec, tmp_path):
    spec = make_spec(DIGITS_EARLY)
    server, job_id, done = kill_mid_job_and_restart(tmp_path, spec, timeout=60)
    try:
        reference = train(spec, tmp_path / "reference")
        assert_resumed_job_ends_as(server.client(), job_id, done, reference, spec.model.layers)
        assert "resumes from its last checkpoint" in server.log()
    finally:
        server.stop()


def test_ray_job_resumed_after_the_server_is_killed_ends_as_an_uninterrupted_run(make_spec, tmp_path):
    """K=2 sync on the server's own Ray. The uninterrupted run is the same spec in-process: a sync step over two
    workers is the exact minibatch step (their gradient sums add up), equal to ~1e-15 here (measured 9e-16 on
    the weights), so the 1e-12 bound holds while a resume that drops any state misses it by far more."""
    spec = make_spec(RAY_EARLY)
    server, job_id, done = kill_mid_job_and_restart(tmp_path, spec, timeout=300)
    try:
        in_process = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"num_workers": 0})})
        reference = train(in_process, tmp_path / "reference")
        client = server.client()
        assert_resumed_job_ends_as(client, job_id, done, reference, spec.model.layers)
        assert client.get(job_id).placement.startswith("sync on Ray, 2 cpu worker(s)")
        assert "resumes from its last checkpoint" in server.log()
    finally:
        server.stop()
