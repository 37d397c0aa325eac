"""Throughput of the Ray runtime against the in-process loop on the same cores, measured side by side.

    python bench/bench_ray.py              # every row on a local Ray (2 CPUs), then the two-node rows
    python bench/bench_ray.py --quick      # fewer steps
    python bench/bench_ray.py --no-two-nodes
    python bench/bench_ray.py --quick --case 784-256-10:1024   # one model and batch size only

Rows, for 784-256-10 at n'=128 and 1024 and 784-1024-1024-10 at n'=1024 (synthetic, float32):
- in-process 1 thread: the baseline of the K=1 row (one worker computes on one core);
- in-process 2 threads: the baseline of every K=2 row (two workers use two cores: a ratio against one
  thread would count the second core as Ray's speed-up);
- ray sync K=1 / K=2 over the compiled graph, ray sync K=2 over the step channel on the same node (the
  cross-node path's code over loopback: worker 1 leads, worker 2 follows), ray async K=2;
- two nodes: ray sync K=2 on a real two-raylet cluster on this machine (head 1 CPU, second node 2 CPUs, so
  one worker on each, each its node's leader), the step channel, against the single-node compiled row of the
  same spec.

Every row runs two epochs of the same steps and reports the second: the first warms up (Ray's workers,
the compiled graph's channels, BLAS). Every figure of a step comes from wall-clock timestamps taken inside
the actors (each gradient call's start and end in the workers, each update's in the server): a sync step
runs from one update's end to the next, along the worker whose gradient came in last; an async step is a
worker's, from one gradient call's start to its next. compute is the gradient call, update the server's
update, comm the time between them on that path (W and gradients travelling, scheduling, waiting for the
other worker's update): measured, not a remainder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polyak.contract.spec import parse_spec  # noqa: E402
from polyak.service.engine.trainer import Hooks, initial_weights, make_engine, run  # noqa: E402
from polyak.workers.data import prepare  # noqa: E402

CASES = [([784, 256, 10], 128, 300), ([784, 256, 10], 1024, 60), ([784, 1024, 1024, 10], 1024, 30)]
# (label, workers, mode, sync path, in-process BLAS threads)
ROWS = [
    ("in-process 1 thread", 0, "sync", None, 1),
    ("ray sync K=1", 1, "sync", "compiled", None),
    ("in-process 2 threads", 0, "sync", None, 2),
    ("ray sync K=2", 2, "sync", "compiled", None),
    ("ray sync K=2 channel", 2, "sync", "channel", None),
    ("ray async K=2", 2, "async", None, None),
]


def spec_for(layers, batch: int, steps: int, workers: int, mode: str):
    """Two epochs of ``steps`` steps each: the data holds exactly steps x n' training rows."""
    return parse_spec({
        "model": {"layers": layers, "seed": 0},
        "data": {"source": "synthetic", "name": "classification", "n_samples": steps * batch, "n_features": 784,
                 "n_classes": 10},
        "optimizer": {"method": "heavy_ball", "lr": 0.05, "alpha": 0.1},
        "batch": {"size": batch},
        "stopping": {"max_epochs": 2},
        "cluster": {"num_workers": workers, "mode": mode, "device": "cpu", "dtype": "float32"},
    })


def measure(spec, sync_path: str | None = None, sync_split_of=None) -> dict:
    """The second epoch's samples/s and the per-step split from the actors' own timestamps (a sync step's by
    ``sync_split_of``, sync_split when not given)."""
    import ray

    from polyak.service.engine.sync_engine import SyncRayEngine

    info = prepare(spec.data, spec.model)
    W0 = initial_weights(spec)
    engine = (SyncRayEngine(spec, info, W0, sync_path=sync_path) if sync_path
              else make_engine(spec, info, W0))
    seen, timings = [], {}

    def on_epoch(m):
        seen.append(m)
        if spec.cluster.num_workers:
            timings["workers"] = ray.get([w.take_timings.remote() for w in engine.workers])
            timings["server"] = last_shard(ray.get([server.take_timings.remote() for server in engine.servers]))

    try:
        run(spec, info, engine, "bench", Hooks(on_epoch=on_epoch))
        where = engine.describe()
    finally:
        engine.close()
    m = seen[-1]
    out = {"rate": m.samples_per_second, "where": where}
    if spec.cluster.num_workers == 0:
        return out | {"step": m.batch_size / m.samples_per_second, "compute": None, "comm": None, "update": None}
    split = (sync_split_of or sync_split) if spec.cluster.mode == "sync" else async_split
    return out | dict(zip(("step", "compute", "comm", "update"), split(timings["workers"], timings["server"]),
                          strict=True))


def last_shard(per_shard: list[list[tuple]]) -> list[tuple]:
    """The S shards' update spans (key, start, end) as one server's: of the S spans of a step (in async, of a
    worker's push: spans pair up key by key, in order), the one that ended last, whose end the step waited for."""
    if len(per_shard) == 1:
        return per_shard[0]
    keys = dict.fromkeys(key for spans in per_shard for key, _, _ in spans)  # None for sync, a worker's shard else
    merged = []
    for key in keys:
        columns = [[span for span in spans if span[0] == key] for spans in per_shard]
        if len({len(c) for c in columns}) > 1:
            raise ValueError(f"the shards timed different numbers of updates for {key}: {[len(c) for c in columns]}")
        merged += [max(spans, key=lambda span: span[2]) for spans in zip(*columns, strict=True)]
    return merged


def sync_split(workers: list[list], server: list) -> tuple[float, ...]:
    """Mean (step, compute, comm, update) seconds over the epoch's steps after its first, from timestamps.

    A step runs from the end of one update to the end of the next; along its critical path, the worker whose
    gradient came in last: W reaching it (comm), its gradient call (compute), the sum reaching the server
    (comm), the update. The parts add up to the step by construction; none is a remainder."""
    updates = [(start, end) for _, start, end in server]
    assert all(len(calls) == len(updates) for calls in workers), "one gradient call per worker and step"
    parts = []
    for i in range(1, len(updates)):
        begin, (u_start, u_end) = updates[i - 1][1], updates[i]
        c_start, c_end = max((calls[i] for calls in workers), key=lambda span: span[1])
        parts.append((u_end - begin, c_end - c_start, (c_start - begin) + (u_start - c_end), u_end - u_start))
    return tuple(np.mean(parts, axis=0))


def async_split(workers: list[list], server: list) -> tuple[float, ...]:
    """Mean (step, compute, comm, update) seconds of a worker's step, from timestamps.

    A worker's step runs from the start of one gradient call to the start of its next: the call (compute),
    the push reaching the server and waiting its turn (comm), the update (or none for a push turned away),
    the answer and W reaching the worker again (comm). Pushes pair with gradient calls one to one."""
    parts = []
    for shard, calls in enumerate(workers):
        pushes = [(start, end) for s, start, end in server if s == shard]
        assert len(pushes) == len(calls), f"worker {shard}: one push per gradient call"
        for (c_start, c_end), (p_start, p_end), (next_start, _) in zip(calls, pushes, calls[1:], strict=False):
            parts.append((next_start - c_start, c_end - c_start, (p_start - c_end) + (next_start - p_end),
                          p_end - p_start))
    return tuple(np.mean(parts, axis=0))

def line(model: str, batch: int, label: str, r: dict, baseline: float) -> str:
    ms = lambda x: f"{x * 1e3:8.2f}" if x is not None else f"{'-':>8}"  # noqa: E731
    return (f"{model:<18}{batch:>6}  {label:<22}{r['rate']:>11,.0f}{r['rate'] / baseline:>7.2f}x"
            f"{ms(r['step'])}{ms(r['compute'])}{ms(r['comm'])}{ms(r['update'])}")


HEADER = (f"{'model':<18}{'n_':>6}  {'row':<22}{'samples/s':>11}{'ratio':>8}{'step ms':>8}{'compute':>8}"
          f"{'comm':>8}{'update':>8}")


# -- a two-raylet cluster on this machine -------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def two_raylet_cluster(prefix: str):
    """(address, env) of a throw-away two-raylet cluster on this machine (head 1 CPU, a second raylet 2 CPUs: a
    two-worker job puts one worker on each), stopped again on the way out."""
    temp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    port, ray_bin = _free_port(), str(Path(sys.executable).parent / "ray")
    common = ["--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1", "--num-gpus", "0"]
    procs = []
    try:
        for args in (["--head", "--port", str(port), "--include-dashboard", "false", "--num-cpus", "1",
                      "--temp-dir", str(temp)],
                     ["--address", f"127.0.0.1:{port}", "--num-cpus", "2"]):
            procs.append(subprocess.Popen([ray_bin, "start", *args, *common], env=env, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(8)
        yield f"127.0.0.1:{port}", env
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def two_node_rows(cases, single_node: dict) -> None:
    with two_raylet_cluster("polyak-bench-") as (address, env):
        for layers, batch, steps in cases:
            out = subprocess.run([sys.executable, __file__, "--driver", address, json.dumps([layers, batch, steps])],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                print(f"two-node row failed:\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            model = "-".join(map(str, layers))
            base = single_node[(model, batch)]
            print(line(model, batch, "two nodes sync K=2", r, base["rate"]) + "   (ratio: vs ray sync K=2 on one node)")
            print(f"{'':26}comm a step: {r['comm'] * 1e3:.2f} ms across nodes, "
                  f"{base['comm'] * 1e3:.2f} ms compiled on one node; "
                  f"{r['where'].split('; sync steps over ')[-1]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a third of the steps")
    parser.add_argument("--no-two-nodes", action="store_true", help="skip the rows on a two-raylet cluster")
    parser.add_argument("--case", metavar="MODEL:BATCH", help="only this case, e.g. 784-256-10:1024")
    parser.add_argument("--driver", nargs=2, metavar=("ADDRESS", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from polyak.service.engine.placement import connect

    if args.driver:  # one two-node row, in a driver joined to that cluster
        connect(args.driver[0])
        layers, batch, steps = json.loads(args.driver[1])
        print(json.dumps(measure(spec_for(layers, batch, steps, 2, "sync"))))
        return
    cases = [(layers, batch, max(steps // 3, 8) if args.quick else steps) for layers, batch, steps in CASES
             if args.case in (None, f"{'-'.join(map(str, layers))}:{batch}")]
    connect(None, num_cpus=2)
    print(HEADER)
    single_node = {}
    for layers, batch, steps in cases:
        model = "-".join(map(str, layers))
        baseline = None
        for label, workers, mode, path, threads in ROWS:
            spec = spec_for(layers, batch, steps, workers, mode)
            if threads:
                with threadpool_limits(threads):
                    r = measure(spec)
                baseline = r["rate"]
            else:
                r = measure(spec, path)
            if label == "ray sync K=2":
                single_node[(model, batch)] = r
            print(line(model, batch, label, r, baseline), flush=True)
    if not args.no_two_nodes:
        import ray

        ray.shutdown()
        two_node_rows(cases, single_node)


if __name__ == "__main__":
    main()
