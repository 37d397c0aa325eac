"""Async on Ray: each worker runs its own pull/compute/push loop over its shard with ordinary actor calls.

The parameter server drops gradients more than ``max_staleness`` versions old; a sharded one (S > 1) judges
each shard's slice by that shard's own version, as ps-lite's servers do. A worker that dies is restarted by Ray
and resumes its pass after the batches the server already applied. ``AsyncRayEngine(..., trace=True)`` keeps
the server's record of every update (``engine.trace``): enough to replay the run from W0.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from polyak.service.engine.engine import ParameterServerLost
from polyak.service.engine.ray_engine import NODE_CHECK_SECONDS, RayEngine


class AsyncRayEngine(RayEngine):
    """Bounded-staleness updates; ``trace=True`` keeps the server's record of every update in ``self.trace``."""

    mode = "async"
    drives_steps = True

    def run_epoch(self, epoch: int, batch_size: int, step_budget: int | None,
                  should_cancel: Callable[[], bool]) -> bool:
        """Let every worker pass over its shard once (at most ``step_budget`` steps); True when cancelled."""
        begun = tuple(ray.get([server.begin_epoch.remote(epoch, step_budget) for server in self.servers]))
        if begun != self.incarnation:
            raise ParameterServerLost("the parameter server restarted after the last epoch")
        runs = [w.run_async_epoch.remote(self.pushes_to(), epoch, batch_size, self.trace is not None)
                for w in self.workers]
        pending, cancelled, checked = runs, False, time.monotonic()
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.1)
            if pending and not cancelled and should_cancel():
                for server in self.servers:
                    server.stop.remote()
                cancelled = True
            if pending and time.monotonic() - checked > NODE_CHECK_SECONDS:
                self.check_nodes()
                checked = time.monotonic()
        ray.get(runs)
        return cancelled

    def pushes_to(self) -> list:
        """The handles the workers join, pull from and push to, one per server shard in key order (fault tests
        put a proxy between)."""
        return self.servers
