"""The scheduler on a real store, with a stand-in cluster and trainer: order, admission, cancel, failures.

The stand-in trainer runs until the test lets its job finish (or the job is cancelled), so every
decision the scheduler makes can be looked at while it holds.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import numpy as np
import pytest
from ray.exceptions import OwnerDiedError, RayTaskError

from polyak.contract.errors import ClusterTooSmall, SpecError
from polyak.contract.spec import JobSpec, parse_spec
from polyak.contract.wire import EpochMetrics, JobState, StopReason
from polyak.service.engine.trainer import TrainResult
from polyak.service.server.cluster import ClusterUnavailable, Resources
from polyak.service.server.job import JobRecord, new_job_id
from polyak.service.server.scheduler import Scheduler
from polyak.service.server.store import Store

QUEUED, RUNNING = JobState.QUEUED, JobState.RUNNING


class FakeCluster:
    """A cluster that is up from the start, of a fixed size."""

    connected = True

    def __init__(self, cpus: float = 2, gpus: float = 0):
        self.size = Resources(cpus, gpus)
        self.started_in_background = 0

    def connect(self) -> None:
        pass

    def capacity(self) -> Resources:
        return self.size

    def known_capacity(self) -> Resources | None:
        return self.size

    def start_background(self, when_done=lambda: None) -> None:
        self.started_in_background += 1

    def status(self) -> dict:
        return {}


class LostCluster(FakeCluster):
    def capacity(self) -> Resources:
        raise ClusterUnavailable("the Ray cluster does not answer: GetTimeoutError")

    def known_capacity(self) -> Resources | None:
        return None


class FakeTrainer:
    """Reports one epoch, then waits for ``finish(job_id)`` (or a cancel); ``fail`` makes a job raise."""

    def __init__(self):
        self.started: list[str] = []
        self.fail: dict[str, Exception] = {}
        self._done: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def _event(self, job_id: str) -> threading.Event:
        with self._lock:
            return self._done.setdefault(job_id, threading.Event())

    def finish(self, job_id: str) -> None:
        self._event(job_id).set()

    def __call__(self, spec: JobSpec, job_id: str, hooks) -> TrainResult:
        self.started.append(job_id)
        if job_id in self.fail:
            raise self.fail[job_id]
        hooks.on_epoch(epoch_metrics(job_id, 1))
        while not self._event(job_id).wait(0.01):
            if hooks.should_cancel():
                return TrainResult(JobState.CANCELLED, StopReason.CANCELLED, np.zeros(3))
        return TrainResult(JobState.SUCCEEDED, StopReason.MAX_EPOCHS, np.zeros(3))


def epoch_metrics(job_id: str, epoch: int) -> EpochMetrics:
    return EpochMetrics(
        job_id=job_id, epoch=epoch, step=epoch, samples_seen=epoch, batch_size=1, lr=0.1, train_loss=1.0,
        weight_norm=1.0, weight_change=None, grad_avg_norm=None, grad_noise=None, samples_per_second=1.0,
        elapsed_seconds=0.1, criteria=[],
    )


def spec(priority: int = 0, workers: int = 0, device: str = "cpu") -> JobSpec:
    return JobSpec(priority=priority, cluster={"num_workers": workers, "device": device})


def wait_until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def make_scheduler(tmp_path):
    made: list[tuple[Scheduler, Store]] = []

    def make(max_concurrent=1, cpus=2, gpus=0, trainer: FakeTrainer | None = None, cluster=None):
        store = Store(tmp_path)
        cluster = cluster or FakeCluster(cpus, gpus)
        scheduler = Scheduler(store, cluster, max_concurrent, train=trainer or FakeTrainer())
        made.append((scheduler, store))
        return scheduler

    yield make
    for scheduler, store in made:
        scheduler.stop(timeout=5)
        store.close()


def state(scheduler: Scheduler, job_id: str) -> JobState:
    return scheduler.store.get(job_id).state


def test_queue_order_is_priority_then_fifo(make_scheduler):
    trainer = FakeTrainer()
    scheduler = make_scheduler(trainer=trainer)
    jobs = [scheduler.submit(spec(p)).id for p in (0, 5, 0, 5, 1)]
    expected = [jobs[1], jobs[3], jobs[4], jobs[0], jobs[2]]
    assert [j.id for j in scheduler.queue()] == expected
    assert [scheduler.info(j).queue_position for j in expected] == [1, 2, 3, 4, 5]

    scheduler.start()
    for job_id in expected:
        wait_until(lambda job_id=job_id: state(scheduler, job_id) == RUNNING)
        trainer.finish(job_id)
    wait_until(lambda: all(state(scheduler, j) == JobState.SUCCEEDED for j in jobs))
    assert trainer.started == expected
    assert [m.epoch for m in scheduler.store.metrics(jobs[0])] == [1]


def test_a_job_left_running_resumes_before_the_queue(make_scheduler, tmp_path):
    first = make_scheduler()
    interrupted = first.submit(spec(0)).id
    first.store.transition(interrupted, RUNNING)  # as if the server died while running it
    urgent = first.submit(spec(9)).id

    trainer = FakeTrainer()
    second = make_scheduler(trainer=trainer)
    second.start()
    wait_until(lambda: trainer.started)
    assert trainer.started == [interrupted]
    assert [s for s, _, _ in second.store.history(interrupted)] == [QUEUED, RUNNING, QUEUED, RUNNING]
    assert state(second, urgent) == QUEUED
    trainer.finish(interrupted)
    wait_until(lambda: trainer.started == [interrupted, urgent])


def test_a_job_cancelled_just_before_the_server_died_is_not_resumed(make_scheduler):
    first = make_scheduler()
    job = first.submit(spec()).id
    first.store.transition(job, RUNNING)
    first.store.request_cancel(job)  # then the server died before the job saw it

    trainer = FakeTrainer()
    second = make_scheduler(trainer=trainer)
    second.start()
    got = second.store.get(job)
    assert (got.state, got.stop_reason) == (JobState.CANCELLED, StopReason.CANCELLED)
    # A job submitted now starts first: had the cancelled one been requeued, it would have gone before it.
    fresh = second.submit(spec()).id
    wait_until(lambda: trainer.started)
    assert trainer.started == [fresh]
    trainer.finish(fresh)
    wait_until(lambda: state(second, fresh) == JobState.SUCCEEDED)
    assert trainer.started == [fresh] and state(second, job) == JobState.CANCELLED


def test_admission_waits_for_cpus_and_says_why(make_scheduler):
    trainer = FakeTrainer()
    scheduler = make_scheduler(max_concurrent=3, cpus=2, trainer=trainer)
    scheduler.start()
    big = scheduler.submit(spec(workers=2)).id
    wait_until(lambda: state(scheduler, big) == RUNNING)
    small = scheduler.submit(spec(workers=1)).id
    local = scheduler.submit(spec(workers=0)).id
    # Strict order: the job behind waits too, though it needs no CPUs, so `small` is never starved.
    behind = f"behind job {small}, which needs 1 CPU, 0 free"
    wait_until(lambda: scheduler.info(local).waiting_reason == behind)
    assert scheduler.info(small).waiting_reason == "needs 1 CPU, 0 free"
    assert scheduler.info(local).queue_position == 2

    trainer.finish(big)
    wait_until(lambda: state(scheduler, small) == RUNNING and state(scheduler, local) == RUNNING)
    assert scheduler.info(small).waiting_reason is None


def test_a_job_waits_while_ray_is_gone_and_says_so(make_scheduler):
    first = make_scheduler()
    job = first.submit(spec(workers=1)).id  # accepted while the cluster was there

    trainer = FakeTrainer()
    scheduler = make_scheduler(trainer=trainer, cluster=LostCluster())
    scheduler.start()
    wait_until(lambda: scheduler.info(job).waiting_reason)
    assert scheduler.info(job).waiting_reason == "the Ray cluster does not answer: GetTimeoutError"
    assert scheduler.cancel(job).state == JobState.CANCELLED
    assert trainer.started == []


def test_a_full_set_of_job_slots_is_the_reason(make_scheduler):
    trainer = FakeTrainer()
    scheduler = make_scheduler(max_concurrent=1, trainer=trainer)
    scheduler.start()
    first = scheduler.submit(spec()).id
    wait_until(lambda: state(scheduler, first) == RUNNING)
    second = scheduler.submit(spec()).id
    wait_until(lambda: scheduler.info(second).waiting_reason)
    assert scheduler.info(second).waiting_reason == "all 1 job slot(s) busy (--max-concurrent-jobs)"
    trainer.finish(first)
    wait_until(lambda: state(scheduler, second) == RUNNING)


@pytest.mark.parametrize(
    ("job", "field", "words"),
    [
        (
            spec(workers=3),
            "cluster.num_workers",
            "3 workers need 3 CPUs (one each) but the Ray cluster has 2",
        ),
        (
            spec(workers=1, device="gpu"),
            "cluster.device",
            "gpu needs 1 GPU (one per worker) but the Ray cluster has 0",
        ),
    ],
)
def test_a_job_that_can_never_fit_is_rejected_at_submit(make_scheduler, job, field, words):
    scheduler = make_scheduler(cpus=2, gpus=0)
    with pytest.raises(ClusterTooSmall) as e:
        scheduler.submit(job)
    assert not isinstance(e.value, SpecError)  # the spec is fine; the cluster is not
    assert (e.value.field, e.value.reason, e.value.message) == (field, words, f"{field}: {words}")
    assert e.value.exit_code == 3
    assert scheduler.store.jobs() == []


def test_cancel_a_queued_job_at_once_and_a_running_one_at_its_next_step(make_scheduler):
    trainer = FakeTrainer()
    scheduler = make_scheduler(trainer=trainer)
    scheduler.start()
    running = scheduler.submit(spec()).id
    wait_until(lambda: state(scheduler, running) == RUNNING)
    queued = scheduler.submit(spec()).id

    job = scheduler.cancel(queued)
    assert (job.state, job.stop_reason) == (JobState.CANCELLED, StopReason.CANCELLED)
    scheduler.cancel(running)
    wait_until(lambda: state(scheduler, running) == JobState.CANCELLED)
    assert scheduler.store.get(running).stop_reason == StopReason.CANCELLED
    assert [m.epoch for m in scheduler.store.metrics(running)] == [1]  # kept
    assert trainer.started == [running]  # the cancelled queued job never started
    assert scheduler.cancel("nope") is None
    assert scheduler.cancel(queued).state == JobState.CANCELLED  # cancelling again changes nothing


def test_a_job_that_raises_fails_and_the_scheduler_goes_on(make_scheduler):
    trainer = FakeTrainer()
    scheduler = make_scheduler(trainer=trainer)
    bad_data, crash, remote, fine = (scheduler.submit(spec()).id for _ in range(4))
    trainer.fail[bad_data] = ValueError("data.path: /x.npz does not exist or is not a file")
    trainer.fail[crash] = RuntimeError("worker exploded")
    # What an async pass raised when its parameter server died under a pull (a chaos run): the remote traceback,
    # many lines, is Ray's message; the job's error stays one line, its cause's.
    lost_w = OwnerDiedError("00585d03", None, "")
    trainer.fail[remote] = RayTaskError("run_async_epoch", "Traceback (most recent call last):\n  File \"w.py\", "
                                        "line 169, in _push_until_taken\nOwnerDiedError: ...", lost_w,
                                        "ray::GradientWorker.run_async_epoch()", 7, "10.0.0.2").as_instanceof_cause()
    trainer.finish(fine)
    scheduler.start()
    wait_until(lambda: state(scheduler, fine) == JobState.SUCCEEDED)
    failed = scheduler.store.get(bad_data)
    assert (failed.state, failed.stop_reason) == (JobState.FAILED, StopReason.ERROR)
    assert failed.error == "data.path: /x.npz does not exist or is not a file"
    assert scheduler.store.get(crash).error == "RuntimeError: worker exploded"
    assert scheduler.store.get(remote).error == f"OwnerDiedError: {' '.join(str(lost_w).split())}"
    assert scheduler.store.get(remote).error.startswith("OwnerDiedError: Failed to retrieve object 00585d03. ")


def test_stop_leaves_running_jobs_to_resume_at_the_next_start(make_scheduler):
    scheduler = make_scheduler()
    scheduler.start()
    job = scheduler.submit(spec()).id
    wait_until(lambda: state(scheduler, job) == RUNNING)
    scheduler.stop(timeout=5)
    assert state(scheduler, job) == RUNNING  # not cancelled: the shutdown only interrupted it

    trainer = FakeTrainer()
    trainer.finish(job)
    again = make_scheduler(trainer=trainer)
    again.start()
    wait_until(lambda: state(again, job) == JobState.SUCCEEDED)


def test_a_job_that_needs_ray_is_queued_at_once_while_ray_starts_in_the_background(tmp_path):
    class Starting(FakeCluster):
        connected = False

        def known_capacity(self):
            return None

        def capacity(self):
            raise AssertionError("submit and dispatch must not wait for Ray")

    cluster = Starting()
    scheduler = Scheduler(Store(tmp_path), cluster, 1, train=FakeTrainer())
    info = scheduler.submit(parse_spec({"cluster": {"num_workers": 64}}))  # size unknown: no 422 yet
    assert info.state == JobState.QUEUED and cluster.started_in_background == 1
    scheduler._dispatch()
    assert scheduler.info(info.id).waiting_reason == "waiting for Ray to start"


def test_the_store_and_the_scheduler_agree_on_the_queue_order(make_scheduler):
    """Shuffled jobs, ties in priority (negative ones too) and in submission time, some left running by a server
    that died: the scheduler's queue, the store's positions and the listing's all follow the documented order,
    computed here independently: resumed jobs first, then priority (higher first), then submission."""
    rng = random.Random(19)
    kinds = [(priority, resumed) for priority in (-1, 0, 0, 2, 2, 2, 5) for resumed in (False, True)]
    kinds += [(priority, False) for priority in (0, 2, -1)]
    rng.shuffle(kinds)
    scheduler = make_scheduler()
    store = scheduler.store
    same_time = datetime(2024, 1, 1, tzinfo=timezone.utc)
    jobs = []
    for priority, resumed in kinds:
        job = store.add(JobRecord(id=new_job_id(), spec=spec(priority), state=QUEUED, created_at=same_time))
        if resumed:  # as the server that died left it, and the next one requeued it
            store.transition(job.id, RUNNING)
            job = store.transition(job.id, QUEUED, recovery=True)
        jobs.append(job)
    gone = scheduler.submit(spec(9)).id
    scheduler.cancel(gone)  # not queued: in no order

    expected = [j.id for j in sorted(jobs, key=lambda j: (j.started_at is None, -j.priority, j.seq))]
    assert len({j.priority for j in jobs}) < len(jobs) and any(j.started_at for j in jobs)
    assert [j.id for j in scheduler.queue()] == expected
    positions = {job_id: n for n, job_id in enumerate(expected, start=1)}
    assert store.queue_positions() == positions
    assert {i.id: i.queue_position for i in scheduler.infos()} == {**positions, gone: None}


def test_a_gpu_job_without_workers_on_a_server_without_a_gpu_is_refused_as_the_cluster_too_small(
        make_scheduler, monkeypatch):
    monkeypatch.setattr("polyak.service.server.scheduler.gpu_available", lambda: False)
    scheduler = make_scheduler()
    with pytest.raises(ClusterTooSmall) as e:
        scheduler.submit(spec(workers=0, device="gpu"))
    assert e.value.field == "cluster.device"
    assert e.value.reason == "gpu with num_workers 0 computes in the server's process, which sees no GPU"
    assert scheduler.store.jobs() == []


def test_looking_at_the_cluster_size_never_starts_ray():
    # In a fresh interpreter: this test process may hold the suite's shared Ray session already.
    code = ("import ray; from polyak.service.server.cluster import Cluster, ClusterUnavailable\n"
            "cluster = Cluster(None)\n"
            "try:\n    cluster.capacity()\nexcept ClusterUnavailable as e:\n    print('refused:', e)\n"
            "print(cluster.connected, cluster.known_capacity(), ray.is_initialized())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    refused, state = done.stdout.strip().splitlines()
    assert "not connected to Ray" in refused and state == "False None False"


def test_a_job_that_failed_before_its_first_checkpoint_is_resubmitted_from_the_start(make_scheduler):
    trainer = FakeTrainer()
    scheduler = make_scheduler(trainer=trainer)
    first = scheduler.submit(spec()).id
    trainer.fail[first] = RuntimeError("ActorUnavailableError: the parameter server died while the engine started")
    scheduler.start()
    wait_until(lambda: state(scheduler, first) == JobState.FAILED)
    assert not (scheduler.store.job_dir(first) / "checkpoint.npz").exists()
    again = scheduler.resubmit(first)
    assert again.resumed_from == first and again.id != first
    assert scheduler.store.get(again.id).spec == scheduler.store.get(first).spec
    trainer.finish(again.id)
    wait_until(lambda: state(scheduler, again.id) == JobState.SUCCEEDED)
    # From the start: its history is its own single epoch, none copied from the failed job.
    assert [(m.job_id, m.epoch) for m in scheduler.store.metrics(again.id)] == [(again.id, 1)]
