"""The parameter server: a Ray actor holding (W, u, t, version), a thin shell over ServerCore.

Sync mode: the nodes ``current`` and ``apply`` of the compiled step graph (service/engine/ray_engine.py):
W goes to the K workers, their gradient sums come back, and ``apply`` takes one exact step.

Async mode: ``push`` applies a gradient at once when it is at most ``max_staleness`` versions old and
answers with the current version and a reference to W, put in the object store once per version.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from client.spec import JobSpec
from service.engine.ps_core import ServerCore
from workers.gradient_worker import APPLIED, STALE, STOP, TIMINGS_KEPT


class ParameterServer:
    def __init__(self, spec_json: str, num_params: int):
        # Weights arrive by restore(): a restarted actor then holds nothing stale, and no constructor
        # argument has to outlive its object-store reference.
        spec = JobSpec.model_validate_json(spec_json)
        # One BLAS thread: idle OpenBLAS threads spin, and would take the cores the workers compute on.
        self._blas_limits = threadpool_limits(limits=1)
        self.core = ServerCore(spec, np.zeros(num_params, dtype=spec.cluster.dtype))
        self.max_staleness = spec.cluster.max_staleness
        self._published: tuple[int, ray.ObjectRef] | None = None
        # A restarted actor runs __init__ again with the initial weights: the driver notices by this id.
        self.incarnation = uuid.uuid4().hex
        self.update_seconds: deque[float] = deque(maxlen=TIMINGS_KEPT)  # per applied step, for benchmarks
        self._begin_epoch(step_limit=None)

    def _begin_epoch(self, step_limit: int | None) -> None:
        self.step_limit = step_limit
        self.stopped = False
        self.staleness: list[int] = []
        self.dropped = 0
        self.applied_by_shard: dict[int, int] = {}

    # -- sync (the compiled graph's two server nodes) ------------------------------------------------
    def current(self, _rows) -> np.ndarray:
        """W for this step's workers; serialised into the graph's channel before apply can change it."""
        return self.core.state.W

    def apply(self, *parts) -> int:
        started = time.perf_counter()
        self.core.apply_parts(parts)
        self.update_seconds.append(time.perf_counter() - started)
        return self.core.state.version

    def step_count(self) -> int:
        return self.core.state.step

    # -- async -------------------------------------------------------------------------------------
    def begin_epoch(self, step_budget: int | None) -> None:
        """Async: the PS stops accepting gradients after ``step_budget`` more steps (or ``stop``)."""
        self._begin_epoch(None if step_budget is None else self.core.state.step + step_budget)

    def stop(self) -> None:
        self.stopped = True

    def _current(self) -> tuple[int, list]:
        version = self.core.state.version
        if self._published is None or self._published[0] != version:
            self._published = (version, ray.put(self.core.state.W))
        return version, [self._published[1]]  # in a list so Ray hands over the reference, not the array

    def join_epoch(self, shard: int):
        """(batches of this shard already applied this epoch, version, [W ref])."""
        return (self.applied_by_shard.get(shard, 0), *self._current())

    def push(self, grad_sum: np.ndarray, loss_sum: float, count: int, version: int, shard: int):
        """Apply a worker's gradient computed at ``version``, unless stale; answers (status, version, [W ref])."""
        if self.stopped or (self.step_limit is not None and self.core.state.step >= self.step_limit):
            return (STOP, *self._current())
        staleness = self.core.state.version - version
        if staleness > self.max_staleness:
            self.dropped += 1
            return (STALE, *self._current())
        started = time.perf_counter()
        self.core.apply(grad_sum, loss_sum, count)
        self.update_seconds.append(time.perf_counter() - started)
        self.staleness.append(staleness)
        self.applied_by_shard[shard] = self.applied_by_shard.get(shard, 0) + 1
        return (APPLIED, *self._current())

    # -- both --------------------------------------------------------------------------------------
    def end_epoch(self) -> tuple[dict, np.ndarray]:
        figures = self.core.end_epoch()
        if self.staleness or self.dropped:  # async only: sync steps are never stale
            figures.update(
                staleness_mean=float(np.mean(self.staleness)) if self.staleness else None,
                staleness_max=int(max(self.staleness)) if self.staleness else None,
                dropped=self.dropped,
            )
        figures["incarnation"] = self.incarnation
        self._begin_epoch(None)
        return figures, self.core.state.W

    def snapshot(self):
        return self.core.snapshot()

    def restore(self, arrays: dict, counters: dict) -> None:
        self.core.restore(arrays, counters)
        self._published = None
        self._begin_epoch(None)

    def ping(self) -> str:
        return self.incarnation

    def take_timings(self) -> list[float]:
        """Seconds of each update since the last take."""
        taken = list(self.update_seconds)
        self.update_seconds.clear()
        return taken

    def pid(self) -> int:
        """This process: benchmarks measure its memory, fault tests check that a restart happened."""
        return os.getpid()
