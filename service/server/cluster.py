"""The Ray cluster as the scheduler sees it: joined (or started) on first need, asked for its size.

Without an address a local Ray starts with the first job that needs workers, so a service that
only runs ``num_workers: 0`` jobs never pays for Ray. Ray is imported only in here and the engine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from client.spec import JobSpec
from workers.backend import worker_device


@dataclass(frozen=True)
class Resources:
    cpus: float = 0
    gpus: float = 0

    def fits_in(self, other: Resources) -> bool:
        return self.cpus <= other.cpus and self.gpus <= other.gpus

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.gpus - other.gpus)

    def clamped(self) -> Resources:
        return Resources(max(self.cpus, 0), max(self.gpus, 0))


def needs(spec: JobSpec, capacity: Resources) -> Resources:
    """One CPU per worker actor, plus one GPU each when it computes on a GPU."""
    k = spec.cluster.num_workers
    gpu = worker_device(spec.cluster.device, k, capacity.gpus) == "gpu"
    return Resources(cpus=k, gpus=k if gpu else 0)


class ClusterUnavailable(RuntimeError):
    """Ray could not be started, joined or reached."""


class Cluster:
    def __init__(self, address: str | None = None):
        self.address = address
        self._lock = threading.Lock()
        self._connected = False
        self._started_here = False
        self._last_capacity: Resources | None = None  # for /health, which must never wait on Ray

    def connect(self) -> None:
        """Join the cluster, or start a local Ray; idempotent and safe from any thread."""
        with self._lock:
            if self._connected:
                return
            from service.engine.ray_engine import connect

            try:
                self._started_here = connect(self.address)
            except Exception as e:  # Ray raises many kinds for "not there"; the caller needs one
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
                raise ClusterUnavailable(f"cannot start or join {where}: {type(e).__name__}: {e}") from e
            self._connected = True

    def capacity(self) -> Resources:
        """Total CPUs and GPUs of the cluster (asked each time: a cluster may autoscale)."""
        import ray

        self.connect()
        try:
            total = ray.cluster_resources()
        except Exception as e:
            raise ClusterUnavailable(f"the Ray cluster does not answer: {type(e).__name__}: {e}") from e
        self._last_capacity = Resources(total.get("CPU", 0), total.get("GPU", 0))
        return self._last_capacity

    def status(self) -> dict[str, Any]:
        """For /health: what was last seen. Never asks Ray, whose calls can block for a minute when
        its head is gone."""
        out: dict[str, Any] = {"connected": self._connected, "address": self.address or "local"}
        if not self._connected:
            out["note"] = "Ray starts with the first job that needs workers (cluster.num_workers > 0)"
        elif self._last_capacity is not None:
            out.update(cpus=self._last_capacity.cpus, gpus=self._last_capacity.gpus)
        return out

    def shutdown(self) -> None:
        """Stop Ray if this service started it; leave a joined cluster running."""
        with self._lock:
            if self._started_here:
                import ray

                ray.shutdown()
            self._connected = self._started_here = False
