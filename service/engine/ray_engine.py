"""What the two Ray engines share: the parameter server (S shards), K gradient workers, their state between
epochs, and the watch that keeps a step from hanging.

The server is ``self.servers``: S actors, shard s holding W[bounds[s]:bounds[s + 1]] (``self.bounds``) and the same
range of every optimizer buffer (S = ``cluster.num_servers``, 1 by default). The engine joins the shards' ranges
back into the whole W and buffers for checkpoints, which look the same whatever S wrote them, and cuts a
checkpoint into ranges again when restoring it, whatever S the new job has.

SyncRayEngine (service/engine/sync_engine.py) takes one exact step of (26) per round; AsyncRayEngine
(service/engine/async_engine.py) lets each worker push its own gradients. Where the actors go, and how a sync
step travels because of it, is service/engine/placement.py's.

Nothing waits forever: answers later than a bound, or a lost node whose workers have no room to restart, fail
the job with a message naming the node and actor (ClusterFault, the trainer's fatal path). A parameter server
shard that restarted is noticed by its incarnation (ParameterServerLost): the trainer restores the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, OwnerDiedError, RayActorError, RayError

from polyak.contract.spec import JobSpec
from polyak.service.engine.checkpoint import load_checkpoint, save_checkpoint
from polyak.service.engine.engine import ClusterFault, EpochFigures, ParameterServerLost
from polyak.service.engine.parameter_server import EpochHandover, ParameterServer, Restore, Update
from polyak.service.engine.placement import (
    check_nodes,
    describe_nodes,
    ps_options,
    resolve_device,
    server_nodes,
    worker_options,
)
from polyak.service.engine.ps_core import combine_parts, shard_bounds
from polyak.workers.data import DataInfo, ShardLayout
from polyak.workers.gradient_worker import GradientWorker

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 120
FIRST_STEP_SECONDS = 300  # before a step time is measured: building a big model's buffers, a GPU's warm-up
NODE_CHECK_SECONDS = 1.0  # while a step is late, look this often for a dead node of the job


class RayEngine:
    """The actors and the state between epochs; the subclasses take the steps."""

    mode: str  # "sync" | "async"
    # A server's death shows as its actor's error, or, to a worker reading the W it had published (its object),
    # as that object's owner gone.
    recoverable = (ParameterServerLost, RayActorError, OwnerDiedError)
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
        self.bounds = shard_bounds(self.W0.size, spec.cluster.num_servers)
        worker = ray.remote(GradientWorker).options(**worker_options(self.driver_node, self.device))
        self.workers = [worker.remote(spec_json, k, K, info.stats, self.bounds) for k in range(K)]
        self.servers = self._start_servers(spec_json, trace)
        try:
            self.locate_workers(ray.get([w.info.remote() for w in self.workers]))  # data errors surface here
            self.server_nodes = ray.get([server.node.remote() for server in self.servers])
            self._reset()
        except BaseException:
            self.close()
            raise

    def _start_servers(self, spec_json: str, trace: bool) -> list:
        """One actor per key range: shard 0 on the driver's node, the others spread over the cluster."""
        server = ray.remote(ParameterServer)
        return [
            server.options(**ps_options(node, soft=s > 0)).remote(
                spec_json, self.W0.size, trace, (self.bounds[s], self.bounds[s + 1]), s)
            for s, node in enumerate(server_nodes(self.driver_node, len(self.bounds) - 1))
        ]

    @property
    def ps(self):
        """Server shard 0: the whole parameter server when num_servers is 1."""
        return self.servers[0]

    def locate_workers(self, worker_info: list[dict]) -> None:
        """Where the workers run (a restarted worker may run on another node than before)."""
        self.worker_info = worker_info
        self.worker_nodes = [info["node"] for info in worker_info]
        self.node_ips = node_ips(worker_info, self.driver_node)

    def describe(self) -> str:
        """One line: where the job's actors run and how its steps travel."""
        nodes = describe_nodes(self.driver_node, self.server_nodes, self.worker_nodes, self.node_ips, self.bounds)
        return f"{self.mode} on Ray, {len(self.workers)} {self.device} worker(s): {nodes}"

    def _slices(self, array: np.ndarray) -> list[np.ndarray]:
        """The servers' key ranges of a whole (p,) array."""
        return [array[lo:hi] for lo, hi in zip(self.bounds[:-1], self.bounds[1:], strict=True)]

    def _incarnations(self) -> tuple[str, ...]:
        return tuple(ray.get([server.ping.remote() for server in self.servers]))

    def _reset(self) -> None:
        """Back to the initial weights and an empty momentum buffer."""
        self._restore_ps({"W": self.W0}, {"step": 0, "version": 0})  # the method's buffers start at zero

    def _restore_ps(self, arrays: dict, counters: dict) -> None:
        """Every shard back to its key range of these arrays (whole W and buffers)."""
        by_shard = [dict(zip(arrays, ranges, strict=True))
                    for ranges in zip(*(self._slices(np.asarray(a)) for a in arrays.values()), strict=True)]
        ray.get([server.restore.remote(part, counters)
                 for server, part in zip(self.servers, by_shard, strict=True)])
        self.incarnation = self._incarnations()
        self.W = np.array(arrays["W"])
        self._state = arrays, counters
        if self.trace is not None:
            self.trace.append(Restore(counters["version"]))

    # -- the trainer's interface (service/engine/engine.py) -------------------------------------------------
    def end_epoch(self) -> EpochFigures:
        handovers: list[EpochHandover] = ray.get([server.end_epoch.remote() for server in self.servers])
        lost = [s + 1 for s, h in enumerate(handovers) if h.incarnation != self.incarnation[s]]
        if lost:
            raise ParameterServerLost(f"the parameter server{lost_shards(lost, len(handovers))} restarted during the "
                                      "epoch")
        # What checkpoint() writes: asking the server again later could reach one restarted since, whose
        # zeros would be saved as the epoch's state.
        arrays = {name: np.concatenate([h.arrays[name] for h in handovers]) for name in handovers[0].arrays}
        self._state = arrays, handovers[0].counters  # sync shards step together; async: shard 0's count
        # Workers join every shard: a restart shows in each, and shard 0's count is the number of restarts.
        if handovers[0].rejoins:
            log.warning("%d gradient worker(s) restarted during the epoch; they resumed after their applied batches",
                        handovers[0].rejoins)
            self.worker_restarts += handovers[0].rejoins
        if self.trace is not None:
            self.trace.extend(self._in_training_rows(r) for h in handovers for r in h.trace)
        self.W = arrays["W"]
        return combine_parts([h.part for h in handovers])

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
        self._restore_ps(arrays, meta)
        return meta

    def recover(self) -> None:
        """Wait for the restarted server shard(s), then put every shard back at the initial weights (a checkpoint
        may follow)."""
        for server in self.servers:
            wait_until_alive(server)
        log.warning("parameter server lost; restored and resuming from the last checkpoint")
        self.server_recoveries += 1
        self._reset()

    def close(self) -> None:
        for actor in (*self.workers, *self.servers):
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
        check_nodes(self.worker_nodes, self.node_ips, self.device)

    def late_step_message(self, waited: float) -> str:
        """'a step did not finish within 20 s; no answer from gradient worker 2 on node 5e6f7a8b (10.0.0.2)'."""
        suspects = [f"gradient worker {k + 1} on node {node[:8]} ({self.node_ips.get(node, '?')})"
                    for k, (worker, node) in enumerate(zip(self.workers, self.worker_nodes, strict=True))
                    if not answers(worker)]
        suspects += [f"the parameter server{lost_shards([s + 1], len(self.servers))} on node {node[:8]}"
                     for s, (server, node) in enumerate(zip(self.servers, self.server_nodes, strict=True))
                     if not answers(server)]
        who = "; no answer from " + ", ".join(suspects) if suspects else " (every actor still answers)"
        return f"a step did not finish within {waited:.0f} s{who}"


def node_ips(worker_info: list[dict], driver_node: str) -> dict[str, str]:
    """Node id -> IP of every alive node: the workers' and servers' nodes, named in messages."""
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    ips.update({info["node"]: info["ip"] for info in worker_info})
    ips.setdefault(driver_node, ray.util.get_node_ip_address())
    return ips


def lost_shards(shards: list[int], num_servers: int) -> str:
    """' shard 2 of 3' (1-based), or nothing for an unsharded server: how messages name a server shard."""
    if num_servers == 1:
        return ""
    return f" shard{'s' if len(shards) > 1 else ''} {','.join(map(str, shards))} of {num_servers}"


def answers(actor) -> bool:
    """Whether the actor answers a ping within 2 s."""
    try:
        ray.get(actor.ping.remote(), timeout=2)
    except (RayError, GetTimeoutError):
        return False
    return True


def shard_rows(layout: ShardLayout) -> list[np.ndarray]:
    """Per shard, the training row at each position: the inverse of ``layout.position``."""
    out = []
    for lo, hi in zip(layout.bounds[:-1], layout.bounds[1:], strict=True):
        rows = np.empty(hi - lo, dtype=np.int64)
        rows[layout.position[lo:hi]] = np.arange(lo, hi)
        out.append(rows)
    return out


def wait_until_alive(actor) -> None:
    """Until the (restarting) actor answers a ping; raises after RECONNECT_SECONDS."""
    deadline = time.monotonic() + RECONNECT_SECONDS
    while True:
        try:
            ray.get(actor.ping.remote(), timeout=10)
            return
        except (RayActorError, GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
