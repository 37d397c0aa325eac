"""Typed errors of the SDK: each carries the server's (or validator's) message."""

from __future__ import annotations


class PolyakError(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class SpecError(PolyakError):
    """A job spec was rejected; ``errors`` is a list of ``{field, message}``."""

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None, status_code: int | None = None):
        super().__init__(message, status_code)
        self.errors = errors or []


class JobNotFound(PolyakError):
    """No job with that id."""


class JobConflict(PolyakError):
    """The job's state does not allow the request (resubmitting a job that is still running)."""


class Unauthorized(PolyakError):
    """Missing or wrong bearer token."""


class ServerError(PolyakError):
    """The server failed, or answered something the client cannot read."""
