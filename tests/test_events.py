"""The event stream on its own: replay then live with nothing lost or doubled, keep-alives, listeners leaving."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timezone

from polyak.client.sdk import parse_sse
from polyak.contract.spec import JobSpec
from polyak.contract.wire import EpochMetrics, JobInfo, JobState
from polyak.service.server.events import Bus, job_events

CREATED = datetime(2025, 1, 1, tzinfo=timezone.utc)


def info(state: JobState, epoch: int | None = None) -> JobInfo:
    return JobInfo(id="j", state=state, spec=JobSpec(), created_at=CREATED, epoch=epoch)


def epoch(n: int) -> EpochMetrics:
    return EpochMetrics(
        job_id="j", epoch=n, step=n, samples_seen=n, batch_size=1, lr=0.1, train_loss=1.0 / n, weight_norm=1.0,
        weight_change=None, grad_avg_norm=None, grad_noise=None, samples_per_second=1.0, elapsed_seconds=n,
        criteria=[],
    )


def kinds(chunks: list[str]) -> list[str]:
    """Each chunk's event kind and epoch id, or "keep-alive" for a comment."""
    out = []
    for chunk in chunks:
        if chunk.startswith(":"):
            out.append("keep-alive")
            continue
        (kind, _), = parse_sse(chunk.splitlines())
        out.append(f"{kind} {chunk.splitlines()[1].removeprefix('id: ')}")
    return out


def test_replay_then_live_loses_and_doubles_nothing():
    async def main() -> list[str]:
        bus = Bus()

        def snapshot(after: int):
            # Epoch 2 and the running state are stored *and* published while the listener reads history.
            bus.publish("j", "epoch", epoch(2))
            bus.publish("j", "state", info(JobState.RUNNING, 2))
            return info(JobState.RUNNING, 2), [epoch(n) for n in (1, 2) if n > after]

        def job_goes_on() -> None:
            bus.publish("j", "epoch", epoch(3))
            bus.publish("j", "state", info(JobState.SUCCEEDED, 3))

        chunks = []
        async for chunk in job_events(bus, "j", 0, snapshot, keepalive=0.05):
            chunks.append(chunk)
            if chunk.startswith(":"):  # quiet long enough for a keep-alive: now the job moves
                threading.Thread(target=job_goes_on).start()
        assert not bus._subs  # the finished stream left nothing behind
        return chunks

    assert kinds(asyncio.run(main())) == [
        "state 0", "epoch 1", "epoch 2", "keep-alive", "epoch 3", "state 3", "end 3",
    ]


def test_a_finished_job_replays_and_ends_at_once():
    async def main() -> list[str]:
        def snapshot(after: int):
            return info(JobState.CANCELLED, 3), [epoch(n) for n in (1, 2, 3) if n > after]

        return [c async for c in job_events(Bus(), "j", 1, snapshot, keepalive=60)]

    assert kinds(asyncio.run(main())) == ["state 1", "epoch 2", "epoch 3", "end 3"]


def test_a_listener_that_leaves_only_removes_itself():
    async def main() -> None:
        bus = Bus()
        stream = job_events(bus, "j", 0, lambda after: (info(JobState.RUNNING), []), keepalive=60)
        await stream.__anext__()
        other = bus.subscribe("j")
        await stream.aclose()  # the client went away
        assert bus._subs == {"j": {other}}
        bus.publish("j", "epoch", epoch(1))  # the job carries on; the remaining listener still hears it
        assert (await asyncio.wait_for(other.queue.get(), 1))[1].epoch == 1

    asyncio.run(main())
