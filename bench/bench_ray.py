"""Throughput of the Ray runtime against the in-process loop, measured side by side in one run.

    python bench/bench_ray.py            # all rows (a few minutes on 2 cores)
    python bench/bench_ray.py --quick    # fewer steps

Rows: in-process (1 BLAS thread, the compute one worker gets), Ray sync K=1, Ray sync K=2, Ray async K=2,
for 784-256-10 at n'=128 and 1024 and 784-1024-1024-10 at n'=1024, synthetic 60k samples, float32.
samples/s come from the trainer's own epoch metrics (steps only, no start-up). The per-step split:
compute and update are timed in this process on the same shapes (one worker's share of the batch);
communication is what remains of the measured step time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from client.spec import parse_spec
from service.engine.ps_core import ServerCore
from service.engine.ray_engine import connect
from service.engine.trainer import Hooks, initial_weights, make_engine, run
from workers.data import load_dataset
from workers.mlp import MLP

CASES = [([784, 256, 10], 128, 300), ([784, 256, 10], 1024, 60), ([784, 1024, 1024, 10], 1024, 40)]
ROWS = [
    ("in-process", 0, "sync"),
    ("ray sync K=1", 1, "sync"),
    ("ray sync K=2", 2, "sync"),
    ("ray async K=2", 2, "async"),
]


def spec_for(layers, batch, steps, workers, mode):
    return parse_spec({
        "model": {"layers": layers, "seed": 0},
        "data": {"source": "synthetic", "name": "classification", "n_samples": 60000, "n_features": 784,
                 "n_classes": 10},
        "optimizer": {"method": "heavy_ball", "lr": 0.05, "alpha": 0.1},
        "batch": {"size": batch},
        "stopping": {"max_steps": steps, "max_epochs": 1},
        "cluster": {"num_workers": workers, "mode": mode, "device": "cpu", "dtype": "float32"},
    })


def throughput(spec, dataset) -> float:
    engine = make_engine(spec, dataset, initial_weights(spec))
    seen = []
    try:
        run(spec, dataset, engine, "bench", Hooks(on_epoch=seen.append))
    finally:
        engine.close()
    return seen[-1].samples_per_second


def split(spec, dataset, workers: int) -> tuple[float, float]:
    """(compute, update) seconds of one step, timed here on one worker's share of the batch."""
    layers, batch = spec.model.layers, spec.batch.size
    mlp = MLP(layers, "relu", "cross_entropy", np, np.float32)
    W = initial_weights(spec)
    rows = batch // max(workers, 1)
    X, y = dataset.X_train[:rows].astype(np.float32), dataset.y_train[:rows]
    core = ServerCore(spec, W)
    g, loss, n = mlp.loss_and_grad(W, X, y)
    reps = 5
    with threadpool_limits(1):
        t0 = time.perf_counter()
        for _ in range(reps):
            mlp.loss_and_grad(W, X, y)
        t1 = time.perf_counter()
        for _ in range(reps):
            core.apply_parts([(g, loss, n)] * max(workers, 1))
        t2 = time.perf_counter()
    return (t1 - t0) / reps, (t2 - t1) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a third of the steps")
    args = parser.parse_args()
    connect(None, num_cpus=2)
    print(f"{'model':<18}{'n_':>6}  {'row':<15}{'samples/s':>11}{'ratio':>8}"
          f"{'step ms':>9}{'compute':>9}{'comm':>8}{'update':>8}")
    for layers, batch, steps in CASES:
        steps = max(steps // 3, 4) if args.quick else steps
        base = spec_for(layers, batch, steps, 0, "sync")
        dataset = load_dataset(base.data, base.model)
        baseline = None
        for name, workers, mode in ROWS:
            spec = spec_for(layers, batch, steps, workers, mode)
            if workers == 0:
                with threadpool_limits(1):
                    rate = throughput(spec, dataset)
                baseline = rate
            else:
                rate = throughput(spec, dataset)
            compute, update = split(spec, dataset, workers)
            step = batch / rate if mode == "sync" else batch / rate * workers  # async: each worker steps alone
            comm = max(step - compute - update, 0.0)
            model = "-".join(map(str, layers))
            print(f"{model:<18}{batch:>6}  {name:<15}{rate:>11,.0f}{rate / baseline:>7.2f}x"
                  f"{step * 1e3:>9.2f}{compute * 1e3:>9.2f}{comm * 1e3:>8.2f}{update * 1e3:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
