"""Where a Ray job runs: joining the cluster, where its actors go, which sync path that implies, lost nodes.

The parameter server runs on the driver's node, so losing any other node never loses W; the workers are asked
for that node too and go elsewhere when it is full. A sharded server (``cluster.num_servers`` S > 1) keeps shard 0
there and spreads the others over the cluster's nodes, so no one node carries every shard's traffic; a lost shard
is restored from the checkpoint like a lost server. Where the actors land decides how a sync step travels
(service/engine/sync_engine.py): a compiled graph when every actor shares the driver's node, the step channel
(TCP sockets between the actors, one part per node) when the job spans nodes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import ray
from ray.exceptions import AuthenticationError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from polyak.contract.errors import RAY_AUTH_HINT
from polyak.service.engine.engine import ClusterFault
from polyak.workers.backend import worker_device
from polyak.workers.readers import DATA_ROOTS

log = logging.getLogger(__name__)


# -- the cluster -----------------------------------------------------------------------------------------
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
    runtime_env = None if in_ray_job else {"py_modules": [shippable_package()], **confined_env()}
    _join(address, runtime_env)
    return False


def confined_env() -> dict:
    """The data roots this process is confined to (``polyak serve --data-root``), for the workers of a cluster it
    joins: a local Ray inherits them from this process's environment, a running cluster's raylets do not, and a
    worker without them would open whatever path it is handed."""
    roots = os.environ.get(DATA_ROOTS)
    return {"env_vars": {DATA_ROOTS: roots}} if roots else {}


def _join(address: str, runtime_env: dict | None) -> None:
    """ray.init of a running cluster; a refusal becomes a one-line ConnectionError saying what to do."""
    # Workers' own output is not forwarded: an actor's error reaches the driver as an exception, and a worker
    # on a dead node would otherwise print Ray's C++ stack trace into the job's output.
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=False)
    except AuthenticationError as e:  # reached, but it wants a token (Ray 2.60's `ray start` turns auth on)
        raise ConnectionError(f"the Ray cluster at {address} refused us ({_one_line(e)}): {RAY_AUTH_HINT}") from None
    except ConnectionError as e:
        # Without RAY_AUTH_MODE=token, Ray cannot even tell a cluster that wants a token from one that is not there.
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            raise ConnectionError(
                f"cannot connect to the Ray cluster at {address} ({_one_line(e)}); a cluster started with "
                f"`ray start` wants a token: {RAY_AUTH_HINT}"
            ) from None
        raise


def _one_line(error: Exception) -> str:
    """Ray's message of ``error`` on one line, cut to 200 characters."""
    return " ".join(str(error).split())[:200]


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


# -- where the actors go ---------------------------------------------------------------------------------
def worker_options(driver_node: str, device: str) -> dict:
    """A gradient worker's actor options: asked for the driver's node, where its steps are cheapest, and
    elsewhere when that is full. Restarted workers rebuild their shard, and Ray retries the worker's own method
    they died in (GradientWorker's methods say so: gradient() is pure) but never Ray's ``__ray_call__``: a
    compiled graph runs its loop on the worker in one, and a loop retried on the restarted worker reads channels
    that died with the old process — Ray aborts the process, restarts it, retries again, and the graph's teardown
    waits for that loop forever (a parameter server lost while a graph started hung a job that way)."""
    return dict(
        num_cpus=1, num_gpus=1 if device == "gpu" else 0, max_restarts=-1, max_task_retries=0,
        # soft alone would wait for the driver's node to free up; spilling places the worker elsewhere now
        scheduling_strategy=NodeAffinitySchedulingStrategy(driver_node, soft=True, _spill_on_unavailable=True),
    )


def server_nodes(driver_node: str, num_servers: int) -> list[str]:
    """Where each parameter server shard is asked to run: shard 0 on the driver's node, the others spread in turn
    over the alive nodes, the driver's first (on one node, all of them there)."""
    others = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != driver_node)
    nodes = [driver_node, *others]
    return [nodes[s % len(nodes)] for s in range(num_servers)]


def ps_options(node: str, soft: bool = False) -> dict:
    """A parameter server (shard)'s actor options. Shard 0 (or the one server) is held to the driver's node, so
    losing another node never loses it; the other shards only ask for theirs (``soft``), so a shard whose node
    is lost restarts elsewhere. A restarted server comes back empty: the engine puts W0 or the checkpoint back."""
    return dict(num_cpus=0, max_restarts=-1, max_task_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=soft))


def choose_sync_path(driver_node: str, server_nodes: list[str], worker_nodes: list[str]) -> tuple[str, str]:
    """("compiled" | "channel", why). A compiled graph only when every actor shares the driver's node: Ray
    2.60's compiled-graph channels between nodes hung and took a raylet down with them."""
    nodes = {*server_nodes, *worker_nodes}
    if nodes == {driver_node}:
        return "compiled", "every actor is on the driver's node (shared-memory channels)"
    return "channel", f"one part per node over TCP; the job spans {len(nodes | {driver_node})} nodes"


def describe_nodes(driver_node: str, server_nodes: list[str], worker_nodes: list[str], ips: dict[str, str],
                   bounds: list[int] | None = None) -> str:
    """'parameter server on 1a2b3c4d (127.0.0.1, the driver); workers 1,2 on 5e6f7a8b (10.0.0.2)'; sharded,
    'parameter server shards 1-2 (W[0:25445], W[25445:50890]) on 1a2b3c4d (...); ...'."""

    def node(n: str) -> str:
        return f"{n[:8]} ({ips.get(n, '?')}{', the driver' if n == driver_node else ''})"

    workers = ", ".join(
        f"worker{'s' if len(ks) > 1 else ''} {','.join(map(str, ks))} on {node(n)}"
        for n, ks in by_node(worker_nodes, start=1).items()
    )
    if len(server_nodes) == 1:
        return f"parameter server on {node(server_nodes[0])}; {workers}"
    shards = ", ".join(
        f"shard{'s' if len(ss) > 1 else ''} {_numbers(ss)} "
        f"({', '.join(f'W[{bounds[s - 1]}:{bounds[s]}]' for s in ss)}) on {node(n)}"
        for n, ss in by_node(server_nodes, start=1).items()
    )
    return f"parameter server {shards}; {workers}"


def by_node(nodes: Sequence[str], start: int = 0) -> dict[str, list[int]]:
    """Node -> the numbers (counted from ``start``) of the actors on it, ascending; nodes in the order of their
    first actor."""
    out: dict[str, list[int]] = {}
    for k, n in enumerate(nodes, start=start):
        out.setdefault(n, []).append(k)
    return out


def _numbers(ks: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3,5'."""
    runs: list[list[int]] = []
    for k in ks:
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


# -- lost nodes --------------------------------------------------------------------------------------------
def check_nodes(worker_nodes: list[str], ips: dict[str, str], device: str) -> None:
    """Raise ClusterFault when a node holding workers of this job is dead and the cluster has no room to
    restart them; with room, Ray restarts them and retries their calls, and the step goes on."""
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    lost = sorted({n for n in worker_nodes if n not in alive})
    if not lost:
        return
    stranded = [k + 1 for k, n in enumerate(worker_nodes) if n in lost]
    kind = "GPU" if device == "gpu" else "CPU"
    have = ray.available_resources().get(kind, 0)
    names = ", ".join(f"{n[:8]} ({ips.get(n, '?')})" for n in lost)
    if have >= len(stranded):
        log.warning("node %s lost: restarting worker(s) %s on the remaining nodes", names, stranded)
        return
    raise ClusterFault(
        f"node {names} was lost with gradient worker(s) {', '.join(map(str, stranded))} of "
        f"{len(worker_nodes)}; the cluster has {have:g} {kind}(s) free and they need {len(stranded)}"
    )
