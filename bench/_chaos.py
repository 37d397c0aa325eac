"""The chaos harness (issue 22): a sweep of sync and async jobs on a real `polyak serve` while a seeded nemesis
kills things, then a check of everything the service promises about what survives.

The nemesis (Jepsen's word) follows a schedule drawn from the seed alone: for each fault a pause and a kind —
``service`` (SIGKILL of `polyak serve`, restarted on the same data dir), ``parameter_server`` or ``worker``
(SIGKILL of a job's actor process, found by Ray's process title, ``ray::ParameterServer...`` /
``ray::GradientWorker...``), and on two nodes ``node`` (the second node's processes killed, the node started again).
What a fault hits depends on when it lands; each is logged with its time, kind, target and outcome. Only this
run's processes are ever touched: every process of the run (the service, its Ray, the cluster's nodes and every
actor they start) carries ``POLYAK_CHAOS_RUN=<run id>`` in its environment.

Rounds of the sweep run until the schedule is spent; a job that fails is resubmitted from its checkpoint. Then,
per job of the sweep: a sync job's history (every epoch's figures) and final and best weights equal the same spec
trained in this process without faults (float64, 1e-12); an async job's trace (POLYAK_ASYNC_TRACE, written by the
service beside its checkpoints: service/engine/trace_file.py) replays, in float64 with torch's gradients, to its
final weights (1e-12), with every training row applied once per epoch on the trajectory it took; histories hold
each epoch once; failures are one line; SQLite's integrity_check says ok; and no actor or process of the run
outlives its job.

Every wait has a deadline and ends the run, or gives its job up as lost, with a line naming what it waited for: a
round none of whose jobs moves for ``job_timeout``, jobs unsettled when the sweep's ``sweep_timeout`` is up, a fault
without a target for ``target_wait``, the service's answers, restarts and shutdown, each with its own.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from polyak import Client
from polyak.client.sweep import plan_sweep
from polyak.contract.errors import JobConflict, ServerUnreachable
from polyak.contract.spec import JobSpec
from polyak.contract.wire import EpochMetrics, JobInfo, JobState

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = "POLYAK_CHAOS_RUN"
KINDS = ("service", "parameter_server", "worker")
TITLES = {"parameter_server": "ray::ParameterServer", "worker": "ray::GradientWorker"}
TIMING = {"job_id", "samples_per_second", "elapsed_seconds"}  # figures no two runs share
TOLERANCE = 1e-12
CALM_WAIT = 900.0  # seconds a thread waits for the other's submission or fault (each bounded well below this)
NEMESIS_GRACE = 600.0  # seconds the fault under way may take to end once the sweep ends (a restart is bounded)

# digits, 64-32-10, float64 (so that a resumed run can be held to 1e-12), checkpoints every epoch (as every job).
BASE = {
    "name": "chaos",
    "model": {"layers": [64, 32, 10], "seed": 7},
    "data": {"source": "sklearn", "name": "digits", "validation_fraction": 0.2, "standardize": True},
    "optimizer": {"method": "heavy_ball", "lr": 0.1, "alpha": 0.5},
    "batch": {"size": 16},
    "stopping": {"max_epochs": 4},
    "cluster": {"num_workers": 2, "mode": "sync", "device": "cpu", "dtype": "float64", "max_staleness": 4},
}


# -- the schedule and its log ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planned:
    pause: float  # seconds after the previous fault was dealt with
    kind: str
    lag: float  # an actor fault that had to wait for its target waits this much more: it lands mid-job, not at birth
    pick: int  # which target, among those there are when it lands (modulo their number)


def schedule(seed: int, faults: int, kinds: tuple[str, ...], pause: tuple[float, float]) -> list[Planned]:
    """The faults of a run, a function of the seed alone."""
    rng = random.Random(seed)
    return [Planned(round(rng.uniform(*pause), 2), rng.choice(kinds), round(rng.uniform(*pause), 2),
                    rng.randrange(1 << 30)) for _ in range(faults)]


@dataclass
class Fault:
    seed: int
    number: int
    at: float  # seconds since the run started
    kind: str
    target: str
    outcome: str


class Log:
    """Every fault and event of the run, as JSON lines in the run's folder and to a callback (the progress view)."""

    def __init__(self, path: Path, on_event: Callable[[str, dict], None]):
        self.path, self.on_event, self.started = path, on_event, time.monotonic()
        self.lock = threading.Lock()

    def now(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def write(self, event: str, **fields) -> None:
        record = {"t": self.now(), "event": event, **fields}
        with self.lock, self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.on_event(event, record)


# -- processes of this run -----------------------------------------------------------------------------------
def run_processes(run_id: str) -> list[psutil.Process]:
    """Live processes whose environment carries this run's marker."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARKER) == run_id and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.Error, OSError):
        return ""


def actor_processes(run_id: str, kind: str) -> list[psutil.Process]:
    """This run's parameter server or gradient worker processes, by Ray's process title, oldest first."""
    procs = [p for p in run_processes(run_id) if title(p).startswith(TITLES[kind])]
    return sorted(procs, key=lambda p: (p.create_time(), p.pid))


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``procs`` still alive after ``timeout`` seconds (a zombie is dead; a reused pid is not the process)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if _alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# -- the service and the cluster ---------------------------------------------------------------------------
class Service:
    """`python -m polyak serve` as a user starts it: one port and one data dir for the whole run, restarted on them."""

    def __init__(self, folder: Path, env: dict, ray_address: str | None = None):
        self.data_dir, self.env = folder / "data", env
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "polyak", "serve", "--port", str(self.port),
                        "--data-dir", str(self.data_dir), "--max-concurrent-jobs", "1"]
        if ray_address:
            self.command += ["--ray-address", ray_address]
        self.log_file = folder / "service.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        with self.log_file.open("a") as log:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"polyak serve exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"polyak serve did not answer within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.1)

    def kill(self) -> list[psutil.Process]:
        """SIGKILL, as a crash; the processes it had started (its local Ray), which must die with it."""
        below = psutil.Process(self.process.pid).children(recursive=True)
        self.process.kill()
        self.process.wait(30)
        return below

    def stop(self, timeout: float = 120) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)

    def tail(self) -> str:
        return self.log_file.read_text(errors="replace")[-3000:] if self.log_file.exists() else ""


class TwoNodes:
    """A head (1 CPU) and a second node (2 CPUs) on loopback, as tests/test_multinode.py builds them: a two-worker
    job then has a worker on each node. Token auth on, with a token file of the run's own."""

    def __init__(self, folder: Path, env: dict):
        token = folder / "auth_token"
        token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        token.chmod(0o600)
        self.folder = folder
        self.env = {k: v for k, v in env.items() if not k.startswith("RAY_")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
                        RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                        RAY_health_check_failure_threshold="3")
        self.gcs_port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.head = self.second = None

    def _ray_start(self, args: list[str], name: str) -> subprocess.Popen:
        ports = free_ports(6)
        port_args = [f"--{flag}={port}" for flag, port in zip(
            ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "object-manager-port", "node-manager-port"), ports, strict=True)]
        low = random.randrange(20000, 31000)
        common = ["--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1", "--num-gpus", "0",
                  "--object-store-memory", str(200 * 2**20), f"--min-worker-port={low}",
                  f"--max-worker-port={low + 63}"]
        with (self.folder / f"{name}.log").open("ab") as out:
            return subprocess.Popen([str(BIN / "ray"), "start", *args, *common, *port_args], env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> None:
        self.head = self._ray_start(["--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                                     "--num-cpus=1", f"--temp-dir={self.folder / 'ray'}"], "head")
        self.start_second()

    def start_second(self, timeout: float = 180) -> None:
        self.second = self._ray_start([f"--address={self.address}", "--num-cpus=2"], "second")
        self.wait_nodes(2, timeout)

    def kill_second(self) -> list[int]:
        """The whole second node at once (its process group: raylet, object store, agents, workers)."""
        pids = [self.second.pid] + [p.pid for p in psutil.Process(self.second.pid).children(recursive=True)]
        os.killpg(self.second.pid, signal.SIGKILL)
        self.second.wait(30)
        return pids

    def wait_nodes(self, n: int, timeout: float) -> None:
        code = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print(sum(1 for x in ray.nodes() if x['Alive']))")
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                                  timeout=120)
            if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach {n} nodes: {done.stdout[-500:]} {done.stderr[-2000:]}")
            time.sleep(1)

    def stop(self) -> None:
        for node in (self.second, self.head):
            if node is not None and node.poll() is None:
                node.send_signal(signal.SIGTERM)  # `--block` stops what it started, then exits
                try:
                    node.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)
                    node.wait(10)


# -- the checks: pure functions of what the service answered -----------------------------------------------------
def comparable(m: EpochMetrics) -> dict:
    return m.model_dump(mode="json", exclude=TIMING)


def differences(got, want, where: str = "") -> list[str]:
    """Where ``got`` differs from ``want``: floats by more than TOLERANCE, anything else at all."""
    if isinstance(want, dict) and isinstance(got, dict):
        if got.keys() != want.keys():
            return [f"{where}: fields {sorted(got)} != {sorted(want)}"]
        return [d for k in want for d in differences(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in differences(g, w, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, float):
        return [] if abs(got - want) <= TOLERANCE else [f"{where}: {got!r} != {want!r}"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def history_problems(history: list[EpochMetrics]) -> list[str]:
    """A job's history must hold epochs 1..n, each once, in order."""
    epochs = [m.epoch for m in history]
    if epochs == list(range(1, len(epochs) + 1)):
        return []
    repeated = sorted(e for e, c in Counter(epochs).items() if c > 1)
    missing = sorted(set(range(1, max(epochs, default=0) + 1)) - set(epochs))
    return [f"history epochs {epochs}: repeated {repeated}, missing {missing}"]


def weights_problems(name: str, got: np.ndarray, want: np.ndarray) -> list[str]:
    worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else np.inf
    return [] if worst <= TOLERANCE else [f"{name} weights differ from the reference by {worst:.3g}"]


def sync_problems(history: list[EpochMetrics], W: np.ndarray, best_W: np.ndarray, reference) -> list[str]:
    """A sync job against the same spec trained undisturbed (``reference``: a TrainResult)."""
    problems = history_problems(history)
    if [m.epoch for m in history] != [m.epoch for m in reference.metrics]:
        return problems + [f"epochs {[m.epoch for m in history]} != reference {[m.epoch for m in reference.metrics]}"]
    for got, want in zip(history, reference.metrics, strict=True):
        problems += differences(comparable(got), comparable(want), f"epoch {want.epoch}")
    problems += weights_problems("final", W, reference.weights)
    if reference.best_weights is not None:
        problems += weights_problems("best", best_W, reference.best_weights)
    return problems


def one_line_problems(info: JobInfo) -> list[str]:
    if info.state != JobState.FAILED:
        return []
    if not info.error or "\n" in info.error.strip() or "Traceback" in info.error:
        return [f"job {info.id} failed without a one-line error: {info.error!r}"]
    return []


# -- the async replay -----------------------------------------------------------------------------------------
def torch_gradient(model, W: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The gradient of the mean loss over (X, y) at the flat W (polyak's layout), by torch autograd, float64."""
    import torch

    from polyak.contract.network import unflatten

    torch.set_num_threads(1)  # tiny matrices: threads only cost
    h = torch.as_tensor(X, dtype=torch.float64)
    params = []
    for layer, (Wl, bl) in enumerate(unflatten(np.asarray(W, np.float64), model.layers)):
        Wt, bt = torch.tensor(Wl, requires_grad=True), torch.tensor(bl, requires_grad=True)
        params += [Wt, bt]
        h = h @ Wt.T + bt
        if layer < len(model.layers) - 2:
            h = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[model.activation](h)
    if model.loss == "cross_entropy":
        loss = torch.nn.functional.cross_entropy(h, torch.as_tensor(np.asarray(y), dtype=torch.long))
    else:
        loss = torch.nn.functional.mse_loss(h, torch.as_tensor(np.asarray(y), dtype=torch.float64).reshape(h.shape))
    loss.backward()
    return np.concatenate([p.grad.numpy().ravel() for p in params])


def step_size(opt, t: int) -> float:
    """MATH.md's eta_t."""
    if opt.schedule == "inverse_time":
        return opt.lr / (1 + t / opt.decay_steps)
    if opt.schedule == "inverse_power":
        return opt.lr / (1 + t) ** opt.power
    return opt.lr


def update(method: str, W, u, g, eta: float, a: float):
    """(27) and its kin, in float64: (W, u) after one step."""
    if method == "sgd":
        return W - eta * g, u
    u = (1 - a) * u - a * eta * g
    if method == "heavy_ball":
        return W + u, u
    if method == "nesterov":
        return W - a * eta * g + (1 - a) * u, u
    raise ValueError(f"the replay knows sgd, heavy_ball and nesterov, not {method}")


def replay(spec: JobSpec, trace: list, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray | None, list, list[str]]:
    """(W after the last update, the updates of the trajectory it ends, problems) from the trace alone. A Restore
    puts the replay back at a version it produced before: the updates after that version are off the trajectory."""
    from polyak.service.engine.parameter_server import Restore, Update
    from polyak.service.engine.trainer import initial_weights

    model, opt = spec.model, spec.optimizer
    decayed = np.concatenate([np.r_[np.ones(o * i), np.zeros(o)]
                              for i, o in zip(model.layers[:-1], model.layers[1:], strict=True)])
    W0 = initial_weights(spec).astype(np.float64)
    history = {0: (W0, np.zeros_like(W0), [])}  # version -> (W, u, the updates that led there)
    W = u = version = path = None
    for i, rec in enumerate(trace):
        where = f"trace record {i} ({type(rec).__name__})"
        if isinstance(rec, Restore):
            if rec.version not in history:
                return None, [], [f"{where}: restores version {rec.version}, which the trace never produced"]
            W, u, path = (x.copy() if isinstance(x, np.ndarray) else list(x) for x in history[rec.version])
            version = rec.version
        elif isinstance(rec, Update):
            problems = update_problems(rec, version, spec, history)
            if problems:
                return None, [], [f"{where}: {p}" for p in problems]
            g = torch_gradient(model, history[rec.read_version][0], X[rec.rows], y[rec.rows])
            W, u = update(opt.method, W, u, g + opt.weight_decay * decayed * W, rec.lr, opt.alpha)
            version += 1
            path.append(rec)
            history[version] = (W.copy(), u.copy(), list(path))
    return W, path or [], []


def update_problems(rec, version: int | None, spec: JobSpec, history: dict) -> list[str]:
    if version is None:
        return ["an update before any Restore"]
    if (rec.version, rec.step) != (version + 1, version):
        return [f"version {rec.version}, step {rec.step} does not follow version {version}"]
    if rec.read_version not in history or not 0 <= version - rec.read_version <= spec.cluster.max_staleness:
        return [f"read at version {rec.read_version} while at {version} (max_staleness {spec.cluster.max_staleness})"]
    if rec.count != len(rec.rows):
        return [f"count {rec.count} for {len(rec.rows)} rows"]
    if abs(rec.lr - step_size(spec.optimizer, rec.step)) > 1e-15 * spec.optimizer.lr:
        return [f"lr {rec.lr} at step {rec.step}, MATH.md's eta is {step_size(spec.optimizer, rec.step)}"]
    return []


def rows_problems(path: list, n_train: int, epochs: int) -> list[str]:
    """Every training row applied once in each epoch of the trajectory, and no update outside them."""
    per_epoch: dict[int, Counter] = {}
    for rec in path:
        per_epoch.setdefault(rec.epoch, Counter()).update(rec.rows.tolist())
    if sorted(per_epoch) != list(range(epochs)):
        return [f"updates in epochs {sorted(per_epoch)}, expected 0..{epochs - 1}"]
    problems = []
    for epoch, rows in sorted(per_epoch.items()):
        twice = sorted(r for r, c in rows.items() if c > 1)
        lost = sorted(set(range(n_train)) - set(rows))
        if twice or lost:
            problems.append(f"epoch {epoch}: rows applied twice {twice[:10]}, never {lost[:10]}")
    return problems


def async_problems(spec: JobSpec, trace: list, history: list[EpochMetrics], W: np.ndarray, data) -> list[str]:
    """An async job's trace replayed (``data``: the spec's dataset, as load_dataset gives it)."""
    problems = history_problems(history)
    replayed, path, why = replay(spec, trace, data.X_train, data.y_train)
    if why:
        return problems + why
    problems += rows_problems(path, data.n_train, len(history))
    if history and len(path) != history[-1].step:
        problems.append(f"the trajectory has {len(path)} updates, the history {history[-1].step} steps")
    return problems + weights_problems("replayed", W, replayed)


# -- the run ----------------------------------------------------------------------------------------------------
@dataclass
class Chain:
    """One job of the sweep: the service's job ids it took (the first, then each resubmission)."""

    params: dict
    ids: list[str]
    errors: list[str] = field(default_factory=list)  # each failure's error line
    fresh: int = 0  # failures before any checkpoint: submitted again from the start
    settled: bool = False
    seen: tuple = ()  # (id, state, epoch) last seen: a round none of whose jobs moves for long is given up
    problems: list[str] = field(default_factory=list)
    evidence: dict = field(default_factory=dict)  # what the checks were given: spec, history, W (best W or trace)

    @property
    def mode(self) -> str:
        return self.params["cluster.mode"]


@dataclass
class Report:
    seed: int
    planned: int
    faults: list[Fault] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    integrity: str = ""
    seconds: float = 0.0

    def injected(self) -> Counter:
        return Counter(f.kind for f in self.faults if not f.outcome.startswith("missed"))

    def summary(self) -> dict:
        lost = [c for c in self.chains if c.problems]
        return {
            "seed": self.seed, "faults": sum(self.injected().values()), "by_kind": dict(self.injected()),
            "missed": sum(f.outcome.startswith("missed") for f in self.faults), "jobs": len(self.chains),
            "sync": sum(c.mode == "sync" for c in self.chains), "async": sum(c.mode == "async" for c in self.chains),
            "equal_to_reference": sum(c.mode == "sync" and not c.problems for c in self.chains),
            "replayed_exactly": sum(c.mode == "async" and not c.problems for c in self.chains),
            "failed_and_resubmitted": sum(len(c.ids) > 1 for c in self.chains),
            "submitted_again": sum(c.fresh for c in self.chains),
            "lost": len(lost), "leftovers": len(self.leftovers), "integrity": self.integrity,
            "seconds": round(self.seconds, 1),
        }


@dataclass
class Config:
    seed: int = 0
    faults: int = 3
    two_nodes: bool = False
    methods: tuple[str, ...] = ("heavy_ball",)  # x (sync, async): the sweep
    pause: tuple[float, float] = (0.5, 4.0)  # seconds between faults, drawn uniformly
    target_wait: float = 1200.0  # a fault with no target this long after its moment is missed
    job_timeout: float = 900.0  # a round none of whose jobs changed state or epoch this long is given up (lost)
    sweep_timeout: float | None = None  # jobs unsettled this long after the start are given up; None: sweep_seconds
    base: dict = field(default_factory=lambda: json.loads(json.dumps(BASE)))

    def kinds(self) -> tuple[str, ...]:
        return KINDS + ("node",) if self.two_nodes else KINDS

    def sweep_seconds(self) -> float:
        return self.sweep_timeout if self.sweep_timeout is not None else 300.0 + 60.0 * self.faults


class Run:
    """One chaos run in ``folder``: start what it needs, run rounds of the sweep under the nemesis, check, clean up."""

    def __init__(self, config: Config, folder: Path, on_event: Callable[[str, dict], None] = lambda kind, rec: None):
        self.config, self.folder = config, folder
        self.run_id = uuid.uuid4().hex[:12]
        self.log = Log(folder / "chaos-log.jsonl", on_event)
        self.report = Report(config.seed, config.faults)
        self.calm = threading.Lock()  # held while the harness submits: a fault waits for it, never cuts a POST
        self.nemesis_done = threading.Event()
        self.nemesis_thread = threading.Thread(target=self.nemesis, name="nemesis", daemon=True)
        self.stopping = threading.Event()
        self.nemesis_abandoned = False
        env = {k: v for k, v in os.environ.items() if k != "POLYAK_TOKEN"}
        env.update({MARKER: self.run_id, "POLYAK_ASYNC_TRACE": "1", "PYTHONUNBUFFERED": "1"})
        self.cluster = TwoNodes(folder, env) if config.two_nodes else None
        self.service = Service(folder, self.cluster.env if self.cluster else env,
                               self.cluster.address if self.cluster else None)
        self.client = Client(self.service.url, retries=0, timeout=60)
        self.references: dict[str, object] = {}
        self.orphans: list[tuple[psutil.Process, float]] = []  # processes of SIGKILLed services, when killed
        self.deadline = float("inf")  # of the sweep: set when it starts

    def execute(self) -> Report:
        started = time.monotonic()
        self.log.write("start", seed=self.config.seed, faults=self.config.faults, run=self.run_id,
                       two_nodes=self.config.two_nodes, folder=str(self.folder))
        try:
            if self.cluster:
                self.cluster.start()
            self.service.start()
            self.deadline = time.monotonic() + self.config.sweep_seconds()
            self.nemesis_thread.start()
            rounds = 0
            while (not self.nemesis_done.is_set() or rounds == 0) and time.monotonic() < self.deadline:
                rounds += 1
                self.follow(self.submit_round(rounds))
            self.end_nemesis()
            for chain in self.report.chains:
                chain.problems += self.check(chain)
                self.log.write("checked", ids=chain.ids, params=chain.params, problems=chain.problems)
            self.report.leftovers += self.actors_left("after every job ended") + self.orphans_left()
        finally:
            self.end_nemesis()  # the run broke off (Ctrl-C, an error): the fault under way ends first
            self.shut_down()
        self.report.integrity = integrity(self.service.data_dir / "polyak.db")
        self.report.seconds = time.monotonic() - started
        self.log.write("end", **self.report.summary())
        return self.report

    # -- the nemesis ------------------------------------------------------------------------------------------
    @contextmanager
    def quiet(self, who: str) -> Iterator[None]:
        """Held while the harness submits or a fault lands: a fault never cuts a POST, nor a POST a restart."""
        if not self.calm.acquire(timeout=CALM_WAIT):
            raise TimeoutError(f"{who} waited {CALM_WAIT:.0f} s for a submission or a fault under way to end")
        try:
            yield
        finally:
            self.calm.release()

    def end_nemesis(self) -> None:
        """Stop the schedule and wait for the fault under way; one that does not end is reported (once)."""
        self.stopping.set()
        if self.nemesis_thread.is_alive() and not self.nemesis_abandoned:
            self.nemesis_thread.join(NEMESIS_GRACE)
            if self.nemesis_thread.is_alive():
                self.nemesis_abandoned = True
                self.report.leftovers.append(f"the nemesis's fault under way did not end within {NEMESIS_GRACE:.0f} s"
                                             " of the sweep's end")

    def nemesis(self) -> None:
        try:
            plan = schedule(self.config.seed, self.config.faults, self.config.kinds(), self.config.pause)
            for number, planned in enumerate(plan, start=1):
                if self.stopping.wait(planned.pause):
                    return
                at, target, outcome = self.inject(planned)
                fault = Fault(self.config.seed, number, at, planned.kind, target, outcome)
                self.report.faults.append(fault)
                self.log.write("fault", **asdict(fault))
        except Exception as e:  # the run goes on and ends; the report says the nemesis broke
            self.log.write("nemesis_error", error=f"{type(e).__name__}: {e}")
            self.report.leftovers.append(f"the nemesis broke: {type(e).__name__}: {e}")
        finally:
            self.nemesis_done.set()

    def inject(self, planned: Planned) -> tuple[float, str, str]:
        """(when, target, outcome) of one fault."""
        if planned.kind in ("service", "node"):
            with self.quiet(f"a {planned.kind} fault"):
                at = self.log.now()
                return (at, *(self.kill_service() if planned.kind == "service" else self.kill_node(planned.pick)))
        deadline, waited = time.monotonic() + self.config.target_wait, False
        while not self.stopping.is_set() and time.monotonic() < deadline:
            if waited and actor_processes(self.run_id, planned.kind):
                time.sleep(planned.lag)
            with self.quiet(f"a {planned.kind} fault"):
                procs = actor_processes(self.run_id, planned.kind)
                if procs:
                    victim = procs[planned.pick % len(procs)]
                    target = f"pid {victim.pid} {' '.join(title(victim).split())[:60]} ({len(procs)} alive)"
                    try:
                        victim.send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        continue
                    return self.log.now(), target, "killed"
            waited = True
            time.sleep(0.05)
        return self.log.now(), "-", f"missed: no {planned.kind} process within {self.config.target_wait:.0f} s"

    def kill_service(self) -> tuple[str, str]:
        """SIGKILL and restart at once. Its local Ray dies with it, Ray's agents about a minute later (they notice
        the raylet gone): whether every one of them went is checked once the run is over."""
        pid = self.service.process.pid
        self.orphans += [(p, time.monotonic()) for p in self.service.kill()]
        started = time.monotonic()
        self.service.start()
        return f"polyak serve pid {pid}", f"killed; restarted in {time.monotonic() - started:.1f} s"

    def kill_node(self, pick: int) -> tuple[str, str]:
        pids = self.cluster.kill_second()
        down = 1 + pick % 4000 / 1000  # 1-5 s down, drawn with the fault
        time.sleep(down)
        started = time.monotonic()
        self.cluster.start_second()
        return (f"second node (ray start pid {pids[0]}, {len(pids)} processes)",
                f"killed; down {down:.1f} s; back in {time.monotonic() - started:.1f} s")

    # -- the jobs ------------------------------------------------------------------------------------------
    def call(self, method: Callable, *args, timeout: float = 600):
        """An SDK call, retried while the service is down (the nemesis restarts it)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return method(*args)
            except ServerUnreachable as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the service at {self.service.url} did not answer {method.__name__}{args} "
                                       f"within {timeout:.0f} s: {e}") from e
                time.sleep(0.2)

    def submit_round(self, number: int) -> list[Chain]:
        """The sweep (client.sweep's plan: one group, a job per combination), each job submitted exactly once."""
        grid = {"cluster.mode": ["sync", "async"], "optimizer.method": list(self.config.methods)}
        plan = plan_sweep(self.config.base, grid, f"chaos-{self.run_id}-{number}")
        with self.quiet(f"round {number}'s submission"):
            chains = [Chain(trial.params, [self.submit_once(trial.spec)]) for trial in plan.trials]
        self.report.chains += chains
        self.log.write("round", number=number, jobs=[[c.ids[0], c.params] for c in chains])
        return chains

    def submit_once(self, spec: JobSpec) -> str:
        """POST /jobs once: an answer lost on the way (a timeout) may be of a job already stored, so the job is
        looked for by its name (unique in its group) before the POST is sent again."""
        return self.once(lambda: self.client.submit(spec).id, spec.group, lambda j: j.name == spec.name)

    def once(self, post: Callable[[], str], group: str, stored: Callable[[JobInfo], bool], timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return post()
            except ServerUnreachable as e:
                found = [j.id for j in self.call(self.client.list, None, group, 1000) if stored(j)]
                if found:
                    return found[0]
                if time.monotonic() > deadline:
                    raise TimeoutError(f"a POST to the service at {self.service.url} (group {group}) got no answer "
                                       f"within {timeout:.0f} s: {e}") from e
                time.sleep(0.5)

    def follow(self, chains: list[Chain]) -> None:
        """Until every job of the round succeeded or is given up on; failures are resubmitted."""
        moved = time.monotonic()
        while not all(c.settled for c in chains):
            for chain in (c for c in chains if not c.settled):
                info = self.call(self.client.get, chain.ids[-1])
                if (info.id, info.state, info.epoch) != chain.seen:
                    chain.seen, moved = (info.id, info.state, info.epoch), time.monotonic()
                if info.state == JobState.SUCCEEDED:
                    chain.settled = True
                    self.log.write("job_done", ids=chain.ids, epochs=info.epoch)
                elif info.state.is_terminal():
                    self.resubmit(chain, info)
                elif time.monotonic() - moved > self.config.job_timeout:
                    self.give_up(chain, f"job {info.id} {info.state.value} at epoch {info.epoch} for "
                                        f"{self.config.job_timeout:.0f} s: {info.waiting_reason or ''}")
                elif time.monotonic() > self.deadline:
                    self.give_up(chain, f"job {info.id} {info.state.value} at epoch {info.epoch} when the sweep's "
                                        f"{self.config.sweep_seconds():.0f} s were up: {info.waiting_reason or ''}")
            time.sleep(0.3)

    def give_up(self, chain: Chain, why: str) -> None:
        chain.settled = True
        chain.problems.append(why)
        self.log.write("job_given_up", ids=chain.ids, why=why)

    def resubmit(self, chain: Chain, info: JobInfo) -> None:
        """A failed job goes on from its checkpoint, or from the start when it has none (POST /jobs/{id}/resubmit); one
        whose checkpoint cannot be read (a 409) is submitted again."""
        chain.errors.append(info.error or "")
        self.log.write("job_failed", id=info.id, state=info.state.value, error=info.error)
        if info.state != JobState.FAILED or len(chain.ids) > 10:
            self.give_up(chain, f"job {info.id} ended {info.state.value} ({info.error}); not resubmitted again")
            return
        with self.quiet(f"job {info.id}'s resubmission"):
            try:
                new = self.once(lambda: self.client.resubmit(info.id).id, info.group,
                                lambda j: j.resumed_from == info.id)
            except JobConflict as e:  # its checkpoint cannot be read
                chain.fresh += 1
                self.log.write("resubmit_refused", id=info.id, why=str(e))
                new = self.submit_once(info.spec.model_copy(update={"name": f"{info.spec.name} again {chain.fresh}"}))
        chain.ids.append(new)
        self.log.write("resubmitted", old=info.id, new=new)

    # -- after the run ---------------------------------------------------------------------------------------
    def check(self, chain: Chain) -> list[str]:
        """Everything the service promises about one job of the sweep, across its resubmissions."""
        from polyak.contract.network import from_dict
        from polyak.service.engine.trace_file import read_trace

        infos = [self.call(self.client.get, job_id) for job_id in chain.ids]
        problems = [p for info in infos for p in one_line_problems(info)]
        for info in infos:
            problems += [f"job {info.id}: {p}" for p in history_problems(self.call(self.client.metrics, info.id))]
        final = infos[-1]
        if final.state != JobState.SUCCEEDED:
            return problems + [f"job {final.id} ended {final.state.value}: {final.error}"]
        spec, history = final.spec, self.call(self.client.metrics, final.id)
        W = from_dict(self.call(self.client.weights, final.id), spec.model.layers, np.float64)
        chain.evidence = {"spec": spec, "history": history, "W": W}
        if spec.cluster.mode == "sync":
            best = from_dict(self.call(self.client.weights, final.id, "best"), spec.model.layers, np.float64)
            chain.evidence["best_W"] = best
            return problems + sync_problems(history, W, best, self.reference(spec))
        trace = [r for job_id in chain.ids for r in read_trace(self.service.data_dir / "jobs" / job_id)]
        chain.evidence["trace"] = trace
        return problems + async_problems(spec, trace, history, W, self.dataset(spec))

    def reference(self, spec: JobSpec):
        """The same spec trained undisturbed in this process: a sync step over K shards is the exact step of (26),
        so it equals the in-process one to rounding (~1e-15 in float64)."""
        from polyak.service.engine.trainer import train_job

        local = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"num_workers": 0})})
        key = local.model_dump_json(exclude={"name", "group"})
        if key not in self.references:
            self.references[key] = train_job(local)
        return self.references[key]

    def dataset(self, spec: JobSpec):
        from polyak.workers.data import load_dataset

        key = spec.data.model_dump_json() + spec.model.model_dump_json()
        if key not in self.references:
            self.references[key] = load_dataset(spec.data, spec.model)
        return self.references[key]

    def actors_left(self, when: str, timeout: float = 60) -> list[str]:
        """Actor processes of the run still alive ``timeout`` seconds after every job ended (killed, reported)."""
        deadline = time.monotonic() + timeout
        while (left := [p for kind in TITLES for p in actor_processes(self.run_id, kind)]) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        found = [f"{when}: pid {p.pid} {title(p)[:60]} still alive after {timeout:.0f} s" for p in left]
        for p in left:
            _kill(p.pid)
        return found

    def orphans_left(self, grace: float = 180) -> list[str]:
        """The SIGKILLed services' processes still alive ``grace`` seconds after their service died (killed)."""
        found = []
        for p, killed in self.orphans:
            if wait_gone([p], max(0.0, killed + grace - time.monotonic())):
                found.append(f"pid {p.pid} {title(p)[:60]} of a SIGKILLed service alive {grace:.0f} s after it")
                _kill(p.pid)
        return found

    def shut_down(self) -> None:
        """SIGTERM the service, stop the cluster; then no process of the run may be left (killed, reported)."""
        self.service.stop()
        if self.cluster:
            self.cluster.stop()
        deadline = time.monotonic() + 60
        while (left := run_processes(self.run_id)) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.report.leftovers += [f"after shutdown: pid {p.pid} {title(p)[:60]} still alive after 60 s" for p in left]
        for p in left:
            _kill(p.pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def integrity(db: Path) -> str:
    """SQLite's own check of the store, after the service stopped: 'ok' or what it found."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
