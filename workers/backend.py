"""Array backend: CuPy on a GPU, NumPy otherwise. Every compute function takes the module ``xp``."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from polyak.contract.choices import DEVICES


class DeviceError(RuntimeError):
    """The requested device cannot be used on this machine."""


@dataclass(frozen=True)
class Backend:
    xp: ModuleType
    device: str  # "cpu" | "gpu"

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def describe(self) -> str:
        if self.device == "cpu":
            return f"cpu (NumPy {np.__version__})"
        props = self.xp.cuda.runtime.getDeviceProperties(self.xp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"gpu {name} (CuPy {self.xp.__version__})"


def to_numpy(a) -> np.ndarray:
    """A host copy-free view for NumPy arrays, a device-to-host copy for CuPy ones."""
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)


def gpu_available() -> bool:
    try:
        import cupy
    except ImportError:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CuPy raises its own CUDA error types when no driver is present
        return False


def worker_device(device: str, num_workers: int, cluster_gpus: float) -> str:
    """Where Ray workers compute: auto is gpu only when the cluster has a GPU for every worker."""
    if device == "auto":
        return "gpu" if num_workers > 0 and cluster_gpus >= num_workers else "cpu"
    return device


def get_backend(device: str = "auto") -> Backend:
    """``auto`` takes CuPy when a GPU is visible, NumPy otherwise; ``gpu`` without one is an error."""
    if device not in DEVICES:
        raise DeviceError(f"cluster.device: must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {device!r}")
    if device == "cpu" or (device == "auto" and not gpu_available()):
        return Backend(np, "cpu")
    if not gpu_available():
        raise DeviceError(
            "cluster.device: gpu was requested but no GPU is usable here "
            "(CuPy is not installed or sees no CUDA device); install polyak[gpu] on a GPU machine or use cpu"
        )
    import cupy

    return Backend(cupy, "gpu")
