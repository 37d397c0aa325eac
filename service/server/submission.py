"""A request body as a job spec: read (1 MB at most), parsed by the contract's one spec parser (JSON or YAML, as its
Content-Type says), its file paths resolved against the data root, and its data checked where that is cheap.

A body that is no spec at all (empty, too big, not JSON/YAML, sent as another media type) is a ``BadBody`` (400,
413 or 415); a spec with bad fields is a ``SpecError`` (422) naming each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request

from polyak.contract.errors import DataError, SpecError, SpecSyntaxError
from polyak.contract.spec import JobSpec, parse_spec, spec_mapping
from polyak.service.server.datasets import DatasetStore
from polyak.service.server.paths import resolve_paths
from polyak.workers.data import check_cheaply

MAX_BODY_BYTES = 1 << 20
YAML_MEDIA = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


class BadBody(Exception):
    """A request body that is not a spec at all (empty, too big, not JSON/YAML, another media type): 400, 413 or
    415."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def check_media(content_type: str) -> None:
    """Only JSON and YAML media types: a web page's form or text/plain POST (which a browser sends cross-site
    without asking) is refused before its body is read."""
    media = media_type(content_type)
    if not (is_json(media) or media in YAML_MEDIA):
        raise BadBody(415, f"Content-Type {media or '(none)'!r} is not a job spec's: send application/json or "
                           f"{' or '.join(YAML_MEDIA)}")


async def read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it is known to be over MAX_BODY_BYTES: by its Content-Length before a
    byte is read, or, sent chunked, at the chunk that passes the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    return bytes(body)


def _too_large() -> BadBody:
    return BadBody(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes (1 MiB): a job spec is a few "
                        "hundred")


def job_spec(body: bytes, content_type: str, data_root: Path | None, datasets: DatasetStore | None = None) -> JobSpec:
    """The spec a body holds, its paths absolute and checked, its layers checked against its data."""
    spec = resolve_paths(parse_spec(_mapping(body, content_type)), data_root, datasets)
    check_data(spec)
    return spec


def _mapping(body: bytes, content_type: str) -> dict[str, Any]:
    """The body as a mapping: JSON when the Content-Type says so, else (a YAML type: ``check_media``) YAML."""
    if not body.strip():
        raise BadBody(400, "request body is empty: send the job spec as JSON or YAML")
    try:
        return spec_mapping(body.decode("utf-8"), is_json(media_type(content_type)), "request body")
    except UnicodeDecodeError as e:
        raise BadBody(400, f"request body is not UTF-8 text: {e}") from None
    except SpecSyntaxError as e:
        raise BadBody(400, e.message) from None


def check_data(spec: JobSpec) -> None:
    """A spec whose layers do not fit its data is a 422 now, where that is cheap to see, not a failure later."""
    try:
        check_cheaply(spec.data, spec.model)
    except DataError as e:
        raise as_spec_error(e) from None


def as_spec_error(e: DataError) -> SpecError:
    """Data that does not suit the spec, as a rejected spec: one error at the field the DataError names."""
    return SpecError(e.message, [{"field": e.field, "message": e.message}])
