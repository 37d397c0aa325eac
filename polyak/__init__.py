"""polyak: minibatch SGD with Polyak's heavy-ball momentum on a Ray parameter server, a job service, SDK and CLI.

The public names load on first use (PEP 562): ``import polyak`` alone imports no HTTP client, no Ray and no
server, so a gradient worker that needs the job spec pays for nothing else.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# In a checkout, client/, service/ and workers/ sit beside this folder (an install mounts them into it, see
# pyproject's package-dir): looking there too lets a checkout run as it is, e.g. as a Ray job's working_dir.
_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "client").is_dir() and (_CHECKOUT / "client" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))

try:
    __version__ = version("polyak")
except PackageNotFoundError:  # a checkout shipped to a cluster as py_modules, never installed there
    __version__ = "0+unknown"

_PUBLIC = {
    **dict.fromkeys(["Client", "Job", "Sweep"], "polyak.client.sdk"),
    "Model": "polyak.client.model",
    "RankedJob": "polyak.client.sweep",
    **dict.fromkeys(["PolyakClassifier", "PolyakRegressor"], "polyak.estimators"),
    **dict.fromkeys(["JobSpec", "parse_spec"], "polyak.contract.spec"),
    **dict.fromkeys(["EpochMetrics", "JobInfo", "JobState", "StopReason", "Criterion", "DatasetInfo"],
                   "polyak.contract.wire"),
    **dict.fromkeys(["PolyakError", "BadInput", "SpecError", "DataError", "OutputError", "ModelError",
                     "Unreachable", "ClusterTooSmall", "NotFound", "JobNotFound", "DatasetNotFound", "JobConflict",
                     "Unauthorized", "ServerError", "ServerUnreachable"], "polyak.contract.errors"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'polyak' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value  # the next look-up is an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
