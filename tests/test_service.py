"""End to end: ``python -m polyak serve`` as a user starts it, real SQLite and Ray, driven by client.Client.

One server (``--max-concurrent-jobs 2 --data-root``) is shared by most tests; each test leaves it
idle (see ``client``). The token, SIGKILL and refusal tests start servers of their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from polyak import Client, JobConflict, JobInfo, JobNotFound, JobState, SpecError, StopReason, Unauthorized
from polyak.contract.network import from_dict

REPO = Path(__file__).resolve().parents[1]

# Specs are conftest's LOCAL_IRIS (iris, 150 samples, in the server's own process) with these changes.
QUICK = {"stopping": {"max_epochs": 3}}
# About 0.1 s an epoch (digits, one sample per step): a job that runs until a test stops it.
SLOW = {
    "model": {"layers": [64, 32, 10], "activation": "relu"},
    "data": {"name": "digits"},
    "optimizer": {"lr": 0.01},
    "batch": {"size": 1},
    "stopping": {"max_epochs": 100_000},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 60.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"not reached within {timeout} s")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Server:
    """A ``polyak serve`` process on a free port; its stderr goes to a log file kept for failures."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "polyak", "serve", "--port", str(self.port),
                        "--data-dir", str(data_dir), *args]
        inherited = {k: v for k, v in os.environ.items() if k != "POLYAK_TOKEN"}
        self.env = {**inherited, **(env or {})}
        self.log_file = data_dir.parent / f"server-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Server:
        with self.log_file.open("a") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=log, stderr=log)

        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout, every=0.1)
        return self

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token=token, retries=2)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop_or_kill(self) -> None:
        try:
            self.stop()
        except AssertionError:  # processes it left behind were killed; the next server starts clean
            pass

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it; every process it started (its Ray) must go too."""
        if self.process is None or self.process.poll() is not None:
            return
        started = descendants(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
        try:
            wait_for(lambda: not any(map(alive, started)), timeout=60, every=0.2)
        except AssertionError:
            left = [pid for pid in started if alive(pid)]
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"processes {left} outlived the server after SIGTERM\n{self.log()}") from None

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    from sklearn.datasets import load_iris

    root = tmp_path_factory.mktemp("data-root")
    X, y = load_iris(return_X_y=True)
    np.savez(root / "iris.npz", X=X, y=y)
    np.savez(root / "three_features.npz", X=X[:, :3], y=y)
    np.savetxt(root / "three_features.csv", np.column_stack([X[:, :3], y]), delimiter=",")
    (root / "escape.npz").symlink_to("/etc/hosts")
    (root / "parquet_escape").mkdir()
    (root / "parquet_escape" / "part-0.parquet").symlink_to("/etc/hosts")  # a data directory's file leading out
    return root


class SharedServer:
    """The server most tests share, replaced by a fresh one (new data dir) when it or the Ray it started has
    died: one broken server must not fail every test after it."""

    def __init__(self, factory):
        self.factory = factory
        self.current: Server | None = None

    def get(self) -> Server:
        if self.current is not None and not self.healthy(self.current):
            self.current.stop_or_kill()
            self.current = None
        if self.current is None:
            self.current = self.factory().start()
        return self.current

    @staticmethod
    def healthy(s: Server) -> bool:
        if s.process.poll() is not None:
            return False
        try:
            health = httpx.get(f"{s.url}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        if health["ray"].get("connected"):  # its local Ray: a raylet must still run below the server
            names = {_process_name(pid) for pid in descendants(s.process.pid)}
            return "raylet" in names
        return True


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory, data_root):
    shared = SharedServer(lambda: Server(tmp_path_factory.mktemp("shared") / "data", "--max-concurrent-jobs", "2",
                                         "--data-root", str(data_root)))
    yield shared
    if shared.current is not None:
        shared.current.stop()


@pytest.fixture
def server(shared_server) -> Server:
    return shared_server.get()


@pytest.fixture
def client(server):
    """A Client on the shared server; whatever a test leaves queued or running is cancelled after it."""
    c = server.client()
    yield c
    for info in c.list(limit=10_000):
        if not info.state.is_terminal():
            c.cancel(info.id)
    wait_for(lambda: all(j.state.is_terminal() for j in c.list(limit=10_000)), timeout=60)
    assert c.health()["status"] == "ok"
    c.close()


def test_a_dead_shared_server_is_replaced_by_a_fresh_one(shared_server):
    first = shared_server.get()
    first.kill()
    second = shared_server.get()
    assert second is not first and second.process.poll() is None
    assert second.client().health()["status"] == "ok"


def blockers(client: Client, make_spec) -> list:
    """Two slow jobs holding both job slots of the shared server."""
    jobs = [client.submit(make_spec(SLOW)) for _ in range(2)]
    wait_for(lambda: all(j.info().state == JobState.RUNNING for j in jobs))
    return jobs


def test_a_job_runs_to_success_with_every_epoch(client, make_spec):
    job = client.submit(make_spec({"name": "iris-e2e", "data": {"validation_fraction": 0.2},
                                   "stopping": {"max_epochs": 6}}))
    assert [m.epoch for m in job.stream()] == [1, 2, 3, 4, 5, 6]
    info = job.wait(timeout=60)
    assert (info.state, info.stop_reason, info.epoch, info.name) == (
        JobState.SUCCEEDED, StopReason.MAX_EPOCHS, 6, "iris-e2e")
    assert info.created_at <= info.started_at <= info.finished_at
    assert info.metrics.epoch == 6 and info.metrics.val_loss is not None
    assert [m.epoch for m in job.metrics()] == [1, 2, 3, 4, 5, 6]
    assert info.placement.startswith("in this process, no Ray: cpu (NumPy ")
    model = job.model()  # the weights file carries what a model of raw inputs needs
    assert model.layers == (4, 16, 3) and model.standardizes and model.loss == "cross_entropy"
    assert model.predict(np.zeros((2, 4))).shape == (2,)
    for which in ("last", "best"):
        weights = job.weights(which)
        assert weights["W1"].shape == (16, 4) and weights["b2"].shape == (3,)
    assert job.id in [j.id for j in client.list(JobState.SUCCEEDED)]
    assert job.id not in [j.id for j in client.list(JobState.QUEUED)]


def test_five_listeners_receive_identical_streams(client, make_spec):
    holding = blockers(client, make_spec)
    job = client.submit(make_spec({"stopping": {"max_epochs": 4}}))
    wait_for(lambda: job.info().waiting_reason)
    streams: list[list] = [[] for _ in range(5)]
    connected = threading.Barrier(6, timeout=30)

    def listen(out: list) -> None:
        for n, (kind, model) in enumerate(client.events(job.id)):
            out.append((kind, model.model_dump_json()))
            if n == 0:
                connected.wait()

    threads = [threading.Thread(target=listen, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    connected.wait()  # every listener is in before the job starts
    for b in holding:
        b.cancel()
    for t in threads:
        t.join(60)
    assert all(s == streams[0] for s in streams)
    kinds = [kind for kind, _ in streams[0]]
    assert kinds == ["state", "state", "epoch", "epoch", "epoch", "epoch", "state", "end"]
    assert '"state":"queued"' in streams[0][0][1] and '"state":"succeeded"' in streams[0][-1][1]


def test_after_replays_only_later_epochs_in_the_wire_format(client, server, make_spec):
    job = client.submit(make_spec({"stopping": {"max_epochs": 5}}))
    job.wait(timeout=60)
    events = list(client.events(job.id, after=3))
    assert [(k, getattr(m, "epoch", None)) for k, m in events] == [
        ("state", 5), ("epoch", 4), ("epoch", 5), ("end", 5)]
    assert [k for k, _ in client.events(job.id, after=5)] == ["state", "end"]

    with httpx.stream("GET", f"{server.url}/jobs/{job.id}/events", params={"after": 4}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    blocks = text.strip().split("\n\n")
    assert blocks[1].startswith("event: epoch\nid: 5\ndata: {")
    assert blocks[-1].startswith("event: end\nid: 5\ndata: {")
    # An EventSource reconnects with Last-Event-ID instead of ?after=.
    resumed = httpx.get(f"{server.url}/jobs/{job.id}/events", headers={"Last-Event-ID": "4"})
    assert resumed.text == text


def test_cancel_a_queued_job_at_once_and_a_running_one_keeping_its_results(client, make_spec):
    running, other = blockers(client, make_spec)
    queued = client.submit(make_spec(QUICK))
    info = queued.cancel()
    assert (info.state, info.stop_reason) == (JobState.CANCELLED, StopReason.CANCELLED)
    assert queued.metrics() == []
    with pytest.raises(JobNotFound, match="no weights"):
        queued.weights()

    wait_for(lambda: len(running.metrics()) >= 2)
    assert running.weights()["W1"].shape == (32, 64)  # while running: its latest checkpoint
    running.cancel()
    final = running.wait(timeout=60)
    assert (final.state, final.stop_reason) == (JobState.CANCELLED, StopReason.CANCELLED)
    epochs = [m.epoch for m in running.metrics()]
    assert len(epochs) >= 2 and epochs == list(range(1, len(epochs) + 1))
    assert running.weights()["W1"].shape == (32, 64)
    assert other.info().state == JobState.RUNNING  # cancelling one job leaves the other alone


@pytest.mark.parametrize("overrides, field, words", [
    ({"model": {"layers": [5, 16, 3]}}, "model.layers", "model.layers[0] = 5 but sklearn dataset 'iris' has 4"),
    ({"model": {"layers": [4, 16, 2]}}, "model.layers", "has labels up to 2"),
    ({"data": {"source": "synthetic", "name": "regression", "n_features": 7}, "model": {"loss": "mse"}},
     "model.layers", "model.layers[0] = 4 but synthetic regression data has 7"),
    ({"data": {"source": "file", "path": "three_features.npz"}}, "model.layers", "has 3 features per sample"),
])
def test_layers_that_do_not_fit_the_data_are_a_422_at_submit(client, make_spec, overrides, field, words):
    with pytest.raises(SpecError) as e:
        client.submit(make_spec(overrides))
    assert e.value.errors[0]["field"] == field and words in e.value.message, e.value.message


def test_the_openapi_page_needs_nothing_from_another_origin(server):
    page = httpx.get(f"{server.url}/docs").text
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page)
    assert assets and all(a.startswith("/") for a in assets), assets  # same origin, every one
    for asset in assets:
        r = httpx.get(server.url + asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert httpx.get(f"{server.url}/openapi.json").json()["info"]["title"] == "polyak"


def test_a_job_too_big_for_the_cluster_is_refused_once_its_size_is_known(client, make_spec):
    """POST never waits for Ray: before its size is known the job is queued and fails at dispatch with the
    message; after, the same spec is a 422 naming the field."""
    too_big = make_spec({"cluster": {"num_workers": 64}})
    words = "cluster.num_workers: 64 workers need 64 CPUs (one each)"
    try:
        job = client.submit(too_big)
    except SpecError as e:  # Ray was already up (an earlier test started it)
        assert words in e.message
    else:
        info = job.wait(timeout=120)
        assert (info.state, info.stop_reason) == (JobState.FAILED, StopReason.ERROR) and words in info.error
    with pytest.raises(SpecError) as e:
        client.submit(too_big)
    assert e.value.errors[0]["field"] == "cluster.num_workers" and words in e.value.message


def test_jobs_are_listed_a_page_at_a_time_and_by_group(client, server, make_spec):
    ids = [client.submit(make_spec({"group": "g-pages", "stopping": {"max_epochs": 1}})).id for _ in range(5)]
    other = client.submit(make_spec({"group": "g-other", "stopping": {"max_epochs": 1}})).id
    newest_first = ids[::-1]
    assert [j.id for j in client.list(group="g-pages")] == newest_first
    assert [j.id for j in client.list(group="g-pages", limit=2)] == newest_first[:2]
    assert [j.id for j in client.list(group="g-pages", limit=2, offset=2)] == newest_first[2:4]
    assert [j.id for j in client.list(group="g-other")] == [other]
    assert all(j.group == "g-pages" for j in client.list(group="g-pages"))
    assert client.list(group="g-pages", offset=5) == []
    for query, field in (("state=bogus", "state"), ("limit=0", "limit"), ("offset=-1", "offset")):
        r = httpx.get(f"{server.url}/jobs?{query}")
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["errors"][0]["field"] == field and field in body["detail"], body
    wait_for(lambda: all(client.get(i).state.is_terminal() for i in [*ids, other]))


def test_a_stopped_job_resubmitted_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(
        client, make_spec, train_local):
    # digits one sample a step: about 0.1 s an epoch, so the cancel lands mid-epoch of a 40-epoch run
    spec = make_spec({**SLOW, "stopping": {"max_epochs": 40}, "data": {"name": "digits", "validation_fraction": 0.2}})
    first = client.submit(spec)
    with pytest.raises(JobConflict, match="only a finished job can be resubmitted"):
        wait_for(lambda: first.info().state == JobState.RUNNING)
        client.resubmit(first.id)
    wait_for(lambda: len(first.metrics()) >= 3)
    first.cancel()
    assert first.wait(timeout=60).state == JobState.CANCELLED
    done = len(first.metrics())
    assert done < 40, "the job ended before the cancel: make it longer"

    second = client.resubmit(first.id)
    info = second.wait(timeout=120)
    assert (info.state, info.stop_reason, info.resumed_from) == (JobState.SUCCEEDED, StopReason.MAX_EPOCHS, first.id)
    history = second.metrics()
    assert [m.epoch for m in history] == list(range(1, 41))
    # The epochs up to the checkpoint (the last whole one) are the first job's; the rest the second's. The cancel
    # lands mid-epoch (that epoch is recorded cut short, then redone whole) or, now and then, between two epochs.
    assert all(m.job_id == second.id for m in history)
    cut_short = first.metrics()[-1].stop == StopReason.CANCELLED
    whole = done - 1 if cut_short else done
    copied = [m.model_copy(update={"job_id": first.id}) for m in history[:whole]]
    assert copied == first.metrics()[:whole]
    if cut_short:
        assert history[done - 1].step > first.metrics()[done - 1].step  # the cut-short epoch was redone whole

    reference, _, _ = train_local(spec)
    got = second.weights()
    np.testing.assert_allclose(got["W1"], reference.weights[: 32 * 64].reshape(32, 64), rtol=0, atol=1e-12)
    assert [m.train_loss for m in history] == pytest.approx([m.train_loss for m in reference.metrics], abs=1e-12)
    with pytest.raises(JobNotFound, match="no job with id nope"):
        client.resubmit("nope")


@pytest.mark.parametrize("content_type", ["application/yaml", "text/yaml", "application/json"])
def test_a_spec_may_come_as_yaml_or_json(client, server, make_spec, content_type):
    spec = make_spec({"name": "raw", "priority": 7}).model_dump(mode="json")
    body = yaml.safe_dump(spec) if "yaml" in content_type else json.dumps(spec)
    response = httpx.post(f"{server.url}/jobs", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 201, response.text
    info = JobInfo.model_validate_json(response.content)
    assert (info.state, info.name, info.priority) == (JobState.QUEUED, "raw", 7)
    assert client.job(info.id).wait(timeout=60).state == JobState.SUCCEEDED


@pytest.mark.parametrize(
    ("content_type", "body", "status", "words"),
    [
        ("application/json", '{"model": {"layers": [4, 3]', 400, "not valid JSON"),
        ("application/yaml", "model:\n  layers: [4, 3\nstopping: {", 400, "not valid YAML"),
        ("text/yaml", "- just\n- a list\n", 422, "must be a mapping"),
        ("application/json", "", 400, "body is empty"),
        ("application/json", '{"optimizer": {"momentum": 0.9}}', 422, "optimizer.momentum: unknown key"),
        ("application/yaml", "stopping:\n  max_epochs: -1\n", 422, "stopping.max_epochs: must be >= 0"),
        ("application/json", '{"cluster": {"device": "tpu"}}', 422, "cluster.device: must be one of"),
        # inf/NaN would be stored as null and make the job unreadable for every later listing
        ("application/yaml", "optimizer:\n  lr: .inf\n", 422, "optimizer.lr: must be a finite number"),
        ("application/json", '{"stopping": {"target_loss": NaN}}', 422, "stopping.target_loss: must be a finite"),
        ("application/json", '{"cluster": {"num_workers": 0, "device": "gpu"}}', 422,
         "cluster.device: gpu with num_workers 0"),
        # a YAML alias bomb: 10^8 elements from a few hundred bytes; the answer must stay short and quick
        ("application/yaml", "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
            f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
            for p, c in zip("abcdefg", "bcdefgh", strict=True)) + "model: {layers: *h}\n", 422, "model.layers"),
    ],
)
def test_bad_specs_are_4xx_naming_the_field(client, server, content_type, body, status, words):
    # The first spec that needs workers starts the server's Ray: seconds, not the default 5 s timeout.
    response = httpx.post(f"{server.url}/jobs", content=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    if status == 422:
        assert response.json()["errors"]
    assert client.health()["status"] == "ok"


@pytest.mark.parametrize(
    ("field", "path", "words"),
    [
        ("data.path", "missing.npz", "missing.npz does not exist on the server"),
        ("data.path", "../../../etc/hosts", "is outside the server's data root"),
        ("data.path", "/etc/hosts", "is outside the server's data root"),
        ("data.path", "escape.npz", "is outside the server's data root"),  # a symlink out
        ("data.path", "parquet_escape", "part-0.parquet leads outside"),  # a file of a data directory
        ("init_weights", "/etc/hosts", "is outside the server's data root"),
        ("data.path", "bad\x00name.npz", "not a usable path"),
        ("data.path", "x" * 5000 + ".npz", "not a usable path"),
    ],
)
def test_paths_must_exist_within_the_data_root(client, server, make_spec, field, path, words):
    spec = make_spec().model_dump(mode="json")
    if field == "data.path":
        spec["data"] = {"source": "file", "path": path}
    else:
        spec["init_weights"] = path
    response = httpx.post(f"{server.url}/jobs", json=spec)
    assert response.status_code == 422
    assert response.json()["errors"] == [{"field": field, "message": response.json()["errors"][0]["message"]}]
    assert words in response.json()["detail"] and field in response.json()["detail"]


def weights_for(spec, seed: int) -> dict[str, np.ndarray]:
    from polyak.contract.network import to_dict
    from polyak.workers.mlp import init_params

    W = init_params(spec.model.layers, 0.5, np.random.default_rng(seed), np, np.float64)
    return to_dict(W, spec.model.layers)


def test_init_weights_relative_or_through_a_symlinked_folder_inside_the_root(client, make_spec, data_root,
                                                                            tmp_path):
    spec = make_spec({"stopping": {"max_epochs": 0}})  # the job's weights are its init_weights
    folder = data_root / f"weights-{tmp_path.name}"
    folder.mkdir()
    np.savez(folder / "w0.npz", **weights_for(spec, 1))
    (data_root / f"link-{tmp_path.name}").symlink_to(folder)  # a folder link that stays inside the root
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    np.savez(outside / "w0.npz", **weights_for(spec, 2))
    (data_root / f"out-{tmp_path.name}").symlink_to(outside)

    for given in (f"{folder.name}/w0.npz", f"link-{tmp_path.name}/w0.npz", f"./{folder.name}/../{folder.name}/w0.npz"):
        job = client.submit(spec.model_copy(update={"init_weights": given}))
        assert job.info().spec.init_weights == str(folder.resolve() / "w0.npz"), given
        info = job.wait(timeout=60)
        assert (info.state, info.stop_reason) == (JobState.SUCCEEDED, StopReason.MAX_EPOCHS), info.error
        got = job.weights()
        for name, want in weights_for(spec, 1).items():
            np.testing.assert_array_equal(got[name], want)
    with pytest.raises(SpecError) as e:
        client.submit(spec.model_copy(update={"init_weights": f"out-{tmp_path.name}/w0.npz"}))
    assert e.value.errors[0]["field"] == "init_weights"
    assert f"out-{tmp_path.name}/w0.npz is outside the server's data root" in e.value.message


@pytest.mark.parametrize("field, swapped", [("data.path", "file"), ("data.path", "folder"),
                                            ("init_weights", "file")])
def test_a_file_swapped_for_a_symlink_out_of_the_root_after_submit_is_not_read(
        client, make_spec, data_root, tmp_path, field, swapped):
    """The path was checked at submit; the job starts later and must not follow what was put there since.
    Outside the root lies a file the job could read: only the check stands in its way."""
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    spec = make_spec(QUICK)
    contents = {"data.path": lambda f: np.savez(f, X=X, y=y), "init_weights": lambda f: np.savez(
        f, **weights_for(spec, 3))}[field]
    folder = data_root / f"swap-{tmp_path.name}"
    folder.mkdir()
    contents(folder / "file.npz")
    outside = tmp_path / "outside"
    outside.mkdir()
    contents(outside / "file.npz")
    given = f"{folder.name}/file.npz"
    changes = {"data": {"source": "file", "path": given}} if field == "data.path" else {"init_weights": given}

    holding = blockers(client, make_spec)
    job = client.submit(make_spec({**QUICK, **changes}))
    wait_for(lambda: job.info().waiting_reason)
    if swapped == "file":
        (folder / "file.npz").unlink()
        (folder / "file.npz").symlink_to(outside / "file.npz")
    else:
        folder.rename(data_root / f"moved-{tmp_path.name}")
        folder.symlink_to(outside)
    for b in holding:
        b.cancel()
    info = job.wait(timeout=60)
    assert (info.state, info.stop_reason) == (JobState.FAILED, StopReason.ERROR)
    assert info.error.startswith(f"{field}: {folder / 'file.npz'} changed since the job was submitted: it now "
                                 f"leads to {outside.resolve() / 'file.npz'} through a symlink"), info.error
    assert job.metrics() == []


def test_file_data_in_the_data_root_trains_and_data_that_does_not_fit_fails(client, make_spec):
    good = client.submit(make_spec({"data": {"source": "file", "path": "iris.npz", "standardize": True}}))
    assert good.wait(timeout=60).state == JobState.SUCCEEDED
    # A .csv is only read when the job loads it (an .npz's headers are checked at submit, above)
    bad = client.submit(make_spec({"data": {"source": "file", "path": "three_features.csv"}}))
    info = bad.wait(timeout=60)
    assert (info.state, info.stop_reason) == (JobState.FAILED, StopReason.ERROR)
    assert "model.layers[0] = 4" in info.error and "three_features.csv has 3 features" in info.error


def test_unknown_ids_and_bad_queries_are_4xx(client, server):
    for method, path in [("GET", "/jobs/nope"), ("GET", "/jobs/nope/metrics"), ("POST", "/jobs/nope/cancel"),
                         ("GET", "/jobs/nope/weights"), ("GET", "/jobs/nope/events")]:
        response = httpx.request(method, f"{server.url}{path}")
        assert (response.status_code, response.json()) == (404, {"detail": "no job with id nope"}), path
    with pytest.raises(JobNotFound, match="no job with id nope"):
        client.get("nope")
    with pytest.raises(SpecError, match="state"):
        client.list("exploded")
    assert httpx.get(f"{server.url}/jobs/x/weights", params={"which": "worst"}).status_code == 422


def test_divergence_fails_the_job_and_the_service_goes_on(client, make_spec):
    diverging = {
        "model": {"layers": [10, 8, 1], "loss": "mse"},
        "data": {"name": "diabetes", "standardize": False},
        "optimizer": {"lr": 50.0},
        "stopping": {"max_epochs": 50},
    }
    info = client.submit(make_spec(diverging)).wait(timeout=60)
    assert (info.state, info.stop_reason) == (JobState.FAILED, StopReason.DIVERGED)
    assert "diverged at epoch" in info.error and "step" in info.error
    assert client.submit(make_spec(QUICK)).wait(timeout=60).state == JobState.SUCCEEDED


def test_thirty_jobs_all_finish_in_priority_then_fifo_order(client, make_spec):
    holding = blockers(client, make_spec)
    specs = [make_spec({"priority": n % 3, "stopping": {"max_epochs": 2}}) for n in range(30)]
    with ThreadPoolExecutor(6) as pool:  # at once: six clients submitting side by side
        ids = {job.id for job in pool.map(client.submit, specs)}
    assert len(ids) == 30
    for b in holding:
        b.cancel()
    infos = wait_for(lambda: (done := [i for i in client.list() if i.id in ids and i.state.is_terminal()])
                     and len(done) == 30 and done, timeout=120)
    assert {i.state for i in infos} == {JobState.SUCCEEDED}
    started = [i.id for i in sorted(infos, key=lambda i: i.started_at)]
    assert started == [i.id for i in sorted(infos, key=lambda i: (-i.priority, i.created_at))]
    assert [i.priority for i in sorted(infos, key=lambda i: i.started_at)] == [2] * 10 + [1] * 10 + [0] * 10
    assert all([m.epoch for m in client.metrics(i)] == [1, 2] for i in ids)


def test_ray_jobs_wait_for_free_cpus_and_oversized_ones_are_rejected(client, make_spec):
    big = client.submit(make_spec({"cluster": {"num_workers": 2}, "stopping": {"max_epochs": 100_000}}))
    # Generous waits: Ray actors start in seconds here, in minutes on a machine busy with other tests.
    wait_for(lambda: big.metrics(), timeout=300)
    ray_status = client.health()["ray"]
    cpus = int(ray_status["cpus"])  # 2 here; a bigger machine's local Ray has more
    assert ray_status["connected"] and cpus >= 2
    placement = big.info().placement  # one node here: the compiled graph, and the job says so
    assert placement.startswith("sync on Ray, 2 cpu worker(s): parameter server on ") and placement.endswith(
        "sync steps over compiled: every actor is on the driver's node (shared-memory channels)"), placement
    waiting = client.submit(make_spec({"cluster": {"num_workers": cpus - 1}, "stopping": {"max_epochs": 3}}))
    wanted = f"needs {cpus - 1} CPU{'s' if cpus > 2 else ''}, {cpus - 2} free"
    wait_for(lambda: waiting.info().waiting_reason == wanted, timeout=60)
    with pytest.raises(SpecError) as e:
        client.submit(make_spec({"cluster": {"num_workers": cpus + 1}}))
    assert e.value.errors[0]["field"] == "cluster.num_workers"

    big.cancel()
    assert big.wait(timeout=120).state == JobState.CANCELLED
    info = waiting.wait(timeout=300)
    assert (info.state, info.epoch) == (JobState.SUCCEEDED, 3), info.error
    assert [m.epoch for m in waiting.metrics()] == [1, 2, 3]


def same_numbers(got: list, want: list) -> None:
    """Two runs' epochs: every figure but the timings equal to 1e-12."""
    timings = {"job_id", "samples_per_second", "elapsed_seconds"}
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        a, b = g.model_dump(mode="json", exclude=timings), w.model_dump(mode="json", exclude=timings)
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=0, abs=1e-12), (w.epoch, key)
            else:
                assert a[key] == b[key], (w.epoch, key)


def run_side_by_side(client, specs: list) -> list:
    """Submit the jobs at once; one listing must show them all running and past their first epoch together."""
    jobs = [client.submit(spec) for spec in specs]
    ids = {j.id for j in jobs}

    def all_mid_run() -> bool:
        listed = [i for i in client.list() if i.id in ids]
        return all(i.state == JobState.RUNNING and (i.epoch or 0) >= 1 for i in listed)

    wait_for(all_mid_run, timeout=300, every=0.01)
    return jobs


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in-process", "ray-K1"])
def test_jobs_side_by_side_give_the_numbers_each_gives_alone(client, make_spec, train_local, num_workers):
    """Two different jobs in the two job slots at once. On Ray one worker each: the local Ray here has 2 CPUs,
    and two K=2 jobs would run one after the other. One Ray worker computes exactly what the in-process
    engine does (one part, the same rows in the same order), so both compare with the in-process run alone."""
    # In-process ~0.15 s an epoch; on Ray ~0.1 s once both jobs' actors are up, which takes seconds and
    # varies: 30 epochs leave both jobs seconds of training side by side whatever the start-up did.
    base, epochs = (SLOW, 10) if num_workers == 0 else ({"batch": {"size": 2}}, 30)
    specs = [make_spec({**base, "data": {**base.get("data", {}), "validation_fraction": 0.2},
                        "model": {**base.get("model", {}), "seed": seed},
                        "optimizer": {"lr": lr, "alpha": alpha}, "stopping": {"max_epochs": epochs},
                        "cluster": {"num_workers": num_workers}})
             for seed, lr, alpha in ((11, 0.01, 0.5), (12, 0.02, 0.3))]
    jobs = run_side_by_side(client, specs)
    for job, spec in zip(jobs, specs, strict=True):
        info = job.wait(timeout=300)
        assert (info.state, info.epoch) == (JobState.SUCCEEDED, epochs), info.error
        alone, _, _ = train_local(spec.model_copy(update={"cluster": spec.cluster.model_copy(
            update={"num_workers": 0})}))
        same_numbers(job.metrics(), alone.metrics)
        W = from_dict(job.weights(), spec.model.layers, np.float64)
        np.testing.assert_allclose(W, alone.weights, rtol=0, atol=1e-12)


def test_cli_against_the_real_server(client, server, make_spec, tmp_path):
    spec_file = tmp_path / "iris.yaml"
    spec_file.write_text(yaml.safe_dump(make_spec({"name": "cli-iris"}).model_dump(mode="json")))

    def polyak(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "polyak", "--url", server.url, *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    submitted = polyak("submit", str(spec_file), "--follow")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0].strip()
    assert client.get(job_id).state == JobState.SUCCEEDED
    listed = polyak("list")
    assert listed.returncode == 0 and job_id in listed.stdout and "cli-iris" in listed.stdout
    status = polyak("status", job_id)
    assert status.returncode == 0 and "succeeded" in status.stdout and "max_epochs" in status.stdout
    weights = polyak("weights", job_id, "-o", "w.npz")
    assert weights.returncode == 0, weights.stderr
    with np.load(tmp_path / "w.npz") as w:
        assert w["W1"].shape == (16, 4)
    plot = polyak("plot", job_id, "-o", "curves.png")
    assert plot.returncode == 0 and (tmp_path / "curves.png").stat().st_size > 0, plot.stderr
    missing = polyak("status", "nope")
    assert missing.returncode == 1 and "error: no job with id nope" in missing.stderr


def test_token_protects_every_route_but_health(tmp_path, make_spec):
    server = Server(tmp_path / "data", env={"POLYAK_TOKEN": "s3cret"}).start()
    try:
        right = server.client(token="s3cret")
        job = right.submit(make_spec({**QUICK, "data": {"validation_fraction": 0.2}}))
        assert job.wait(timeout=60).state == JobState.SUCCEEDED
        spec = make_spec(QUICK).model_dump(mode="json")
        routes = [("GET", "/jobs", None), ("POST", "/jobs", spec), ("GET", f"/jobs/{job.id}", None),
                  ("GET", f"/jobs/{job.id}/metrics", None), ("GET", f"/jobs/{job.id}/events", None),
                  ("GET", f"/jobs/{job.id}/weights", None), ("GET", f"/jobs/{job.id}/weights?which=best", None),
                  ("POST", f"/jobs/{job.id}/cancel", None), ("POST", f"/jobs/{job.id}/resubmit", None)]
        wrong = ({"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}, {"Authorization": "s3cret"})
        for method, path, body in routes:
            for headers, words in [({}, "missing bearer token"), *((h, "bearer token") for h in wrong)]:
                response = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=30)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert words in response.json()["detail"], (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
            wrong_token = httpx.request(method, f"{server.url}{path}", json=body,
                                        headers={"Authorization": "Bearer s3cre"}, timeout=30)
            assert (wrong_token.status_code, wrong_token.json()) == (401, {"detail": "wrong bearer token"}), path
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert [j.id for j in right.list()] == [job.id]  # nothing above submitted, cancelled or resubmitted
        assert right.get(job.id).state == JobState.SUCCEEDED

        intruder = server.client(token="wrong")
        for call in (intruder.list, lambda: intruder.get(job.id), lambda: list(intruder.events(job.id)),
                     lambda: intruder.weights(job.id), lambda: intruder.metrics(job.id)):
            with pytest.raises(Unauthorized, match="wrong bearer token"):
                call()
        # The right token: the whole event stream, as a listener that joined at the start would see it.
        events = list(right.events(job.id))
        assert [k for k, _ in events] == ["state", "epoch", "epoch", "epoch", "end"]
        assert [m.epoch for k, m in events if k == "epoch"] == [1, 2, 3]
        assert events[-1][1].state == JobState.SUCCEEDED
        assert right.weights(job.id, "best")["W1"].shape == (16, 4)
    finally:
        server.stop()


def test_serve_checks_host_and_origin_and_caps_event_streams(tmp_path, make_spec):
    """polyak serve --allowed-host and --max-listeners, through a real server."""
    server = Server(tmp_path / "data", "--allowed-host", "polyak.test", "--max-listeners", "1").start()
    try:
        jobs = f"{server.url}/jobs"
        for host, status in [("localhost", 200), (f"127.0.0.1:{server.port}", 200), ("polyak.test", 200),
                             (f"rebind.example:{server.port}", 400)]:
            assert httpx.get(jobs, headers={"Host": host}).status_code == status, host
        foreign = httpx.post(jobs, content="{}", headers={"Content-Type": "application/json",
                                                          "Origin": "http://evil.example"})
        assert foreign.status_code == 403
        assert "cross-origin request from 'http://evil.example' refused" in foreign.json()["detail"]
        own = httpx.get(jobs, headers={"Origin": server.url})
        assert own.status_code == 200
        assert httpx.post(jobs, content="stopping: {max_epochs: 1}", headers={"Content-Type": "text/plain"}
                          ).status_code == 415
        assert httpx.get(jobs).json() == []  # neither the foreign nor the text/plain one was queued

        client = server.client()
        running = client.submit(make_spec(SLOW))  # keeps the one slot busy: the next job stays queued
        queued = client.submit(make_spec(QUICK))
        with httpx.stream("GET", f"{jobs}/{queued.id}/events", timeout=30) as stream:
            lines = stream.iter_lines()
            assert next(lines) == "event: state"
            refused = httpx.get(f"{jobs}/{running.id}/events")
            assert refused.status_code == 503
            assert "--max-listeners 1" in refused.json()["detail"]
            client.cancel(queued.id)
            assert [line for line in lines if line.startswith("event:")] == ["event: state", "event: end"]
        client.cancel(running.id)
        # The closed stream freed its slot (a stream of the cancelled job ends at once).
        wait_for(lambda: httpx.get(f"{jobs}/{queued.id}/events", timeout=10).status_code == 200, 10, every=0.1)
    finally:
        server.stop()


def test_a_server_beyond_loopback_answers_to_any_host_unless_names_are_given(tmp_path):
    """With --host 0.0.0.0 (and so a token) clients come by names the server cannot know (a Service, a load
    balancer): any Host is served; --allowed-host makes the check strict again."""
    token = {"Authorization": "Bearer " + "k" * 32}
    for extra, status in (((), 200), (("--allowed-host", "polyak.internal"), 400)):
        server = Server(tmp_path / f"data{len(extra)}", "--host", "0.0.0.0", "--token", "k" * 32, *extra).start()
        try:
            named = httpx.get(f"{server.url}/jobs", headers={**token, "Host": f"svc.example:{server.port}"})
            assert named.status_code == status
            foreign = httpx.get(f"{server.url}/jobs", headers={**token, "Origin": "http://evil.example"})
            assert foreign.status_code == 403  # cross-origin pages stay out either way
        finally:
            server.stop()


def test_a_second_server_on_the_same_data_dir_is_refused(server):
    result = subprocess.run(
        [sys.executable, "-m", "polyak", "serve", "--port", str(free_port()), "--data-dir", str(server.data_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "another `polyak serve` is using the data dir" in result.stderr
    assert httpx.get(f"{server.url}/health").status_code == 200  # the first one is untouched


def test_a_public_address_without_a_token_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "POLYAK_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "polyak", "serve", "--host", "0.0.0.0", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "data")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in result.stderr


def test_sigkill_mid_job_loses_nothing(tmp_path, make_spec):
    data_dir = tmp_path / "data"
    server = Server(data_dir).start()
    c = server.client()
    slow = c.submit(make_spec({**SLOW, "stopping": {"max_epochs": 10}}))  # killed after 2: 8 left to resume
    behind = [c.submit(make_spec({**QUICK, "name": f"behind-{n}"})) for n in range(2)]
    before = wait_for(lambda: (m := slow.metrics()) and len(m) >= 2 and m, every=0.02)
    server.kill()

    server = Server(data_dir).start()
    try:
        c = server.client()
        # The interrupted job resumes first; the queued ones stay queued, in their order, behind it.
        assert [c.get(b.id).state for b in behind] == [JobState.QUEUED, JobState.QUEUED]
        assert [c.get(b.id).queue_position for b in behind] in ([1, 2], [2, 3])
        info = c.job(slow.id).wait(timeout=120)
        assert (info.state, info.stop_reason, info.epoch) == (JobState.SUCCEEDED, StopReason.MAX_EPOCHS, 10)
        after = c.metrics(slow.id)
        assert [m.epoch for m in after] == list(range(1, 11))
        # Epochs before the last checkpoint were not trained again: their timings are the first run's.
        assert after[: len(before) - 1] == before[:-1]
        for b in behind:
            assert c.job(b.id).wait(timeout=60).state == JobState.SUCCEEDED
        assert "resumes from its last checkpoint" in server.log()
    finally:
        server.stop()
