"""One typed tree of errors. Each class carries the CLI's exit status (``polyak --help`` lists them), and an
error about one field of a spec names it; nothing is ever classified by matching its message text.

    PolyakError                 1  the job failed, or a request was refused
      BadInput                  2  what the user gave cannot be used
        SpecError                  a job spec, with {field, message} per problem
          SpecSyntaxError          spec text that is not JSON or YAML
        DataError                  a data source (file, columns, targets), with the spec field it concerns
        ModelError                 a weights file that is no usable model, or inputs it cannot take
        OutputError                an output path (-o) that cannot be written
      Unreachable               3  a server, Ray cluster or port that cannot be reached or used
        ClusterTooSmall            a cluster that can never hold the job
      NotFound                  1
        JobNotFound, DatasetNotFound
      JobConflict               1
      Unauthorized              1
      ServerError               1  the server failed, or answered something unreadable
"""

from __future__ import annotations

# What to do about a Ray cluster that wants a token (Ray 2.60's `ray start` turns token authentication on).
RAY_AUTH_HINT = (
    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<the cluster's token file> (or RAY_AUTH_TOKEN=<token>) "
    "here, as on the cluster (`ray get-auth-token` on the head prints it)"
)


class PolyakError(Exception):
    """Base of every error polyak raises on purpose; ``status_code`` is the HTTP status it came with, if any."""

    exit_code = 1

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class BadInput(PolyakError):
    """Something the user gave cannot be used: a spec, a data file, an option, an output path."""

    exit_code = 2


class SpecError(BadInput):
    """A job spec was rejected; ``errors`` is a list of ``{field, message}``."""

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None, status_code: int | None = None):
        super().__init__(message, status_code)
        self.errors = errors or []

    @classmethod
    def at(cls, field: str, message: str) -> SpecError:
        """One problem with one field: ``field: message``."""
        return cls(f"{field}: {message}", [{"field": field, "message": message}])


class SpecSyntaxError(SpecError):
    """Spec text that is not JSON or YAML at all (a request body: 400, not 422)."""


class DataError(BadInput, ValueError):
    """The data cannot be used (a missing file, a bad column, targets that do not suit the loss); ``field`` is
    the spec field it concerns."""

    def __init__(self, message: str, field: str = "data.path"):
        super().__init__(message)
        self.field = field


class ModelError(BadInput):
    """A weights file that is not a usable model, or inputs the model cannot take (client/model.py)."""


class OutputError(BadInput):
    """An output path that cannot be written (a missing folder, an image type matplotlib cannot draw)."""


class Unreachable(PolyakError):
    """A server, Ray cluster or port that cannot be reached or used: nothing was refused, nothing was wrong with
    the input."""

    exit_code = 3


class ClusterTooSmall(Unreachable):
    """The cluster can never hold the job (too few CPUs or no GPU for its workers)."""


class NotFound(PolyakError):
    """No such thing on the server (404)."""


class JobNotFound(NotFound):
    """No job with that id."""


class DatasetNotFound(NotFound):
    """No uploaded dataset with that id."""


class JobConflict(PolyakError):
    """The job's state does not allow the request (resubmitting a job that is still running)."""


class Unauthorized(PolyakError):
    """Missing or wrong bearer token."""


class ServerError(PolyakError):
    """The server failed, or answered something the client cannot read."""


class ServerUnreachable(ServerError, Unreachable):
    """The request never got an answer: the server is down, or the connection broke."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (a library's multi-line message would break the one error line)."""
    return " ".join(str(e).split()) or type(e).__name__
