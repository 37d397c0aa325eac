"""The Ray runtime behind the trainer's engine interface: one parameter server, K gradient workers.

sync: every step is one exact minibatch step of (26), run as a Ray Compiled Graph

    rows_1..rows_K -> server.current -> W -> worker_k.gradient(W, rows_k) -> server.apply(parts) -> version

compiled once per job: weights and gradient sums move server <-> workers over shared-memory channels,
never through the driver, and a step costs well under a millisecond of overhead instead of the
several milliseconds of ordinary actor calls (bench/bench_ray.py). The driver keeps a few steps in
flight, which hides its own latency while cancel still takes effect within those few steps.
A worker that dies is restarted by Ray; the engine rebuilds the graph and re-submits exactly the
steps the server has not applied, so the trajectory is the one an undisturbed run takes.

async: each worker runs its own pull/compute/push loop over its shard with ordinary actor calls; the
server drops gradients more than ``max_staleness`` versions old.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path

import numpy as np
import ray
from ray.dag import InputNode
from ray.exceptions import GetTimeoutError, RayActorError, RayChannelError, RayError, RaySystemError

from client.spec import JobSpec
from service.engine.checkpoint import load_checkpoint, save_checkpoint
from service.engine.parameter_server import ParameterServer
from workers.backend import worker_device
from workers.data import Dataset, shard_bounds
from workers.gradient_worker import GradientWorker

log = logging.getLogger(__name__)

STEPS_IN_FLIGHT = 4
RECONNECT_SECONDS = 120
MAX_REPAIRS_PER_EPOCH = 10
STEP_TIMEOUT_SECONDS = 600  # Ray's default for a compiled graph is 10 s: too short for a big model on a CPU


class ParameterServerLost(RuntimeError):
    """The parameter server died (or restarted) mid-epoch; its last checkpoint is the way back."""


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join or start Ray; True when this call started a local instance (the caller shuts it down).

    No address (or "local") starts a single-node Ray on this machine, never joining a cluster that
    happens to run here — except inside a Ray job's entrypoint, which joins the cluster running the job.
    Any other address joins that cluster and ships the three packages with the job.
    """
    if ray.is_initialized():
        return False
    if address is None and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        address = "auto"  # the entrypoint of a Ray job (`ray job submit`): join the job's own cluster
    if address in (None, "", "local"):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        return True
    import client
    import service
    import workers

    packages = [str(Path(m.__file__).parent) for m in (client, service, workers)]
    ray.init(address=address, runtime_env={"py_modules": packages}, logging_level=logging.WARNING)
    return False


def resolve_device(device: str, num_workers: int) -> str:
    """The workers' device on the connected cluster; gpu without a GPU per worker is an error."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "gpu" and gpus < num_workers:
        raise ValueError(
            f"cluster.device: gpu needs {num_workers} GPU(s) (one per worker) but the Ray cluster has {gpus:g}"
        )
    return worker_device(device, num_workers, gpus)


class RayEngine:
    recoverable = (ParameterServerLost, RayActorError)

    def __init__(self, spec: JobSpec, dataset: Dataset, W0: np.ndarray):
        K = spec.cluster.num_workers
        cpus = ray.cluster_resources().get("CPU", 0)
        if K > cpus:
            raise ValueError(f"cluster.num_workers = {K} needs {K} CPUs but the Ray cluster has {cpus:g}")
        self.device = resolve_device(spec.cluster.device, K)
        spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"device": self.device})})
        spec_json = spec.model_dump_json()
        self.bounds = shard_bounds(dataset.n_train, K)
        self.W0 = np.asarray(W0)
        # Restarted workers rebuild their shard and Ray retries the call they died in: gradient() is pure.
        worker_options = dict(
            num_cpus=1, num_gpus=1 if self.device == "gpu" else 0, max_restarts=-1, max_task_retries=-1
        )
        self.workers = [
            ray.remote(GradientWorker).options(**worker_options).remote(spec_json, k, K) for k in range(K)
        ]
        # A restarted server comes back empty: recover() and the trainer put W0 or the checkpoint back.
        server = ray.remote(ParameterServer).options(num_cpus=0, max_restarts=-1, max_task_retries=0)
        self.server = server.remote(spec_json, self.W0.size)
        try:
            self.worker_info = ray.get([w.info.remote() for w in self.workers])  # data errors surface here
            self._reset()
        except BaseException:
            self.close()
            raise

    def _reset(self) -> None:
        """Back to the initial weights and an empty momentum buffer."""
        self._restore_server({"W": self.W0, "u": np.zeros_like(self.W0)}, {"step": 0, "version": 0})

    def _restore_server(self, arrays: dict, counters: dict) -> None:
        ray.get(self.server.restore.remote(arrays, counters))
        self.incarnation = ray.get(self.server.ping.remote())
        self.W = np.array(arrays["W"])

    # -- the trainer's interface --------------------------------------------------------------------
    def end_epoch(self) -> dict:
        figures, W = ray.get(self.server.end_epoch.remote())
        if figures.pop("incarnation") != self.incarnation:
            raise ParameterServerLost("the parameter server restarted during the epoch")
        self.W = np.array(W)
        return figures

    def weights(self) -> np.ndarray:
        return self.W

    def checkpoint(self, path: str | Path, meta: dict) -> None:
        arrays, counters = ray.get(self.server.snapshot.remote())
        save_checkpoint(path, arrays, {**meta, **counters})

    def restore(self, path: str | Path) -> dict:
        arrays, meta = load_checkpoint(path)
        self._restore_server(arrays, meta)
        return meta

    def recover(self) -> None:
        """Wait for the restarted server, then put it back at the initial weights (a checkpoint may follow)."""
        _wait_until_alive(self.server)
        log.warning("parameter server lost; restored and resuming from the last checkpoint")
        self._reset()

    def close(self) -> None:
        for actor in (*self.workers, self.server):
            ray.kill(actor, no_restart=True)


def _wait_until_alive(actor) -> None:
    deadline = time.monotonic() + RECONNECT_SECONDS
    while True:
        try:
            ray.get(actor.ping.remote(), timeout=10)
            return
        except (RayActorError, GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Pace:
    """The steady interval between finished steps, to predict when the next one is due."""

    def __init__(self):
        self.last: float | None = None
        self.interval = 0.0

    def done(self, now: float, consecutive: bool) -> None:
        if consecutive and self.last is not None:
            self.interval = 0.8 * self.interval + 0.2 * (now - self.last)
        self.last = now if consecutive else None

    def next_due(self) -> float:
        return self.last + self.interval if self.last is not None else 0.0


class SyncRayEngine(RayEngine):
    mode = "sync"
    drives_steps = False

    def __init__(self, spec: JobSpec, dataset: Dataset, W0: np.ndarray):
        self.graph = None
        super().__init__(spec, dataset, W0)

    def _restore_server(self, arrays: dict, counters: dict) -> None:
        self._teardown()  # the server runs ordinary calls only while no step is in flight
        super()._restore_server(arrays, counters)
        self.epoch_start_step = counters["step"]
        self.epoch_rows: list[list[np.ndarray]] = []
        self.repairs = 0
        self._compile()

    def _compile(self) -> None:
        with InputNode() as rows:
            W = self.server.current.bind(rows[0])
            parts = [w.gradient.bind(W, rows[k]) for k, w in enumerate(self.workers)]
            graph = self.server.apply.bind(*parts)
        self.graph = graph.experimental_compile()
        self.inflight: deque = deque()
        self._pace = Pace()
        # The first round allocates the channels (over a second); an empty round pays that now, not in step 1.
        no_rows = np.empty(0, dtype=np.int64)
        ray.get(self.graph.execute(*[no_rows] * len(self.workers)))

    def _teardown(self) -> None:
        graph, self.graph = self.graph, None
        if graph is not None:
            graph.teardown()

    def step(self, batch: np.ndarray) -> None:
        """Split the batch's rows by shard (row numbers local to each shard) and run one step."""
        shard_of = np.searchsorted(self.bounds, batch, side="right") - 1
        rows = [batch[shard_of == k] - self.bounds[k] for k in range(len(self.workers))]
        self.epoch_rows.append(rows)
        self._submit(rows)

    def _submit(self, rows: list[np.ndarray]) -> None:
        self.inflight.append(self.graph.execute(*rows))
        if len(self.inflight) > STEPS_IN_FLIGHT:
            self._settle(keep=STEPS_IN_FLIGHT)

    def _settle(self, keep: int = 0) -> None:
        try:
            while len(self.inflight) > keep:
                ref = self.inflight.popleft()
                self._sleep_until_due()
                ray.get(ref, timeout=STEP_TIMEOUT_SECONDS)
                self._pace.done(time.monotonic(), consecutive=keep > 0)
        except RayError as e:
            if not isinstance(getattr(e, "cause", None) or e, (RayActorError, RaySystemError, RayChannelError)):
                raise  # an error in our own code, not a lost actor: re-running would fail the same way
            self._repair()

    def _sleep_until_due(self) -> None:
        """Sleep through most of the wait for the oldest step: a compiled graph's reader spins while it
        waits, and on a small machine that spinning takes the very cores the workers compute on."""
        wait = self._pace.next_due() - time.monotonic()
        if self._pace.interval > 0.005 and wait > 0.001:  # short steps: a sleep's wake-up costs more
            time.sleep(0.9 * wait)

    def _repair(self) -> None:
        """A worker or the server died mid-step: rebuild the graph and redo the steps not applied."""
        self.repairs += 1
        if self.repairs > MAX_REPAIRS_PER_EPOCH:
            raise RuntimeError(f"gave up after {MAX_REPAIRS_PER_EPOCH} worker failures in one epoch")
        self.inflight.clear()
        self._teardown()
        if ray.get(self.server.ping.remote()) != self.incarnation:
            raise ParameterServerLost("the parameter server restarted during the epoch")
        for worker in self.workers:
            _wait_until_alive(worker)
        applied = ray.get(self.server.step_count.remote()) - self.epoch_start_step
        log.warning("a gradient worker was lost; re-running the epoch from step %d of it", applied + 1)
        self._compile()
        for rows in self.epoch_rows[applied:]:
            self._submit(rows)

    def end_epoch(self) -> dict:
        self._settle()
        figures = super().end_epoch()
        self.epoch_start_step, self.epoch_rows, self.repairs = figures["step"], [], 0
        return figures

    def checkpoint(self, path: str | Path, meta: dict) -> None:
        self._settle()
        super().checkpoint(path, meta)

    def recover(self) -> None:
        self.inflight.clear()
        self._teardown()
        super().recover()

    def close(self) -> None:
        try:
            self._teardown()
        finally:
            super().close()


class AsyncRayEngine(RayEngine):
    mode = "async"
    drives_steps = True

    def run_epoch(self, epoch: int, batch_size: int, step_budget: int | None, should_cancel) -> bool:
        """Let every worker pass over its shard once (at most ``step_budget`` steps); True when cancelled."""
        ray.get(self.server.begin_epoch.remote(step_budget))
        runs = [w.run_async_epoch.remote(self.server, epoch, batch_size) for w in self.workers]
        pending, cancelled = runs, False
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.1)
            if pending and not cancelled and should_cancel():
                self.server.stop.remote()
                cancelled = True
        ray.get(runs)
        return cancelled
