"""Checkpoints and weights files: .npz written atomically (``polyak.contract.atomic``), read without pickle."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from polyak.contract.atomic import atomic_write


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` so that a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: np.savez(f, **arrays))


class UnreadableFile(ValueError):
    """A checkpoint or weights file that is no .npz polyak can read (truncated, overwritten, another format)."""


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file; UnreadableFile naming it when it is none. Never numpy's advice to allow pickle:
    a file that needs it is not one polyak wrote, and loading it could run code."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise UnreadableFile(f"{path} is not an .npz archive (truncated, or not written by polyak)")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        why = "it holds object arrays" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
        raise UnreadableFile(f"{path} is not a readable .npz archive ({why})") from None


def save_checkpoint(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Arrays (W, u, ...) plus a JSON ``meta`` record (epoch, step, stopper and RNG state)."""
    return save_npz(path, {**arrays, "__meta__": np.array(json.dumps(meta))})


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    arrays = load_npz(path)
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except (KeyError, ValueError):
        raise UnreadableFile(f"{path} is no polyak checkpoint (its __meta__ record is missing or broken)") from None
    return arrays, meta
