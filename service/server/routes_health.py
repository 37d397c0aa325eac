"""The API's health: service, Ray and queue status, open even when the server wants a token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from polyak.service.server.context import ServiceDep

router = APIRouter()


@router.get("/health")
def health(service: ServiceDep) -> dict[str, Any]:
    """Service, Ray and queue status; open even when the server wants a token. ``status`` is "degraded" while the
    job database takes no writes (read-only, disk full): ``database.error`` says why, and every write is a 503."""
    scheduler, store = service.scheduler, service.store
    counts = store.counts()
    # Asked again only while it is failing: how a permission or space given back is seen without a write.
    error = store.check_writable() if store.write_error else None
    return {
        "status": "degraded" if error else "ok",
        "database": {"path": str(store.path), "writable": error is None, **({"error": error} if error else {})},
        "ray": scheduler.cluster.status(),
        "queue": {
            "queued": counts["queued"],
            "running": counts["running"],
            "max_concurrent_jobs": scheduler.max_concurrent,
        },
        "jobs": counts,
    }
