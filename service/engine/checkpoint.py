"""Checkpoints and weights files: .npz written atomically (``polyak.contract.atomic``), read without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from polyak.contract.atomic import atomic_write


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` so that a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def save_checkpoint(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Arrays (W, u, ...) plus a JSON ``meta`` record (epoch, step, stopper and RNG state)."""
    return save_npz(path, {**arrays, "__meta__": np.array(json.dumps(meta))})


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    arrays = load_npz(path)
    meta = json.loads(str(arrays.pop("__meta__")))
    return arrays, meta
