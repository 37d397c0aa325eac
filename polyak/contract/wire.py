"""Wire models shared by the service and the SDK: job states, metrics, job info, uploaded datasets."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from polyak.contract.spec import JobSpec


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class StopReason(str, Enum):
    MAX_EPOCHS = "max_epochs"
    MAX_STEPS = "max_steps"
    WEIGHT_CHANGE = "weight_change"
    GRADIENT = "gradient"
    TARGET_LOSS = "target_loss"
    EARLY_STOPPING = "early_stopping"
    CANCELLED = "cancelled"
    DIVERGED = "diverged"
    ERROR = "error"


class Criterion(BaseModel):
    """One stopping criterion at the end of an epoch: its value against its threshold."""

    name: str
    value: float | None
    threshold: float | None
    met: bool


class EpochMetrics(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: str
    epoch: int
    step: int
    samples_seen: int
    batch_size: int
    lr: float
    train_loss: float | None
    val_loss: float | None = None
    val_accuracy: float | None = None
    weight_norm: float
    weight_change: float | None
    grad_avg_norm: float | None
    grad_noise: float | None
    samples_per_second: float
    elapsed_seconds: float
    staleness_mean: float | None = None
    staleness_max: int | None = None
    dropped_gradients: int | None = None
    criteria: list[Criterion]
    stop: StopReason | None = None


class JobInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    name: str | None = None
    group: str | None = None
    state: JobState
    priority: int = 0
    queue_position: int | None = None
    waiting_reason: str | None = None
    spec: JobSpec
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    epoch: int | None = None
    stop_reason: StopReason | None = None
    error: str | None = None
    placement: str | None = None  # where the job's actors run and how its sync steps travel
    resumed_from: str | None = None  # the job whose checkpoint this one resumed
    metrics: EpochMetrics | None = None


class DatasetInfo(BaseModel):
    """An uploaded dataset (``POST /datasets``): a spec names it as ``data: {source: dataset, name: <id>}``."""

    id: str = Field(description="SHA-256 of the uploaded bytes, in hex: the same bytes are one dataset")
    format: Literal["npy", "parquet"]
    bytes: int
    rows: int
    columns: int = Field(description=".npy: features then target column(s); .parquet: every column")
    created_at: datetime
