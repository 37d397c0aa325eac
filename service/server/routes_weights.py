"""The API's weights of a job: its last or best weights file, or a 404 that says why there is none."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from polyak.contract.wire import JobState
from polyak.service.engine.trainer import BEST_WEIGHTS, LAST_WEIGHTS
from polyak.service.server.context import ServiceDep, errors, job_or_404
from polyak.service.server.job import JobRecord

router = APIRouter()

_NPZ = {"content": {"application/octet-stream": {}}, "description": "the .npz file"}


@router.get("/jobs/{job_id}/weights", response_class=Response, responses={
    **errors(404, 422, why={404: "no such job, or it has no such weights (yet)"}), 200: _NPZ})
def weights(job_id: str, service: ServiceDep, which: Literal["last", "best"] = "last") -> Response:
    """The weights file (W1, b1, ..., WL, bL, x_mean/x_std, spec): ``last`` (a running job's latest epoch) or
    ``best`` (lowest validation loss; needs validation data)."""
    job = job_or_404(service.store, job_id)
    folder = service.store.job_dir(job.id)
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


def _file(path: Path, job: JobRecord, which: str) -> Response | None:
    try:
        data = path.read_bytes()  # whole, at once: a running job may os.replace the file any moment
    except FileNotFoundError:
        return None
    return Response(data, media_type="application/octet-stream", headers=_attachment(job, which))


def _attachment(job: JobRecord, which: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{job.id}-{which}.npz"'}


def _why_no_best(job: JobRecord) -> str:
    if job.spec.data.validation_fraction == 0:
        return "it has no validation data (data.validation_fraction is 0); use which=last"
    return f"no epoch has been validated yet (it is {job.state.value})"
