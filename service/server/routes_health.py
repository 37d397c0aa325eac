"""The API's health: service, Ray and queue status, open even when the server wants a token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from polyak.service.server.context import ServiceDep

router = APIRouter()


@router.get("/health")
def health(service: ServiceDep) -> dict[str, Any]:
    """Service, Ray and queue status; open even when the server wants a token."""
    scheduler, counts = service.scheduler, service.store.counts()
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
