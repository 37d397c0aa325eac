"""The epoch loop, written once: batching, metrics, stopping, checkpoints, cancel.

It runs against an engine that "takes the steps of these batches" — in this process (LocalEngine) or
on Ray (service/ray_engine.py). An engine offers:

    drives_steps: bool                      # False: the trainer hands it batches; True: async workers drive
    step(batch)                             # one exact minibatch step of (26) over these training rows
    run_epoch(epoch, batch_size, max_steps, should_cancel) -> bool   # drives_steps engines only
    end_epoch() -> dict                     # step_losses, samples, step, grad_avg_norm, grad_noise, lr, ...
    weights() -> np.ndarray                 # W after the last step, on the host
    checkpoint(path, meta); resumed_meta; describe(); close()
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.models import EpochMetrics, JobState, StopReason
from client.spec import JobSpec
from service.checkpoint import load_npz, save_npz
from service.criteria import EpochOutcome, Stopper, relative_change
from service.schedules import batch_size
from workers.data import Dataset
from workers.mlp import MLP, from_dict, init_params, to_dict

CHECKPOINT = "checkpoint.npz"
BEST_WEIGHTS = "best.npz"
LAST_WEIGHTS = "weights.npz"


class Diverged(RuntimeError):
    """A non-finite loss or weight: the job fails with stop_reason diverged."""


@dataclass
class Hooks:
    on_epoch: Callable[[EpochMetrics], None] = lambda m: None
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


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Every epoch visits each training row once, in a fresh order that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, 2, epoch]).permutation(n)


class Validator:
    """Validation loss and accuracy on the held-out rows, on the host."""

    def __init__(self, spec: JobSpec, dataset: Dataset):
        dtype = np.dtype(spec.cluster.dtype)
        self.mlp = MLP(spec.model.layers, spec.model.activation, spec.model.loss, np, dtype)
        self.X = dataset.X_val.astype(dtype)
        self.y = dataset.y_val if dataset.classification else dataset.y_val.astype(dtype)

    def __call__(self, W) -> tuple[float | None, float | None]:
        if self.X.shape[0] == 0:
            return None, None
        loss_sum, correct, n = self.mlp.evaluate(W, self.X, self.y)
        return loss_sum / n, (correct / n if correct is not None else None)


def _first_non_finite(step_losses: np.ndarray) -> int | None:
    bad = np.flatnonzero(~np.isfinite(step_losses))
    return int(bad[0]) if bad.size else None


def run(spec: JobSpec, dataset: Dataset, engine, job_id: str = "local", hooks: Hooks | None = None) -> TrainResult:
    """Train until a stopping criterion is met, the job is cancelled, or it diverges."""
    hooks = hooks or Hooks()
    job_dir = Path(hooks.job_dir) if hooks.job_dir else None
    stopper = Stopper(spec.stopping)
    validate = Validator(spec, dataset)
    n = dataset.n_train
    meta = engine.resumed_meta or {}
    epoch, t = meta.get("epoch", 0), meta.get("step", 0)
    elapsed_before = meta.get("elapsed_seconds", 0.0)
    samples_seen = meta.get("samples_seen", 0)
    if "stopper" in meta:
        stopper.load_state(meta["stopper"])
    W_prev = engine.weights()
    best = load_npz(job_dir / BEST_WEIGHTS) if job_dir and meta and (job_dir / BEST_WEIGHTS).exists() else None
    best_W = from_dict(best, spec.model.layers, W_prev.dtype) if best else None
    metrics: list[EpochMetrics] = []
    started = time.perf_counter()

    def finish(state: JobState, reason: StopReason, W: np.ndarray, error: str | None = None) -> TrainResult:
        if job_dir:
            save_npz(job_dir / LAST_WEIGHTS, to_dict(W, spec.model.layers))
        return TrainResult(state, reason, W, best_W, error, metrics)

    if spec.stopping.max_epochs == 0 or (spec.stopping.max_steps == 0):
        reason = StopReason.MAX_EPOCHS if spec.stopping.max_epochs == 0 else StopReason.MAX_STEPS
        return finish(JobState.SUCCEEDED, reason, W_prev)

    while True:
        bs = batch_size(spec.batch, n, epoch)
        order = epoch_order(spec.model.seed, epoch, n)
        steps = math.ceil(n / bs)
        if spec.stopping.max_steps is not None:
            steps = min(steps, spec.stopping.max_steps - t)
        epoch_start = time.perf_counter()
        if engine.drives_steps:
            cancelled = engine.run_epoch(epoch, bs, steps, hooks.should_cancel)
        else:
            cancelled = False
            for i in range(steps):
                if hooks.should_cancel():
                    cancelled = True
                    break
                engine.step(order[i * bs : (i + 1) * bs])
        res = engine.end_epoch()
        W = engine.weights()
        epoch_seconds = time.perf_counter() - epoch_start
        done = len(res["step_losses"])
        bad = _first_non_finite(res["step_losses"])
        if bad is not None or not np.isfinite(W).all():
            at = t + (bad + 1 if bad is not None else done)
            msg = f"diverged at epoch {epoch + 1}, step {at}: the loss became non-finite (try a smaller optimizer.lr)"
            return finish(JobState.FAILED, StopReason.DIVERGED, W_prev, msg)
        if cancelled and done == 0:
            return finish(JobState.CANCELLED, StopReason.CANCELLED, W)
        epoch += 1
        t = res["step"]
        samples_seen += res["samples"]
        train_loss = float(res["step_losses"].mean()) if done else None
        val_loss, val_acc = validate(W)
        if stopper.observe_validation(epoch, val_loss):
            best_W = W.copy()
            if job_dir:
                save_npz(job_dir / BEST_WEIGHTS, to_dict(W, spec.model.layers))
        outcome = EpochOutcome(epoch, t, train_loss, val_loss, relative_change(W, W_prev), res["grad_avg_norm"])
        criteria, stop = stopper.check(outcome)
        if cancelled:
            stop = StopReason.CANCELLED
        elapsed = elapsed_before + time.perf_counter() - started
        m = EpochMetrics(
            job_id=job_id,
            epoch=epoch,
            step=t,
            samples_seen=samples_seen,
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
            elapsed_seconds=elapsed,
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
        if job_dir:
            engine.checkpoint(
                job_dir / CHECKPOINT,
                {"epoch": epoch, "elapsed_seconds": elapsed, "samples_seen": samples_seen, "stopper": stopper.state()},
            )
        W_prev = W
