"""The gradient worker: a Ray actor and a thin shell over workers/mlp.py.

It reads its own shard of the training rows and its slice of the validation rows from the source (nothing is
shipped through the driver), holds them in the spec's dtype, on the GPU when the device is gpu, and returns
(gradient sum, loss sum, count) for the rows it is given, and (loss sum, correct, count) of its validation
slice. A restarted worker reads the same rows again: they are a function of the spec alone. Across nodes its
sync steps come over the step channel (workers/step_channel.py), served by a thread of this actor.

With a sharded parameter server (``bounds``: server shard s owns W[bounds[s]:bounds[s + 1]]) a worker takes W as
the shards' slices and hands server shard s only its slice of the gradient sum: each shard moves p/S floats a step.
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
# A call this worker died in runs again on its restarted process: each method is pure or resumes where the server
# says it stopped. Only its own methods: the actor's default is no retry (service/engine/placement.worker_options).
RETRIED = ray.method(max_task_retries=-1)


class GradientWorker:
    def __init__(self, spec_json: str, shard: int, num_shards: int, stats=None, bounds: list[int] | None = None):
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
        bounds = bounds or [0, self.mlp.p]
        self.key_ranges = list(zip(bounds[:-1], bounds[1:], strict=True))  # of the server shards, in order
        # (start, end) wall-clock times of each gradient() call, for benchmarks to split a step's time from
        # timestamps (comparable with the parameter server's on one machine); bounded, as nobody may take them.
        self.compute_spans: deque[tuple[float, float]] = deque(maxlen=TIMINGS_KEPT)
        self.channel: ChannelWorker | None = None

    @RETRIED
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

    @RETRIED
    def ping(self) -> int:
        return self.shard

    @RETRIED
    def pid(self) -> int:
        """This process: a fault test checks that a restart really happened."""
        import os

        return os.getpid()

    @RETRIED
    def gradient(self, *args):
        """(gradient sum (p,), loss sum, count) over these rows of the shard; args: W (or its slices, one per server
        shard), then rows. Sharded, one such triple per server shard, with its slice of the gradient sum (the
        method then has num_returns = S, and each slice goes to its own shard)."""
        *W, rows = args
        grad_sum, loss_sum, count = self._gradient(W, rows)
        parts = tuple((grad_sum[lo:hi], loss_sum, count) for lo, hi in self.key_ranges)
        return parts if len(parts) > 1 else parts[0]

    def _gradient(self, W_slices: list, rows: np.ndarray):
        """(gradient sum (p,) on the host, loss sum, count) at the W these slices make up."""
        xp = self.backend.xp
        started = time.time()
        if len(rows) == 0:  # this step's random batch drew nothing from this shard
            out = np.zeros(self.mlp.p, dtype=self.dtype), 0.0, 0
        else:
            idx = xp.asarray(rows)
            W = W_slices[0] if len(W_slices) == 1 else np.concatenate(W_slices)
            grad_sum, loss_sum, count = self.mlp.loss_and_grad(xp.asarray(W), self.X[idx], self.y[idx], self.grad)
            out = to_numpy(grad_sum), loss_sum, count
        self.compute_spans.append((started, time.time()))
        return out

    @RETRIED
    def channel_start(self, role: Role) -> int | None:
        """Serve sync steps over a new step channel in this role (ending any previous one); a leader with
        followers answers the loopback port they connect to."""
        self.channel_stop()
        # The channel slices the node's summed gradient per server shard itself: it takes the whole one.
        self.channel = ChannelWorker(role, self.mlp.p, self.dtype, lambda W, rows: self._gradient([W], rows),
                                     f"gradient worker {self.shard + 1}")
        return self.channel.port

    @RETRIED
    def channel_stop(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()

    @RETRIED
    def take_timings(self) -> list[tuple[float, float]]:
        """(start, end) of each gradient() call since the last take, in time.time() seconds."""
        taken = list(self.compute_spans)
        self.compute_spans.clear()
        return taken

    @RETRIED
    def evaluate(self, W: np.ndarray) -> tuple[float, int | None, int]:
        """(loss sum, correct or None for mse, count) over this worker's validation rows, at weights W."""
        xp = self.backend.xp
        return self.mlp.evaluate(xp.asarray(W), self.X_val, self.y_val)

    @RETRIED
    def run_async_epoch(self, servers: list, epoch: int, batch_size: int, traced: bool = False) -> int:
        """Async mode: pull W -> g_B on n' rows of this shard -> push (g_B, version), over the shard once.

        ``servers``: the server shards, in key order; shard s gets slice s of each gradient and judges it by its own
        version. A gradient a shard turns away as stale is recomputed at fresh weights and pushed again to the shards
        that turned it away, so each shard applies each batch once. After a restart the worker skips, per shard,
        the batches that shard already applied this epoch (its order is a function of the spec and epoch alone),
        and each shard turns away any late push of the pass it replaces. A shard that answers STOP gets no more
        pushes; the pass ends when all have. A push carries its rows and read versions only when ``traced``.
        Returns the number of batches at least one shard applied.
        """
        n = self.X.shape[0]
        order = np.random.default_rng([self.seed, 3, epoch, self.shard]).permutation(n)
        joined = ray.get([server.join_epoch.remote(self.shard) for server in servers])
        done = [j[0] for j in joined]
        self._pass = {"ids": [j[1] for j in joined], "versions": [j[2] for j in joined],
                      "refs": [j[3][0] for j in joined], "stopped": set()}
        applied = 0
        for batch, start in enumerate(range(min(done) * batch_size, n, batch_size), start=min(done)):
            rows = order[start : start + batch_size]
            todo = [s for s in range(len(servers)) if done[s] <= batch and s not in self._pass["stopped"]]
            applied += self._push_until_taken(servers, todo, rows, traced)
            if len(self._pass["stopped"]) == len(servers):
                break
        return applied

    def _push_until_taken(self, servers: list, todo: list[int], rows: np.ndarray, traced: bool) -> bool:
        """Push this batch's gradient to the shards in ``todo`` until none of them answers STALE; whether any
        applied it."""
        state, applied = self._pass, False
        while todo:
            g, loss_sum, count = self._gradient(ray.get(state["refs"]), rows)
            traced_args = (rows, tuple(state["versions"])) if traced else (None, None)
            answers = ray.get([
                servers[s].push.remote(g[lo:hi], loss_sum, count, state["versions"][s], self.shard, state["ids"][s],
                                       *traced_args)
                for s, (lo, hi) in ((s, self.key_ranges[s]) for s in todo)
            ])
            for s, (status, version, (w_ref,)) in zip(todo, answers, strict=True):
                state["versions"][s], state["refs"][s] = version, w_ref
                applied |= status == APPLIED
                if status == STOP:
                    state["stopped"].add(s)
            todo = [s for s, answer in zip(todo, answers, strict=True) if answer[0] == STALE]
        return applied
