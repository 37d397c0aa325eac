"""The epoch loop, written once: batching, metrics, stopping, checkpoints, cancel.

It runs against an engine that "takes the steps of these batches" — in this process (LocalEngine) or
on Ray (service/engine/ray_engine.py). An engine offers:

    drives_steps: bool                      # False: the trainer hands it batches; True: async workers drive
    step(batch)                             # one exact minibatch step of (26) over these training rows
    run_epoch(epoch, batch_size, step_budget, should_cancel) -> bool  # drives_steps engines only
    end_epoch() -> dict                     # step_losses, samples, step, grad_avg_norm, grad_noise, lr, ...
    weights() -> np.ndarray                 # W after the last step, on the host
    evaluate(W) -> (loss sum, correct, n)   # over the validation rows (held by the workers)
    checkpoint(path, meta); restore(path) -> meta
    recoverable: tuple of exception types   # a lost parameter server; then recover() and resume
    fatal: tuple of exception types         # the cluster cannot go on (a lost node, no room): the job fails
    describe() -> str                       # one line: where the job runs and how its steps travel
    close()
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from polyak.contract.network import from_dict, to_dict
from polyak.contract.spec import JobSpec
from polyak.contract.wire import EpochMetrics, JobState, StopReason
from polyak.service.engine.checkpoint import load_npz, save_npz
from polyak.service.engine.criteria import EpochOutcome, Stopper, relative_change
from polyak.service.engine.schedules import batch_size
from polyak.workers.data import DataInfo, prepare
from polyak.workers.mlp import init_params

CHECKPOINT = "checkpoint.npz"
BEST_WEIGHTS = "best.npz"
LAST_WEIGHTS = "weights.npz"


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


def make_engine(spec: JobSpec, info: DataInfo, W0: np.ndarray):
    """In this process for num_workers 0 (Ray is not even imported), else on the connected Ray cluster."""
    if spec.cluster.num_workers == 0:
        from polyak.service.engine.local_engine import LocalEngine

        return LocalEngine(spec, info, W0)
    from polyak.service.engine.ray_engine import AsyncRayEngine, SyncRayEngine

    return (AsyncRayEngine if spec.cluster.mode == "async" else SyncRayEngine)(spec, info, W0)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Every epoch visits each training row once, in a fresh order that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, 2, epoch]).permutation(n)


def validate(engine, info: DataInfo, W: np.ndarray) -> tuple[float | None, float | None]:
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


def run(spec: JobSpec, info: DataInfo, engine, job_id: str = "local", hooks: Hooks | None = None) -> TrainResult:
    """Train until a stopping criterion is met, the job is cancelled, or it diverges.

    With ``hooks.job_dir`` the job resumes from its checkpoint there, and a parameter server lost
    mid-epoch (``engine.recoverable``) is restored from the last checkpoint and the epoch redone.
    """
    hooks = hooks or Hooks()
    job_dir = Path(hooks.job_dir) if hooks.job_dir else None
    checkpoint = job_dir / CHECKPOINT if job_dir else None
    best_file = job_dir / BEST_WEIGHTS if job_dir else None
    layers = spec.model.layers
    metrics: list[EpochMetrics] = []

    def resume() -> tuple[Progress, Stopper, np.ndarray]:
        meta = engine.restore(checkpoint) if checkpoint and checkpoint.exists() else {}
        progress, stopper = Progress.from_meta(meta), Stopper(spec.stopping)
        if progress.stopper:
            stopper.load_state(progress.stopper)
        del metrics[progress.epoch :]  # epochs after the checkpoint are redone and reported again
        return progress, stopper, engine.weights()

    progress, stopper, W_prev = resume()
    best_W = from_dict(load_npz(best_file), layers, W_prev.dtype) if best_file and best_file.exists() else None

    def finish(state: JobState, reason: StopReason, W: np.ndarray, error: str | None = None) -> TrainResult:
        if job_dir:
            save_npz(job_dir / LAST_WEIGHTS, weights_file(W, spec, info))
        return TrainResult(state, reason, W, best_W, error, metrics)

    if spec.stopping.max_epochs == 0 or spec.stopping.max_steps == 0:
        reason = StopReason.MAX_EPOCHS if spec.stopping.max_epochs == 0 else StopReason.MAX_STEPS
        return finish(JobState.SUCCEEDED, reason, W_prev)

    recoveries = 0
    while True:
        n = info.n_train
        bs = batch_size(spec.batch, n, progress.epoch)
        budget = None if spec.stopping.max_steps is None else spec.stopping.max_steps - progress.step
        epoch_start = time.perf_counter()
        try:
            if engine.drives_steps:  # async: each worker passes over its own shard, t' = sum_k ceil(n_k / n')
                cancelled = engine.run_epoch(progress.epoch, bs, budget, hooks.should_cancel)
            else:
                cancelled = False
                order = epoch_order(spec.model.seed, progress.epoch, n)
                steps = math.ceil(n / bs) if budget is None else min(math.ceil(n / bs), budget)
                for i in range(steps):
                    if hooks.should_cancel():
                        cancelled = True
                        break
                    engine.step(order[i * bs : (i + 1) * bs])
            res = engine.end_epoch()
            W = engine.weights()
            epoch_seconds = time.perf_counter() - epoch_start
            # Validation runs on the engine's parts too (the workers hold the rows): a lost node shows up here.
            val_loss, val_acc = validate(engine, info, W) if np.isfinite(W).all() else (None, None)
        except engine.recoverable:
            recoveries += 1
            if recoveries > MAX_RECOVERIES:
                raise
            engine.recover()
            progress, stopper, W_prev = resume()
            continue
        except engine.fatal as e:
            kept = f"weights and checkpoint of epoch {progress.epoch} kept" if progress.epoch else "no epoch finished"
            return finish(JobState.FAILED, StopReason.ERROR, W_prev, f"{e} (during epoch {progress.epoch + 1}; {kept})")
        done = len(res["step_losses"])
        bad = _first_non_finite(res["step_losses"])
        if bad is not None or not np.isfinite(W).all():
            at = progress.step + (bad + 1 if bad is not None else done)
            msg = (
                f"diverged at epoch {progress.epoch + 1}, step {at}: the loss became non-finite "
                "(try a smaller optimizer.lr)"
            )
            return finish(JobState.FAILED, StopReason.DIVERGED, W_prev, msg)
        if cancelled and done == 0:
            return finish(JobState.CANCELLED, StopReason.CANCELLED, W)
        progress.epoch += 1
        progress.step = res["step"]
        progress.samples_seen += res["samples"]
        progress.elapsed_seconds += epoch_seconds
        train_loss = float(res["step_losses"].mean()) if done else None
        # A cut-short epoch is no candidate for the best weights: a server stopping mid-epoch drops it.
        if not cancelled and stopper.observe_validation(progress.epoch, val_loss):
            best_W = W.copy()
            if best_file:
                save_npz(best_file, weights_file(W, spec, info))
        outcome = EpochOutcome(
            progress.epoch, progress.step, train_loss, val_loss, relative_change(W, W_prev), res["grad_avg_norm"]
        )
        criteria, stop = stopper.check(outcome)
        if cancelled:
            stop = StopReason.CANCELLED
        m = EpochMetrics(
            job_id=job_id,
            epoch=progress.epoch,
            step=progress.step,
            samples_seen=progress.samples_seen,
            batch_size=bs,
            lr=res["lr"],
            train_loss=train_loss,
            val_loss=val_loss,
            val_accuracy=val_acc,
            weight_norm=float(np.linalg.norm(W.astype(np.float64))),
            weight_change=outcome.weight_change,
            grad_avg_norm=res["grad_avg_norm"],
            grad_noise=res["grad_noise"],
            samples_per_second=res["samples"] / epoch_seconds if epoch_seconds > 0 else 0.0,
            elapsed_seconds=progress.elapsed_seconds,
            staleness_mean=res.get("staleness_mean"),
            staleness_max=res.get("staleness_max"),
            dropped_gradients=res.get("dropped"),
            criteria=criteria,
            stop=stop,
        )
        metrics.append(m)
        hooks.on_epoch(m)
        if stop is not None:
            state = JobState.CANCELLED if stop == StopReason.CANCELLED else JobState.SUCCEEDED
            return finish(state, stop, W)
        if checkpoint:
            progress.stopper = stopper.state()
            engine.checkpoint(checkpoint, asdict(progress))
            save_npz(job_dir / LAST_WEIGHTS, weights_file(W, spec, info))  # what GET /weights serves meanwhile
        W_prev = W


def train_job(spec: JobSpec, job_id: str = "local", hooks: Hooks | None = None, info: DataInfo | None = None):
    """Check the data, build the engine the spec asks for (its parts read their own rows), train, and release
    the engine.

    Raises DataError / ValueError for data or weights that do not fit the spec (before any step).
    Ray must already be connected when ``cluster.num_workers`` > 0 (service.engine.ray_engine.connect).
    """
    info = info if info is not None else prepare(spec.data, spec.model)
    engine = make_engine(spec, info, initial_weights(spec))
    try:
        (hooks or Hooks()).on_start(engine.describe())
        return run(spec, info, engine, job_id, hooks)
    finally:
        engine.close()
