"""num_workers: 0 — the whole step in this process, no Ray (quick runs, notebooks, the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from polyak.contract.spec import JobSpec
from polyak.service.engine.checkpoint import load_checkpoint, save_checkpoint
from polyak.service.engine.engine import EpochFigures
from polyak.service.engine.ps_core import ServerCore
from polyak.workers.backend import get_backend
from polyak.workers.data import DataInfo, Part, ShardLayout, check_labels, load_part, split_of
from polyak.workers.mlp import MLP
from polyak.workers.readers import open_source
from polyak.workers.readers.source import ArraySource, Source


def held_part(source: Source, rows: np.ndarray, dtype, stats, layers) -> Part:
    """``load_part``'s part; but where an in-memory X already is that part (every row, in ``dtype``, nothing to
    standardize: an estimator's float32 X for a float32 job), it is checked as load_part checks it and held as it
    is, not copied: fit holds its data once, not twice."""
    if not (isinstance(source, ArraySource) and stats is None and len(rows) == source.n
            and source.X.dtype == dtype and source.X.flags.c_contiguous):
        return load_part(source, rows, dtype, stats, layers)
    for _ in source.chunks(np.arange(source.n), dtype):  # its checks (finite values, class ids), chunk by chunk
        pass
    if not source.classification:
        return Part(source.X, source.y.astype(dtype, copy=False))
    y = source.y[:, 0].astype(np.int64)
    check_labels(y, layers, source.origin)
    return Part(source.X, y)


class LocalEngine:
    """A TrainerDrivenEngine (service/engine/engine.py): the trainer hands it one batch at a time."""

    drives_steps = False
    recoverable: tuple[type[Exception], ...] = ()  # nothing here can die on its own
    fatal: tuple[type[Exception], ...] = ()

    def __init__(self, spec: JobSpec, info: DataInfo, W0: np.ndarray, source: Source | None = None):
        """``source``: the spec's data already open in this process (an estimator's arrays), else opened here."""
        self.backend = get_backend(spec.cluster.device)
        xp, dtype = self.backend.xp, np.dtype(spec.cluster.dtype)
        self.mlp = MLP(spec.model.layers, spec.model.activation, spec.model.loss, xp, dtype)
        # The data once, in the spec's dtype, rows in source order: exactly what one gradient worker holds.
        source = source if source is not None else open_source(spec.data, spec.model)
        split = split_of(spec.data, spec.model, source.n)
        train = held_part(source, split.train_rows(), dtype, info.stats, spec.model.layers)
        val = held_part(source, split.val_rows(), dtype, info.stats, spec.model.layers)
        del source  # an in-memory source (.npz, .csv, sklearn) would hold the data twice
        self.position = ShardLayout.of(spec.data, spec.model, info, 1).position
        self.X, self.y = xp.asarray(train.X), xp.asarray(train.y)  # (n, m_0)
        self.X_val, self.y_val = xp.asarray(val.X), xp.asarray(val.y)
        del train, val
        self.W0 = np.asarray(W0)
        self.core = ServerCore(spec, self.W0, xp)
        self.grad = xp.empty(self.mlp.p, dtype=dtype)

    def describe(self) -> str:
        return f"in this process, no Ray: {self.backend.describe()}"

    def step(self, batch: np.ndarray) -> None:
        idx = self.backend.asarray(self.position[batch])
        grad_sum, loss_sum, count = self.mlp.loss_and_grad(self.core.state.W, self.X[idx], self.y[idx], self.grad)
        self.core.apply(grad_sum, loss_sum, count)

    def end_epoch(self) -> EpochFigures:
        return self.core.end_epoch()

    def weights(self) -> np.ndarray:
        return self.core.weights()

    def evaluate(self, W: np.ndarray) -> tuple[float, int | None, int]:
        return self.mlp.evaluate(self.backend.asarray(W), self.X_val, self.y_val)

    def checkpoint(self, path: str | Path, meta: dict) -> None:
        arrays, counters = self.core.snapshot()
        save_checkpoint(path, arrays, {**meta, **counters})

    def restore(self, path: str | Path) -> dict:
        arrays, meta = load_checkpoint(path)
        self.core.restore(arrays, meta)
        return meta

    def recover(self) -> None:
        """Back to W0 and empty buffers, as a Ray engine after a lost server (the trainer never needs it here:
        ``recoverable`` is empty)."""
        self.core.restore({"W": self.W0}, {"step": 0, "version": 0})

    def close(self) -> None:
        pass
