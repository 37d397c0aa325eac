"""The HTTP API of DESIGN.md over a Scheduler (FastAPI; OpenAPI at /docs): the app, built from its parts.

Routes live in one module per noun (``routes_jobs``, ``routes_metrics``, ``routes_weights``, ``routes_datasets``,
``routes_health``, ``routes_pages``); the state they share in ``context`` (on ``app.state.service``, read through a
dependency), with the error body every error status publishes; how errors are answered in ``handlers``; how a
request body becomes a spec in ``submission``; which Host and Origin may call at all in ``guard``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from polyak.service.server import (
    handlers,
    routes_datasets,
    routes_health,
    routes_jobs,
    routes_metrics,
    routes_pages,
    routes_weights,
)
from polyak.service.server.context import DEFAULT_MAX_LISTENERS, Listeners, Service, authorize, errors
from polyak.service.server.datasets import DatasetStore
from polyak.service.server.guard import LOOPBACK_HOSTS, HostAndOrigin
from polyak.service.server.scheduler import Scheduler

DEFAULT_MAX_DATASET_BYTES = 1 << 30


def create_app(
    scheduler: Scheduler,
    *,
    token: str | None = None,
    data_root: Path | None = None,
    max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES,
    allowed_hosts: Iterable[str] = LOOPBACK_HOSTS,
    max_listeners: int = DEFAULT_MAX_LISTENERS,
) -> FastAPI:
    """The app, answering requests whose Host is one of ``allowed_hosts`` ("*": any). Its lifespan starts the
    scheduler (recovering jobs a previous server left); on the way out it stops the scheduler, then the Ray it
    started. Here, not after ``uvicorn.run``: uvicorn re-raises the SIGTERM it shut down on, and nothing after it
    runs."""
    app = FastAPI(
        title="polyak",
        summary="Distributed minibatch SGD with heavy-ball momentum on Ray, as a job service",
        lifespan=_lifespan,
        docs_url=None,  # served by routes_pages from the package's own copy of Swagger UI, not from a CDN
        redoc_url=None,
        # Every route: the Host and Origin checks of guard.HostAndOrigin.
        responses=errors(400, 403, why={400: "the Host header names another server"}),
    )
    datasets = DatasetStore(scheduler.store.data_dir / "datasets", max_dataset_bytes)
    app.state.service = Service(scheduler, datasets, token, data_root, Listeners(max_listeners))
    app.add_middleware(HostAndOrigin, allowed_hosts=allowed_hosts)
    app.mount("/static", StaticFiles(directory=routes_pages.STATIC), name="static")
    app.mount("/dashboard", StaticFiles(directory=routes_pages.DASHBOARD), name="dashboard")
    handlers.install(app)
    app.include_router(routes_pages.router)  # open: the page has to load to ask for the token
    app.include_router(routes_health.router)  # open: /health never asks for the token
    for routes in (routes_jobs, routes_metrics, routes_weights, routes_datasets):
        # 401 documented always: whether the server wants a token is not known to the schema's readers.
        app.include_router(routes.router, dependencies=[Depends(authorize)], responses=errors(401))
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    scheduler = app.state.service.scheduler
    await run_in_threadpool(scheduler.start)
    # Everything imported and built so far lives as long as the server: frozen, a full garbage collection
    # (which a listing of 100 jobs can trigger) no longer walks it, and requests stop stalling ~100 ms.
    gc.freeze()
    try:
        yield
    finally:
        await run_in_threadpool(scheduler.stop)
        await run_in_threadpool(scheduler.cluster.shutdown)
