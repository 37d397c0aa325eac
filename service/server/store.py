"""The durable side of the service: SQLite (WAL) at <data-dir>/polyak.db, files under <data-dir>/jobs/<id>/.

Three tables: ``jobs`` (one row per job, its current state), ``state_changes`` (every transition,
never rewritten) and ``metrics`` (one row per (job, epoch): a resumed job that reports an epoch again
overwrites it, so the history holds every epoch exactly once). One connection behind a lock, and
every write is one short ``BEGIN IMMEDIATE`` transaction: a process killed at any moment leaves the
database as it was after the last committed write.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from polyak.contract.spec import JobSpec
from polyak.contract.wire import EpochMetrics, JobState, StopReason
from polyak.service.server.job import JobRecord, check_transition, utcnow

DB_NAME = "polyak.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    spec           TEXT NOT NULL,  -- name and priority are in here: json_extract(spec, '$.priority')
    state          TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    started_at     TEXT,
    finished_at    TEXT,
    epoch          INTEGER,
    stop_reason    TEXT,
    error          TEXT,
    waiting_reason TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    placement      TEXT,  -- where the engine put the job's actors and how its steps travel
    resumed_from   TEXT   -- the job whose checkpoint this one started from (POST /jobs/{id}/resubmit)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS state_changes (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    state  TEXT NOT NULL,
    at     TEXT NOT NULL,
    note   TEXT
);
CREATE INDEX IF NOT EXISTS state_changes_by_job ON state_changes (job_id);
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    epoch  INTEGER NOT NULL,
    data   TEXT NOT NULL,
    PRIMARY KEY (job_id, epoch)
) WITHOUT ROWID;
"""
_COLUMNS = (
    "seq, id, spec, state, created_at, started_at, finished_at, epoch, stop_reason, error, waiting_reason, "
    "cancel_requested, placement, resumed_from"
)
# Columns added after the first release: a data dir written by an older server gains them at open.
_ADDED_COLUMNS = {"placement": "TEXT", "resumed_from": "TEXT"}
# The order queued jobs start in, defined here once (the scheduler takes its queue from the store): jobs that were
# running when the server died first (they resume; no other queued job has a start time), then priority (higher
# first), then submission (FIFO).
_QUEUE_ORDER = "started_at IS NULL, json_extract(spec, '$.priority') DESC, seq"
# Indexes added after the first release, made at every open (a read-only database goes without: the queries are
# the same, only slower). The queue's is partial and on _QUEUE_ORDER's very expressions, so that a scheduling pass
# or a queue position reads the queue in order from it instead of parsing every queued spec's JSON to sort it; a
# group's listing reads its jobs from the other instead of every spec in the store.
_INDEXES = f"""
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs ({_QUEUE_ORDER}) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_by_group ON jobs (json_extract(spec, '$.group'));
"""


class StoreUnavailable(RuntimeError):
    """The job database cannot be written (read-only, disk full, an I/O error): the API answers 503, reads go on,
    and the next write tries again."""


class Store:
    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / DB_NAME
        self.write_error: str | None = None  # why the last write failed; None once one succeeds
        self._lock = threading.Lock()
        self._reconnect = False
        with self._lock:
            self._db = self._connect()
            if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone():
                self._db.executescript(_SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            with suppress(sqlite3.OperationalError):
                self._db.executescript(_INDEXES)
            # Named, or the planner (no statistics) takes jobs_by_state's equality and sorts the queue after all.
            ordered = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs_queue'").fetchone()
            self._queued = (f"FROM jobs {'INDEXED BY jobs_queue ' if ordered else ''}WHERE state = 'queued' "
                            f"ORDER BY {_QUEUE_ORDER}")
        self.check_writable()

    def _connect(self) -> sqlite3.Connection:
        # Autocommit mode: transactions are opened explicitly in _write, never implicitly by sqlite3.
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL survives a killed process; only a power cut can lose the last commits.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        return db

    def check_writable(self) -> str | None:
        """Try a write that changes nothing: None when the database takes writes, else why not (also kept in
        ``write_error``, for /health)."""
        try:
            with self._write() as db:
                db.execute("UPDATE jobs SET seq = seq WHERE 0")
        except StoreUnavailable:
            pass
        return self.write_error

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def job_dir(self, job_id: str) -> Path:
        """Checkpoint, best and last weights of one job (written by the trainer)."""
        return self.data_dir / "jobs" / job_id

    # -- jobs ----------------------------------------------------------------------------------------
    def add(self, job: JobRecord) -> JobRecord:
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO jobs (id, spec, state, created_at, resumed_from) VALUES (?, ?, ?, ?, ?)",
                (job.id, job.spec.model_dump_json(), job.state.value, _iso(job.created_at), job.resumed_from),
            )
            db.execute(
                "INSERT INTO state_changes (job_id, state, at) VALUES (?, ?, ?)",
                (job.id, job.state.value, _iso(job.created_at)),
            )
            seq = cursor.lastrowid
        return replace(job, seq=seq)

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(
        self,
        state: JobState | None = None,
        group: str | None = None,
        *,
        newest_first: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[JobRecord]:
        """Jobs in submission order (or newest first), all or those in ``state`` / ``group``, a page of them."""
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state.value)
        if group is not None:
            where.append("json_extract(spec, '$.group') = ?")
            params.append(group)
        sql = f"SELECT {_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ? OFFSET ?"
        params += [-1 if limit is None else limit, offset]
        return [_job(r) for r in self._read(sql, tuple(params))]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in JobState), 0)
        counts.update(self._read("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        return counts

    def transition(
        self,
        job_id: str,
        new: JobState,
        *,
        recovery: bool = False,
        note: str | None = None,
        stop_reason: StopReason | None = None,
        error: str | None = None,
    ) -> JobRecord:
        """Move a job to ``new`` if the lifecycle allows it (InvalidTransition if not); records the change."""
        now = _iso(utcnow())
        with self._write() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            check_transition(JobState(row[0]), new, recovery)
            db.execute(
                """UPDATE jobs SET state = ?, waiting_reason = NULL,
                       started_at = CASE WHEN ? THEN COALESCE(started_at, ?) ELSE started_at END,
                       finished_at = CASE WHEN ? THEN ? ELSE finished_at END,
                       stop_reason = COALESCE(?, stop_reason), error = COALESCE(?, error)
                   WHERE id = ?""",
                (
                    new.value,
                    new == JobState.RUNNING,
                    now,
                    new.is_terminal(),
                    now,
                    stop_reason.value if stop_reason else None,
                    error,
                    job_id,
                ),
            )
            db.execute(
                "INSERT INTO state_changes (job_id, state, at, note) VALUES (?, ?, ?, ?)",
                (job_id, new.value, now, note),
            )
        return self.get(job_id)

    def set_waiting_reason(self, job_id: str, reason: str | None) -> None:
        with self._write() as db:
            sql = "UPDATE jobs SET waiting_reason = ? WHERE id = ? AND state = 'queued'"
            db.execute(sql, (reason, job_id))

    def set_placement(self, job_id: str, placement: str) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET placement = ? WHERE id = ?", (placement, job_id))

    def request_cancel(self, job_id: str) -> None:
        """Remembered, so that a running job cancelled just before the server dies is not resumed."""
        with self._write() as db:
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))

    def history(self, job_id: str) -> list[tuple[JobState, datetime, str | None]]:
        """Every state the job entered, oldest first, with when and why."""
        rows = self._read(
            "SELECT state, at, note FROM state_changes WHERE job_id = ? ORDER BY rowid", (job_id,)
        )
        return [(JobState(s), datetime.fromisoformat(at), note) for s, at, note in rows]

    # -- metrics -------------------------------------------------------------------------------------
    def record_epoch(self, m: EpochMetrics) -> None:
        """Upsert on (job, epoch): an epoch redone after a resume replaces the first report of it."""
        with self._write() as db:
            db.execute(
                """INSERT INTO metrics (job_id, epoch, data) VALUES (?, ?, ?)
                   ON CONFLICT (job_id, epoch) DO UPDATE SET data = excluded.data""",
                (m.job_id, m.epoch, m.model_dump_json()),
            )
            db.execute("UPDATE jobs SET epoch = ? WHERE id = ?", (m.epoch, m.job_id))

    def copy_metrics(self, source: str, target: str, through_epoch: int) -> None:
        """A resubmitted job's history starts with its source's epochs up to the checkpoint it resumes."""
        for m in self.metrics(source):
            if m.epoch <= through_epoch:
                self.record_epoch(m.model_copy(update={"job_id": target}))

    def metrics(self, job_id: str, after: int = 0) -> list[EpochMetrics]:
        rows = self._read(
            "SELECT data FROM metrics WHERE job_id = ? AND epoch > ? ORDER BY epoch", (job_id, after)
        )
        return [EpochMetrics.model_validate_json(r[0]) for r in rows]

    def queue(self) -> list[JobRecord]:
        """Queued jobs in the order they start."""
        rows = self._read(f"SELECT {_COLUMNS} {self._queued}")
        return [_job(r) for r in rows]

    def ray_queued(self) -> bool:
        """Whether a queued job needs Ray (has workers), read without parsing the queue's specs."""
        sql = "SELECT 1 FROM jobs WHERE state = 'queued' AND json_extract(spec, '$.cluster.num_workers') > 0 LIMIT 1"
        return bool(self._read(sql))

    def queue_positions(self) -> dict[str, int]:
        """Each queued job's place in the queue (1 = next), in ``queue``'s order, read from three columns: no spec
        is parsed, so a long queue costs a listing next to nothing."""
        rows = self._read(f"SELECT id {self._queued}")
        return {job_id: i for i, (job_id,) in enumerate(rows, start=1)}

    def latest_metrics_of(self, job_ids: list[str]) -> dict[str, EpochMetrics]:
        """The last epoch's metrics of each of these jobs, in one query."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        rows = self._read(
            f"SELECT m.job_id, m.data FROM metrics m JOIN jobs j ON j.id = m.job_id AND j.epoch = m.epoch "
            f"WHERE j.id IN ({marks})",
            tuple(job_ids),
        )
        return {job_id: EpochMetrics.model_validate_json(data) for job_id, data in rows}

    def latest_metrics(self, job_id: str) -> EpochMetrics | None:
        rows = self._read("SELECT data FROM metrics WHERE job_id = ? ORDER BY epoch DESC LIMIT 1", (job_id,))
        return EpochMetrics.model_validate_json(rows[0][0]) if rows else None

    # -- plumbing ------------------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; StoreUnavailable naming the database when SQLite or the disk refuses it. After such a
        failure the next write opens the database again: SQLite keeps a file it could only open read-only so for
        the connection's life, and a permission given back would never be seen."""
        with self._lock:
            try:
                if self._reconnect:
                    fresh = self._connect()
                    self._db.close()
                    self._db, self._reconnect = fresh, False
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # a failed COMMIT (disk full) must not leave it open
                        self._db.execute("ROLLBACK")
                    raise
            except (sqlite3.OperationalError, OSError) as e:
                self._reconnect = True
                self.write_error = f"the job database {self.path} cannot be written: {e}"
                raise StoreUnavailable(self.write_error) from None
            self.write_error = None

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()


def _iso(t: datetime) -> str:
    return t.isoformat()


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


# A spec never changes once stored, and parsing one is most of what reading a job costs (~50 us): a scheduling pass
# reads every queued job, a listing a hundred. The parsed specs of the last 2,048 texts are kept, ~9 KB each with
# their text; a spec over 4 KB (a long layers list: the body may be 1 MiB) is parsed every time, so that the cache
# holds at most ~80 MB (2,048 specs just under 4 KB, ~37 KB each) whatever is submitted. The code treats a spec as
# immutable (model_copy, never assignment), so one object can serve every reader.
_CACHED_SPEC_CHARS = 4096
_cached_spec = lru_cache(maxsize=2048)(JobSpec.model_validate_json)


def _spec(text: str) -> JobSpec:
    return _cached_spec(text) if len(text) <= _CACHED_SPEC_CHARS else JobSpec.model_validate_json(text)


def _job(row: tuple) -> JobRecord:
    (seq, job_id, spec, state, created, started, finished, epoch, stop_reason, error, waiting, cancel, placement,
     resumed_from) = row
    return JobRecord(
        id=job_id,
        spec=_spec(spec),
        state=JobState(state),
        created_at=datetime.fromisoformat(created),
        seq=seq,
        started_at=_time(started),
        finished_at=_time(finished),
        epoch=epoch,
        stop_reason=StopReason(stop_reason) if stop_reason else None,
        error=error,
        waiting_reason=waiting,
        cancel_requested=bool(cancel),
        placement=placement,
        resumed_from=resumed_from,
    )
