"""The HTTP API of DESIGN.md over a Scheduler (FastAPI; OpenAPI at /docs).

Errors are ``{"detail": message}``, plus ``"errors": [{field, message}]`` for a rejected spec (422).
Bad input of any kind is a 4xx: a request never reaches the scheduler unvalidated, and the scheduler
itself turns whatever a job raises into that job's ``failed`` state.
"""

from __future__ import annotations

import gc
import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from polyak.contract.errors import DataError, SpecError, SpecSyntaxError
from polyak.contract.spec import parse_spec, spec_mapping
from polyak.contract.wire import EpochMetrics, JobInfo, JobState
from polyak.service.engine.trainer import BEST_WEIGHTS, LAST_WEIGHTS
from polyak.service.server.cluster import ClusterUnavailable
from polyak.service.server.events import job_events
from polyak.service.server.job import Job
from polyak.service.server.paths import resolve_paths
from polyak.service.server.scheduler import JobNotResumable, Scheduler
from polyak.workers.data import check_cheaply

log = logging.getLogger("polyak")

MAX_BODY_BYTES = 1 << 20
STATIC = Path(__file__).parent / "static"  # package data: Swagger UI's assets
DASHBOARD = Path(__file__).parent / "dashboard"  # package data: the page at / (no build step, no CDN)
_JOB_LIST = TypeAdapter(list[JobInfo])
_SPEC_SCHEMA = {"$ref": "#/components/schemas/JobSpec"}
_SPEC_BODY = {
    "requestBody": {
        "required": True,
        "description": "the job spec, as JSON or YAML (Content-Type application/yaml or text/yaml)",
        "content": {media: {"schema": _SPEC_SCHEMA} for media in ("application/json", "application/yaml")},
    }
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {
        "description": "no such job",
        "content": {"application/json": {"example": {"detail": "no job with id ..."}}},
    }
}
# Module level: FastAPI resolves the (string) annotations of the routes against this module's names.
_bearer = HTTPBearer(auto_error=False, description="when the server runs with --token / POLYAK_TOKEN")
_NPZ = {"content": {"application/octet-stream": {}}, "description": "the .npz file"}


class BadBody(Exception):
    """A request body that is not a spec at all (empty, too big, not JSON/YAML): 400 or 413."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def create_app(
    scheduler: Scheduler,
    *,
    token: str | None = None,
    data_root: Path | None = None,
) -> FastAPI:
    """The app. Its lifespan starts the scheduler (recovering jobs a previous server left); on the way
    out it stops the scheduler, then the Ray it started. Here, not after ``uvicorn.run``: uvicorn
    re-raises the SIGTERM it shut down on, and nothing after it runs."""
    store = scheduler.store

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(scheduler.start)
        # Everything imported and built so far lives as long as the server: frozen, a full garbage collection
        # (which a listing of 100 jobs can trigger) no longer walks it, and requests stop stalling ~100 ms.
        gc.freeze()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)
            await run_in_threadpool(scheduler.cluster.shutdown)

    app = FastAPI(
        title="polyak",
        summary="Distributed minibatch SGD with heavy-ball momentum on Ray, as a job service",
        lifespan=lifespan,
        docs_url=None,  # served below from the package's own copy of Swagger UI, not from a CDN
        redoc_url=None,
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/dashboard", StaticFiles(directory=DASHBOARD), name="dashboard")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        """Open even with --token: the page has to load to ask for the token; the JSON API checks it."""
        return FileResponse(DASHBOARD / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="polyak API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        )
    _add_error_handlers(app)

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if token is None:
            return
        if credentials is None:
            raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>' (polyak --token)")
        if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise _unauthorized("wrong bearer token")

    api = APIRouter(dependencies=[Depends(authorize)])

    def job_or_404(job_id: str) -> Job:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job with id {job_id}")
        return job

    @api.post("/jobs", status_code=201, response_model=JobInfo, openapi_extra=_SPEC_BODY)
    async def submit(request: Request) -> JobInfo:
        """Queue a job: 201 with its JobInfo (queued); 422 naming every bad field of the spec."""
        body, content_type = await _body(request), request.headers.get("content-type", "")

        def submit_now() -> JobInfo:  # parsing up to 1 MB of YAML must not stall every event stream
            spec = resolve_paths(parse_spec(_read_spec(body, content_type)), data_root)
            _check_data(spec)
            return scheduler.submit(spec)

        return await run_in_threadpool(submit_now)

    @api.get("/jobs", response_model=list[JobInfo])
    def list_jobs(
        state: JobState | None = None,
        group: str | None = Query(None, description="only the jobs of this group (spec field group)"),
        limit: int = Query(100, ge=1, le=10_000, description="at most this many jobs"),
        offset: int = Query(0, ge=0, description="skip this many of the newest first"),
    ) -> list[JobInfo]:
        """Jobs, newest first, a page at a time; ``?state=`` and ``?group=`` keep those in one state or group."""
        # Serialized once here: returned as models, FastAPI would validate each JobInfo again first.
        return Response(_JOB_LIST.dump_json(scheduler.infos(state, group, limit, offset)),
                        media_type="application/json")

    @api.get("/jobs/{job_id}", response_model=JobInfo, responses=_NOT_FOUND)
    def get_job(job_id: str) -> JobInfo:
        return scheduler.info(job_or_404(job_id).id)

    @api.get("/jobs/{job_id}/metrics", response_model=list[EpochMetrics], responses=_NOT_FOUND)
    def get_metrics(job_id: str) -> list[EpochMetrics]:
        """Every epoch's metrics so far, in order."""
        return store.metrics(job_or_404(job_id).id)

    @api.get("/jobs/{job_id}/events", responses={**_NOT_FOUND, 200: {"content": {"text/event-stream": {}}}})
    async def events(
        job_id: str,
        after: int | None = Query(None, ge=0, description="replay only epochs after this one"),
        last_event_id: int | None = Header(None, ge=0, description="what a reconnecting EventSource sends"),
    ) -> StreamingResponse:
        """Server-Sent Events: ``state`` now, the epochs so far, then live ``epoch`` and ``state``
        events; ``end`` with the final JobInfo, then the stream closes. ``: keep-alive`` comments
        every 10 s."""
        await run_in_threadpool(job_or_404, job_id)

        def snapshot(after: int) -> tuple[JobInfo, list[EpochMetrics]]:
            return scheduler.info(job_id), store.metrics(job_id, after)

        start = after if after is not None else (last_event_id or 0)
        stream = job_events(scheduler.bus, job_id, start, snapshot)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    @api.post("/jobs/{job_id}/cancel", response_model=JobInfo, responses=_NOT_FOUND)
    def cancel(job_id: str) -> JobInfo:
        """A queued job is cancelled at once; a running one stops at its next step, keeping its last
        weights and metrics. Cancelling a finished job changes nothing."""
        if scheduler.cancel(job_id) is None:
            raise HTTPException(404, f"no job with id {job_id}")
        return scheduler.info(job_id)

    @api.post("/jobs/{job_id}/resubmit", status_code=201, response_model=JobInfo, responses=_NOT_FOUND)
    def resubmit(job_id: str) -> JobInfo:
        """A new job with the same spec, starting from this finished job's last checkpoint (its epochs so far
        are copied into the new job's history): how a job that failed with its cluster goes on."""
        info = scheduler.resubmit(job_id)
        if info is None:
            raise HTTPException(404, f"no job with id {job_id}")
        return info

    @api.get(
        "/jobs/{job_id}/weights",
        response_class=Response,
        responses={**_NOT_FOUND, 200: _NPZ},
    )
    def weights(job_id: str, which: Literal["last", "best"] = "last") -> Response:
        """The weights file (W1, b1, ..., WL, bL, x_mean/x_std, spec): ``last`` (a running job's latest epoch) or
        ``best`` (lowest validation loss; needs validation data)."""
        job = job_or_404(job_id)
        folder = store.job_dir(job.id)
        if which == "best":
            best = _file(folder / BEST_WEIGHTS, job, which)
            if best is None:
                raise HTTPException(404, f"job {job.id} has no best weights: {_why_no_best(job)}")
            return best
        if found := _file(folder / LAST_WEIGHTS, job, which):  # written with every checkpoint, and at the end
            return found
        if job.state.is_terminal():
            ended = "was cancelled" if job.state == JobState.CANCELLED else job.state.value
            raise HTTPException(404, f"job {job.id} has no weights: it {ended} before its first epoch")
        raise HTTPException(404, f"job {job.id} has no weights yet: it is {job.state.value}, no epoch done")

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Service, Ray and queue status; open even when the server wants a token."""
        counts = store.counts()
        return {
            "status": "ok",
            "ray": scheduler.cluster.status(),
            "queue": {
                "queued": counts["queued"],
                "running": counts["running"],
                "max_concurrent_jobs": scheduler.max_concurrent,
            },
            "jobs": counts,
        }

    app.include_router(api)
    return app


# -- request bodies --------------------------------------------------------------------------------
async def _body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadBody(413, f"request body is over {MAX_BODY_BYTES} bytes: a job spec is a few hundred")
    return bytes(body)


def _read_spec(body: bytes, content_type: str) -> dict[str, Any]:
    """The body as a mapping: JSON when the Content-Type says so, else YAML (a superset of JSON), so
    ``application/yaml``, ``text/yaml`` and whatever ``curl -d`` sends all work."""
    media = content_type.split(";")[0].strip().lower()
    is_json = media == "application/json" or media.endswith("+json")
    if not body.strip():
        raise BadBody(400, "request body is empty: send the job spec as JSON or YAML")
    try:
        return spec_mapping(body.decode("utf-8"), is_json, "request body")
    except UnicodeDecodeError as e:
        raise BadBody(400, f"request body is not UTF-8 text: {e}") from None
    except SpecSyntaxError as e:
        raise BadBody(400, e.message) from None


def _check_data(spec) -> None:
    """A spec whose layers do not fit its data is a 422 now, where that is cheap to see, not a failure later."""
    try:
        check_cheaply(spec.data, spec.model)
    except DataError as e:
        message = str(e)
        field = next((f for f in ("model.layers", "model.loss", "data.target", "data.validation_fraction")
                      if message.startswith(f)), "data.path")
        raise SpecError(message, [{"field": field, "message": message}]) from None


# -- answers ---------------------------------------------------------------------------------------
def _file(path: Path, job: Job, which: str) -> Response | None:
    try:
        data = path.read_bytes()  # whole, at once: a running job may os.replace the file any moment
    except FileNotFoundError:
        return None
    return Response(data, media_type="application/octet-stream", headers=_attachment(job, which))


def _attachment(job: Job, which: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{job.id}-{which}.npz"'}


def _why_no_best(job: Job) -> str:
    if job.spec.data.validation_fraction == 0:
        return "it has no validation data (data.validation_fraction is 0); use which=last"
    return f"no epoch has been validated yet (it is {job.state.value})"


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SpecError)
    async def spec_error(request: Request, e: SpecError) -> JSONResponse:
        return JSONResponse({"detail": f"invalid job spec: {e.message}", "errors": e.errors}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
        """A bad query or path parameter, in the same shape as a bad spec: {detail, errors: [{field, message}]}."""
        errors = [{"field": ".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0]), "message": err["msg"]}
                  for err in e.errors()]
        detail = "invalid request: " + "; ".join(f"{x['field']}: {x['message']}" for x in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(BadBody)
    async def bad_body(request: Request, e: BadBody) -> JSONResponse:
        return JSONResponse({"detail": e.message}, status_code=e.status)

    @app.exception_handler(JobNotResumable)
    async def not_resumable(request: Request, e: JobNotResumable) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(ClusterUnavailable)
    async def no_cluster(request: Request, e: ClusterUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=503)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
