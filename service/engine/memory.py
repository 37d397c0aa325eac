"""A job's memory, estimated from its spec before anything is allocated: the admission check of ``polyak serve``
(422 at submit) and ``polyak train`` (before any data is read or Ray started).

With p = sum_l m_{l+1} (m_l + 1) parameters, b bytes per value (cluster.dtype), B optimizer buffers (heavy ball
and Nesterov: u; AdaGrad: s; RMSProp: v; Adam: m and v; SGD: none), K workers and n' rows in the largest batch:

    parameter server / driver  (5 + B) p b   W, its buffers, the gradient sum, and the trainer's previous,
                                             current and best weights
    each worker                2 p b + 3 r (m_0 + ... + m_L) b
                                             its copy of W, its gradient, and about three values per unit per row
                                             of its batch (inputs or activations, pre-activations, their
                                             gradients); r = ceil(n' / K) in sync mode, n' in async mode
    the job                    driver + max(K, 1) workers (K = 0: one process holds both)

n' is batch.size (batch.max_size when the batch grows); a full batch (size null) counts data.n_samples rows for
synthetic data and none otherwise, as does a batch that grows without a cap: the estimate is a lower bound, and the
data rows each worker holds are not in it. It is only meant to refuse what can never fit, at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyak.contract.errors import SpecError
from polyak.contract.network import param_count
from polyak.contract.spec import JobSpec
from polyak.service.engine.optim import BUFFERS

# The trainer's and parameter server's copies of W beside the optimizer's buffers: W, the gradient sum, and the
# previous, current and best weights of the epoch loop.
SERVER_COPIES = 5
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    server_bytes: int  # the parameter server (or, without workers, the one process) for W and its buffers
    worker_bytes: int  # each worker
    workers: int  # processes of worker_bytes each (1 when the job computes in the driver's process)
    batch_rows: int  # rows of a worker's batch the activations are counted for

    @property
    def total(self) -> int:
        return self.server_bytes + self.workers * self.worker_bytes


def batch_rows(spec: JobSpec) -> int:
    """The largest batch the spec asks for, where the spec alone says it (see the module's notes)."""
    b = spec.batch
    rows = b.max_size if b.growth > 1 else b.size
    if rows is None and b.size is None and spec.data.source == "synthetic":
        rows = spec.data.n_samples
    return rows or 0


def estimate(spec: JobSpec) -> MemoryEstimate:
    layers, k = spec.model.layers, spec.cluster.num_workers
    p, b = param_count(layers), np.dtype(spec.cluster.dtype).itemsize
    rows = batch_rows(spec)
    per_worker_rows = math.ceil(rows / k) if k and spec.cluster.mode == "sync" else rows
    worker = 2 * p * b + 3 * per_worker_rows * sum(layers) * b
    server = (SERVER_COPIES + len(BUFFERS[spec.optimizer.method])) * p * b
    return MemoryEstimate(p, server, worker, max(k, 1), per_worker_rows)


def machine_memory() -> int:
    """This machine's physical memory, or the container's limit (cgroup v2) when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = CGROUP_LIMIT.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def default_limit() -> int:
    """Half the machine's memory: the rest is for the service (or driver), Ray's object store and the data."""
    return machine_memory() // 2


def size_text(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def check_memory(spec: JobSpec, limit: int) -> MemoryEstimate:
    """The estimate, or a SpecError at model.layers naming it, its parts and the limit when it is over."""
    e = estimate(spec)
    if e.total <= limit:
        return e
    k = spec.cluster.num_workers
    where = (f"{size_text(e.worker_bytes)} per worker x {k} (W, gradient, activations of {e.batch_rows} rows)" if k
             else f"{size_text(e.worker_bytes)} for the gradient and activations of {e.batch_rows} rows")
    raise SpecError.at("model.layers", (
        f"the job needs an estimated {size_text(e.total)} of memory ({e.parameters:,} parameters: "
        f"{size_text(e.server_bytes)} for W and the optimizer's buffers, {where}) but the limit is "
        f"{size_text(limit)} (--max-job-memory); use fewer or narrower layers or a smaller batch"
        f"{', or float32' if spec.cluster.dtype == 'float64' else ''}"))
