"""The Ray cluster as the scheduler sees it: joined (or started) in the background, asked for its size.

Ray starts (or is joined) in a background thread when the first job that needs it arrives (or at startup,
when queued jobs need it), so no request ever waits for Ray: a job submitted before Ray is up is queued at
once and checked against the cluster's size when it is known. A service that only runs in-process jobs
(``num_workers: 0``) never starts Ray. Only ``connect`` (or ``start_background``, which calls it) starts or joins
Ray; asking the size never does. Ray is imported only in here and the engine.
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from typing import Any

from polyak.contract.spec import JobSpec
from polyak.workers.backend import worker_device


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
        self._lock = threading.Lock()  # held while Ray starts (seconds): never by a request
        self._start_lock = threading.Lock()  # guards _starting alone, so start_background never waits for Ray
        self._connected = False
        self._started_here = False
        self._last_capacity: Resources | None = None  # for /health and submit, which never wait on Ray
        self._error: str | None = None
        self._starting = False
        self._released = threading.Event()

    @property
    def connected(self) -> bool:
        return self._connected

    def start_background(self, when_done=lambda: None) -> None:
        """Connect and read the capacity in a thread of its own (once); failures are reported by status().
        ``when_done`` runs after either. Returns at once, also while Ray is starting: every request that brings a
        job needing Ray calls it."""
        with self._start_lock:
            if self._starting:
                return
            self._starting = True

        def run() -> None:
            try:
                self.connect()
                self.capacity()
            except ClusterUnavailable as e:
                self._error = str(e)
                with self._start_lock:
                    self._starting = False  # the next job that needs Ray tries again
                when_done()
                return
            when_done()
            gc.freeze()  # Ray's many long-lived objects: kept out of every later full collection (see api.py)
            # Ray's processes are started with PR_SET_PDEATHSIG: they die with the *thread* that started them.
            # This thread is their parent, so it lives until Ray is shut down.
            self._released.wait()


        threading.Thread(target=run, name="polyak-ray-start", daemon=True).start()

    def known_capacity(self) -> Resources | None:
        """The size last read, without waiting for Ray: None until Ray is up."""
        return self._last_capacity

    def connect(self) -> None:
        """Join the cluster, or start a local Ray; idempotent and safe from any thread."""
        with self._lock:
            if self._connected:
                return
            from polyak.service.engine.placement import connect

            try:
                self._started_here = connect(self.address)
                self._error = None
            except Exception as e:  # Ray raises many kinds for "not there"; the caller needs one
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
                detail = str(e) if isinstance(e, ConnectionError) else f"{type(e).__name__}: {e}"  # ours: one line
                raise ClusterUnavailable(f"cannot start or join {where}: {detail}") from e
            self._connected = True

    def capacity(self) -> Resources:
        """Total CPUs and GPUs of the cluster (asked each time: a cluster may autoscale). Never starts or joins Ray:
        ClusterUnavailable before ``connect``."""
        if not self._connected:
            raise ClusterUnavailable("not connected to Ray: its size is known once the service has joined it")
        import ray

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
        if self._error and not self._connected:
            out["error"] = self._error
        elif self._starting and not self._connected:
            out["note"] = "Ray is starting"
        elif not self._connected:
            out["note"] = "Ray starts when the first job that needs it arrives"
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
        self._released.set()
