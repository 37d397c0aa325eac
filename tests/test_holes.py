"""The last known holes (issue 22), each closed with a test: requests that never wait for Ray's start, store writes
that fail, a read-only database, unreadable checkpoints, best.npz and the checkpoint committed together, data paths
checked where workers open them, data errors that quote no file contents, idle connections dropped, and remote
sources that time out."""

from __future__ import annotations

import errno
import io
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from test_api import make_client  # noqa: F401 (a fixture)
from test_scheduler import FakeCluster, FakeTrainer, wait_until
from test_service import Server, wait_for

from polyak.contract.errors import DataError
from polyak.contract.network import from_dict
from polyak.contract.spec import DataSpec, JobSpec, ModelSpec
from polyak.contract.wire import JobState, StopReason
from polyak.service.engine.checkpoint import load_checkpoint, load_npz, save_checkpoint
from polyak.service.engine.trainer import BEST_WEIGHTS, CHECKPOINT, Hooks, settle_best, train_job
from polyak.service.server import datasets
from polyak.service.server.job import JobRecord, utcnow
from polyak.service.server.scheduler import Scheduler
from polyak.service.server.store import Store
from polyak.workers.data import load_dataset
from polyak.workers.readers import DATA_ROOTS, confine_data, open_source, remote

REPO = Path(__file__).resolve().parents[1]


def test_posts_while_ray_starts_in_the_background_never_wait_for_it(tmp_path):
    """Ten two-worker jobs posted one after another to a fresh server: the first starts Ray in the background, and
    each answer comes while it is still starting (one used to wait on the lock the starting thread held)."""
    spec = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    server = Server(tmp_path / "data").start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            seconds, connected = [], []
            for _ in range(10):
                started = time.monotonic()
                assert http.post("/jobs", json=spec).status_code == 201
                seconds.append(time.monotonic() - started)
                connected.append(http.get("/health").json()["ray"]["connected"])
            assert max(seconds) < 2.0, seconds
            assert not connected[0], "Ray was up before the second POST: the test saw no start"
            for job in http.get("/jobs").json():  # queued still (or just started): nothing is left to train
                http.post(f"/jobs/{job['id']}/cancel")
            wait_for(lambda: all(j["state"] == "cancelled" for j in http.get("/jobs").json()), timeout=120)
    finally:
        server.stop()


# -- store writes that fail --------------------------------------------------------------------------------------
class FaultyConnection:
    """A SQLite connection whose statements fail (as SQLite fails them) while a fault is armed for them: a fault
    names fragments that must all be in the statement or its parameters."""

    def __init__(self, db: sqlite3.Connection, faults: dict[tuple[str, ...], int], error: str):
        self._db, self._faults, self._error = db, faults, error

    def execute(self, sql: str, params=()):
        text = f"{sql} {params!r}"
        for fragments, left in self._faults.items():
            if left > 0 and all(f in text for f in fragments):
                self._faults[fragments] = left - 1
                raise sqlite3.OperationalError(self._error)
        return self._db.execute(sql, params)

    def __getattr__(self, name: str):
        return getattr(self._db, name)


class FaultyStore(Store):
    """A real store whose writes fail where ``faults`` says (fragment of SQL -> how many times), with ``error``."""

    def __init__(self, data_dir: Path, error: str = "disk I/O error"):
        self.faults: dict[tuple[str, ...], int] = {}
        self.error = error
        super().__init__(data_dir)

    def _connect(self):
        return FaultyConnection(super()._connect(), self.faults, self.error)


class ReadOnlyStore(Store):
    """A real store on a database SQLite opens read-only (as it does a file it may not write) while
    ``read_only``: every write is refused by SQLite itself (even for root, who may write any file)."""

    read_only = True

    def _connect(self):
        if not self.read_only:
            return super()._connect()
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)


def one_job_spec() -> JobSpec:
    return JobSpec(cluster={"num_workers": 0, "device": "cpu"})


def test_a_job_whose_epoch_and_end_cannot_be_stored_ends_failed_in_one_line_and_cancel_moves_it(tmp_path):
    store = FaultyStore(tmp_path)
    trainer = FakeTrainer()
    scheduler = Scheduler(store, FakeCluster(2), 1, train=trainer)
    scheduler.start()
    try:
        # The epoch's write fails, then every write of the end until the store takes writes again: the job's thread
        # and the scheduling passes after it (however many the wake-ups make) are all refused.
        end = ("UPDATE jobs SET state", "'failed'")
        store.faults.update({("INSERT INTO metrics",): 1, end: 10**6})
        job = scheduler.submit(one_job_spec())
        wait_until(lambda: store.faults[end] <= 10**6 - 2, timeout=30)  # the job's thread and a pass were refused
        assert store.get(job.id).state == JobState.RUNNING  # the store holds no end: it takes writes again, and the
        store.faults[end] = 0  # cancel writes it at once (a pass, seconds later, would write the same end)
        scheduler.cancel(job.id)
        ended = store.get(job.id)
        assert store.metrics(job.id) == []  # the epoch that was not stored is not history
    finally:
        scheduler.stop()
        store.close()
    assert (ended.state, ended.stop_reason) == (JobState.FAILED, StopReason.ERROR)
    assert ended.error == f"the job database {store.path} cannot be written: disk I/O error"


def test_an_end_the_store_refused_is_written_by_the_next_pass_once_it_takes_writes(tmp_path):
    store = FaultyStore(tmp_path)
    scheduler = Scheduler(store, FakeCluster(2), 1, train=FakeTrainer())
    scheduler.start()
    try:
        store.faults.update({("INSERT INTO metrics",): 1, ("UPDATE jobs SET state", "'failed'"): 1})
        job = scheduler.submit(one_job_spec())
        ended = wait_until(lambda: (j := store.get(job.id)).state.is_terminal() and j)
    finally:
        scheduler.stop()
        store.close()
    assert ended.state == JobState.FAILED and "cannot be written: disk I/O error" in ended.error


SPEC = {"data": {"source": "sklearn", "name": "iris"}, "model": {"layers": [4, 8, 3]}, "cluster": {"num_workers": 0}}


def test_a_read_only_database_is_reported_by_health_and_every_write_is_a_503_until_it_is_writable(
        tmp_path, make_client):  # noqa: F811 (the fixture)
    first = Store(tmp_path / "data")
    job = first.add(JobRecord(id="a" * 12, spec=one_job_spec(), state=JobState.QUEUED, created_at=utcnow()))
    first.close()
    store = ReadOnlyStore(tmp_path / "data")
    api = make_client(store=store)
    health = api.get("/health").json()
    assert health["status"] == "degraded" and health["database"]["writable"] is False
    assert str(store.path) in health["database"]["error"] and "readonly" in health["database"]["error"]
    for r in (api.post("/jobs", json=SPEC), api.post(f"/jobs/{job.id}/cancel")):
        assert r.status_code == 503
        assert r.json()["detail"] == f"the job database {store.path} cannot be written: attempt to write a " \
                                     "readonly database"
    assert [j["id"] for j in api.get("/jobs").json()] == [job.id]  # reads go on
    store.read_only = False  # the permission comes back
    assert api.get("/health").json()["status"] == "ok"
    assert api.post("/jobs", json=SPEC).status_code == 201
    assert api.post(f"/jobs/{job.id}/cancel").json()["state"] == "cancelled"


def test_a_full_disk_is_a_503_that_leaves_nothing_half_written_and_the_service_recovers(
        tmp_path, make_client, monkeypatch):  # noqa: F811 (the fixture)
    store = FaultyStore(tmp_path / "data", error="database or disk is full")
    api = make_client(store=store)
    # The job's row went in; the transaction's second write fails, and so does /health's probe: then space returns.
    store.faults.update({("INSERT INTO state_changes",): 1, ("UPDATE jobs SET seq = seq",): 1})
    r = api.post("/jobs", json=SPEC)
    assert (r.status_code, r.json()["detail"]) == (503, f"the job database {store.path} cannot be written: "
                                                        "database or disk is full")
    assert api.get("/jobs").json() == [] and api.get("/health").json()["status"] == "degraded"
    assert api.post("/jobs", json=SPEC).status_code == 201
    assert api.get("/health").json()["status"] == "ok"
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT COUNT(*) FROM state_changes").fetchall() == [(1,)]

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    table = io.BytesIO()
    np.save(table, np.arange(12.0).reshape(4, 3))
    monkeypatch.setattr(datasets.os, "fsync", no_space)
    r = api.post("/datasets", content=table.getvalue(), headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 503
    assert r.json()["detail"] == f"cannot store the upload in {store.data_dir / 'datasets'}: No space left on device"
    assert list((store.data_dir / "datasets").iterdir()) == []  # no temporary file, no dataset
    monkeypatch.undo()
    assert api.post("/datasets", content=table.getvalue(), headers={"Content-Type": "application/x-npy"}
                    ).status_code == 201


# -- unreadable checkpoints -------------------------------------------------------------------------------------
def corruptions(good: bytes) -> dict[str, bytes]:
    objects = io.BytesIO()
    np.savez(objects, W=np.array([{"a": 1}], dtype=object))
    return {"garbage": b"not a checkpoint at all\n" * 10, "truncated": good[: len(good) // 2],
            "object arrays": objects.getvalue()}


def test_resubmitting_a_job_whose_checkpoint_is_unreadable_is_a_409_naming_the_file(tmp_path, make_client):  # noqa: F811
    store = Store(tmp_path / "data")
    api = make_client(store=store)
    job = store.add(JobRecord(id="b" * 12, spec=one_job_spec(), state=JobState.QUEUED, created_at=utcnow()))
    store.transition(job.id, JobState.CANCELLED)
    checkpoint = store.job_dir(job.id) / "checkpoint.npz"
    checkpoint.parent.mkdir(parents=True)
    save_checkpoint(checkpoint, {"W": np.ones(3)}, {"epoch": 1})
    for kind, data in corruptions(checkpoint.read_bytes()).items():
        checkpoint.write_bytes(data)
        r = api.post(f"/jobs/{job.id}/resubmit")
        assert r.status_code == 409, kind
        assert str(checkpoint) in r.json()["detail"] and "pickle" not in r.json()["detail"], (kind, r.json())
    assert len(api.get("/jobs").json()) == 1  # no job was made


def test_a_corrupt_checkpoint_at_resume_fails_the_job_naming_the_file_never_suggesting_pickle(tmp_path, make_spec,
                                                                                               train_local):
    spec = make_spec({"stopping": {"max_epochs": 2}})
    train_local(spec, Hooks(job_dir=tmp_path))
    checkpoint = tmp_path / CHECKPOINT
    for kind, data in corruptions(checkpoint.read_bytes()).items():
        checkpoint.write_bytes(data)
        with pytest.raises(ValueError) as failed:
            train_job(spec, "t", Hooks(job_dir=tmp_path))
        assert str(checkpoint) in str(failed.value) and "pickle" not in str(failed.value), kind


# -- best.npz and the checkpoint, committed together -------------------------------------------------------------
# A subprocess trains in-process and dies (os._exit) at the named point of epoch 3's commit.
CRASH = """
import json, os, sys
from polyak.contract.spec import parse_spec
from polyak.service.engine import trainer
from polyak.service.engine.local_engine import LocalEngine
point, job_dir, spec = sys.argv[1], sys.argv[2], parse_spec(json.loads(sys.argv[3]))
checkpoint, commit = LocalEngine.checkpoint, trainer.commit_best
def checkpoint_then_maybe_die(self, path, meta):
    if point == "before the checkpoint" and meta["epoch"] == 3:
        os._exit(17)
    checkpoint(self, path, meta)
def commit_or_die(pending):
    if point == "after the checkpoint" and pending.name == "best.epoch3.npz":
        os._exit(17)
    commit(pending)
LocalEngine.checkpoint, trainer.commit_best = checkpoint_then_maybe_die, commit_or_die
trainer.train_job(spec, "t", trainer.Hooks(job_dir=job_dir))
"""


@pytest.mark.parametrize("point", ["before the checkpoint", "after the checkpoint"])
def test_a_crash_between_best_weights_and_checkpoint_leaves_them_consistent(tmp_path, point, make_spec, torch_ref):
    overrides = {"data": {"validation_fraction": 0.3}, "stopping": {"max_epochs": 5}, "batch": {"size": 16}}
    spec = make_spec(overrides)
    crashed = subprocess.run([sys.executable, "-c", CRASH, point, str(tmp_path), spec.model_dump_json()], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert crashed.returncode == 17, crashed.stderr
    assert len(list(tmp_path.glob("best.epoch*.npz"))) == 1  # the crash left epoch 3's commit half done

    _, meta = load_checkpoint(tmp_path / CHECKPOINT)
    settle_best(tmp_path, meta["epoch"])  # what a resume does first
    assert meta["epoch"] == (2 if point == "before the checkpoint" else 3)
    assert not list(tmp_path.glob("best.epoch*.npz"))
    best = load_npz(tmp_path / BEST_WEIGHTS)
    data = load_dataset(spec.data, spec.model)
    W = from_dict(best, spec.model.layers, np.float64)
    val_loss = torch_ref.mean_loss(spec.model.layers, spec.model.activation, spec.model.loss, W, data.X_val,
                                   data.y_val)
    # best.npz holds the weights whose validation loss the checkpoint's stopper calls the best so far.
    assert val_loss == pytest.approx(meta["stopper"]["best_val_loss"], rel=1e-9, abs=1e-12)

    resumed = train_job(spec, "t", Hooks(job_dir=tmp_path))
    reference = train_job(spec, "t", Hooks(job_dir=tmp_path / "reference"))
    np.testing.assert_array_equal(resumed.best_weights, reference.best_weights)
    np.testing.assert_array_equal(from_dict(load_npz(tmp_path / BEST_WEIGHTS), spec.model.layers, np.float64),
                                  reference.best_weights)


# -- data paths checked where they are opened ------------------------------------------------------------------
def test_a_data_file_swapped_for_a_symlink_out_of_the_root_is_refused_where_it_is_opened(tmp_path, monkeypatch):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    table = np.column_stack([np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2])
    np.save(root / "t.npy", table)
    np.save(outside / "secret.npy", table)
    data = DataSpec(source="file", path=str(root / "t.npy"))
    model = ModelSpec(layers=[3, 2])
    monkeypatch.setenv(DATA_ROOTS, "")  # restored after the test: confine_data sets the process's environment
    confine_data([root])  # as polyak serve --data-root does, for itself and the Ray it starts
    assert open_source(data, model).n == 20
    (root / "t.npy").unlink()
    (root / "t.npy").symlink_to(outside / "secret.npy")  # swapped after the server's checks
    with pytest.raises(DataError) as refused:
        open_source(data, model)
    assert refused.value.message == (f"data.path: {root / 't.npy'} leads to {outside / 'secret.npy'}, outside the "
                                     f"server's data root {root}: refused where it was opened")
    (root / "parts").mkdir()
    (root / "parts" / "part-0.parquet").symlink_to(outside / "secret.npy")  # a folder's member leading out
    with pytest.raises(DataError, match="outside the server's data root"):
        open_source(DataSpec(source="file", path=str(root / "parts")), model)
    monkeypatch.setenv(DATA_ROOTS, "")  # unconfined (polyak train, a server without --data-root): followed
    assert open_source(data, model).n == 20


# -- data errors name file, column, row and kind, never a value --------------------------------------------------
SECRET = "hunter2-SECRET"


def test_data_errors_name_the_place_and_the_kind_but_never_quote_the_files_contents(tmp_path):
    model = ModelSpec(layers=[2, 3])
    rows = "\n".join(f"{i},{i % 3},{i % 3}" for i in range(5000))
    (tmp_path / "late_text.csv").write_text(f"a,b,y\n{rows}\n1,{SECRET},0\n")
    header = f"{{'descr': '{SECRET}', 'fortran_order': False, 'shape': (4, 3), }}".encode().ljust(117) + b"\n"
    (tmp_path / "bad_header.npy").write_bytes(np.lib.format.magic(1, 0) + len(header).to_bytes(2, "little")
                                               + header + bytes(96))
    negative = np.column_stack([np.ones((6, 2)), [0, 1, 2, -31337, 1, 0]])
    np.save(tmp_path / "negative.npy", negative)
    expected = {
        "late_text.csv": "column 'b' holds text, not numbers",
        "bad_header.npy": "not a readable .npy file (ValueError)",
        "negative.npy": "labels must be in 0..k-1, found a negative one (first in row 3)",
    }
    for name, words in expected.items():
        path = str(tmp_path / name)
        with pytest.raises(DataError) as refused:
            open_source(DataSpec(source="file", path=path), model).read(np.arange(6))
        message = refused.value.message
        assert path in message and words in message, message
        assert SECRET not in message and "31337" not in message, message


# -- connections that send nothing, half a request, or stop mid-body are dropped --------------------------------
def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes the connection (EOF or reset) before ``within`` seconds pass."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_idle_half_open_and_stalled_connections_are_dropped_and_the_server_answers_on(tmp_path):
    server = Server(tmp_path / "data", "--request-timeout", "1").start()
    try:
        host = ("127.0.0.1", server.port)
        stalls = {
            "nothing": b"",
            "half a header": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1",
            "part of a body": b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{\"model\":",
            "idle after an answer": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        }
        sockets = {}
        for name, sent in stalls.items():
            for i in range(25):  # a hundred connections held open for nothing
                sockets[name, i] = socket.create_connection(host)
                sockets[name, i].sendall(sent)
        assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
        for (name, _), sock in sockets.items():
            with sock:  # each within a generous bound (1 s deadline; 5 s keep-alive)
                assert closed_by_server(sock, within=30), name
        assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
    finally:
        server.stop()


# -- remote sources that never answer ---------------------------------------------------------------------------
@pytest.fixture
def stalled_gs():
    """A gs:// URI whose endpoint (a local socket) accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"gs://bucket/table.parquet?endpoint_override=127.0.0.1:{listener.getsockname()[1]}&scheme=http"
    stop.set()
    thread.join(5)
    for sock in [*held, listener]:
        sock.close()


def test_opening_a_remote_source_that_never_answers_fails_within_the_bound(stalled_gs, monkeypatch):
    monkeypatch.setattr(remote, "OPEN_SECONDS", 1.0)
    started = time.monotonic()
    with pytest.raises(DataError) as refused:
        open_source(DataSpec(source="file", path=stalled_gs), ModelSpec(layers=[4, 3]))
    assert refused.value.message == f"data.path: {stalled_gs} did not answer within 1 s (the storage endpoint, or " \
                                    "its credentials' lookup, does not respond); check the URI and the network"
    assert time.monotonic() - started < 30  # generous: the bound is 1 s; without it the open never returns


def test_a_job_opening_a_silent_remote_source_is_cancelled_and_the_queue_goes_on(stalled_gs, tmp_path, make_spec):
    store = Store(tmp_path)
    scheduler = Scheduler(store, FakeCluster(2), 1)  # the real train_job, one job at a time
    scheduler.start()
    try:
        stuck = scheduler.submit(make_spec({"data": {"source": "file", "path": stalled_gs}}))
        behind = scheduler.submit(make_spec({"stopping": {"max_epochs": 2}}))
        wait_until(lambda: store.get(stuck.id).state == JobState.RUNNING)
        time.sleep(0.5)  # inside the open, which would wait OPEN_SECONDS (60)
        scheduler.cancel(stuck.id)
        ended = [wait_until(lambda j=j: (r := store.get(j.id)).state.is_terminal() and r, timeout=30)
                 for j in (stuck, behind)]
    finally:
        scheduler.stop()
        store.close()
    assert [(j.state, j.stop_reason) for j in ended] == [(JobState.CANCELLED, StopReason.CANCELLED),
                                                          (JobState.SUCCEEDED, StopReason.MAX_EPOCHS)]
