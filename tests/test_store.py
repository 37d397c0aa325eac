"""The job store: SQLite in WAL mode, the state machine enforced in its transactions, metrics upserted."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from polyak.contract.spec import JobSpec
from polyak.contract.wire import EpochMetrics, JobState, StopReason
from polyak.service.server import store as store_module
from polyak.service.server.job import TRANSITIONS, InvalidTransition, JobRecord, check_transition, new_job_id, utcnow
from polyak.service.server.store import DB_NAME, Store

QUEUED, RUNNING = JobState.QUEUED, JobState.RUNNING
TERMINAL = [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]


def metrics(job_id: str, epoch: int, loss: float = 1.0) -> EpochMetrics:
    return EpochMetrics(
        job_id=job_id, epoch=epoch, step=10 * epoch, samples_seen=100 * epoch, batch_size=10, lr=0.1,
        train_loss=loss, weight_norm=1.0, weight_change=0.1, grad_avg_norm=0.5, grad_noise=0.1,
        samples_per_second=1000.0, elapsed_seconds=0.1 * epoch, criteria=[],
    )


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path)
    yield s
    s.close()


def add(store: Store, priority: int = 0, name: str | None = None) -> JobRecord:
    spec = JobSpec(name=name, priority=priority)
    return store.add(JobRecord(id=new_job_id(), spec=spec, state=QUEUED, created_at=utcnow()))


def test_database_is_in_wal_mode(store, tmp_path):
    # WAL is a property of the file: any other connection sees it too.
    with sqlite3.connect(tmp_path / DB_NAME) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_jobs_round_trip_and_keep_submission_order(store):
    a, b, c = add(store, 0, "a"), add(store, 5, "b"), add(store, 0, "c")
    assert a.seq < b.seq < c.seq
    got = store.get(b.id)
    assert (got.id, got.name, got.priority, got.state, got.spec) == (b.id, "b", 5, QUEUED, b.spec)
    assert got.created_at == b.created_at
    assert [j.id for j in store.jobs()] == [a.id, b.id, c.id]
    assert store.get("nope") is None


def test_lifecycle_records_times_and_history(store):
    job = add(store)
    running = store.transition(job.id, RUNNING)
    assert running.started_at is not None and running.finished_at is None
    why = "diverged at epoch 3"
    done = store.transition(job.id, JobState.FAILED, stop_reason=StopReason.DIVERGED, error=why)
    assert (done.state, done.stop_reason, done.error) == (JobState.FAILED, StopReason.DIVERGED, why)
    assert done.finished_at >= done.started_at
    assert [state for state, _, _ in store.history(job.id)] == [QUEUED, RUNNING, JobState.FAILED]
    assert store.jobs(JobState.FAILED) == [done]
    assert store.counts()["failed"] == 1


@pytest.mark.parametrize("final", TERMINAL)
def test_terminal_states_are_never_left(store, final):
    job = add(store)
    if final != JobState.CANCELLED:
        store.transition(job.id, RUNNING)
    store.transition(job.id, final)
    for target in JobState:
        with pytest.raises(InvalidTransition, match="final state"):
            store.transition(job.id, target, recovery=True)
    assert store.get(job.id).state == final
    assert len(store.history(job.id)) == (2 if final == JobState.CANCELLED else 3)


def test_running_goes_back_to_queued_only_through_recovery(store):
    job = add(store)
    store.transition(job.id, RUNNING)
    with pytest.raises(InvalidTransition):
        store.transition(job.id, QUEUED)
    requeued = store.transition(job.id, QUEUED, recovery=True, note="server restarted")
    assert requeued.state == QUEUED and requeued.resumed  # started before: it resumes
    assert store.history(job.id)[-1][2] == "server restarted"


def test_transition_table_is_the_documented_lifecycle():
    assert TRANSITIONS[QUEUED] == {RUNNING, JobState.CANCELLED, JobState.FAILED}
    assert TRANSITIONS[RUNNING] == set(TERMINAL)
    with pytest.raises(InvalidTransition):
        check_transition(QUEUED, JobState.SUCCEEDED)
    with pytest.raises(InvalidTransition):
        check_transition(QUEUED, QUEUED, recovery=True)


def test_epochs_are_upserted_exactly_once(store):
    job = add(store)
    for epoch in (1, 2, 3):
        store.record_epoch(metrics(job.id, epoch, loss=float(epoch)))
    # A job resumed from its epoch-2 checkpoint reports epoch 3 again, then goes on.
    store.record_epoch(metrics(job.id, 3, loss=30.0))
    store.record_epoch(metrics(job.id, 4, loss=40.0))
    history = store.metrics(job.id)
    assert [m.epoch for m in history] == [1, 2, 3, 4]
    assert [m.train_loss for m in history] == [1.0, 2.0, 30.0, 40.0]
    assert [m.epoch for m in store.metrics(job.id, after=2)] == [3, 4]
    assert store.latest_metrics(job.id).epoch == 4
    assert store.get(job.id).epoch == 4


def test_concurrent_writers_lose_nothing(store):
    jobs = [add(store) for _ in range(4)]

    def report(job_id: str) -> None:
        for epoch in range(1, 26):
            store.record_epoch(metrics(job_id, epoch))

    threads = [threading.Thread(target=report, args=(j.id,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j in jobs:
        assert [m.epoch for m in store.metrics(j.id)] == list(range(1, 26))


def test_everything_survives_reopening(tmp_path):
    store = Store(tmp_path)
    job = add(store, priority=3)
    store.transition(job.id, RUNNING)
    store.record_epoch(metrics(job.id, 1))
    store.close()
    again = Store(tmp_path)
    try:
        got = again.get(job.id)
        assert (got.state, got.priority, got.epoch) == (RUNNING, 3, 1)
        assert [s for s, _, _ in again.history(job.id)] == [QUEUED, RUNNING]
        assert again.job_dir(job.id) == tmp_path / "jobs" / job.id
    finally:
        again.close()


class ReadOnly(Store):
    """A store whose database SQLite opens read-only: no index can be made at open."""

    def _connect(self):
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)


def plans(store: Store, read) -> list[str]:
    """The query plan of every statement ``read(store)`` runs, as SQLite explains it."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    read(store)
    store._db.set_trace_callback(None)
    return [" ".join(row[3] for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}")) for sql in statements]


def test_an_older_database_gains_the_queue_and_group_indexes_and_reads_the_same_either_way(tmp_path):
    """The queue (resumed jobs first, then priority, then submission) and a group's jobs read the same from a database
    without the indexes (an older data dir, opened read-only: it cannot gain them) as with them; with them, the queue
    is scanned in order from its index (no sort) and a group found through its own (no scan of every spec)."""
    store = Store(tmp_path)
    jobs = []
    for i, priority in enumerate((0, 3, -1, 3, 0, 5)):
        spec = JobSpec(priority=priority, group="g" if i % 2 else None)
        job = store.add(JobRecord(id=new_job_id(), spec=spec, state=QUEUED, created_at=utcnow()))
        if i == 2:  # left running by a server that died, requeued by the next
            store.transition(job.id, RUNNING)
            job = store.transition(job.id, QUEUED, recovery=True)
        jobs.append(job)
    store.transition(jobs[1].id, RUNNING)  # not queued any more
    store._db.execute("DROP INDEX jobs_queue")
    store._db.execute("DROP INDEX jobs_by_group")
    store.close()
    queued = [j for j in jobs if j.id != jobs[1].id]
    expected = [j.id for j in sorted(queued, key=lambda j: (j.started_at is None, -j.priority, j.seq))]
    assert expected[:2] == [jobs[2].id, jobs[5].id]  # not submission order: the resumed one, then priority 5
    group = [j.id for j in jobs if j.spec.group == "g"]

    def read(store: Store) -> tuple:
        return [j.id for j in store.queue()], list(store.queue_positions()), [j.id for j in store.jobs(group="g")]

    for kind, indexed in ((ReadOnly, False), (Store, True)):
        opened = kind(tmp_path)
        try:
            assert read(opened) == (expected, expected, group)
            queue, positions, by_group = plans(opened, read)
        finally:
            opened.close()
        assert ("USING INDEX jobs_queue" in queue and "TEMP B-TREE" not in queue) is indexed, queue
        assert ("USING INDEX jobs_queue" in positions and "TEMP B-TREE" not in positions) is indexed, positions
        assert ("USING INDEX jobs_by_group" in by_group) is indexed, by_group


def test_ray_queued_says_whether_a_queued_job_has_workers(store):
    def queue(workers: int) -> JobRecord:
        spec = JobSpec(cluster={"num_workers": workers})
        return store.add(JobRecord(id=new_job_id(), spec=spec, state=QUEUED, created_at=utcnow()))

    queue(0)  # in-process
    assert store.ray_queued() is False
    job = queue(2)
    assert store.ray_queued() is True
    store.transition(job.id, RUNNING)
    assert store.ray_queued() is False


def test_specs_read_back_equal_and_only_short_ones_are_kept_parsed(store):
    """Parsed specs are cached by their text, but not a long one (a 1 MiB body could hold a spec of a hundred
    thousand layers): the cache's memory stays bounded whatever is submitted."""
    short = add(store, name="short")
    long = store.add(JobRecord(id=new_job_id(), spec=JobSpec(model={"layers": [64] + [3] * 3000 + [10]}),
                               state=QUEUED, created_at=utcnow()))
    assert len(long.spec.model_dump_json()) > store_module._CACHED_SPEC_CHARS
    store_module._cached_spec.cache_clear()
    assert store.get(long.id).spec == long.spec
    assert store_module._cached_spec.cache_info().currsize == 0
    assert store.get(short.id).spec == short.spec
    assert [j.spec for j in store.jobs()] == [short.spec, long.spec]
    assert store_module._cached_spec.cache_info().currsize == 1
