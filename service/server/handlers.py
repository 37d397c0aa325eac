"""How the API answers what a request raised: each exception type its status and body, chosen by type, never by
the message's text.

Errors are ``{"detail": message}``, plus ``"errors": [{field, message}]`` for a rejected spec and a bad query, path
or header parameter (422): ``context.ErrorBody``, as the OpenAPI schema publishes them. Bad input of any kind is a
4xx: a request never reaches the scheduler unvalidated, and the scheduler itself turns whatever a job raises into
that job's ``failed`` state.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from polyak.contract.errors import SpecError
from polyak.contract.spec import field_errors
from polyak.service.server.cluster import ClusterUnavailable
from polyak.service.server.datasets import BadDataset, DatasetTooLarge
from polyak.service.server.scheduler import ClusterTooSmallFor, JobNotResumable
from polyak.service.server.store import StoreUnavailable
from polyak.service.server.submission import BadBody

log = logging.getLogger("polyak")

# Errors answered with their message alone.
_STATUS: dict[type[Exception], int] = {
    JobNotResumable: 409, ClusterUnavailable: 503, DatasetTooLarge: 413, BadDataset: 422, StoreUnavailable: 503,
    ClientDisconnect: 400,  # an upload cut off: nobody reads the answer, and the store kept nothing
}


def install(app: FastAPI) -> None:
    app.add_exception_handler(SpecError, _spec_error)
    app.add_exception_handler(ClusterTooSmallFor, _too_small)
    app.add_exception_handler(RequestValidationError, _bad_parameter)
    app.add_exception_handler(BadBody, _bad_body)
    for kind in _STATUS:
        app.add_exception_handler(kind, _by_status)
    app.add_exception_handler(Exception, _internal)


def invalid_spec(message: str, errors: list[dict[str, str]]) -> JSONResponse:
    return JSONResponse({"detail": f"invalid job spec: {message}", "errors": errors}, status_code=422)


async def _spec_error(request: Request, e: SpecError) -> JSONResponse:
    return invalid_spec(e.message, e.errors)


async def _too_small(request: Request, e: ClusterTooSmallFor) -> JSONResponse:
    """A job the cluster can never hold: answered as the spec error it was before it had a type of its own (422
    naming the field that asks too much), so clients see no change."""
    return invalid_spec(e.message, [{"field": e.field, "message": e.reason}])


class _ByName:
    """A request's validation errors located by the parameter's name: FastAPI's first location part only says
    where the parameter came from (query, path, header). What ``field_errors`` reads of a ValidationError."""

    def __init__(self, e: RequestValidationError):
        self._errors = e.errors()

    def errors(self) -> list[dict[str, Any]]:
        return [{**err, "loc": tuple(err["loc"][1:]) or tuple(err["loc"])} for err in self._errors]


async def _bad_parameter(request: Request, e: RequestValidationError) -> JSONResponse:
    """A bad query, path or header parameter, in the same shape and words as a bad spec."""
    errors = field_errors(_ByName(e))
    detail = "invalid request: " + "; ".join(f"{x['field']}: {x['message']}" for x in errors)
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


async def _bad_body(request: Request, e: BadBody) -> JSONResponse:
    return JSONResponse({"detail": e.message}, status_code=e.status)


async def _by_status(request: Request, e: Exception) -> JSONResponse:
    status = next(code for kind, code in _STATUS.items() if isinstance(e, kind))
    return JSONResponse({"detail": str(e) or type(e).__name__}, status_code=status)


async def _internal(request: Request, e: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
