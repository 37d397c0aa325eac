"""Latency of the service's API under load, and whether every POST is stored exactly once.

    python bench/bench_service.py                 # 10,000 stored jobs, 2 training, 50 SSE listeners, 200-POST burst
    python bench/bench_service.py --jobs 2000 --listeners 10 --burst 50 --calls 100

A real `polyak serve` (a subprocess, as a user starts it; fresh data dir, --max-concurrent-jobs 2) over a store that
already holds --jobs jobs, seeded straight into its SQLite file with the service's own Store (through the API
every job would have to run): 95% finished (succeeded, failed or cancelled, with the epochs of a real digits run each:
losses, validation, criteria) and 5% queued digits jobs that need Ray, so the server starts Ray at once. Then:

1. two Ray jobs (digits, one worker each, priority 10 so they start first) are POSTed while Ray starts; the first
   POST's time is printed alone; --listeners SSE listeners follow them (half each) until the end;
2. burst: --burst POSTs at once, one thread and connection each, while one reader calls GET /jobs and
   GET /jobs/{id} in turn until the burst is answered;
3. steady: --calls calls of each kind, one at a time, interleaved: POST /jobs, GET /jobs (the default page of 100),
   GET /jobs/{id}.

Every POST carries a unique name. At the end the server is stopped and its store opened: each name must be there
exactly once, with the id its 201 answered (none missing, none twice). Printed: p50 / p99 / max in ms per call and
phase, the server process's CPU seconds (which a shared CPU's load does not inflate as it does latencies), the
events the listeners received, the exactly-once count and the load average. Goal (issue 22): p99 < 100 ms for
every call. Seeding 10,000 jobs takes about two minutes: --seed-cache DIR keeps the seeded store for the next runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polyak.contract.spec import parse_spec  # noqa: E402
from polyak.contract.wire import EpochMetrics, JobState, StopReason  # noqa: E402
from polyak.service.engine.trainer import train_job  # noqa: E402
from polyak.service.server.job import (  # noqa: E402
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    new_job_id,
    utcnow,
)
from polyak.service.server.store import Store  # noqa: E402

DIGITS = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
QUICK = {"model": {"layers": [4, 8, 3]}, "data": {"source": "sklearn", "name": "iris"},
         "stopping": {"max_epochs": 2}, "cluster": {"num_workers": 0}}
TRAINING = {"model": {"layers": [64, 32, 10]}, "data": {"source": "sklearn", "name": "digits"},
            "batch": {"size": 128}, "stopping": {"max_epochs": 100_000}, "cluster": {"num_workers": 1},
            "priority": 10}
CALLS = ("POST /jobs", "GET /jobs", "GET /jobs/{id}")


# -- the store, seeded -----------------------------------------------------------------------------------
def real_epochs(epochs: int) -> list[EpochMetrics]:
    """The epochs of a real digits run (in this process, no Ray): what a finished job's history holds."""
    spec = parse_spec({**DIGITS, "cluster": {"num_workers": 0}, "stopping": {"max_epochs": epochs}})
    return train_job(spec, "template").metrics


def seed(data_dir: Path, jobs: int, queued: int, epochs: list[EpochMetrics]) -> None:
    """``jobs`` jobs written with the Store the server uses: the newest ``queued`` of them queued digits jobs on Ray,
    the others finished with the real run's epochs (every 20th failed after 4, every 20th cancelled after 6)."""
    store = Store(data_dir)
    start = utcnow() - timedelta(minutes=jobs)
    for i in range(jobs):
        spec = parse_spec({**DIGITS, "name": f"seed-{i:05d}", "group": f"sweep-{i // 20:03d}"})
        job = store.add(JobRecord(id=new_job_id(), spec=spec, state=QUEUED, created_at=start + timedelta(minutes=i)))
        if i >= jobs - queued:
            continue
        store.transition(job.id, RUNNING)
        ending = _ending(i, epochs)
        for m in epochs[:ending[0]]:
            store.record_epoch(m.model_copy(update={"job_id": job.id}))
        store.transition(job.id, ending[1], stop_reason=ending[2], error=ending[3])
    store.close()


def _ending(i: int, epochs: list[EpochMetrics]) -> tuple[int, JobState, StopReason, str | None]:
    """(epochs kept, final state, stop reason, error) of the i-th seeded finished job."""
    if i % 20 == 0:
        return 4, FAILED, StopReason.DIVERGED, ("diverged at epoch 5, step 97: the loss became non-finite "
                                                "(try a smaller optimizer.lr)")
    if i % 20 == 1:
        return 6, CANCELLED, StopReason.CANCELLED, None
    return len(epochs), SUCCEEDED, epochs[-1].stop or StopReason.MAX_EPOCHS, None


# -- the server ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "POLYAK_TOKEN"}
    with log_path.open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "polyak", "serve", "--port", str(port), "--data-dir",
                                 str(data_dir), "--max-concurrent-jobs", "2"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def wait_until(what: str, ready, seconds: float, log_path: Path) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}:\n" + log_path.read_text()[-3000:])
        time.sleep(0.2)


def healthy(c: httpx.Client) -> bool:
    try:
        return c.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(90)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# -- the clients -----------------------------------------------------------------------------------------
class Ledger:
    """Every POST's unique name and the id its 201 answered (None: no 201), from any thread."""

    def __init__(self) -> None:
        self.ids: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def post(self, c: httpx.Client, name: str, group: str, spec: dict) -> tuple[float, httpx.Response]:
        t = time.perf_counter()
        r = c.post("/jobs", json={**spec, "name": name, "group": group})
        elapsed = time.perf_counter() - t
        with self._lock:
            self.ids[name] = r.json()["id"] if r.status_code == 201 else None
        return elapsed, r


def ok(elapsed_and_response: tuple[float, httpx.Response]) -> float:
    elapsed, r = elapsed_and_response
    if r.status_code >= 400:
        raise RuntimeError(f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:300]}")
    return elapsed


def timed(call) -> tuple[float, httpx.Response]:
    t = time.perf_counter()
    r = call()
    return time.perf_counter() - t, r


def listen(url: str, job_id: str, stop: threading.Event, received: Counter) -> None:
    """Follow a job's event stream, counting its events by kind, until ``stop``."""
    try:
        with httpx.Client(timeout=None) as c, c.stream("GET", f"{url}/jobs/{job_id}/events") as r:
            received["open" if r.status_code == 200 else f"status {r.status_code}"] += 1
            for line in r.iter_lines():
                if line.startswith("event: "):
                    received[line[7:]] += 1
                if stop.is_set():
                    return
    except httpx.TransportError:  # the server went away at the end
        pass


def burst(url: str, posts: int, ledger: Ledger, some_id: str) -> dict[str, list[float]]:
    """``posts`` POSTs at once, each from its own thread and connection, while one reader GETs until they are
    answered; the latencies of each call."""
    times: dict[str, list[float]] = {name: [] for name in CALLS}
    gate, done = threading.Barrier(posts + 1), threading.Event()

    def post(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            gate.wait()
            times["POST /jobs"].append(ok(ledger.post(c, f"burst-{i:04d}", "bench-burst", QUICK)))

    def read() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:  # one round at least: a short burst may be over before the first
                times["GET /jobs"].append(ok(timed(lambda: c.get("/jobs"))))
                times["GET /jobs/{id}"].append(ok(timed(lambda: c.get(f"/jobs/{some_id}"))))
                if done.is_set():
                    return

    threads = [threading.Thread(target=post, args=(i,)) for i in range(posts)]
    for thread in threads:
        thread.start()
    reader = threading.Thread(target=read)
    gate.wait()
    t = time.perf_counter()
    reader.start()
    for thread in threads:
        thread.join()
    times["wall"] = [time.perf_counter() - t]
    done.set()
    reader.join()
    return times


def steady(c: httpx.Client, calls: int, ledger: Ledger, some_id: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in CALLS}
    for i in range(calls):
        times["POST /jobs"].append(ok(ledger.post(c, f"steady-{i:04d}", "bench-steady", QUICK)))
        times["GET /jobs"].append(ok(timed(lambda: c.get("/jobs"))))
        times["GET /jobs/{id}"].append(ok(timed(lambda: c.get(f"/jobs/{some_id}"))))
    return times


def table(title: str, times: dict[str, list[float]]) -> None:
    print(title)
    print(f"  {'call':<16}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for name in CALLS:
        ms = np.array(times[name]) * 1e3
        print(f"  {name:<16}{len(ms):7d}{np.percentile(ms, 50):9.1f}{np.percentile(ms, 99):9.1f}{ms.max():9.1f}")


# -- exactly once ----------------------------------------------------------------------------------------
def stored_once(data_dir: Path, ledger: Ledger, groups: tuple[str, ...]) -> str:
    """Every POST's name in the stopped server's store exactly once, with the id its 201 answered; else an error
    naming what is missing, twice, or different."""
    store = Store(data_dir)
    try:
        stored = [j for group in groups for j in store.jobs(group=group)]
    finally:
        store.close()
    by_name = Counter(j.name for j in stored)
    twice = sorted(name for name, n in by_name.items() if n > 1)
    missing = sorted(set(ledger.ids) - set(by_name))
    unexpected = sorted(set(by_name) - set(ledger.ids))
    refused = sorted(name for name, job_id in ledger.ids.items() if job_id is None)
    wrong = sorted(j.name for j in stored if ledger.ids.get(j.name) not in (None, j.id))
    problems = {"stored twice": twice, "missing": missing, "not posted": unexpected, "not answered 201": refused,
                "id differs from its 201": wrong}
    if any(problems.values()):
        raise RuntimeError("; ".join(f"{k}: {v[:10]}" for k, v in problems.items() if v))
    return f"exactly once: {len(ledger.ids)} POSTs answered 201, each name stored once with its id (none missing)"


# -- the run ---------------------------------------------------------------------------------------------
def start_training(c: httpx.Client, ledger: Ledger, log_path: Path) -> tuple[list[str], float]:
    """The two Ray jobs, POSTed while Ray starts; returns their ids once both train, and the first POST's time."""
    first = ok(ledger.post(c, "training-0", "bench-training", TRAINING))
    ok(ledger.post(c, "training-1", "bench-training", TRAINING))
    training = [ledger.ids["training-0"], ledger.ids["training-1"]]

    def both_train() -> bool:  # running, and past their first epoch: their workers are up
        running = c.get("/jobs", params={"state": "running"}).json()
        return {j["id"] for j in running if j["epoch"]} == set(training)

    wait_until("the two Ray jobs never both trained", both_train, 300, log_path)
    return training, first


class ServerCpu:
    """The server process's CPU seconds (user + system; its Ray workers are other processes): figures that the
    shared CPU's load does not inflate as it does latencies."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)

    def seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def during(self, run) -> tuple[object, float, float]:
        """``run()``'s result, and the CPU and wall seconds it took."""
        cpu, wall = self.seconds(), time.perf_counter()
        result = run()
        return result, self.seconds() - cpu, time.perf_counter() - wall


def measure(url: str, server: ServerCpu, args: argparse.Namespace, log_path: Path) -> Ledger:
    ledger, stop, received = Ledger(), threading.Event(), Counter()
    with httpx.Client(base_url=url, timeout=120) as c:
        wait_until("the server did not start", lambda: healthy(c), 120, log_path)
        training, first = start_training(c, ledger, log_path)
        for i in range(args.listeners):
            threading.Thread(target=listen, args=(url, training[i % 2], stop, received), daemon=True).start()
        wait_until("the listeners did not all connect", lambda: received["open"] == args.listeners, 60, log_path)
        print(f"first POST: {first * 1e3:.1f} ms (a Ray job, while the server starts Ray)")
        load = os.getloadavg()
        _, quiet, wall = server.during(lambda: time.sleep(10))
        rate = quiet / wall  # the jobs' threads and the listeners, with no call
        times, burst_cpu, _ = server.during(lambda: burst(url, args.burst, ledger, training[0]))
        table(f"burst: {args.burst} POSTs at once, answered in {times['wall'][0]:.2f} s (server CPU "
              f"{burst_cpu:.2f} s); one reader GETs meanwhile:", times)
        times, steady_cpu, wall = server.during(lambda: steady(c, args.calls, ledger, training[0]))
        table(f"steady: one call at a time, {args.calls} of each kind, interleaved (server CPU "
              f"{(steady_cpu - rate * wall) / (3 * args.calls) * 1e3:.1f} ms a call above its rate without calls):",
              times)
        running = len(c.get("/jobs", params={"state": "running"}).json())
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(received.items()) if kind != "open")
        print(f"meanwhile {running} Ray jobs trained and {received['open']} SSE listeners received {counts}; without "
              f"calls the server process used {rate:.0%} of a CPU")
        load = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(load, os.getloadavg(), strict=True))
        print(f"load average (1, 5, 15 min) before/after the calls: {load} on {os.cpu_count()} CPUs")
    stop.set()
    return ledger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs already in the store")
    parser.add_argument("--queued", type=float, default=0.05, help="the fraction of them queued")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each finished job's history")
    parser.add_argument("--burst", type=int, default=200, help="POSTs at once")
    parser.add_argument("--calls", type=int, default=200, help="steady calls of each kind")
    parser.add_argument("--listeners", type=int, default=50)
    parser.add_argument("--seed-cache", type=Path, help="keep the seeded store in this folder and reuse it")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="polyak-bench-service-"))
    data_dir, log_path = folder / "data", folder / "serve.log"
    try:
        seeded(data_dir, args)
        port = free_port()
        server = start_server(data_dir, port, log_path)
        try:
            ledger = measure(f"http://127.0.0.1:{port}", ServerCpu(server.pid), args, log_path)
        except Exception:
            print("the server's log ends:\n" + log_path.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            stop_server(server)
        print(stored_once(data_dir, ledger, ("bench-training", "bench-burst", "bench-steady")))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def seeded(data_dir: Path, args: argparse.Namespace) -> None:
    """The seeded store in ``data_dir``: seeded now, or copied from --seed-cache (seeded there first if new)."""
    queued = round(args.jobs * args.queued)
    cache = args.seed_cache / f"jobs{args.jobs}-queued{queued}-epochs{args.epochs}" if args.seed_cache else None
    t = time.perf_counter()
    if cache is None or not (cache / "polyak.db").is_file():
        seed(cache or data_dir, args.jobs, queued, real_epochs(args.epochs))
    if cache is not None:
        shutil.copytree(cache, data_dir)
    print(f"store: {args.jobs:,} jobs seeded through Store ({args.jobs - queued:,} finished with {args.epochs} "
          f"epochs of a real digits run, {queued:,} queued on Ray) in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
