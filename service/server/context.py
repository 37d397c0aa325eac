"""What every route of the API shares: the service's state, held once on ``app.state.service`` (not in closures),
the dependencies that read it, the bearer-token check, a job looked up by id, the event-stream listener slots, and
the error body every error status is answered with (published in the OpenAPI schema through ``errors``)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from polyak.service.server.datasets import DatasetStore
from polyak.service.server.job import JobRecord
from polyak.service.server.scheduler import Scheduler
from polyak.service.server.store import Store

# The largest integer a query or header parameter may be: SQLite's INTEGER is 64 bits, and a bigger one would reach
# the store and fail there (500) instead of being refused up front (422).
MAX_INT = 2**62


class FieldError(BaseModel):
    field: str = Field(description="where: a spec field (model.layers[0]) or a request parameter (offset)")
    message: str


class ErrorBody(BaseModel):
    """Every error the API answers (handlers.py builds them): what went wrong, and for a 422 each bad field."""

    detail: str
    errors: list[FieldError] | None = Field(default=None, description="422 only: each rejected field")


Responses = dict[int | str, dict[str, Any]]

_WHY: dict[int, str] = {
    400: "a body that is no spec at all, or an upload cut off",
    401: "the server runs with --token and the request lacks it or has a wrong one",
    403: "a cross-origin request (an Origin other than this server's)",
    404: "no such job",
    409: "the request conflicts with the job's or dataset's state",
    413: "the body is too large",
    415: "a Content-Type the route does not accept",
    422: "a bad parameter or spec, naming each bad field",
    503: "the job database or the data dir cannot be written now (read-only, disk full); nothing was changed",
}


def errors(*codes: int, why: dict[int, str] | None = None) -> Responses:
    """The error statuses of a route for ``responses=``: each an ErrorBody, described by ``why`` or the common words
    for that status."""
    return {code: {"model": ErrorBody, "description": (why or {}).get(code) or _WHY[code]} for code in codes}


DEFAULT_MAX_LISTENERS = 100


class Listeners:
    """The open event streams, at most ``limit`` of them: each holds a queue and a task on the event loop, so an
    unbounded number would let any client exhaust the server. Used only on the event loop: no lock."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0

    def take(self) -> Slot | None:
        """A slot for one more stream, or None when all are taken."""
        if self.open >= self.limit:
            return None
        self.open += 1
        return Slot(self)


class Slot:
    """One listener's place; ``free`` is idempotent, because both the stream's end and the response's end call it
    (a client gone before its stream started never runs the stream's ``finally``)."""

    def __init__(self, listeners: Listeners):
        self._listeners: Listeners | None = listeners

    def free(self) -> None:
        if self._listeners is not None:
            self._listeners.open -= 1
            self._listeners = None


@dataclass(frozen=True)
class Service:
    """The app's state: the scheduler (and through it the store, the cluster and the event bus), the uploaded
    datasets, the bearer token the JSON API wants (None: none), the folder data paths must lie in (None:
    unconfined, relative to the server's working directory), and the event streams' slots."""

    scheduler: Scheduler
    datasets: DatasetStore
    token: str | None = None
    data_root: Path | None = None
    listeners: Listeners = field(default_factory=lambda: Listeners(DEFAULT_MAX_LISTENERS))

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
