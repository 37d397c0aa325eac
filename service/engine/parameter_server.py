"""The parameter server: a Ray actor holding (W, u, t, version), a thin shell over ServerCore.

Sync mode on one node: the nodes ``current`` and ``apply`` of the compiled step graph
(service/engine/sync_engine.py): W goes to the K workers, their gradient sums come back, and ``apply`` takes one
exact step. Across nodes: ``channel_step`` sends W over the step channel (service/engine/step_channel.py) and
applies the one part per node that comes back, with the same ``apply``.

Async mode: ``push`` applies a gradient at once when it is at most ``max_staleness`` versions old and
answers with the current version and a reference to W, put in the object store once per version.

Sharded (``cluster.num_servers`` S > 1): S of these actors, server shard s holding W[lo:hi] and the same range of
every buffer. Each takes the K workers' slices of its range in sync mode, and in async mode judges each push by
its own version alone; records name the shard (``server``), and an update records the versions of every shard
its gradient's W was read at.

Asked for (``trace=True``, a debugging and testing aid, off by default), the server records what it did in
async mode: every applied update with the version its W was read at and its rows, each worker joining an
epoch, a cancel reaching it. The engine fetches the records with each epoch's figures; they are enough to
replay the run from W0 (tests/test_async_replay.py does, in NumPy).
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from polyak.contract.spec import JobSpec
from polyak.service.engine.engine import EpochFigures
from polyak.service.engine.ps_core import EpochPart, ServerCore, combine_parts
from polyak.service.engine.step_channel import ChannelServer
from polyak.workers.gradient_worker import APPLIED, STALE, STOP, TIMINGS_KEPT
from polyak.workers.step_channel import ChannelLost


@dataclass(frozen=True)
class Update:
    """An applied async update: the mean gradient of ``rows`` at the W of ``read_version``, applied as step
    ``step`` (step size ``lr``) to the W of ``version - 1``."""

    epoch: int
    shard: int
    rows: np.ndarray  # the batch: positions in the shard here; training-set rows once the engine has it
    count: int
    read_version: int  # of this server shard
    version: int  # the version this update produced
    step: int  # t before the update: eta_t
    lr: float
    read_versions: tuple[int, ...] = ()  # of every server shard, when the gradient's W was read
    server: int = 0  # the server shard that applied it (to its key range)


@dataclass(frozen=True)
class Join:
    """A worker starting its pass over its shard, or resuming it after a restart: it skips ``skipped`` batches."""

    epoch: int
    shard: int
    skipped: int
    version: int
    server: int = 0


@dataclass(frozen=True)
class Stop:
    """A cancel reached the server at ``version``: every push after it is turned away."""

    version: int
    server: int = 0


@dataclass(frozen=True)
class Restore:
    """The engine put the server (every shard) back at ``version`` (0: W0; else a checkpoint's W and buffers)."""

    version: int


@dataclass(frozen=True)
class EpochHandover:
    """What the server hands the engine at the end of an epoch: its part of the epoch's figures, the state a
    checkpoint of it holds, and the evidence of faults the engine checks."""

    part: EpochPart  # the engine combines the shards' parts (combine_parts)
    arrays: dict[str, np.ndarray]  # W and the method's buffers (this shard's key range of them)
    counters: dict[str, int]  # step, version
    incarnation: str  # the actor's life that ran the epoch: not the one at its start means it restarted
    rejoins: int  # gradient workers that joined the epoch again after a restart (async)
    trace: list[Update | Join | Stop]  # the epoch's records; empty unless tracing

    @property
    def figures(self) -> EpochFigures:
        """The epoch's figures as this shard alone saw them (a whole server's when S = 1)."""
        return combine_parts([self.part])


class ParameterServer:
    def __init__(self, spec_json: str, num_params: int, trace: bool = False, key_range: tuple[int, int] | None = None,
                 index: int = 0):
        """The whole W of ``num_params``, or server shard ``index`` over W[lo:hi] when ``key_range`` is (lo, hi)."""
        # Weights arrive by restore(): a restarted actor then holds nothing stale, and no constructor
        # argument has to outlive its object-store reference.
        spec = JobSpec.model_validate_json(spec_json)
        # One BLAS thread: idle OpenBLAS threads spin, and would take the cores the workers compute on.
        self._blas_limits = threadpool_limits(limits=1)
        lo, hi = key_range or (0, num_params)
        self.index = index
        self.core = ServerCore(spec, np.zeros(hi - lo, dtype=spec.cluster.dtype), key_range=(lo, hi))
        self.max_staleness = spec.cluster.max_staleness
        self._published: tuple[int, ray.ObjectRef] | None = None
        # A restarted actor runs __init__ again with the initial weights: the driver notices by this id.
        self.incarnation = uuid.uuid4().hex
        # (shard or None in sync mode, start, end) of each update, or of each async push turned away (start ==
        # end): benchmarks pair them with the workers' compute spans to time a step's parts from timestamps.
        self.update_spans: deque[tuple[int | None, float, float]] = deque(maxlen=TIMINGS_KEPT)
        self.tracing = trace
        self.trace: list[Update | Join | Stop] = []  # this epoch's records; handed over by end_epoch
        self.channel: ChannelServer | None = None
        self._begin_epoch(step_limit=None, epoch=-1)

    def _begin_epoch(self, step_limit: int | None, epoch: int) -> None:
        self.epoch = epoch
        self.step_limit = step_limit
        self.stopped = False
        self.staleness: list[int] = []
        self.dropped = 0
        self.applied_by_shard: dict[int, int] = {}
        # Each join starts a pass with a new id, unique across epochs and restarts of this actor: a second join
        # in one epoch is a restarted worker, and the pushes of any pass but a shard's latest this epoch are
        # turned away, however late they arrive.
        self.passes: dict[int, str] = {}
        self.rejoins = 0

    # -- sync (the compiled graph's two server nodes) ------------------------------------------------
    def current(self, _rows) -> np.ndarray:
        """W for this step's workers; serialised into the graph's channel before apply can change it."""
        return self.core.state.W

    def apply(self, *parts) -> int:
        started = time.time()
        self.core.apply_parts(parts)
        self.update_spans.append((None, started, time.time()))
        return self.core.state.version

    def step_count(self) -> int:
        return self.core.state.step

    # -- sync across nodes (the step channel) ---------------------------------------------------------
    def channel_listen(self) -> tuple[str, int]:
        """A new channel's address on this node; any previous channel is closed."""
        self.channel_close()
        self.channel = ChannelServer(ray.util.get_node_ip_address())
        return self.channel.address

    def channel_accept(self, nodes: list[list[int]], names: list[str], token: bytes, timeout: float) -> None:
        self._channel().accept(nodes, names, token, self.core.state.W.size, self.core.dtype, timeout)

    def channel_step(self, rows: list, timeout: float) -> int:
        """One step: W and each node's rows out, the nodes' parts in, applied; raises ChannelLost."""
        return self.apply(*self._channel().exchange(self.core.state.W, rows, timeout))

    def _channel(self) -> ChannelServer:
        if self.channel is None:  # closed, or this actor restarted since it was opened
            raise ChannelLost("no step channel is open")
        return self.channel

    def channel_close(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()

    # -- async -------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, step_budget: int | None) -> str:
        """Async: the PS stops accepting gradients after ``step_budget`` more steps (or ``stop``). Answers
        with its incarnation: a server that restarted since the last epoch must not be trained on."""
        self._begin_epoch(None if step_budget is None else self.core.state.step + step_budget, epoch)
        return self.incarnation

    def stop(self) -> None:
        self.stopped = True
        self._record(Stop(self.core.state.version, self.index))

    def _record(self, item) -> None:
        if self.tracing:
            self.trace.append(item)

    def _current(self) -> tuple[int, list]:
        version = self.core.state.version
        if self._published is None or self._published[0] != version:
            self._published = (version, ray.put(self.core.state.W))
        return version, [self._published[1]]  # in a list so Ray hands over the reference, not the array

    def join_epoch(self, shard: int):
        """(batches of this shard already applied this epoch, this pass's id, version, [W ref])."""
        if shard in self.passes:
            self.rejoins += 1
        self.passes[shard] = uuid.uuid4().hex
        done = self.applied_by_shard.get(shard, 0)
        self._record(Join(self.epoch, shard, done, self.core.state.version, self.index))
        return (done, self.passes[shard], *self._current())

    def push(self, grad_sum: np.ndarray, loss_sum: float, count: int, version: int, shard: int, pass_id: str,
             rows: np.ndarray | None, read_versions: tuple[int, ...] | None = None):
        """Apply a worker's gradient of ``rows`` computed at ``version`` of this shard (and ``read_versions`` of every
        shard; both sent only when tracing), unless stale; answers (status, version, [W ref])."""
        state = self.core.state
        started = time.time()
        if (self.stopped or (self.step_limit is not None and state.step >= self.step_limit)
                or pass_id != self.passes.get(shard)):  # a dead worker's late push: its restart redoes it
            self.update_spans.append((shard, started, started))
            return (STOP, *self._current())
        staleness = state.version - version
        if staleness > self.max_staleness:
            self.dropped += 1
            self.update_spans.append((shard, started, started))
            return (STALE, *self._current())
        step, lr = state.step, self.core.optimizer.lr(state.step)
        self.core.apply(grad_sum, loss_sum, count)
        self.update_spans.append((shard, started, time.time()))
        self.staleness.append(staleness)
        self.applied_by_shard[shard] = self.applied_by_shard.get(shard, 0) + 1
        self._record(Update(self.epoch, shard, np.asarray(rows), count, version, self.core.state.version, step, lr,
                            tuple(read_versions or (version,)), self.index))
        return (APPLIED, *self._current())

    # -- both --------------------------------------------------------------------------------------
    def end_epoch(self) -> EpochHandover:
        """The epoch's figures and the whole state a checkpoint of it holds; the next epoch starts afresh."""
        part = dataclasses.replace(self.core.take_part(), staleness=tuple(self.staleness), dropped=self.dropped)
        handover = EpochHandover(part, *self.core.snapshot(), self.incarnation, self.rejoins, self.trace)
        self.trace = []
        self._begin_epoch(None, -1)
        return handover

    def restore(self, arrays: dict, counters: dict) -> None:
        self.core.restore(arrays, counters)
        self._published = None
        self.trace = []  # records of the state just replaced: the engine notes the restore itself
        self._begin_epoch(None, -1)

    def ping(self) -> str:
        return self.incarnation

    def node(self) -> str:
        """The node this shard runs on: where it landed decides how a sync step travels."""
        return ray.get_runtime_context().get_node_id()

    def take_timings(self) -> list[tuple[int | None, float, float]]:
        """(shard or None, start, end) of each update since the last take, in time.time() seconds."""
        taken = list(self.update_spans)
        self.update_spans.clear()
        return taken

    def pid(self) -> int:
        """This process: benchmarks measure its memory, fault tests check that a restart happened."""
        return os.getpid()
