"""Live job events: an in-process pub/sub, and the Server-Sent Events stream built on it.

Job threads publish; each SSE listener owns an asyncio queue on the server's event loop. A listener
subscribes *before* it reads the stored history, so an event is either in that history, or in its
queue, or both (then it is skipped by epoch / state): none is lost, none is sent twice. A listener
that goes away only removes its own queue; the job never waits for anyone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from polyak.contract.wire import EpochMetrics, JobInfo

KEEPALIVE_SECONDS = 10.0


@dataclass(eq=False)
class Subscription:
    job_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class Bus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = {}

    def subscribe(self, job_id: str) -> Subscription:
        """Called on the event loop that will read the queue."""
        sub = Subscription(job_id, asyncio.get_running_loop())
        with self._lock:
            self._subs.setdefault(job_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.job_id, set())
            subs.discard(sub)
            if not subs:
                self._subs.pop(sub.job_id, None)

    def publish(self, job_id: str, kind: str, payload: BaseModel) -> None:
        """From any thread: ``kind`` is "epoch" (EpochMetrics) or "state" (JobInfo)."""
        with self._lock:
            subs = list(self._subs.get(job_id, ()))
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub.queue.put_nowait, (kind, payload))
            except RuntimeError:  # its loop has closed: the server is shutting down
                pass


def sse(kind: str, payload: BaseModel, event_id: int) -> str:
    return f"event: {kind}\nid: {event_id}\ndata: {payload.model_dump_json()}\n\n"


async def job_events(
    bus: Bus,
    job_id: str,
    after: int,
    snapshot: Callable[[int], tuple[JobInfo, list[EpochMetrics]]],
    keepalive: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[str]:
    """``state`` (now), the stored epochs > ``after``, then live ``epoch``/``state`` events until the
    job ends; then ``end`` with the final JobInfo. ``snapshot(after)`` reads (JobInfo, epochs) from the store.
    """
    sub = bus.subscribe(job_id)
    try:
        info, history = await run_in_threadpool(snapshot, after)
        last_epoch = after
        yield sse("state", info, after)
        for m in history:
            last_epoch = m.epoch
            yield sse("epoch", m, m.epoch)
        while not info.state.is_terminal():
            try:
                kind, payload = await asyncio.wait_for(sub.queue.get(), keepalive)
            except asyncio.TimeoutError:  # not TimeoutError: the two differ before Python 3.11
                yield ": keep-alive\n\n"
                continue
            if kind == "epoch" and payload.epoch > last_epoch:
                last_epoch = payload.epoch
                yield sse("epoch", payload, payload.epoch)
            elif kind == "state" and payload.state != info.state:
                info = payload
                yield sse("state", info, last_epoch)
        yield sse("end", info, last_epoch)
    finally:
        bus.unsubscribe(sub)
