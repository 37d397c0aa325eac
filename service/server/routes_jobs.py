"""The API's jobs: submit one, list them, look at one, cancel, resubmit from its checkpoint."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from polyak.contract.wire import JobInfo, JobState
from polyak.service.server.context import MAX_INT, Service, ServiceDep, errors, job_or_404, no_such_job
from polyak.service.server.submission import YAML_MEDIA, check_media, job_spec, read_body

router = APIRouter()

_JOB_LIST = TypeAdapter(list[JobInfo])
_SPEC_SCHEMA = {"$ref": "#/components/schemas/JobSpec"}
_SPEC_BODY = {
    "requestBody": {
        "required": True,
        "description": "the job spec, as JSON or YAML (Content-Type application/json or a YAML type); other media "
                       "types are refused (415)",
        "content": {media: {"schema": _SPEC_SCHEMA} for media in ("application/json", *YAML_MEDIA)},
    }
}


@router.post("/jobs", status_code=201, response_model=JobInfo, openapi_extra=_SPEC_BODY,
             responses=errors(400, 413, 415, 422, 503, why={400: "the body is empty, not UTF-8, or not JSON/YAML"}))
async def submit(request: Request, service: ServiceDep) -> JobInfo:
    """Queue a job: 201 with its JobInfo (queued); 422 naming every bad field of the spec."""
    content_type = request.headers.get("content-type", "")
    check_media(content_type)
    body = await read_body(request)
    # Off the event loop: parsing up to 1 MB of YAML must not stall every event stream.
    return await run_in_threadpool(_submit_now, service, body, content_type)


def _submit_now(service: Service, body: bytes, content_type: str) -> JobInfo:
    return service.scheduler.submit(job_spec(body, content_type, service.data_root, service.datasets))


@router.get("/jobs", response_model=list[JobInfo], responses=errors(422))
def list_jobs(
    service: ServiceDep,
    state: JobState | None = None,
    group: str | None = Query(None, description="only the jobs of this group (spec field group)"),
    limit: int = Query(100, ge=1, le=10_000, description="at most this many jobs"),
    offset: int = Query(0, ge=0, le=MAX_INT, description="skip this many of the newest first"),
) -> list[JobInfo]:
    """Jobs, newest first, a page at a time; ``?state=`` and ``?group=`` keep those in one state or group."""
    # Serialized once here: returned as models, FastAPI would validate each JobInfo again first.
    return Response(_JOB_LIST.dump_json(service.scheduler.infos(state, group, limit, offset)),
                    media_type="application/json")


@router.get("/jobs/{job_id}", response_model=JobInfo, responses=errors(404, 422))
def get_job(job_id: str, service: ServiceDep) -> JobInfo:
    return service.scheduler.info(job_or_404(service.store, job_id).id)


@router.post("/jobs/{job_id}/cancel", response_model=JobInfo, responses=errors(404, 422, 503))
def cancel(job_id: str, service: ServiceDep) -> JobInfo:
    """A queued job is cancelled at once; a running one stops at its next step, keeping its last
    weights and metrics. Cancelling a finished job changes nothing."""
    if service.scheduler.cancel(job_id) is None:
        raise no_such_job(job_id)
    return service.scheduler.info(job_id)


@router.post("/jobs/{job_id}/resubmit", status_code=201, response_model=JobInfo, responses=errors(
    404, 409, 422, 503, why={409: "the job has not ended, or its checkpoint is missing or unreadable"}))
def resubmit(job_id: str, service: ServiceDep) -> JobInfo:
    """A new job with the same spec, starting from this finished job's last checkpoint (its epochs so far
    are copied into the new job's history): how a job that failed with its cluster goes on."""
    info = service.scheduler.resubmit(job_id)
    if info is None:
        raise no_such_job(job_id)
    return info
