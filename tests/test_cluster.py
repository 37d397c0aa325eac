"""polyak on a real Ray cluster, as a user runs one: `ray start --head`, token auth on, jobs submitted.

One head node for the module, started with `ray start --head --block` on loopback, every port it opens
chosen free here (so it never meets another Ray on this machine) and token authentication on
(RAY_AUTH_MODE=token, the token in a file of this test's own, named by RAY_AUTH_TOKEN_PATH: nothing
is read from or written to ~/.ray). Teardown signals only that `--block` process, which stops what it
started; `ray stop` is never used, as it would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from polyak.client.ray_job import RayJobFailed, follow, job_status, parse_metrics_line, submit_spec
from polyak.contract.errors import PolyakError, SpecError
from polyak.contract.wire import EpochMetrics

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

IRIS = {
    "name": "iris-on-ray",
    "model": {"layers": [4, 8, 3], "activation": "tanh", "seed": 1},
    "data": {"source": "sklearn", "name": "iris", "standardize": True, "validation_fraction": 0.2},
    "optimizer": {"method": "heavy_ball", "lr": 0.5, "alpha": 0.5},
    "batch": {"size": 16},
    "stopping": {"max_epochs": 5},
    "cluster": {"num_workers": 2, "mode": "sync", "device": "cpu"},
}


# ------------------------------------------------------------------------------------------------
# The cluster
# ------------------------------------------------------------------------------------------------


@dataclass
class RayCluster:
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    gcs_port: int
    dashboard: str  # http://127.0.0.1:PORT
    token: str
    env: dict  # for every process that talks to the cluster: RAY_AUTH_MODE and the token file

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def get(self, path: str, token: str | None = "cluster") -> tuple[int, bytes]:
        """GET on the dashboard; token "cluster" sends this cluster's, None sends none."""
        request = urllib.request.Request(self.dashboard + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {self.token if token == 'cluster' else token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def actors(self) -> Counter:
        """How many actors of each class the cluster has run (the state API keeps dead ones too)."""
        status, body = self.get("/api/v0/actors?limit=10000&detail=false")
        assert status == 200, body[:500]
        return Counter(a["class_name"] for a in json.loads(body)["data"]["result"]["result"])

    def job_ids(self) -> list[str]:
        status, body = self.get("/api/jobs/")
        assert status == 200, body[:500]
        return [j["submission_id"] for j in json.loads(body)]

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(size: int, avoid: set[int]) -> tuple[int, int]:
    """A run of ``size`` free ports between 20000 and 32000: above Ray's default worker range
    (10002-19999, what another local Ray uses), below Linux's ephemeral ports (32768+)."""
    for _ in range(200):
        low = random.randrange(20000, 32000 - size)
        ports = range(low, low + size)
        if avoid.intersection(ports):
            continue
        if all(_bindable(p) for p in ports):
            return low, low + size - 1
    raise RuntimeError("no run of free ports for Ray's workers")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ray_env(token_file: Path) -> dict:
    # Nothing of the caller's Ray settings (an address, another token, a tmpdir) may leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def cluster():
    # Ray's Unix socket paths must fit in 107 bytes: keep the temp dir short.
    temp_dir = Path(tempfile.mkdtemp(prefix="polyak-ray-", dir="/tmp"))
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes, but to our own file
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = _ray_env(token_file)
    (gcs, dashboard, client_server, agent_listen, agent_grpc, runtime_env_agent, metrics_export,
     object_manager, node_manager) = ports = free_ports(9)
    low, high = free_port_range(64, set(ports))
    log = temp_dir / "ray-start.log"
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
        "--ray-client-server-port", str(client_server),
        "--dashboard-agent-listen-port", str(agent_listen), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port", str(metrics_export),
        "--object-manager-port", str(object_manager), "--node-manager-port", str(node_manager),
        "--min-worker-port", str(low), "--max-worker-port", str(high),
        "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(300 * 2**20),
        "--temp-dir", str(temp_dir),
    ]
    with log.open("wb") as out:
        # Its own session: a Ctrl-C of pytest reaches it only through the teardown below.
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    c = RayCluster(proc, temp_dir, log, gcs, f"http://127.0.0.1:{dashboard}", token, env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{c.tail()}"
            try:
                if c.get("/api/jobs/")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the dashboard's job API never answered:\n{c.tail()}"
            time.sleep(1)
        yield c
    finally:
        _stop(c)


def _stop(c: RayCluster) -> None:
    if c.proc.poll() is None:
        c.proc.send_signal(signal.SIGTERM)  # `--block` kills the processes it started, then exits
        try:
            c.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(c.proc.pid, signal.SIGKILL)  # the session we gave it: only its own processes
            c.proc.wait(10)
    deadline = time.monotonic() + 30
    while port_open(c.gcs_port) and time.monotonic() < deadline:
        time.sleep(0.5)
    still_open = port_open(c.gcs_port)
    # Every process of this cluster (its daemons, workers, job drivers) inherited our token file's path.
    deadline = time.monotonic() + 15
    while (left := _processes_with(c.env["RAY_AUTH_TOKEN_PATH"])) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # ours beyond doubt; never leave them running
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(c.temp_dir, ignore_errors=True)
    assert not still_open, f"the cluster's GCS still listens on {c.gcs_port} after its `ray start` ended"
    assert not left, f"processes of the cluster outlived its `ray start --block`: {left}"


def _processes_with(token_path: str) -> list[int]:
    """Live processes whose environment names this cluster's token file."""
    marker = f"RAY_AUTH_TOKEN_PATH={token_path}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                status = (proc / "status").read_text()
                if "\nState:\tZ" not in status:  # a zombie is dead, waiting for its parent
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def run(args: list[str], cluster: RayCluster, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=cluster.env, capture_output=True, text=True, timeout=timeout)


def metrics_of(text: str) -> list[EpochMetrics]:
    return [m for m in map(parse_metrics_line, text.splitlines()) if m is not None]


def assert_trained_here(cluster: RayCluster, before: Counter) -> None:
    """A parameter server and two gradient workers more than ``before``: the job ran on this cluster."""
    new = cluster.actors() - before
    assert new["ParameterServer"] >= 1 and new["GradientWorker"] >= 2, dict(new)


def assert_whole_run(history: list[EpochMetrics], max_epochs: int | None = None) -> None:
    epochs = [m.epoch for m in history]
    assert epochs == list(range(1, len(epochs) + 1)), epochs
    assert history and history[-1].stop is not None
    assert all(m.stop is None for m in history[:-1])
    if max_epochs is not None:
        assert len(history) == max_epochs and history[-1].stop == "max_epochs"


@pytest.fixture
def workdir(tmp_path):
    """A working_dir without polyak's code (it travels as py_modules): the spec files go in it."""
    return tmp_path


def write_spec(folder: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------


def test_the_cluster_wants_its_token(cluster):
    assert cluster.get("/api/jobs/", token=None)[0] == 401
    assert cluster.get("/api/jobs/", token="0" * 64)[0] == 403
    assert json.loads(cluster.get("/api/authentication_mode")[1]) == {"authentication_mode": "token"}


def test_submit_spec_and_follow(cluster, workdir):
    (workdir / "specs").mkdir()
    spec = write_spec(workdir / "specs", IRIS)
    before = cluster.actors()
    job_id = submit_spec(cluster.dashboard, spec, workdir, token=cluster.token)
    history = list(follow(cluster.dashboard, job_id, poll=0.5, timeout=180, token=cluster.token))
    assert_trained_here(cluster, before)
    assert_whole_run(history, max_epochs=5)
    assert all(m.job_id == "train" for m in history)
    assert history[-1].val_accuracy is not None
    assert job_status(cluster.dashboard, job_id, token=cluster.token) == "SUCCEEDED"


def test_a_bad_spec_never_reaches_the_cluster(cluster, workdir):
    before = cluster.job_ids()
    bad = write_spec(workdir, {**IRIS, "stopping": {"max_epochs": -1}})
    with pytest.raises(SpecError, match="stopping.max_epochs"):
        submit_spec(cluster.dashboard, bad, workdir, token=cluster.token)
    outside = write_spec(workdir.parent, IRIS, "outside.yaml")
    with pytest.raises(PolyakError, match="not inside the working dir"):
        submit_spec(cluster.dashboard, outside, workdir, token=cluster.token)
    assert cluster.job_ids() == before


def test_a_failing_job_raises_its_error_line(cluster, workdir):
    # Valid as a spec, so it is submitted; the data file is not there when the job loads it.
    spec = {**IRIS, "data": {"source": "file", "path": "no/such/data.npz"}, "cluster": {"num_workers": 0}}
    job_id = submit_spec(cluster.dashboard, write_spec(workdir, spec), workdir, token=cluster.token)
    with pytest.raises(RayJobFailed) as failed:
        list(follow(cluster.dashboard, job_id, poll=0.5, timeout=120, token=cluster.token))
    e = failed.value
    assert isinstance(e, PolyakError) and e.status == "FAILED"
    assert e.error_line.startswith("error: data.path: ") and "no/such/data.npz" in e.error_line
    assert "does not exist" in e.message and job_id in e.message


def test_ray_submit_command_follows_a_failing_job(cluster, workdir):
    """`polyak ray-submit --follow` as a user runs it: Ray's client finds the token the way Ray does."""
    spec = {**IRIS, "data": {"source": "file", "path": "no/such/data.npz"}, "cluster": {"num_workers": 0}}
    args = [sys.executable, "-m", "polyak", "ray-submit", "spec.yaml", "--address", cluster.dashboard,
            "--working-dir", ".", "--follow"]
    write_spec(workdir, spec)
    proc = run(args, cluster, timeout=120, cwd=workdir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0].startswith("raysubmit_")
    assert "job failed" in proc.stdout and "/no/such/data.npz does not exist" in proc.stdout
    # Without RAY_AUTH_MODE=token Ray's client sends no token, whatever token files there are.
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "error: the Ray dashboard at " in proc.stderr, proc.stderr
    assert "Authentication required" in proc.stderr and "set RAY_AUTH_MODE=token" in proc.stderr


NO_TOKEN_SUBMIT = """
import sys
from polyak.contract.errors import PolyakError
from polyak.client.ray_job import submit_spec
try:
    submit_spec(sys.argv[1], sys.argv[2], sys.argv[3])
except PolyakError as e:
    sys.exit(e.message)
"""


def test_the_helper_needs_the_token(cluster, workdir):
    spec = write_spec(workdir, IRIS)
    before = cluster.job_ids()
    with pytest.raises(PolyakError, match="Authentication failed") as wrong:
        submit_spec(cluster.dashboard, spec, workdir, token="0" * 64)
    assert "Invalid authentication token" in wrong.value.message
    # No token at all: in a process of its own, without RAY_AUTH_* (with RAY_AUTH_MODE=token, which Ray reads
    # once per process, its client would send the token it finds itself).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([sys.executable, "-c", NO_TOKEN_SUBMIT, cluster.dashboard, str(spec), str(workdir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Authentication required" in proc.stderr, proc.stderr
    assert cluster.job_ids() == before  # neither was submitted


def test_polyak_serve_runs_jobs_on_the_cluster(cluster, tmp_path):
    """The service joined to the cluster by its GCS address, confined to a data root: a two-worker job trains there,
    its workers opening a file of the root under the same confinement (the roots travel in the job's runtime_env).

    Written against DESIGN.md's contract (HTTP API, client.Client); it needs `polyak serve`.
    """
    import numpy as np
    from sklearn.datasets import load_iris

    from polyak import Client, JobState

    root = tmp_path / "root"
    root.mkdir()
    X, y = load_iris(return_X_y=True)
    np.save(root / "iris.npy", np.column_stack([X, y]))
    iris_file = {**IRIS, "data": {"source": "file", "path": "iris.npy", "standardize": True,
                                  "validation_fraction": 0.2}}
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    before = cluster.actors()
    # Run from a folder with no polyak source in it: the service itself ships the packages to the cluster.
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "polyak", "serve", "--ray-address", cluster.gcs_address,
             "--port", str(port), "--data-dir", str(tmp_path / "data"), "--data-root", str(root)],
            cwd=tmp_path, env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        with Client(url) as client:
            deadline = time.monotonic() + 60
            while True:
                assert serve.poll() is None, log.read_text(errors="replace")[-4000:]
                try:
                    client.health()
                    break
                except PolyakError:
                    assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
                    time.sleep(0.5)
            job = client.submit(iris_file)
            info = job.wait(timeout=180)
            assert info.state == JobState.SUCCEEDED, (info.error, log.read_text(errors="replace")[-4000:])
            history = job.metrics()
            assert_whole_run(history, max_epochs=5)
            assert info.metrics is not None and info.metrics.epoch == 5
    finally:
        serve.send_signal(signal.SIGINT)  # uvicorn's graceful stop
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait(10)
    assert_trained_here(cluster, before)


def test_ray_job_submit_runs_the_documented_entrypoint(cluster):
    """DESIGN.md's command, verbatim, from the repository root: the job trains on this cluster."""
    job_id = f"polyak-digits-{secrets.token_hex(4)}"
    ray = str(BIN / "ray")
    before = cluster.actors()
    submitted = run([ray, "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
                     "--working-dir", ".", "--", "python", "-m", "polyak", "train", "examples/digits.yaml",
                     "--json"], cluster, timeout=240)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    streamed = metrics_of(submitted.stdout)
    assert_whole_run(streamed)

    status = run([ray, "job", "status", "--address", cluster.dashboard, job_id], cluster, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    logs = run([ray, "job", "logs", "--address", cluster.dashboard, job_id], cluster, timeout=60)
    assert logs.returncode == 0, logs.stderr
    assert metrics_of(logs.stdout) == streamed
    # The parameter server and both gradient workers were actors of this cluster, not of a Ray the
    # job started for itself (whose workers could not even fetch the job's working_dir).
    assert_trained_here(cluster, before)


def test_without_the_token_polyak_says_in_one_line_what_to_set(cluster, tmp_path):
    spec = write_spec(tmp_path, IRIS)
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"  # what a shell that never heard of the cluster's token has
    # Ray tries a refused GCS connection 20 times, a second apart, before it gives up with the same error:
    # one try is enough here (the knob is Ray's own, honoured exactly by ray._private.node.Node).
    env["RAY_gcs_server_port_wait_time_s"] = "1"
    for args in (["train", str(spec), "--ray-address", cluster.gcs_address],
                 ["serve", "--ray-address", cluster.gcs_address, "--port", str(free_ports(1)[0]),
                  "--data-dir", str(tmp_path / "data")]):
        proc = subprocess.run([sys.executable, "-m", "polyak", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr
        assert f"Ray cluster at {cluster.gcs_address}" in errors[0], errors[0]
        assert "wants a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=" in errors[0], errors[0]
        assert "Traceback" not in proc.stderr


def test_ray_submit_brings_the_weights_back_to_this_machine(cluster, workdir, tmp_path):
    from polyak.service.engine.checkpoint import load_npz

    write_spec(workdir, IRIS)
    out = tmp_path / "from-cluster.npz"
    args = [sys.executable, "-m", "polyak", "ray-submit", "spec.yaml", "--address", cluster.dashboard,
            "--working-dir", ".", "-o", str(out)]
    proc = run(args, cluster, timeout=240, cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"to {out}" in proc.stdout
    weights = load_npz(out)
    assert weights["W1"].shape == (8, 4) and "x_mean" in weights and "spec" in weights
    assert oct(out.stat().st_mode & 0o777) == "0o644"


def test_health_says_ray_starts_with_the_first_job_that_needs_it(monkeypatch):
    """/health's Ray entry, through each state of the connection (no Ray is started: connect is held)."""
    import threading

    from polyak.service.server.cluster import Cluster, ClusterUnavailable

    cluster = Cluster(None)
    assert cluster.status() == {"connected": False, "address": "local",
                                "note": "Ray starts when the first job that needs it arrives"}
    entered, release = threading.Event(), threading.Event()

    def unreachable():
        entered.set()
        release.wait(10)
        raise ClusterUnavailable("no Ray head answers at 10.0.0.9:6379")

    monkeypatch.setattr(cluster, "connect", unreachable)
    cluster.start_background()
    assert entered.wait(10)
    assert cluster.status()["note"] == "Ray is starting"
    release.set()
    deadline = time.monotonic() + 10
    while "error" not in cluster.status() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cluster.status() == {"connected": False, "address": "local",
                                "error": "no Ray head answers at 10.0.0.9:6379"}
