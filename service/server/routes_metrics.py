"""The API's epochs of a job: every one so far, and the live stream of them (Server-Sent Events), at most
``--max-listeners`` streams open at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from fastapi import APIRouter, Header, HTTPException, Query
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from polyak.contract.wire import EpochMetrics, JobInfo
from polyak.service.server.context import MAX_INT, Service, ServiceDep, Slot, errors, job_or_404
from polyak.service.server.events import job_events

router = APIRouter()


@router.get("/jobs/{job_id}/metrics", response_model=list[EpochMetrics], responses=errors(404, 422))
def get_metrics(job_id: str, service: ServiceDep) -> list[EpochMetrics]:
    """Every epoch's metrics so far, in order."""
    return service.store.metrics(job_or_404(service.store, job_id).id)


@router.get("/jobs/{job_id}/events", responses={
    **errors(404, 422, 503, why={503: "over the server's --max-listeners event streams"}),
    200: {"content": {"text/event-stream": {}}}})
async def events(
    job_id: str,
    service: ServiceDep,
    after: int | None = Query(None, ge=0, le=MAX_INT, description="replay only epochs after this one"),
    last_event_id: int | None = Header(None, ge=0, le=MAX_INT, description="what a reconnecting EventSource sends"),
) -> StreamingResponse:
    """Server-Sent Events: ``state`` now, the epochs so far, then live ``epoch`` and ``state``
    events; ``end`` with the final JobInfo, then the stream closes. ``: keep-alive`` comments
    every 10 s. 503 when ``--max-listeners`` streams are open already."""
    await run_in_threadpool(job_or_404, service.store, job_id)
    slot = service.listeners.take()
    if slot is None:
        raise HTTPException(503, f"too many event streams open (polyak serve --max-listeners "
                                 f"{service.listeners.limit}): try again later, or poll GET /jobs/{job_id}")
    start = after if after is not None else (last_event_id or 0)
    stream = job_events(service.scheduler.bus, job_id, start, partial(_snapshot, service, job_id))
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_holding(slot, stream), media_type="text/event-stream", headers=headers,
                             background=BackgroundTask(_free, slot))


async def _free(slot: Slot) -> None:
    """On the event loop, as every other change to the slots (a plain function would run in a worker thread)."""
    slot.free()


async def _holding(slot: Slot, stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream, freeing its slot when it ends or its client goes away."""
    try:
        async for event in stream:
            yield event
    finally:
        slot.free()


def _snapshot(service: Service, job_id: str, after: int) -> tuple[JobInfo, list[EpochMetrics]]:
    return service.scheduler.info(job_id), service.store.metrics(job_id, after)
