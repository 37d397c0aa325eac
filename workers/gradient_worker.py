"""The gradient worker: a Ray actor and a thin shell over workers/mlp.py.

It reads its own shard of the training rows and its slice of the validation rows from the source (nothing is
shipped through the driver), holds them in the spec's dtype, on the GPU when the device is gpu, and returns
(gradient sum, loss sum, count) for the rows it is given, and (loss sum, correct, count) of its validation
slice. A restarted worker reads the same rows again: they are a function of the spec alone. Across nodes its
sync steps come over the step channel (workers/step_channel.py), served by a thread of this actor.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import ray

from polyak.contract.spec import JobSpec
from polyak.workers.backend import get_backend, to_numpy
from polyak.workers.data import load_shard
from polyak.workers.mlp import MLP
from polyak.workers.step_channel import ChannelWorker, Role

# The answers of ParameterServer.push; defined here because workers never import service code.
APPLIED, STALE, STOP = "applied", "stale", "stop"
TIMINGS_KEPT = 100_000  # the latest calls' timings a worker or the parameter server keeps


class GradientWorker:
    def __init__(self, spec_json: str, shard: int, num_shards: int, stats=None):
        spec = JobSpec.model_validate_json(spec_json)
        self.backend = get_backend(spec.cluster.device)
        if self.backend.device == "cpu":
            # One BLAS thread per worker: K workers on K cores, not K x cores threads fighting.
            from threadpoolctl import threadpool_limits

            self._limits = threadpool_limits(limits=1)
        xp, dtype = self.backend.xp, np.dtype(spec.cluster.dtype)
        train, val = load_shard(spec.data, spec.model, dtype, stats, shard, num_shards)
        self.X, self.y = xp.asarray(train.X), xp.asarray(train.y)  # (n_k, m_0): rows of this shard, source order
        self.X_val, self.y_val = xp.asarray(val.X), xp.asarray(val.y)
        del train, val  # on a GPU the host copies go now
        self.mlp = MLP(spec.model.layers, spec.model.activation, spec.model.loss, xp, dtype)
        self.grad = xp.empty(self.mlp.p, dtype=dtype)
        self.dtype = dtype
        self.seed = spec.model.seed
        self.shard = shard
        # (start, end) wall-clock times of each gradient() call, for benchmarks to split a step's time from
        # timestamps (comparable with the parameter server's on one machine); bounded, as nobody may take them.
        self.compute_spans: deque[tuple[float, float]] = deque(maxlen=TIMINGS_KEPT)
        self.channel: ChannelWorker | None = None

    def info(self) -> dict:
        """What the driver needs to place the job's steps: this worker's rows, device and node."""
        return {
            "rows": int(self.X.shape[0]),
            "val_rows": int(self.X_val.shape[0]),
            "device": self.backend.describe(),
            "shard": self.shard,
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
        }

    def ping(self) -> int:
        return self.shard

    def pid(self) -> int:
        """This process: a fault test checks that a restart really happened."""
        import os

        return os.getpid()

    def gradient(self, W: np.ndarray, rows: np.ndarray):
        """(gradient sum (p,), loss sum, count) over these rows of the shard, at weights W."""
        xp = self.backend.xp
        started = time.time()
        if len(rows) == 0:  # this step's random batch drew nothing from this shard
            out = np.zeros(self.mlp.p, dtype=self.dtype), 0.0, 0
        else:
            idx = xp.asarray(rows)
            grad_sum, loss_sum, count = self.mlp.loss_and_grad(xp.asarray(W), self.X[idx], self.y[idx], self.grad)
            out = to_numpy(grad_sum), loss_sum, count
        self.compute_spans.append((started, time.time()))
        return out

    def channel_start(self, role: Role) -> int | None:
        """Serve sync steps over a new step channel in this role (ending any previous one); a leader with
        followers answers the loopback port they connect to."""
        self.channel_stop()
        self.channel = ChannelWorker(role, self.mlp.p, self.dtype, self.gradient, f"gradient worker {self.shard + 1}")
        return self.channel.port

    def channel_stop(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()

    def take_timings(self) -> list[tuple[float, float]]:
        """(start, end) of each gradient() call since the last take, in time.time() seconds."""
        taken = list(self.compute_spans)
        self.compute_spans.clear()
        return taken

    def evaluate(self, W: np.ndarray) -> tuple[float, int | None, int]:
        """(loss sum, correct or None for mse, count) over this worker's validation rows, at weights W."""
        xp = self.backend.xp
        return self.mlp.evaluate(xp.asarray(W), self.X_val, self.y_val)

    def run_async_epoch(self, server, epoch: int, batch_size: int, traced: bool = False) -> int:
        """Async mode: pull W -> g_B on n' rows of this shard -> push (g_B, version), over the shard once.

        A stale gradient is recomputed at fresh weights. After a restart the worker skips the batches
        the server already applied this epoch (its order is a function of the spec and epoch alone), and the
        server turns away any late push of the pass it replaces. A push carries its rows only when the server
        ``traced`` (keeps a record of every update). Returns the number of pushes that were applied.
        """
        n = self.X.shape[0]
        order = np.random.default_rng([self.seed, 3, epoch, self.shard]).permutation(n)
        done, pass_id, version, (w_ref,) = ray.get(server.join_epoch.remote(self.shard))
        applied = 0
        for start in range(done * batch_size, n, batch_size):
            rows = order[start : start + batch_size]
            while True:
                g, loss_sum, count = self.gradient(ray.get(w_ref), rows)
                push = server.push.remote(g, loss_sum, count, version, self.shard, pass_id, rows if traced else None)
                status, version, (w_ref,) = ray.get(push)
                if status != STALE:
                    break
            if status == STOP:
                break
            applied += 1
        return applied
