"""polyak's client: the job spec and wire models, the SDK (Client, Job) and its typed errors.

Imports no Ray, service or worker code, and no matplotlib: submitting a job stays light.
"""

from client.errors import JobConflict, JobNotFound, PolyakError, ServerError, SpecError, Unauthorized
from client.model import Model, ModelError
from client.models import Criterion, EpochMetrics, JobInfo, JobState, StopReason
from client.sdk import Client, Job
from client.spec import JobSpec, parse_spec
from client.sweep import RankedJob, Sweep

__all__ = [
    "Client",
    "Criterion",
    "EpochMetrics",
    "Job",
    "JobConflict",
    "JobInfo",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "Model",
    "ModelError",
    "PolyakError",
    "RankedJob",
    "ServerError",
    "SpecError",
    "StopReason",
    "Sweep",
    "Unauthorized",
    "parse_spec",
]
