"""Latency of the service's API under load: does it answer at once, the first POST included?

    python bench/bench_service.py            # 2,000 jobs in the store, 2 training, 10 SSE listeners
    python bench/bench_service.py --calls 100

A real `polyak serve` (subprocess, fresh data dir, --max-concurrent-jobs 2) over a store that already holds
2,000 finished jobs with 5 epochs of metrics each. The first POST /jobs submits a job that needs Ray, which
is not started yet (the service starts it in the background); a second one follows, and both train
(one Ray worker each) while 10 SSE listeners follow them. Then, interleaved, N calls each of POST /jobs
(in-process jobs, queued behind the two), GET /jobs (the default page of 100) and GET /jobs/{id}.
Printed: p50 / p99 / max in ms per call, and the first POST alone. Goal (issue 8): p99 < 100 ms for
every call, the first POST included.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polyak.contract.spec import parse_spec  # noqa: E402
from polyak.contract.wire import EpochMetrics  # noqa: E402
from polyak.service.server.job import FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord, new_job_id, utcnow  # noqa: E402
from polyak.service.server.store import Store  # noqa: E402

QUICK = {"model": {"layers": [4, 8, 3]}, "data": {"source": "sklearn", "name": "iris"},
         "stopping": {"max_epochs": 2}, "cluster": {"num_workers": 0}}
TRAINING = {"model": {"layers": [64, 32, 10]}, "data": {"source": "sklearn", "name": "digits"},
            "batch": {"size": 128}, "stopping": {"max_epochs": 100_000}, "cluster": {"num_workers": 1}}


def fill(data_dir: Path, jobs: int) -> None:
    """Finished jobs with a few epochs each, written straight into the store before the server starts."""
    store = Store(data_dir)
    spec = parse_spec(QUICK)
    for i in range(jobs):
        job = store.add(JobRecord(id=new_job_id(), spec=spec, state=QUEUED, created_at=utcnow()))
        store.transition(job.id, RUNNING)
        for epoch in range(1, 6):
            store.record_epoch(EpochMetrics(
                job_id=job.id, epoch=epoch, step=epoch * 5, samples_seen=epoch * 150, batch_size=32, lr=0.1,
                train_loss=1.0 / epoch, weight_norm=1.0, weight_change=0.1, grad_avg_norm=0.1, grad_noise=0.1,
                samples_per_second=1e5, elapsed_seconds=epoch * 0.01, criteria=[]))
        store.transition(job.id, SUCCEEDED if i % 10 else FAILED)
    store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listen(url: str, job_id: str, stop: threading.Event) -> None:
    with httpx.Client(timeout=None) as c, c.stream("GET", f"{url}/jobs/{job_id}/events") as r:
        for _ in r.iter_lines():
            if stop.is_set():
                return


def timed(call) -> float:
    t = time.perf_counter()
    r = call()
    elapsed = time.perf_counter() - t
    if r.status_code >= 400:
        raise RuntimeError(f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:300]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="finished jobs already in the store")
    parser.add_argument("--calls", type=int, default=200, help="calls of each kind")
    parser.add_argument("--listeners", type=int, default=10)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="polyak-bench-service-"))
    data_dir = folder / "data"
    t = time.perf_counter()
    fill(data_dir, args.jobs)
    print(f"store: {args.jobs:,} finished jobs, 5 epochs each ({time.perf_counter() - t:.0f} s)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (folder / "serve.log").open("w")
    env = {k: v for k, v in os.environ.items() if k != "POLYAK_TOKEN"}
    server = subprocess.Popen([sys.executable, "-m", "polyak", "serve", "--port", str(port), "--data-dir",
                               str(data_dir), "--max-concurrent-jobs", "2"], cwd=ROOT, env=env, stdout=log,
                              stderr=log)
    stop = threading.Event()
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start:\n" + (folder / "serve.log").read_text()[-2000:])
                time.sleep(0.2)
            first = timed(lambda: c.post("/jobs", json=TRAINING))  # needs Ray, which is not started yet
            timed(lambda: c.post("/jobs", json=TRAINING))
            training = [j["id"] for j in c.get("/jobs", params={"state": "queued"}).json()] or [
                j["id"] for j in c.get("/jobs", params={"state": "running"}).json()]
            listeners = [threading.Thread(target=listen, args=(url, training[i % len(training)], stop), daemon=True)
                         for i in range(args.listeners)]
            for thread in listeners:
                thread.start()
            deadline = time.monotonic() + 120
            while len(c.get("/jobs", params={"state": "running"}).json()) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("the two Ray jobs never ran:\n" + (folder / "serve.log").read_text()[-2000:])
                time.sleep(0.5)
            times: dict[str, list[float]] = {"POST /jobs": [], "GET /jobs": [], "GET /jobs/{id}": []}
            some_id = training[0]
            for _ in range(args.calls):
                times["POST /jobs"].append(timed(lambda: c.post("/jobs", json=QUICK)))
                times["GET /jobs"].append(timed(lambda: c.get("/jobs")))
                times["GET /jobs/{id}"].append(timed(lambda: c.get(f"/jobs/{some_id}")))
            running = len(c.get("/jobs", params={"state": "running"}).json())
            print(f"while {running} jobs train (one Ray worker each) and {args.listeners} SSE listeners follow them:")
            print(f"{'call':<16}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
            for name, xs in times.items():
                ms = np.array(xs) * 1e3
                print(f"{name:<16}{np.percentile(ms, 50):9.1f}{np.percentile(ms, 99):9.1f}{ms.max():9.1f}")
            print(f"{'first POST':<16}{first * 1e3:9.1f}   (a Ray job, before Ray had started)")
            for job in c.get("/jobs", params={"limit": 10_000}).json():
                if job["state"] in ("queued", "running"):
                    c.post(f"/jobs/{job['id']}/cancel")
    finally:
        stop.set()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    main()
