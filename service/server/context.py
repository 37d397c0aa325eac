"""What every route of the API shares: the service's state, held once on ``app.state.service`` (not in closures),
the dependencies that read it, the bearer-token check, and a job looked up by id."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from polyak.service.server.datasets import DatasetStore
from polyak.service.server.job import JobRecord
from polyak.service.server.scheduler import Scheduler
from polyak.service.server.store import Store

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {
        "description": "no such job",
        "content": {"application/json": {"example": {"detail": "no job with id ..."}}},
    }
}


@dataclass(frozen=True)
class Service:
    """The app's state: the scheduler (and through it the store, the cluster and the event bus), the uploaded
    datasets, the bearer token
    the JSON API wants (None: none), and the folder data paths must lie in (None: unconfined, relative to the
    server's working directory)."""

    scheduler: Scheduler
    datasets: DatasetStore
    token: str | None = None
    data_root: Path | None = None

    @property
    def store(self) -> Store:
        return self.scheduler.store


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
# Module level: FastAPI resolves the (string) annotations of a dependency against its module's names.
_bearer = HTTPBearer(auto_error=False, description="when the server runs with --token / POLYAK_TOKEN")


async def authorize(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)], service: ServiceDep
) -> None:
    """The JSON API's guard: a server started with a token answers 401 to a request without it."""
    if service.token is None:
        return
    if credentials is None:
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>' (polyak --token)")
    if not secrets.compare_digest(credentials.credentials.encode(), service.token.encode()):
        raise _unauthorized("wrong bearer token")


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def job_or_404(store: Store, job_id: str) -> JobRecord:
    job = store.get(job_id)
    if job is None:
        raise no_such_job(job_id)
    return job


def no_such_job(job_id: str) -> HTTPException:
    return HTTPException(404, f"no job with id {job_id}")
