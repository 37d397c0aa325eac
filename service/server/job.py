"""A job's record and its state machine: queued -> running -> succeeded | failed | cancelled.

The rules live here, once; the store applies them inside the transaction that changes the state,
so no interleaving of threads can take a job out of a terminal state.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from polyak.contract.spec import JobSpec
from polyak.contract.wire import EpochMetrics, JobInfo, JobState, StopReason

QUEUED, RUNNING = JobState.QUEUED, JobState.RUNNING
SUCCEEDED, FAILED, CANCELLED = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # queued -> failed: a job that can no longer ever start (the cluster shrank under it).
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}
# The one way back: a job the server was running when it died is queued again at startup, to resume.
RECOVERY = (RUNNING, QUEUED)


class InvalidTransition(RuntimeError):
    """A state change the lifecycle does not allow."""


def check_transition(old: JobState, new: JobState, recovery: bool = False) -> None:
    if old.is_terminal():
        raise InvalidTransition(f"job is {old.value}, a final state: it cannot become {new.value}")
    if recovery and (old, new) == RECOVERY:
        return
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"job cannot go from {old.value} to {new.value}")


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class JobRecord:
    """One row of the jobs table; ``seq`` is the submission order (FIFO within a priority). Not the SDK's
    ``polyak.Job``, which is a client's handle on a job of a server."""

    id: str
    spec: JobSpec
    state: JobState
    created_at: datetime
    seq: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    epoch: int | None = None
    stop_reason: StopReason | None = None
    error: str | None = None
    waiting_reason: str | None = None
    cancel_requested: bool = False
    placement: str | None = None
    resumed_from: str | None = None

    @property
    def name(self) -> str | None:
        return self.spec.name

    @property
    def priority(self) -> int:
        return self.spec.priority

    @property
    def resumed(self) -> bool:
        """Queued again after the server died while running it."""
        return self.state == QUEUED and self.started_at is not None

    def info(self, queue_position: int | None = None, metrics: EpochMetrics | None = None) -> JobInfo:
        return JobInfo(
            id=self.id,
            name=self.name,
            group=self.spec.group,
            state=self.state,
            priority=self.priority,
            queue_position=queue_position if self.state == QUEUED else None,
            waiting_reason=self.waiting_reason if self.state == QUEUED else None,
            spec=self.spec,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            epoch=self.epoch,
            stop_reason=self.stop_reason,
            error=self.error,
            placement=self.placement,
            resumed_from=self.resumed_from,
            metrics=metrics,
        )
