"""The API's datasets: arrays uploaded instead of files the server reads (``service.server.datasets``)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from polyak.contract.wire import DatasetInfo, JobState
from polyak.service.server.context import ServiceDep, errors
from polyak.service.server.datasets import FORMATS

router = APIRouter()

_MEDIA = {"application/x-npy": "npy", "application/vnd.apache.parquet": "parquet"}
_UPLOAD = {
    "requestBody": {
        "required": True,
        "description": "the file's bytes, streamed: a .npy table (features, then the target column(s)) or a "
                       ".parquet file; the Content-Type or ?format= says which",
        "content": {media: {"schema": {"type": "string", "format": "binary"}} for media in _MEDIA},
    }
}
_NO_DATASET = errors(404, 422, why={404: "no such dataset"})


@router.post("/datasets", status_code=201, response_model=DatasetInfo, openapi_extra=_UPLOAD,
             responses={200: {"model": DatasetInfo, "description": "the same bytes were stored already"},
                        **errors(400, 413, 415, 422, 503, why={400: "the upload was cut off",
                                                          413: "over the server's --max-dataset-bytes",
                                                          422: "not a usable table"})})
async def upload(request: Request, service: ServiceDep,
                 format: str | None = Query(None, description="npy | parquet; default from the Content-Type")):
    """Store an upload under the SHA-256 of its bytes: 201 with its info, or 200 when it was there already."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fmt = format or _MEDIA.get(media)
    if fmt is None:
        raise HTTPException(415, f"say the upload's format: Content-Type {' or '.join(_MEDIA)}, or "
                                 f"?format={'|'.join(FORMATS)}")
    info, created = await service.datasets.save(request.stream(), fmt)
    return JSONResponse(info.model_dump(mode="json"), status_code=201 if created else 200)


@router.get("/datasets", response_model=list[DatasetInfo])
def list_datasets(service: ServiceDep) -> list[DatasetInfo]:
    """Every stored dataset, newest first."""
    return service.datasets.list()


@router.get("/datasets/{dataset_id}", response_model=DatasetInfo, responses=_NO_DATASET)
def get_dataset(dataset_id: str, service: ServiceDep) -> DatasetInfo:
    try:
        return service.datasets.info(dataset_id)
    except KeyError:
        raise _no_such(dataset_id) from None


@router.delete("/datasets/{dataset_id}", status_code=204, responses={
    **_NO_DATASET, **errors(409, 503, why={409: "a job that has not ended reads it"})})
def delete_dataset(dataset_id: str, service: ServiceDep) -> None:
    """Delete it, unless a queued or running job will read it (409 naming the job)."""
    try:
        path = service.datasets.path(dataset_id)
    except KeyError:
        raise _no_such(dataset_id) from None
    unfinished = service.store.jobs(JobState.QUEUED) + service.store.jobs(JobState.RUNNING)
    readers = [job.id for job in unfinished if job.spec.data.path == str(path)]
    if readers:
        raise HTTPException(409, f"dataset {dataset_id} is read by job(s) {', '.join(readers)} that have not "
                                 "ended: cancel them or wait")
    service.datasets.delete(dataset_id)


def _no_such(dataset_id: str) -> HTTPException:
    return HTTPException(404, f"no dataset with id {dataset_id}")
