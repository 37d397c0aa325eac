"""The Ray runtime behind the trainer's engine interface: one parameter server, K gradient workers.

Placement: the parameter server runs on the driver's node, so losing any other node never loses W; the
workers are asked for that node too and go elsewhere when it is full. Where they land decides how a
sync step travels (the job's first output line and ``/jobs/{id}`` say which, and why):

- compiled — every actor on the driver's node: each step is a Ray Compiled Graph

      rows_1..rows_K -> server.current -> W -> worker_k.gradient(W, rows_k) -> server.apply(parts) -> version

  over shared-memory channels, never through the driver: well under a millisecond of overhead a step
  instead of the several milliseconds of ordinary actor calls (bench/bench_ray.py).
- actor calls — actors on several nodes: ``server.current`` puts W into the object store once a step,
  each node fetches that one copy, and ``server.apply`` takes the K parts as ObjectRefs. Ray 2.60's
  compiled-graph channels between nodes hung and took a raylet down with them, so they are never used.

Both take the same exact step of (26). The driver keeps a few steps in flight, which hides its own
latency while cancel still takes effect within those few steps. A worker that dies is restarted by Ray
and the steps the server has not applied are redone, so the trajectory is the one an undisturbed run
takes. Nothing waits forever: a step later than a bound derived from the measured step time, or a lost
node whose workers have no room to restart, fails the job with a message naming the node and actor.

async: each worker runs its own pull/compute/push loop over its shard with ordinary actor calls; the
server drops gradients more than ``max_staleness`` versions old. A worker that dies is restarted by Ray and
resumes its pass after the batches the server already applied. ``AsyncRayEngine(..., trace=True)`` keeps the
server's record of every update (``engine.trace``): enough to replay the run from W0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from pathlib import Path

import numpy as np
import ray
from ray.dag import InputNode
from ray.exceptions import (
    AuthenticationError,
    GetTimeoutError,
    RayActorError,
    RayChannelError,
    RayChannelTimeoutError,
    RayError,
    RaySystemError,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from polyak.contract.errors import RAY_AUTH_HINT
from polyak.contract.spec import JobSpec
from polyak.service.engine.checkpoint import load_checkpoint, save_checkpoint
from polyak.service.engine.parameter_server import ParameterServer, Restore, Update
from polyak.workers.backend import worker_device
from polyak.workers.data import DataInfo, ShardLayout
from polyak.workers.gradient_worker import GradientWorker

log = logging.getLogger(__name__)

STEPS_IN_FLIGHT = 4
RECONNECT_SECONDS = 120
MAX_REPAIRS_PER_EPOCH = 10
FIRST_STEP_SECONDS = 300  # before a step time is measured: building a big model's buffers, a GPU's warm-up
STEP_TIMEOUT_FACTOR = 200  # a step may take this many times the measured step time (a few are queued) ...
STEP_TIMEOUT_FLOOR = 20.0  # ... but never less: a GC pause or a busy machine is not a fault
NODE_CHECK_SECONDS = 1.0  # while a step is late, look this often for a dead node of the job


class ParameterServerLost(RuntimeError):
    """The parameter server died (or restarted) mid-epoch; its last checkpoint is the way back."""


class ClusterFault(RuntimeError):
    """The cluster cannot finish the job: a node was lost with no room left, or a step never finished."""


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join or start Ray; True when this call started a local instance (the caller shuts it down).

    No address (or "local") starts a single-node Ray on this machine, never joining a cluster that
    happens to run here — except inside a Ray job's entrypoint, which joins the cluster running the job.
    Any other address joins that cluster and ships the polyak package with the job.
    """
    if ray.is_initialized():
        return False
    in_ray_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    if address is None and in_ray_job:
        address = "auto"  # the entrypoint of a Ray job (`ray job submit`): join the job's own cluster
    if address in (None, "", "local"):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
        return True
    from polyak.shipping import shippable_package

    # A Ray job's actors inherit the job's runtime_env, which already carries the code (its working_dir or
    # py_modules); Ray refuses a second py_modules beside the job's own.
    runtime_env = None if in_ray_job else {"py_modules": [shippable_package()]}
    # Workers' own output is not forwarded: an actor's error reaches the driver as an exception, and a worker
    # on a dead node would otherwise print Ray's C++ stack trace into the job's output.
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING,
                 log_to_driver=False)
    except AuthenticationError as e:  # reached, but it wants a token (Ray 2.60's `ray start` turns auth on)
        reason = " ".join(str(e).split())
        raise ConnectionError(f"the Ray cluster at {address} refused us ({reason[:200]}): {RAY_AUTH_HINT}") from None
    except ConnectionError as e:
        # Without RAY_AUTH_MODE=token, Ray cannot even tell a cluster that wants a token from one that is not there.
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            reason = " ".join(str(e).split())
            raise ConnectionError(
                f"cannot connect to the Ray cluster at {address} ({reason[:200]}); a cluster started with "
                f"`ray start` wants a token: {RAY_AUTH_HINT}"
            ) from None
        raise
    return False


def cluster_summary() -> str:
    """'Ray cluster at 10.0.0.1:6379: 2 nodes, 3 CPUs, 0 GPUs' — which cluster a run joined, in one line."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    address = ray.get_runtime_context().gcs_address
    return (f"Ray cluster at {address}: {len(nodes)} node(s), {total.get('CPU', 0):g} CPU(s), "
            f"{total.get('GPU', 0):g} GPU(s)")


def resolve_device(device: str, num_workers: int) -> str:
    """The workers' device on the connected cluster; gpu without a GPU per worker is an error."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "gpu" and gpus < num_workers:
        raise ValueError(
            f"cluster.device: gpu needs {num_workers} GPU(s) (one per worker) but the Ray cluster has {gpus:g}"
        )
    return worker_device(device, num_workers, gpus)


# -- placement -----------------------------------------------------------------------------------------
def choose_sync_path(driver_node: str, server_node: str, worker_nodes: list[str]) -> tuple[str, str]:
    """("compiled" | "actor_calls", why). A compiled graph only when every actor shares the driver's node:
    Ray 2.60's compiled-graph channels between nodes hung and took a raylet down with them."""
    nodes = {server_node, *worker_nodes}
    if nodes == {driver_node}:
        return "compiled", "every actor is on the driver's node (shared-memory channels)"
    return "actor_calls", f"the job spans {len(nodes | {driver_node})} nodes (W put once per step)"


def describe_nodes(driver_node: str, server_node: str, worker_nodes: list[str], ips: dict[str, str]) -> str:
    """'parameter server on 1a2b3c4d (127.0.0.1, the driver's), workers 1-2 on 5e6f7a8b (10.0.0.2)'."""

    def node(n: str) -> str:
        return f"{n[:8]} ({ips.get(n, '?')}{', the driver' if n == driver_node else ''})"

    by_node: dict[str, list[int]] = {}
    for k, n in enumerate(worker_nodes, start=1):
        by_node.setdefault(n, []).append(k)
    workers = ", ".join(
        f"worker{'s' if len(ks) > 1 else ''} {','.join(map(str, ks))} on {node(n)}" for n, ks in by_node.items()
    )
    return f"parameter server on {node(server_node)}; {workers}"


class RayEngine:
    recoverable = (ParameterServerLost, RayActorError)
    fatal = (ClusterFault,)

    def __init__(self, spec: JobSpec, info: DataInfo, W0: np.ndarray, trace: bool = False):
        K = spec.cluster.num_workers
        cpus = ray.cluster_resources().get("CPU", 0)
        if K > cpus:
            raise ValueError(f"cluster.num_workers = {K} needs {K} CPUs but the Ray cluster has {cpus:g}")
        self.device = resolve_device(spec.cluster.device, K)
        spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"device": self.device})})
        spec_json = spec.model_dump_json()
        self.layout = ShardLayout.of(spec.data, spec.model, info, K)
        self.W0 = np.asarray(W0)
        self.driver_node = ray.get_runtime_context().get_node_id()
        # Evidence that a fault was survived, not just absent: Ray restarts actors without telling anyone.
        self.worker_restarts = 0
        self.server_recoveries = 0
        self.trace: list | None = [] if trace else None  # the server's records, fetched each epoch; each Restore
        self._shard_rows = shard_rows(self.layout) if trace else None
        # The workers are asked for the driver's node, where their steps are cheapest, and go elsewhere when
        # it is full. Restarted workers rebuild their shard and Ray retries the call they died in: gradient()
        # is pure.
        worker_options = dict(
            num_cpus=1, num_gpus=1 if self.device == "gpu" else 0, max_restarts=-1, max_task_retries=-1,
            # soft alone would wait for the driver's node to free up; spilling places the worker elsewhere now
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.driver_node, soft=True, _spill_on_unavailable=True),
        )
        self.workers = [
            ray.remote(GradientWorker).options(**worker_options).remote(spec_json, k, K, info.stats) for k in range(K)
        ]
        # The server lives on the driver's node: losing another node never loses W. A restarted server comes
        # back empty: recover() and the trainer put W0 or the checkpoint back.
        server = ray.remote(ParameterServer).options(
            num_cpus=0, max_restarts=-1, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.driver_node, soft=False),
        )
        self.server = server.remote(spec_json, self.W0.size, trace)
        try:
            self.worker_info = ray.get([w.info.remote() for w in self.workers])  # data errors surface here
            self.worker_nodes = [info["node"] for info in self.worker_info]
            ips = {info["node"]: info["ip"] for info in self.worker_info}
            ips.setdefault(self.driver_node, ray.util.get_node_ip_address())
            self.node_ips = ips
            self._reset()
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        """One line: where the job's actors run and how its steps travel."""
        nodes = describe_nodes(self.driver_node, self.driver_node, self.worker_nodes, self.node_ips)
        return f"{self.mode} on Ray, {len(self.workers)} {self.device} worker(s): {nodes}"

    def _reset(self) -> None:
        """Back to the initial weights and an empty momentum buffer."""
        self._restore_server({"W": self.W0}, {"step": 0, "version": 0})  # the method's buffers start at zero

    def _restore_server(self, arrays: dict, counters: dict) -> None:
        ray.get(self.server.restore.remote(arrays, counters))
        self.incarnation = ray.get(self.server.ping.remote())
        self.W = np.array(arrays["W"])
        self._state = arrays, counters
        if self.trace is not None:
            self.trace.append(Restore(counters["version"]))

    # -- the trainer's interface --------------------------------------------------------------------
    def end_epoch(self) -> dict:
        figures, arrays, counters = ray.get(self.server.end_epoch.remote())
        if figures.pop("incarnation") != self.incarnation:
            raise ParameterServerLost("the parameter server restarted during the epoch")
        # What checkpoint() writes: asking the server again later could reach one restarted since, whose
        # zeros would be saved as the epoch's state.
        self._state = arrays, counters
        rejoins, records = figures.pop("rejoins"), figures.pop("trace")
        if rejoins:
            log.warning("%d gradient worker(s) restarted during the epoch; they resumed after their applied batches",
                        rejoins)
            self.worker_restarts += rejoins
        if self.trace is not None:
            self.trace.extend(self._in_training_rows(r) for r in records)
        self.W = np.array(arrays["W"])
        return figures

    def _in_training_rows(self, record):
        """An Update's rows as indices into the training set (the server knows positions in a shard)."""
        if not isinstance(record, Update):
            return record
        return dataclasses.replace(record, rows=self._shard_rows[record.shard][record.rows])

    def weights(self) -> np.ndarray:
        return self.W

    def evaluate(self, W: np.ndarray) -> tuple[float, int | None, int]:
        """Validation (loss sum, correct, count), each worker over its slice; W goes out once."""
        W_ref = ray.put(W)
        parts = self.watched_get([w.evaluate.remote(W_ref) for w in self.workers], FIRST_STEP_SECONDS)
        correct = None if parts[0][1] is None else sum(p[1] for p in parts)
        return sum(p[0] for p in parts), correct, sum(p[2] for p in parts)

    def checkpoint(self, path: str | Path, meta: dict) -> None:
        """The state of the last end_epoch (or restore): the trainer checkpoints right after an epoch."""
        arrays, counters = self._state
        save_checkpoint(path, arrays, {**meta, **counters})

    def restore(self, path: str | Path) -> dict:
        arrays, meta = load_checkpoint(path)
        self._restore_server(arrays, meta)
        return meta

    def recover(self) -> None:
        """Wait for the restarted server, then put it back at the initial weights (a checkpoint may follow)."""
        _wait_until_alive(self.server)
        log.warning("parameter server lost; restored and resuming from the last checkpoint")
        self.server_recoveries += 1
        self._reset()

    def close(self) -> None:
        for actor in (*self.workers, self.server):
            ray.kill(actor, no_restart=True)

    # -- when a step is late ---------------------------------------------------------------------------
    def watched_get(self, refs: list, limit: float) -> list:
        """ray.get of the workers' answers that never hangs: a dead node without room fails at once, and
        answers later than ``limit`` seconds fail naming who did not answer."""
        started = time.monotonic()
        while True:
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=NODE_CHECK_SECONDS)
            if not pending:
                return ray.get(refs)
            self.check_nodes()
            if time.monotonic() - started > limit:
                raise ClusterFault(self.late_step_message(limit))

    def check_nodes(self) -> None:
        """Raise ClusterFault when a node holding workers of this job is dead and the cluster has no room to
        restart them; with room, Ray restarts them and retries their calls, and the step goes on."""
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        lost = sorted({n for n in self.worker_nodes if n not in alive})
        if not lost:
            return
        stranded = [k + 1 for k, n in enumerate(self.worker_nodes) if n in lost]
        free = ray.available_resources()
        need, kind = (len(stranded), "GPU") if self.device == "gpu" else (len(stranded), "CPU")
        have = free.get(kind, 0)
        names = ", ".join(f"{n[:8]} ({self.node_ips.get(n, '?')})" for n in lost)
        if have >= need:
            log.warning("node %s lost: restarting worker(s) %s on the remaining nodes", names, stranded)
            return
        raise ClusterFault(
            f"node {names} was lost with gradient worker(s) {', '.join(map(str, stranded))} of "
            f"{len(self.workers)}; the cluster has {have:g} {kind}(s) free and they need {need}"
        )

    def late_step_message(self, waited: float) -> str:
        suspects = []
        for k, worker in enumerate(self.workers):
            try:
                ray.get(worker.ping.remote(), timeout=2)
            except (RayError, GetTimeoutError):
                node = self.worker_nodes[k]
                suspects.append(f"gradient worker {k + 1} on node {node[:8]} ({self.node_ips.get(node, '?')})")
        try:
            ray.get(self.server.ping.remote(), timeout=2)
        except (RayError, GetTimeoutError):
            suspects.append(f"the parameter server on node {self.driver_node[:8]}")
        who = "; no answer from " + ", ".join(suspects) if suspects else " (every actor still answers)"
        return f"a step did not finish within {waited:.0f} s{who}"


def shard_rows(layout: ShardLayout) -> list[np.ndarray]:
    """Per shard, the training row at each position: the inverse of ``layout.position``."""
    out = []
    for lo, hi in zip(layout.bounds[:-1], layout.bounds[1:], strict=True):
        rows = np.empty(hi - lo, dtype=np.int64)
        rows[layout.position[lo:hi]] = np.arange(lo, hi)
        out.append(rows)
    return out


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
    """The steady interval between finished steps: when the next one is due, and how late is too late."""

    def __init__(self):
        self.last: float | None = None
        self.interval = 0.0

    def done(self, now: float, consecutive: bool) -> None:
        if consecutive and self.last is not None:
            self.interval = 0.8 * self.interval + 0.2 * (now - self.last)
        self.last = now if consecutive else None

    def next_due(self) -> float:
        return self.last + self.interval if self.last is not None else 0.0

    def timeout(self) -> float:
        """Seconds a step may take before it counts as hung."""
        if self.interval <= 0:
            return FIRST_STEP_SECONDS
        return max(STEP_TIMEOUT_FLOOR, STEP_TIMEOUT_FACTOR * self.interval)

    def sleep_until_due(self) -> None:
        """Sleep through most of the wait for the oldest step: a compiled graph's reader spins while it
        waits, and on a small machine that spinning takes the very cores the workers compute on."""
        wait = self.next_due() - time.monotonic()
        if self.interval > 0.005 and wait > 0.001:  # short steps: a sleep's wake-up costs more
            time.sleep(0.9 * wait)


class SyncRayEngine(RayEngine):
    """One exact step of (26) per round; over a compiled graph or ordinary actor calls, by placement."""

    mode = "sync"
    drives_steps = False

    def __init__(self, spec: JobSpec, info: DataInfo, W0: np.ndarray, sync_path: str = "auto"):
        self.graph = None
        self.forced_path = sync_path  # tests and benchmarks compare the two paths on one node
        super().__init__(spec, info, W0)

    def _choose_path(self) -> None:
        self.sync_path, self.path_reason = choose_sync_path(self.driver_node, self.driver_node, self.worker_nodes)
        if self.forced_path != "auto" and self.forced_path != self.sync_path:
            if self.forced_path == "compiled":
                raise ValueError(f"a compiled graph needs every actor on the driver's node: {self.path_reason}")
            self.sync_path, self.path_reason = self.forced_path, "chosen by the caller"
        log.info("sync path: %s (%s)", self.sync_path, self.path_reason)

    def describe(self) -> str:
        return f"{super().describe()}; sync steps over {self.sync_path.replace('_', ' ')}: {self.path_reason}"

    def _restore_server(self, arrays: dict, counters: dict) -> None:
        self._teardown()  # the server runs ordinary calls only while no step is in flight
        super()._restore_server(arrays, counters)
        self.epoch_start_step = counters["step"]
        self.epoch_rows: list[list[np.ndarray]] = []
        self.repairs = 0
        self.inflight: deque = deque()
        self._pace = Pace()
        if not hasattr(self, "sync_path"):
            self._choose_path()
        if self.sync_path == "compiled":
            self._compile()

    def _compile(self) -> None:
        with InputNode() as rows:
            W = self.server.current.bind(rows[0])
            parts = [w.gradient.bind(W, rows[k]) for k, w in enumerate(self.workers)]
            graph = self.server.apply.bind(*parts)
        self.graph = graph.experimental_compile()
        # The first round allocates the channels (over a second); an empty round pays that now, not in step 1.
        no_rows = np.empty(0, dtype=np.int64)
        try:
            ray.get(self.graph.execute(*[no_rows] * len(self.workers)), timeout=FIRST_STEP_SECONDS)
        except RayChannelTimeoutError:
            raise ClusterFault(
                f"the compiled step graph did not answer its first round within {FIRST_STEP_SECONDS} s"
            ) from None

    def _teardown(self) -> None:
        graph, self.graph = self.graph, None
        if graph is not None:
            graph.teardown()

    def step(self, batch: np.ndarray) -> None:
        """Split the batch's rows by shard (positions within each shard) and run one step."""
        rows = self.layout.split_batch(batch)
        self.epoch_rows.append(rows)
        self._submit(rows)

    def _submit(self, rows: list[np.ndarray]) -> None:
        if self.graph is not None:
            self.inflight.append(self.graph.execute(*rows))
        else:
            # W goes into the object store once; each node fetches that one copy for its workers. An actor
            # runs one caller's calls in order, so step i+1 reads W only after step i's apply.
            W = self.server.current.remote(None)
            parts = [w.gradient.remote(W, rows[k]) for k, w in enumerate(self.workers)]
            self.inflight.append(self.server.apply.remote(*parts))
        if len(self.inflight) > STEPS_IN_FLIGHT:
            self._settle(keep=STEPS_IN_FLIGHT)

    def _settle(self, keep: int = 0) -> None:
        try:
            while len(self.inflight) > keep:
                ref = self.inflight.popleft()
                self._pace.sleep_until_due()
                self._await(ref)
                self._pace.done(time.monotonic(), consecutive=keep > 0)
        except RayError as e:
            if isinstance(e, GetTimeoutError | RayChannelTimeoutError):
                raise  # _await turns these into ClusterFault; never a repair loop
            if not isinstance(getattr(e, "cause", None) or e, (RayActorError, RaySystemError, RayChannelError)):
                raise  # an error in our own code, not a lost actor: re-running would fail the same way
            self._repair()

    def _await(self, ref) -> None:
        """The step's result, within the late-step bound; a dead node without room fails the job sooner."""
        limit = self._pace.timeout()
        if self.graph is not None:  # every actor is on this node: no node of the job can vanish alone
            try:
                ray.get(ref, timeout=limit)
            except RayChannelTimeoutError:
                raise ClusterFault(self.late_step_message(limit)) from None
            return
        self.watched_get([ref], limit)

    def _repair(self) -> None:
        """A worker or the server died mid-step: rebuild the graph and redo the steps not applied."""
        self.repairs += 1
        if self.repairs > MAX_REPAIRS_PER_EPOCH:
            raise RuntimeError(f"gave up after {MAX_REPAIRS_PER_EPOCH} worker failures in one epoch")
        self.inflight.clear()
        self._teardown()
        if ray.get(self.server.ping.remote()) != self.incarnation:
            raise ParameterServerLost("the parameter server restarted during the epoch")
        self.worker_restarts += 1
        for worker in self.workers:
            _wait_until_alive(worker)
        applied = ray.get(self.server.step_count.remote()) - self.epoch_start_step
        log.warning("a gradient worker was lost; re-running the epoch from step %d of it", applied + 1)
        if self.sync_path == "compiled":
            self._compile()
        for rows in self.epoch_rows[applied:]:
            self._submit(rows)

    def end_epoch(self) -> dict:
        self._settle()
        figures = super().end_epoch()
        self.epoch_start_step, self.epoch_rows, self.repairs = figures["step"], [], 0
        return figures

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
    """Bounded-staleness updates; ``trace=True`` keeps the server's record of every update in ``self.trace``."""

    mode = "async"
    drives_steps = True

    def run_epoch(self, epoch: int, batch_size: int, step_budget: int | None, should_cancel) -> bool:
        """Let every worker pass over its shard once (at most ``step_budget`` steps); True when cancelled."""
        if ray.get(self.server.begin_epoch.remote(epoch, step_budget)) != self.incarnation:
            raise ParameterServerLost("the parameter server restarted after the last epoch")
        runs = [w.run_async_epoch.remote(self.pushes_to(), epoch, batch_size, self.trace is not None)
                for w in self.workers]
        pending, cancelled, checked = runs, False, time.monotonic()
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.1)
            if pending and not cancelled and should_cancel():
                self.server.stop.remote()
                cancelled = True
            if pending and time.monotonic() - checked > NODE_CHECK_SECONDS:
                self.check_nodes()
                checked = time.monotonic()
        ray.get(runs)
        return cancelled

    def pushes_to(self):
        """The handle the workers join, pull from and push to: the server (fault tests put a proxy between)."""
        return self.server
