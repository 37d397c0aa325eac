"""The SDK: a typed HTTP client for the polyak service, and a handle on one job.

Every call goes through ``Client._send``: it adds the bearer token, turns transport failures and
error answers into the typed errors of ``client.errors`` (always carrying the server's message),
and ``Client._request`` parses the answer into the wire model the caller asked for.
"""

from __future__ import annotations

import io
import os
import time
import zipfile
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel, TypeAdapter, ValidationError

from polyak.client.model import Model
from polyak.client.sweep import RankedJob, SweepPlan, plan_sweep, rank, spec_source
from polyak.contract.errors import (
    BadInput,
    DatasetNotFound,
    JobConflict,
    JobNotFound,
    NotFound,
    PolyakError,
    ServerError,
    ServerUnreachable,
    SpecError,
    Unauthorized,
)
from polyak.contract.spec import JobSpec, parse_spec
from polyak.contract.wire import DatasetInfo, EpochMetrics, JobInfo, JobState

DEFAULT_URL = "http://127.0.0.1:8765"

_EVENT_MODELS: dict[str, type[BaseModel]] = {"epoch": EpochMetrics, "state": JobInfo, "end": JobInfo}


class Client:
    """Talks to one polyak server. ``transport`` is handed to httpx (tests pass an ``httpx.MockTransport``).

    ``retries`` and ``backoff`` bound how ``Job.stream``/``Job.wait`` reconnect a dropped event
    stream: up to ``retries`` attempts in a row without a new epoch, sleeping ``backoff * 2**k`` s.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retries: int = 5,
        backoff: float = 0.5,
    ):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        token = token if token is not None else os.environ.get("POLYAK_TOKEN") or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- the API, one method per endpoint ---------------------------------------------------------

    def submit(self, spec: str | Path | dict[str, Any] | JobSpec) -> Job:
        """Queue a job: ``spec`` is a spec file's name (str or Path), a mapping of fields or a JobSpec. It is
        validated here first, so a bad one fails before any request."""
        body = parse_spec(spec_source(spec)).model_dump(mode="json")
        info = self._request("POST", "/jobs", JobInfo, json=body)
        return Job(info.id, self)

    def sweep(self, spec: str | Path | dict[str, Any] | JobSpec, grid: dict[str, list[Any]],
              group: str | None = None) -> Sweep:
        """Queue one job per combination of ``grid`` (dotted keys -> values) as one group (default a new
        ``sweep-...`` name). Every combination is validated first: one bad value queues nothing."""
        return self.submit_sweep(plan_sweep(spec, grid, group))

    def submit_sweep(self, plan: SweepPlan) -> Sweep:
        """Queue a plan from ``client.sweep.plan_sweep`` (``polyak sweep`` prints its group before this)."""
        jobs = [self.submit(trial.spec) for trial in plan.trials]
        return Sweep(plan.group, jobs, [trial.params for trial in plan.trials], self)

    def cancel_group(self, group: str) -> list[JobInfo]:
        """Cancel every job of ``group`` that has not ended; the answers, one per job cancelled."""
        live = [j for j in self.list(group=group, limit=10_000) if not j.state.is_terminal()]
        return [self.cancel(j.id) for j in live]

    def get(self, job_id: str) -> JobInfo:
        return self._request("GET", f"/jobs/{job_id}", JobInfo)

    def list(
        self, state: JobState | str | None = None, group: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[JobInfo]:
        """Jobs, newest first: a page of ``limit`` after skipping ``offset``; only ``state`` / ``group`` ones."""
        params = {"state": _value(state), "group": group, "limit": limit, "offset": offset}
        return self._request("GET", "/jobs", list[JobInfo], params=params)

    def cancel(self, job_id: str) -> JobInfo:
        return self._request("POST", f"/jobs/{job_id}/cancel", JobInfo)

    def resubmit(self, job_id: str) -> Job:
        """A new job with the same spec that resumes from this finished job's last checkpoint."""
        info = self._request("POST", f"/jobs/{job_id}/resubmit", JobInfo)
        return Job(info.id, self)

    def metrics(self, job_id: str) -> list[EpochMetrics]:
        return self._request("GET", f"/jobs/{job_id}/metrics", list[EpochMetrics])

    def weights(self, job_id: str, which: str = "last") -> dict[str, np.ndarray]:
        """The job's weights (``last`` or ``best``) as ``{"W1": ..., "b1": ..., ...}``."""
        path = f"/jobs/{job_id}/weights"
        response = self._send("GET", path, params={"which": which})
        try:
            return _read_npz(response.content)
        except (ValueError, OSError, EOFError) as e:
            raise ServerError(f"GET {self.url}{path}: answer is not a readable .npz ({e})") from None

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health", dict[str, Any])

    def events(self, job_id: str, after: int | None = None) -> Iterator[tuple[str, BaseModel]]:
        """The job's Server-Sent Events as ``(kind, model)``: ``epoch`` -> EpochMetrics,
        ``state``/``end`` -> JobInfo; ends when the server closes. ``after`` skips epochs <= after."""
        return self._events(job_id, after, deadline=None)

    def job(self, job_id: str) -> Job:
        return Job(job_id, self)

    def upload(self, X: Any, y: Any = None) -> DatasetInfo:
        """Store arrays on the server as one dataset, streamed as a ``.npy`` table (X's columns, then y's): its
        info, whose ``id`` a spec names as ``{"data": {"source": "dataset", "name": id}}``. The same arrays
        uploaded again are the same dataset (its id is the SHA-256 of the bytes)."""
        table = upload_table(X, y)
        return self._request("POST", "/datasets", DatasetInfo, content=_npy_chunks(table),
                             headers={"Content-Type": "application/x-npy"})

    def upload_file(self, path: str | Path) -> DatasetInfo:
        """Store a ``.npy`` table or a ``.parquet`` file on the server, streamed from disk (see ``upload``)."""
        path = Path(path)
        media = {".npy": "application/x-npy", ".parquet": "application/vnd.apache.parquet"}.get(path.suffix)
        if media is None:
            raise BadInput(f"{path}: upload a .npy table or a .parquet file")
        try:
            with path.open("rb") as f:
                return self._request("POST", "/datasets", DatasetInfo, content=iter(lambda: f.read(1 << 20), b""),
                                     headers={"Content-Type": media})
        except OSError as e:
            raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None

    def datasets(self) -> list[DatasetInfo]:
        return self._request("GET", "/datasets", list[DatasetInfo])

    def dataset(self, dataset_id: str) -> DatasetInfo:
        return self._request("GET", f"/datasets/{dataset_id}", DatasetInfo)

    def delete_dataset(self, dataset_id: str) -> None:
        self._send("DELETE", f"/datasets/{dataset_id}")

    # --- plumbing ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, into: Any, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        try:
            return _adapter(into).validate_json(response.content)
        except ValidationError as e:
            raise ServerError(f"{method} {self.url}{path}: unreadable answer: {_first_error(e)}") from None

    def _send(self, method: str, path: str, params: dict | None = None, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, params=_drop_none(params), **kwargs)
        except httpx.TransportError as e:
            raise self._transport_error(e, method, path) from None
        if not response.is_success:
            raise _error_from(response, DatasetNotFound if path.startswith("/datasets") else JobNotFound)
        return response

    def _events(self, job_id: str, after: int | None, deadline: float | None) -> Iterator[tuple[str, Any]]:
        path = f"/jobs/{job_id}/events"
        # With a deadline, no single read may block past it; keep-alive comments re-arm the read timeout.
        timeout = self.timeout
        if deadline is not None:
            timeout = max(0.01, min(timeout, deadline - time.monotonic()))
        params = _drop_none({"after": after})
        try:
            with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                if not response.is_success:
                    response.read()
                    raise _error_from(response)
                for kind, data in parse_sse(_before(response.iter_lines(), deadline)):
                    if kind in _EVENT_MODELS:
                        yield kind, self._parse_event(kind, data, path)
        except httpx.TransportError as e:
            raise self._transport_error(e, "GET", path) from None

    def _parse_event(self, kind: str, data: str, path: str) -> BaseModel:
        try:
            return _EVENT_MODELS[kind].model_validate_json(data)
        except ValidationError as e:
            raise ServerError(f"GET {self.url}{path}: unreadable {kind} event: {_first_error(e)}") from None

    def _transport_error(self, error: httpx.TransportError, method: str, path: str) -> ServerUnreachable:
        if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
            return ServerUnreachable(
                f"cannot reach polyak server at {self.url}: is `polyak serve` running? ({error})"
            )
        detail = str(error) or type(error).__name__
        return ServerUnreachable(f"{method} {self.url}{path}: connection to the polyak server failed: {detail}")


class Job:
    """A handle on one job: its id and the client that reaches it."""

    def __init__(self, id: str, client: Client):
        self.id = id
        self.client = client

    def __repr__(self) -> str:
        return f"Job({self.id!r}, url={self.client.url!r})"

    def info(self) -> JobInfo:
        return self.client.get(self.id)

    def cancel(self) -> JobInfo:
        return self.client.cancel(self.id)

    def metrics(self) -> list[EpochMetrics]:
        return self.client.metrics(self.id)

    def weights(self, which: str = "last") -> dict[str, np.ndarray]:
        return self.client.weights(self.id, which)

    def model(self, which: str = "last", dtype=np.float64) -> Model:
        """The trained model (``last`` or ``best`` weights), ready for raw inputs: predict, evaluate, export."""
        return Model.from_arrays(self.weights(which), dtype=dtype, source=f"job {self.id} ({which} weights)")

    def stream(self) -> Iterator[EpochMetrics]:
        """Every epoch's metrics, history first then live, each exactly once, until the job ends."""
        for kind, model in self._follow(deadline=None):
            if kind == "epoch":
                yield model

    def events(self) -> Iterator[tuple[str, BaseModel]]:
        """Like ``Client.events``, but surviving dropped connections: every epoch once, ``end`` last."""
        return self._follow(deadline=None)

    def wait(self, timeout: float | None = None, poll: float = 2.0) -> JobInfo:
        """The final JobInfo once the job ends; TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            try:
                return self._follow_to_end(deadline)
            except ServerError:
                # The stream gave up (e.g. a proxy that buffers SSE); plain requests may still get through.
                return self._poll(deadline, poll)
        except TimeoutError:
            raise TimeoutError(f"job {self.id} did not finish within {timeout:g} s") from None

    def _follow_to_end(self, deadline: float | None) -> JobInfo:
        final = None
        for kind, model in self._follow(deadline):
            if kind == "end":
                final = model
        return final

    def _poll(self, deadline: float | None, poll: float) -> JobInfo:
        while True:
            info = self.info()
            if info.state.is_terminal():
                return info
            _sleep(poll, deadline)

    def _follow(self, deadline: float | None) -> Iterator[tuple[str, BaseModel]]:
        """Events until ``end``, reconnecting with ``after=<last epoch seen>`` when the stream drops."""
        last_epoch: int | None = None
        failures = 0
        while True:
            try:
                for kind, model in self.client._events(self.id, last_epoch, deadline):
                    if kind == "epoch":
                        # A server that ignores `after` must not make us yield an epoch twice.
                        if last_epoch is not None and model.epoch <= last_epoch:
                            continue
                        last_epoch = model.epoch
                        # Only a new epoch is progress: a server that replays its state and drops
                        # the connection again must still run out of retries.
                        failures = 0
                    yield kind, model
                    if kind == "end":
                        return
                cause, lost = "the stream ended before the job did", ServerError
            except ServerError as e:
                cause, lost = e.message, type(e)
            failures += 1
            if failures > self.client.retries:
                # As the last failure was: a server that could not be reached is ServerUnreachable.
                raise lost(f"lost the event stream of job {self.id} after {self.client.retries} reconnects: {cause}")
            _sleep(self.client.backoff * 2 ** (failures - 1), deadline)


def upload_table(X: Any, y: Any = None, dtype: Any = None) -> np.ndarray:
    """The one 2-D table polyak's trainer reads and ``upload`` sends: X's columns then y's (class ids or targets),
    in ``dtype`` (default float32 when X is float32, else float64), built in one copy; BadInput when they are not
    numeric or do not line up."""
    X = np.asarray(X)
    dtype = dtype or (np.float32 if X.dtype == np.float32 else np.float64)
    parts = [X] if y is None else [X, np.asarray(y).reshape(len(np.asarray(y)), -1)]
    for name, part in zip(("X", "y"), parts, strict=False):
        if not (np.issubdtype(part.dtype, np.number) or part.dtype == bool):
            raise BadInput(f"{name} must be numeric to upload, got dtype {part.dtype} (encode categories first, "
                           "e.g. with scikit-learn's OneHotEncoder, or use PolyakClassifier in a Pipeline)")
    if X.ndim != 2:
        raise BadInput(f"X must be 2-D (rows, features), got shape {X.shape}")
    if y is not None and len(parts[1]) != len(X):
        raise BadInput(f"X has {len(X)} rows but y has {len(parts[1])}")
    table = np.empty((len(X), sum(part.shape[1] for part in parts)), dtype=dtype)
    table[:, : X.shape[1]] = X
    if y is not None:
        table[:, X.shape[1] :] = parts[1]
    return table


def _npy_chunks(table: np.ndarray, rows: int = 65536) -> Iterator[bytes]:
    """``table`` as ``.npy`` bytes, a header then a block of rows at a time: never a second copy in memory."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(table))  # as np.save
    yield header.getvalue()
    for start in range(0, len(table), rows):
        yield table[start : start + rows].tobytes()


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(event, data)`` for each Server-Sent Event in ``lines``; comments and ``id``/``retry`` skipped."""
    kind, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
    if data:
        yield kind, "\n".join(data)


def _before(lines: Iterator[str], deadline: float | None) -> Iterator[str]:
    # Checked per line, keep-alive comments included, so a quiet job cannot outlast the deadline.
    for line in lines:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
        yield line


def _sleep(seconds: float, deadline: float | None) -> None:
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        seconds = min(seconds, left)
    time.sleep(seconds)


def _error_from(response: httpx.Response, missing: type[NotFound] = JobNotFound) -> PolyakError:
    """The typed error of a failed answer; a 404 is ``missing`` (what the request looked for)."""
    status = response.status_code
    detail = _detail(response)
    if detail is None:
        text = response.text.strip()[:200] or response.reason_phrase
        return ServerError(f"{response.request.method} {response.request.url}: HTTP {status}: {text}", status)
    message, errors = detail
    if status in (401, 403):
        return Unauthorized(message, status)
    if status == 404:
        return missing(message, status)
    if status == 409:
        return JobConflict(message, status)
    if status in (400, 422):
        return SpecError(message, errors, status)
    if status in (413, 415):
        return BadInput(message, status)
    if status >= 500:
        return ServerError(message, status)
    return PolyakError(message, status)


def _detail(response: httpx.Response) -> tuple[str, list[dict[str, str]]] | None:
    """The error body's message and field errors; None when the body is not polyak's JSON error
    (``{"detail": message, "errors": [{field, message}]}``)."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or "detail" not in body:
        return None
    # The server's one error shape (its ErrorBody): the field errors are the contract's field_errors, already
    # translated there; nothing is translated again here.
    errors = body.get("errors")
    errors = [{"field": str(e.get("field", "(request)")), "message": str(e.get("message", ""))}
              for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
    return str(body["detail"]), errors


def _read_npz(content: bytes) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(io.BytesIO(content)):
        raise ValueError("not a zip archive")
    with np.load(io.BytesIO(content), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


@cache
def _adapter(into: Any) -> TypeAdapter:
    return TypeAdapter(into)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(body)"
    return f"{loc}: {first['msg']} ({error.error_count()} error(s))"


def _drop_none(params: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if params is None else {k: v for k, v in params.items() if v is not None}


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


class Sweep:
    """Jobs queued as one group by ``Client.sweep``; ``params[i]`` are the grid values of ``jobs[i]``."""

    def __init__(self, group: str, jobs: list[Job], params: list[dict[str, Any]], client: Client):
        self.group = group
        self.jobs = jobs
        self.params = params
        self.client = client

    def __repr__(self) -> str:
        return f"Sweep({self.group!r}, {len(self.jobs)} jobs)"

    def infos(self) -> list[JobInfo]:
        """The jobs as the server has them now, in submission order (one request for the whole group)."""
        by_id = {info.id: info for info in self.client.list(group=self.group, limit=10_000)}
        return [by_id.get(job.id) or job.info() for job in self.jobs]

    def wait(self, timeout: float | None = None) -> list[JobInfo]:
        """Every job's final JobInfo once all have ended; TimeoutError after ``timeout`` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self.jobs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            job.wait(timeout=left)
        return self.infos()

    def ranking(self, metric: str | None = None, mode: str | None = None) -> list[RankedJob]:
        """The jobs best first by ``metric`` of their last epoch (see ``rank``)."""
        return rank(self.infos(), self.params, metric, mode)
