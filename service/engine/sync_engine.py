"""Sync on Ray: one exact step of (26) per round, over a compiled graph on one node or the step channel across nodes.

Which path a job takes follows from where its actors landed (service/engine/placement.py; the job's first
output line and ``/jobs/{id}`` say which, and why):

- compiled — every actor on the driver's node: each step is a Ray Compiled Graph

      rows_1..rows_K -> ps.current -> W -> worker_k.gradient(W, rows_k) -> ps.apply(parts) -> version

  over shared-memory channels, never through the driver: well under a millisecond of overhead a step
  instead of the several milliseconds of ordinary actor calls (bench/bench_ray.py).
- channel — actors on several nodes: one actor call a step to each server, ``channel_step(rows)``; the server
  sends W over TCP to each node's leader, which hands it to the node's other workers over loopback, adds
  their gradient sums to its own and sends one part per node back (service/engine/step_channel.py,
  workers/step_channel.py). W crosses the network once per node and nothing goes through the driver. Ray
  2.60's compiled-graph channels between nodes hung and took a raylet down with them, so they are never used.

With S server shards (``cluster.num_servers``) each shard's ``current`` gives its slice of W, a worker's
``gradient`` takes the S slices and returns S outputs (num_returns = S: compiled graphs take such a node's
outputs as separate channels), and shard s's ``apply`` takes the K workers' slices s: a shard moves p/S floats
per worker a step, in both paths.

Both take the same exact step. The driver keeps a few steps in flight, which hides its own latency while
cancel still takes effect within those few steps. A worker that dies is restarted by Ray (its sockets close,
so the channel's step fails at once with ChannelLost) and the steps the server has not applied are redone on
a new graph or channel (the repair), so the trajectory is the one an undisturbed run takes; an epoch that
needs more than MAX_REPAIRS_PER_EPOCH repairs fails the job (ClusterFault), and so does a lost node whose
workers have no room to restart. A step later than a bound derived from the measured step time fails it too.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque

import numpy as np
import ray
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import (
    GetTimeoutError,
    RayActorError,
    RayChannelError,
    RayChannelTimeoutError,
    RayError,
    RaySystemError,
)

from polyak.contract.spec import JobSpec
from polyak.service.engine.engine import ClusterFault, EpochFigures, ParameterServerLost
from polyak.service.engine.placement import choose_sync_path
from polyak.service.engine.ray_engine import FIRST_STEP_SECONDS, RECONNECT_SECONDS, RayEngine
from polyak.service.engine.step_channel import nodes_of
from polyak.workers.data import DataInfo
from polyak.workers.step_channel import CONNECT_SECONDS, TOKEN_BYTES, ChannelLost, Role

log = logging.getLogger(__name__)

STEPS_IN_FLIGHT = 4
MAX_REPAIRS_PER_EPOCH = 10
STEP_TIMEOUT_FACTOR = 200  # a step may take this many times the measured step time (a few are queued) ...
STEP_TIMEOUT_FLOOR = 20.0  # ... but never less: a GC pause or a busy machine is not a fault
# A server gives up on a step's parts later than the driver does: the driver's late-step error, which names who
# does not answer, comes first; the server's bound only keeps it from waiting forever.
SERVER_TIMEOUT_FACTOR = 2


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


def by_server(grads: list, num_servers: int) -> list[list]:
    """The workers' gradient outputs regrouped per server shard: shard s gets every worker's output s."""
    return [[g if num_servers == 1 else g[s] for g in grads] for s in range(num_servers)]


def is_lost_actor(error: RayError) -> bool:
    """A worker or the server died under the step, or the step channel broke with it (Ray wraps the server's
    ChannelLost in a task error's cause): a repair redoes it. Anything else is an error in our own code or a
    worker's gradient call, and re-running would fail the same way."""
    lost = (RayActorError, RaySystemError, RayChannelError, ChannelLost)
    return isinstance(getattr(error, "cause", None) or error, lost)


class SyncRayEngine(RayEngine):
    """One exact step of (26) per round; over a compiled graph or the step channel, by placement."""

    mode = "sync"
    drives_steps = False

    def __init__(self, spec: JobSpec, info: DataInfo, W0: np.ndarray, sync_path: str = "auto"):
        self.graph = None
        self.channel_open = False
        self.forced_path = sync_path  # tests and benchmarks compare the two paths on one node
        super().__init__(spec, info, W0)

    def _choose_path(self) -> None:
        self.sync_path, self.path_reason = choose_sync_path(self.driver_node, self.server_nodes, self.worker_nodes)
        if self.forced_path != "auto" and self.forced_path != self.sync_path:
            if self.forced_path == "compiled":
                raise ValueError(f"a compiled graph needs every actor on the driver's node: {self.path_reason}")
            self.sync_path, self.path_reason = self.forced_path, "chosen by the caller"
        log.info("sync path: %s (%s)", self.sync_path, self.path_reason)

    def describe(self) -> str:
        return f"{super().describe()}; sync steps over {self.sync_path}: {self.path_reason}"

    def _restore_ps(self, arrays: dict, counters: dict) -> None:
        self._teardown()  # the server runs ordinary calls only while no step is in flight
        super()._restore_ps(arrays, counters)
        self.epoch_start_step = counters["step"]
        self.epoch_rows: list[list[np.ndarray]] = []
        self.repairs = 0
        self.inflight: deque = deque()
        self._pace = Pace()
        if not hasattr(self, "sync_path"):
            self._choose_path()
        self._connect()

    def _connect(self) -> None:
        if self.sync_path == "compiled":
            self._compile()
        else:
            self._open_channel()

    def _compile(self) -> None:
        S = len(self.servers)
        with InputNode() as rows:
            W = [server.current.bind(rows[0]) for server in self.servers]
            grads = [w.gradient.options(num_returns=S).bind(*W, rows[k]) for k, w in enumerate(self.workers)]
            applies = [server.apply.bind(*parts)
                       for server, parts in zip(self.servers, by_server(grads, S), strict=True)]
            graph = applies[0] if S == 1 else MultiOutputNode(applies)
        self.graph = graph.experimental_compile()
        # The first round allocates the channels (over a second); an empty round pays that now, not in step 1.
        no_rows = np.empty(0, dtype=np.int64)
        try:
            ray.get(self.graph.execute(*[no_rows] * len(self.workers)), timeout=FIRST_STEP_SECONDS)
        except RayChannelTimeoutError:
            raise ClusterFault(
                f"the compiled step graph did not answer its first round within {FIRST_STEP_SECONDS} s"
            ) from None

    def _open_channel(self) -> None:
        """Build the step channel where the workers run now: the servers listen; each node's leader starts,
        listening for its followers on loopback; the followers connect to it, and it to every server."""
        limit = FIRST_STEP_SECONDS
        self.locate_workers(self.watched_get([w.info.remote() for w in self.workers], limit))
        nodes, token = nodes_of(self.worker_nodes), secrets.token_bytes(TOKEN_BYTES)
        servers = tuple(tuple(a) for a in self.watched_get([s.channel_listen.remote() for s in self.servers], limit))
        leaders = [self.workers[ks[0]].channel_start.remote(
            Role(token, j, followers=len(ks) - 1, servers=servers, bounds=tuple(self.bounds)))
            for j, ks in enumerate(nodes)]
        ports = self.watched_get(leaders, limit)
        self.watched_get([self.workers[k].channel_start.remote(Role(token, j, position=i, leader=("127.0.0.1", port)))
                          for j, (ks, port) in enumerate(zip(nodes, ports, strict=True))
                          for i, k in enumerate(ks[1:], start=1)], limit)
        names = [f"{self.worker_nodes[ks[0]][:8]} ({self.node_ips.get(self.worker_nodes[ks[0]], '?')})"
                 for ks in nodes]
        self.watched_get([s.channel_accept.remote(nodes, names, token, CONNECT_SECONDS) for s in self.servers], limit)
        self.channel_open = True

    def _teardown(self) -> None:
        graph, self.graph = self.graph, None
        if graph is not None:
            graph.teardown()
        if self.channel_open:  # the workers' ends close as the servers' do
            self.channel_open = False
            for server in self.servers:
                server.channel_close.remote()

    def step(self, batch: np.ndarray) -> None:
        """Split the batch's rows by shard (positions within each shard) and run one step."""
        rows = self.layout.split_batch(batch)
        self.epoch_rows.append(rows)
        self._submit(rows)

    def _submit(self, rows: list[np.ndarray]) -> None:
        if self.graph is not None:
            refs = self.graph.execute(*rows)
            self.inflight.append(refs if isinstance(refs, list) else [refs])
        else:
            timeout = SERVER_TIMEOUT_FACTOR * self._pace.timeout()
            self.inflight.append([server.channel_step.remote(rows, timeout) for server in self.servers])
        if len(self.inflight) > STEPS_IN_FLIGHT:
            self._settle(keep=STEPS_IN_FLIGHT)

    def _settle(self, keep: int = 0) -> None:
        try:
            while len(self.inflight) > keep:
                refs = self.inflight.popleft()
                self._pace.sleep_until_due()
                self._await(refs)
                self._pace.done(time.monotonic(), consecutive=keep > 0)
        except RayError as e:
            if isinstance(e, GetTimeoutError | RayChannelTimeoutError) or not is_lost_actor(e):
                raise  # _await turns timeouts into ClusterFault; never a repair loop
            self._repair()

    def _await(self, refs: list) -> None:
        """The step's result (every shard's apply), within the late-step bound; a dead node without room fails the
        job sooner."""
        limit = self._pace.timeout()
        if self.graph is not None:  # every actor is on this node: no node of the job can vanish alone
            try:
                ray.get(refs, timeout=limit)
            except RayChannelTimeoutError:
                raise ClusterFault(self.late_step_message(limit)) from None
            return
        self.watched_get(refs, limit)

    def _repair(self) -> None:
        """A worker or the server died mid-step: rebuild the graph or channel and redo the steps not applied."""
        self.repairs += 1
        if self.repairs > MAX_REPAIRS_PER_EPOCH:
            raise ClusterFault(f"gave up after {self.repairs} gradient worker failure(s) in one epoch "
                               f"(at most {MAX_REPAIRS_PER_EPOCH} are repaired)")
        self.inflight.clear()
        self._teardown()
        self._pace = Pace()  # the seconds the fault took are no step interval: later steps must not wait them out
        if self._incarnations() != self.incarnation:
            raise ParameterServerLost("the parameter server restarted during the epoch")
        self.worker_restarts += 1
        self._wait_for_workers()
        steps = set(ray.get([server.step_count.remote() for server in self.servers]))
        if len(steps) > 1:  # a step reached some shards only: the others cannot redo it at the W it was taken at
            raise ParameterServerLost(f"the parameter server shards stopped at different steps ({sorted(steps)})")
        applied = steps.pop() - self.epoch_start_step
        log.warning("a gradient worker was lost; re-running the epoch from step %d of it", applied + 1)
        try:
            self._connect()
        except RayError as e:  # another actor lost while the channel was built: one more repair
            if not is_lost_actor(e):
                raise
            self._repair()
            return
        for rows in self.epoch_rows[applied:]:
            self._submit(rows)

    def _wait_for_workers(self) -> None:
        """Until Ray has restarted the lost workers (a ping to one restarting may fail: ask again); a lost node
        whose workers have no room fails the job here, at once."""
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                self.watched_get([w.ping.remote() for w in self.workers], deadline - time.monotonic())
                return
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def end_epoch(self) -> EpochFigures:
        self._settle()
        figures = super().end_epoch()
        self.epoch_start_step, self.epoch_rows, self.repairs = figures.step, [], 0
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
