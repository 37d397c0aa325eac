"""The epoch loop, written once: batching, metrics, stopping, checkpoints, cancel.

It runs against an engine (service/engine/engine.py) that takes the steps of the epoch's batches — in this
process (LocalEngine) or on Ray (SyncRayEngine, AsyncRayEngine) — and reports each epoch's figures. Read top to
bottom: ``run`` hands the job to a ``Training``, whose loop runs an epoch (``run_epoch``), recovers a lost
parameter server or fails the job on a fatal fault, then judges the epoch (``conclude``): diverged, cancelled,
stopped by a criterion, or checkpointed for the next one.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from polyak.contract.network import from_dict, to_dict
from polyak.contract.spec import JobSpec
from polyak.contract.wire import EpochMetrics, JobState, StopReason
from polyak.service.engine.checkpoint import load_npz, save_npz
from polyak.service.engine.criteria import EpochOutcome, Stopper, relative_change
from polyak.service.engine.engine import Engine, EpochFigures, TrainerDrivenEngine, WorkerDrivenEngine
from polyak.service.engine.schedules import batch_size, epoch_batches
from polyak.service.engine.trace_file import tracing_requested, write_part
from polyak.service.engine.tracking import model_files, trackers_for
from polyak.workers.data import DataInfo, prepare
from polyak.workers.mlp import init_params
from polyak.workers.readers.remote import OpenCancelled, cancellable
from polyak.workers.readers.source import Source

log = logging.getLogger(__name__)

ENGINE_BUILDS = 3  # a server or worker killed while the engine's actors start is a fault to retry, not the job's end

CHECKPOINT = "checkpoint.npz"
BEST_WEIGHTS = "best.npz"
LAST_WEIGHTS = "weights.npz"
# best.npz and the checkpoint are committed together: an epoch's new best weights are written to best.epoch<E>.npz,
# then the checkpoint of epoch E (the commit), then renamed to best.npz. A crash leaves at most that one pending
# file, and ``settle_best`` decides by the checkpoint: committed (E <= its epoch) or to be redone (E after it).
PENDING_BEST = "best.epoch{epoch}.npz"


def settle_best(job_dir: Path, checkpoint_epoch: int) -> None:
    """Finish or undo the commit a crash cut short, so that best.npz is the best of the epochs the checkpoint
    holds."""
    head, tail = PENDING_BEST.split("{epoch}")
    pending = sorted((int(p.name[len(head):-len(tail)]), p) for p in job_dir.glob(f"{head}*{tail}"))
    for epoch, path in pending:
        if epoch <= checkpoint_epoch:
            commit_best(path)
        else:
            path.unlink()


def commit_best(pending: Path) -> None:
    os.replace(pending, pending.with_name(BEST_WEIGHTS))


@dataclass
class Hooks:
    on_epoch: Callable[[EpochMetrics], None] = lambda m: None
    on_start: Callable[[str], None] = lambda where: None  # the engine's describe(), once it is built
    should_cancel: Callable[[], bool] = lambda: False
    job_dir: Path | None = None  # checkpoint.npz every epoch, best.npz, weights.npz at the end


@dataclass
class TrainResult:
    state: JobState
    stop_reason: StopReason
    weights: np.ndarray
    best_weights: np.ndarray | None = None
    error: str | None = None
    metrics: list[EpochMetrics] = field(default_factory=list)


def initial_weights(spec: JobSpec) -> np.ndarray:
    """The random init of MATH.md (seeded), or ``init_weights`` when the spec names a file."""
    layers, dtype = spec.model.layers, np.dtype(spec.cluster.dtype)
    if spec.init_weights:
        path = Path(spec.init_weights)
        try:
            arrays = load_npz(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"init_weights: cannot read {path}: {e}") from None
        try:
            return from_dict(arrays, layers, dtype)
        except ValueError as e:
            raise ValueError(f"init_weights: {path}: {e}") from None
    return init_params(layers, spec.model.init_scale, np.random.default_rng([spec.model.seed, 0]), np, dtype)


def weights_file(W: np.ndarray, spec: JobSpec, info: DataInfo) -> dict[str, np.ndarray]:
    """The weights file's arrays (DESIGN.md): W1, b1, ..., WL, bL; x_mean, x_std when the job standardized its
    inputs; and the spec as JSON in a 0-d unicode array, so the file alone is a model of raw inputs."""
    arrays = to_dict(W, spec.model.layers)
    if info.x_mean is not None:
        arrays.update(x_mean=np.asarray(info.x_mean, np.float64), x_std=np.asarray(info.x_std, np.float64))
    arrays["spec"] = np.array(spec.model_dump_json())
    return arrays


def make_engine(spec: JobSpec, info: DataInfo, W0: np.ndarray,
                source: Source | None = None) -> TrainerDrivenEngine | WorkerDrivenEngine:
    """In this process for num_workers 0 (Ray is not even imported), else on the connected Ray cluster.
    ``source``: the spec's data already open in this process, for num_workers 0 (Ray's workers read their own)."""
    if spec.cluster.num_workers == 0:
        from polyak.service.engine.local_engine import LocalEngine

        return LocalEngine(spec, info, W0, source)
    if spec.cluster.mode == "async":
        from polyak.service.engine.async_engine import AsyncRayEngine

        return AsyncRayEngine(spec, info, W0, trace=tracing_requested())
    from polyak.service.engine.sync_engine import SyncRayEngine

    return SyncRayEngine(spec, info, W0)


def build_engine(spec: JobSpec, info: DataInfo, W0: np.ndarray,
                 source: Source | None = None) -> TrainerDrivenEngine | WorkerDrivenEngine:
    """make_engine, built again (at most ENGINE_BUILDS times) when an actor is lost while the engine starts: before
    its first step there is no checkpoint to go back to, so the trainer's recovery cannot cover that moment."""
    if spec.cluster.num_workers == 0:
        return make_engine(spec, info, W0, source)
    from ray.exceptions import ActorUnavailableError, RayChannelError

    from polyak.service.engine.engine import ParameterServerLost

    for _ in range(ENGINE_BUILDS - 1):
        try:
            return make_engine(spec, info, W0)
        except (ActorUnavailableError, RayChannelError, ParameterServerLost) as e:
            log.warning("an actor was lost while the engine started (%s); starting it again", type(e).__name__)
    return make_engine(spec, info, W0)


def validate(engine: Engine, info: DataInfo, W: np.ndarray) -> tuple[float | None, float | None]:
    """Validation loss and accuracy: the sums the engine's parts return, divided once here."""
    if info.n_val == 0:
        return None, None
    loss_sum, correct, n = engine.evaluate(W)
    return loss_sum / n, (correct / n if correct is not None else None)


def _first_non_finite(step_losses: np.ndarray) -> int | None:
    bad = np.flatnonzero(~np.isfinite(step_losses))
    return int(bad[0]) if bad.size else None


@dataclass
class Progress:
    """Where a job stands between epochs; stored in every checkpoint so a resumed job picks up here."""

    epoch: int = 0
    step: int = 0
    samples_seen: int = 0
    elapsed_seconds: float = 0.0
    stopper: dict | None = None

    @classmethod
    def from_meta(cls, meta: dict) -> Progress:
        return cls(**{k: meta[k] for k in ("epoch", "step", "samples_seen", "elapsed_seconds", "stopper") if k in meta})


MAX_RECOVERIES = 3


def run(spec: JobSpec, info: DataInfo, engine: TrainerDrivenEngine | WorkerDrivenEngine, job_id: str = "local",
        hooks: Hooks | None = None) -> TrainResult:
    """Train until a stopping criterion is met, the job is cancelled, or it diverges.

    With ``hooks.job_dir`` the job resumes from its checkpoint there, and a parameter server lost
    mid-epoch (``engine.recoverable``) is restored from the last checkpoint and the epoch redone.
    """
    return Training(spec, info, engine, job_id, hooks or Hooks()).run()


@dataclass(frozen=True)
class EpochResult:
    """What one epoch's steps left behind, before the trainer judges it."""

    figures: EpochFigures
    W: np.ndarray
    batch_size: int
    seconds: float  # the steps and end_epoch, not validation
    val_loss: float | None
    val_accuracy: float | None
    cancelled: bool


class Training:
    """One job's epoch loop: where it stands (progress, stopper, the weights of the last epoch), its files and
    the metrics so far."""

    def __init__(self, spec: JobSpec, info: DataInfo, engine: TrainerDrivenEngine | WorkerDrivenEngine,
                 job_id: str, hooks: Hooks):
        self.spec, self.info, self.engine, self.job_id, self.hooks = spec, info, engine, job_id, hooks
        self.job_dir = Path(hooks.job_dir) if hooks.job_dir else None
        self.checkpoint = self.job_dir / CHECKPOINT if self.job_dir else None
        self.best_file = self.job_dir / BEST_WEIGHTS if self.job_dir else None
        self.metrics: list[EpochMetrics] = []
        self.pending_best: Path | None = None  # this epoch's best weights, until its checkpoint commits them
        self.trace_written = 0  # engine.trace records already in the job dir (POLYAK_ASYNC_TRACE)
        self.resume()
        if self.job_dir:
            settle_best(self.job_dir, self.progress.epoch)
        self.best_W = (from_dict(load_npz(self.best_file), spec.model.layers, self.W_prev.dtype)
                       if self.best_file and self.best_file.exists() else None)

    def resume(self) -> None:
        """From the checkpoint when there is one, else from the engine's initial state."""
        meta = self.engine.restore(self.checkpoint) if self.checkpoint and self.checkpoint.exists() else {}
        self.progress, self.stopper = Progress.from_meta(meta), Stopper(self.spec.stopping)
        if self.progress.stopper:
            self.stopper.load_state(self.progress.stopper)
        del self.metrics[self.progress.epoch :]  # epochs after the checkpoint are redone and reported again
        self.W_prev = self.engine.weights()

    def run(self) -> TrainResult:
        stopping = self.spec.stopping
        if stopping.max_epochs == 0 or stopping.max_steps == 0:
            reason = StopReason.MAX_EPOCHS if stopping.max_epochs == 0 else StopReason.MAX_STEPS
            return self.finish(JobState.SUCCEEDED, reason, self.W_prev)
        recoveries = 0
        while True:
            try:
                epoch = run_epoch(self.spec, self.info, self.engine, self.progress, self.hooks.should_cancel)
            except self.engine.recoverable:
                recoveries += 1
                if recoveries > MAX_RECOVERIES:
                    raise
                self.engine.recover()
                self.resume()
                continue
            except self.engine.fatal as e:
                return self.finish(JobState.FAILED, StopReason.ERROR, self.W_prev, fatal_message(e, self.progress))
            result = self.conclude(epoch)
            if result is not None:
                return result

    def conclude(self, epoch: EpochResult) -> TrainResult | None:
        """Judge the epoch: its end (diverged, cancelled, a criterion met) or a checkpoint and the next one."""
        diverged = divergence(epoch, self.progress)
        if diverged is not None:
            return self.finish(JobState.FAILED, StopReason.DIVERGED, self.W_prev, diverged)
        if epoch.cancelled and len(epoch.figures.step_losses) == 0:
            return self.finish(JobState.CANCELLED, StopReason.CANCELLED, epoch.W)
        m = self.record(epoch)
        self.write_trace()
        self.hooks.on_epoch(m)
        if m.stop is not None:
            state = JobState.CANCELLED if m.stop == StopReason.CANCELLED else JobState.SUCCEEDED
            return self.finish(state, m.stop, epoch.W)
        if self.checkpoint:
            self.progress.stopper = self.stopper.state()
            self.engine.checkpoint(self.checkpoint, asdict(self.progress))
            self.commit_best()
            save_npz(self.job_dir / LAST_WEIGHTS, weights_file(epoch.W, self.spec, self.info))  # GET /weights
        self.W_prev = epoch.W
        return None

    def commit_best(self) -> None:
        if self.pending_best is not None:
            commit_best(self.pending_best)
            self.pending_best = None

    def record(self, epoch: EpochResult) -> EpochMetrics:
        """Count the epoch in, keep its weights if they are the best so far, and check the stopping criteria."""
        figures, progress = epoch.figures, self.progress
        progress.epoch += 1
        progress.step = figures.step
        progress.samples_seen += figures.samples
        progress.elapsed_seconds += epoch.seconds
        train_loss = float(figures.step_losses.mean()) if len(figures.step_losses) else None
        # A cut-short epoch is no candidate for the best weights: a server stopping mid-epoch drops it.
        if not epoch.cancelled and self.stopper.observe_validation(progress.epoch, epoch.val_loss):
            self.best_W = epoch.W.copy()
            if self.best_file:
                self.pending_best = self.job_dir / PENDING_BEST.format(epoch=progress.epoch)
                save_npz(self.pending_best, weights_file(epoch.W, self.spec, self.info))
        outcome = EpochOutcome(progress.epoch, progress.step, train_loss, epoch.val_loss,
                               relative_change(epoch.W, self.W_prev), figures.grad_avg_norm)
        criteria, stop = self.stopper.check(outcome)
        m = epoch_metrics(self.job_id, progress, epoch, outcome, criteria,
                          StopReason.CANCELLED if epoch.cancelled else stop)
        self.metrics.append(m)
        return m

    def write_trace(self) -> None:
        """The trace records not yet in the job dir, before the epoch's checkpoint (service/engine/trace_file.py)."""
        trace = getattr(self.engine, "trace", None)
        if trace is not None and self.job_dir:
            write_part(self.job_dir, trace[self.trace_written :])
            self.trace_written = len(trace)

    def finish(self, state: JobState, reason: StopReason, W: np.ndarray, error: str | None = None) -> TrainResult:
        # The job ends here, with no checkpoint after its last epoch: the end commits that epoch's best weights (a
        # crash before it resumes from the checkpoint before, and that epoch is redone).
        self.commit_best()
        if self.job_dir:
            save_npz(self.job_dir / LAST_WEIGHTS, weights_file(W, self.spec, self.info))
        return TrainResult(state, reason, W, self.best_W, error, self.metrics)


def run_epoch(spec: JobSpec, info: DataInfo, engine: TrainerDrivenEngine | WorkerDrivenEngine, progress: Progress,
              should_cancel: Callable[[], bool]) -> EpochResult:
    """The next epoch's steps, the engine's figures of them, and validation of the weights they reached."""
    bs = batch_size(spec.batch, info.n_train, progress.epoch)
    budget = None if spec.stopping.max_steps is None else max(spec.stopping.max_steps - progress.step, 0)
    started = time.perf_counter()
    if engine.drives_steps:  # async: each worker passes over its own shard, t' = sum_k ceil(n_k / n')
        cancelled = engine.run_epoch(progress.epoch, bs, budget, should_cancel)
    else:
        batches = epoch_batches(spec.batch, spec.model.seed, progress.epoch, info.n_train)
        cancelled = hand_over(engine, itertools.islice(batches, budget), should_cancel)
    figures = engine.end_epoch()
    W = engine.weights()
    seconds = time.perf_counter() - started
    # Validation runs on the engine's parts too (the workers hold the rows): a lost node shows up here.
    val_loss, val_accuracy = validate(engine, info, W) if np.isfinite(W).all() else (None, None)
    return EpochResult(figures, W, bs, seconds, val_loss, val_accuracy, cancelled)


def hand_over(engine: TrainerDrivenEngine, batches: Iterable[np.ndarray], should_cancel: Callable[[], bool]) -> bool:
    """One engine step per batch, while the job is not cancelled; True when it was."""
    for batch in batches:
        if should_cancel():
            return True
        engine.step(batch)
    return False


def divergence(epoch: EpochResult, progress: Progress) -> str | None:
    """Why the epoch diverged (a non-finite loss or weights), naming its first bad step; None when it did not."""
    step_losses = epoch.figures.step_losses
    bad = _first_non_finite(step_losses)
    if bad is None and np.isfinite(epoch.W).all():
        return None
    at = progress.step + (bad + 1 if bad is not None else len(step_losses))
    return (f"diverged at epoch {progress.epoch + 1}, step {at}: the loss became non-finite "
            "(try a smaller optimizer.lr)")


def fatal_message(error: Exception, progress: Progress) -> str:
    """The engine's one line, and what of the job is kept."""
    kept = f"weights and checkpoint of epoch {progress.epoch} kept" if progress.epoch else "no epoch finished"
    return f"{error} (during epoch {progress.epoch + 1}; {kept})"


def epoch_metrics(job_id: str, progress: Progress, epoch: EpochResult, outcome: EpochOutcome,
                  criteria: list, stop: StopReason | None) -> EpochMetrics:
    """The epoch's line of the job's metrics (the wire format), from the progress it was counted into."""
    figures, W = epoch.figures, epoch.W
    return EpochMetrics(
        job_id=job_id,
        epoch=progress.epoch,
        step=progress.step,
        samples_seen=progress.samples_seen,
        batch_size=epoch.batch_size,
        lr=figures.last_lr,
        train_loss=outcome.train_loss,
        val_loss=epoch.val_loss,
        val_accuracy=epoch.val_accuracy,
        weight_norm=float(np.linalg.norm(W.astype(np.float64))),
        weight_change=outcome.weight_change,
        grad_avg_norm=figures.grad_avg_norm,
        grad_noise=figures.grad_noise,
        samples_per_second=figures.samples / epoch.seconds if epoch.seconds > 0 else 0.0,
        elapsed_seconds=progress.elapsed_seconds,
        staleness_mean=figures.staleness_mean,
        staleness_max=figures.staleness_max,
        dropped_gradients=figures.dropped_gradients,
        criteria=criteria,
        stop=stop,
    )


def train_job(spec: JobSpec, job_id: str = "local", hooks: Hooks | None = None, info: DataInfo | None = None,
              source: Source | None = None):
    """Check the data, build the engine the spec asks for (its parts read their own rows), train, and release
    the engine. ``source``: the spec's data already open in this process (an estimator's arrays), which an
    in-process engine trains on instead of reading the data again.

    Raises DataError / ValueError for data or weights that do not fit the spec (before any step).
    Ray must already be connected when ``cluster.num_workers`` > 0 (service.engine.placement.connect).
    """
    hooks = hooks or Hooks()
    try:
        with cancellable(hooks.should_cancel):  # a remote source that does not answer must not hold a cancel
            info = info if info is not None else prepare(spec.data, spec.model, source)
    except OpenCancelled:
        return TrainResult(JobState.CANCELLED, StopReason.CANCELLED, initial_weights(spec))
    W0 = initial_weights(spec)
    if hooks.should_cancel():  # during the data's pass: ended before the engine (its actors, their shards) is built
        return TrainResult(JobState.CANCELLED, StopReason.CANCELLED, W0)
    trackers = trackers_for(spec, job_id)  # a missing tracking package fails the job before any work
    hooks = _tracked(hooks, trackers)
    engine = build_engine(spec, info, W0, source)
    try:
        hooks.on_start(engine.describe())
        result = run(spec, info, engine, job_id, hooks)
    finally:
        engine.close()
    if trackers:
        files = model_files(weights_file(result.weights, spec, info), spec)
        for tracker in trackers:
            tracker.finish(result.state, files)
    return result


def _tracked(hooks: Hooks, trackers: list) -> Hooks:
    """``hooks`` whose ``on_epoch`` also logs the epoch to every tracker."""
    if not trackers:
        return hooks

    def on_epoch(m: EpochMetrics) -> None:
        hooks.on_epoch(m)
        for tracker in trackers:
            tracker.epoch(m)

    return replace(hooks, on_epoch=on_epoch)
