"""num_workers: 0 — the whole step in this process, no Ray (quick runs, notebooks, the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.spec import JobSpec
from service.engine.checkpoint import load_checkpoint, save_checkpoint
from service.engine.ps_core import ServerCore
from workers.backend import get_backend
from workers.data import Dataset
from workers.mlp import MLP


class LocalEngine:
    drives_steps = False  # the trainer hands it one batch at a time
    recoverable: tuple[type[Exception], ...] = ()  # nothing here can die on its own
    fatal: tuple[type[Exception], ...] = ()

    def __init__(self, spec: JobSpec, dataset: Dataset, W0: np.ndarray):
        self.backend = get_backend(spec.cluster.device)
        xp, dtype = self.backend.xp, np.dtype(spec.cluster.dtype)
        self.mlp = MLP(spec.model.layers, spec.model.activation, spec.model.loss, xp, dtype)
        self.X = xp.asarray(dataset.X_train, dtype=dtype)  # (n, m_0)
        self.y = xp.asarray(dataset.y_train if dataset.classification else dataset.y_train.astype(dtype))
        self.core = ServerCore(spec, W0, xp)
        self.grad = xp.empty(self.mlp.p, dtype=dtype)

    def describe(self) -> str:
        return f"in this process, no Ray: {self.backend.describe()}"

    def step(self, batch: np.ndarray) -> None:
        idx = self.backend.asarray(batch)
        grad_sum, loss_sum, count = self.mlp.loss_and_grad(self.core.state.W, self.X[idx], self.y[idx], self.grad)
        self.core.apply(grad_sum, loss_sum, count)

    def end_epoch(self) -> dict:
        return self.core.end_epoch()

    def weights(self) -> np.ndarray:
        return self.core.weights()

    def checkpoint(self, path: str | Path, meta: dict) -> None:
        arrays, counters = self.core.snapshot()
        save_checkpoint(path, arrays, {**meta, **counters})

    def restore(self, path: str | Path) -> dict:
        arrays, meta = load_checkpoint(path)
        self.core.restore(arrays, meta)
        return meta

    def close(self) -> None:
        pass
