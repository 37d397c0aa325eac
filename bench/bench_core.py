"""Samples/s of the in-process training step against PyTorch on the CPU, same model, batch and threads.

    python bench/bench_core.py                 # all rows
    python bench/bench_core.py --quick         # shorter timings
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_core.py   # OpenBLAS picks its kernel

polyak: LocalEngine.step over random minibatches (gather the rows, MLP.loss_and_grad, ServerCore.apply:
mean, gradient statistics, the heavy-ball rule), exactly the in-process loop of the trainer.
torch:  nn.Sequential(Linear, ReLU, ..., Linear), CrossEntropyLoss, torch.optim.SGD(momentum=1-alpha,
        lr=alpha*eta), the same gathered rows, loss.item() per step (the trainer reads every step's loss).
float32, the spec's synthetic classification data (784 features, 10 classes), 1 and 2 threads
(threadpoolctl for NumPy's BLAS, torch.set_num_threads for torch).

Each framework runs in its own process: NumPy's OpenBLAS and torch's OpenMP both keep idle threads
spinning for a while after a call, and in one process, with 2 threads on 2 cores, they can steal each
other's cores (a first in-process version measured both many times slower at 2 threads). The parent
drives the two alternately: a warm-up, then several repeats, interleaved, alternating which goes first,
with a pause between them; the best repeat counts. The machine's CPU pressure is printed before and after:
other processes competing for the cores make the 2-thread rows noisy.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _frameworks import framework_info, side_by_side
from threadpoolctl import threadpool_limits

from polyak.contract.network import unflatten
from polyak.contract.spec import parse_spec
from polyak.service.engine.local_engine import LocalEngine
from polyak.service.engine.trainer import initial_weights
from polyak.workers.data import load_dataset, prepare

CASES = [([784, 256, 10], 128), ([784, 256, 10], 1024), ([784, 1024, 1024, 10], 1024)]
N_SAMPLES = 16384
ETA, ALPHA = 0.05, 0.1


def make_spec(layers, batch):
    return parse_spec(
        {
            "model": {"layers": layers, "seed": 0},
            "data": {"source": "synthetic", "name": "classification", "n_samples": N_SAMPLES, "n_features": 784,
                     "n_classes": 10},
            "optimizer": {"method": "heavy_ball", "lr": ETA, "alpha": ALPHA},
            "batch": {"size": batch},
            "cluster": {"num_workers": 0, "device": "cpu", "dtype": "float32"},
        }
    )


class PolyakLoop:
    def __init__(self, layers, batch, ds):
        spec = make_spec(layers, batch)
        # The engine loads the spec's data itself: the same rows as ds, which the torch loop is given.
        self.engine = LocalEngine(spec, prepare(spec.data, spec.model), initial_weights(spec))
        self.batch = batch

    def run(self, batches):
        for idx in batches:
            self.engine.step(idx)
        self.engine.end_epoch()  # drop the epoch's running sums, as the trainer does


class TorchLoop:
    def __init__(self, layers, batch, ds):
        import torch

        self.torch = torch
        mods = []
        W0 = initial_weights(make_spec(layers, batch))
        params = unflatten(W0, layers)
        for l, (Wl, bl) in enumerate(params):
            lin = torch.nn.Linear(Wl.shape[1], Wl.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(Wl))
                lin.bias.copy_(torch.from_numpy(bl))
            mods.append(lin)
            if l < len(params) - 1:
                mods.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*mods)
        self.loss = torch.nn.CrossEntropyLoss()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=ALPHA * ETA, momentum=1 - ALPHA, dampening=0)
        self.X = torch.from_numpy(ds.X_train.astype(np.float32))
        self.y = torch.from_numpy(ds.y_train)

    def run(self, batches):
        torch = self.torch
        for idx in batches:
            i = torch.from_numpy(idx)
            xb, yb = self.X[i], self.y[i]
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss(self.model(xb), yb)
            loss.backward()
            self.opt.step()
            loss.item()


def timed(loop, batches) -> float:
    t0 = time.perf_counter()
    loop.run(batches)
    return time.perf_counter() - t0


def worker(framework: str, conn) -> None:
    """One framework in its own process: ("setup", layers, batch, threads) -> step-time estimate;
    ("time", batches) -> seconds; ("info",) -> a description; None -> exit."""
    spec = make_spec([784, 10], None)
    ds = load_dataset(spec.data, spec.model)
    loop, limiter = None, None
    while (msg := conn.recv()) is not None:
        if msg[0] == "info":
            conn.send(framework_info(framework))
        elif msg[0] == "setup":
            _, layers, batch, threads = msg
            if limiter is not None:
                limiter.restore_original_limits()
            limiter = threadpool_limits(limits=threads, user_api="blas")
            if framework == "torch":
                import torch

                torch.set_num_threads(threads)
            loop = (TorchLoop if framework == "torch" else PolyakLoop)(layers, batch, ds)
            warm = [np.random.default_rng(2).choice(N_SAMPLES, batch, replace=False) for _ in range(5)]
            loop.run(warm)
            conn.send(min(timed(loop, [b]) for b in warm))
        elif msg[0] == "time":
            conn.send(timed(loop, msg[1]))


def cpu_pressure() -> str:
    """Linux PSI: the share of time some runnable task waited for a CPU (10 s and 60 s averages)."""
    try:
        with open("/proc/pressure/cpu") as f:
            fields = dict(kv.split("=") for kv in f.readline().split()[1:])
        return f"some avg10={fields['avg10']}% avg60={fields['avg60']}%"
    except (OSError, ValueError, KeyError):
        return f"load average {os.getloadavg()[0]:.2f}"


def bench_row(workers, layers, batch, threads, seconds: float, repeats: int, pause: float):
    est = {}
    for name, conn in workers.items():  # one at a time: the warm-up times each alone
        conn.send(("setup", layers, batch, threads))
        est[name] = conn.recv()
    steps = max(3, int(seconds / max(est.values())))
    rng = np.random.default_rng(1)
    batches = [rng.choice(N_SAMPLES, batch, replace=False) for _ in range(steps)]
    best = {name: float("inf") for name in workers}
    for r in range(repeats):
        order = list(workers) if r % 2 == 0 else list(workers)[::-1]  # interleaved, alternating first
        for name in order:
            time.sleep(pause)  # let the other process's spinning threads go to sleep
            workers[name].send(("time", batches))
            best[name] = min(best[name], workers[name].recv())
    return {name: steps * batch / t for name, t in best.items()}, steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--case", type=int, nargs="*", help="rows of CASES to run (0-based); default all")
    parser.add_argument("--repeats", type=int, help="timed repeats per framework and row (default 9, quick 3)")
    args = parser.parse_args()
    seconds, repeats, pause = (0.4, 3, 0.2) if args.quick else (0.6, 9, 0.3)
    repeats = args.repeats or repeats
    cases = [CASES[i] for i in args.case] if args.case else CASES

    with side_by_side(worker) as workers:
        header = (
            f"{'model':<18} {'batch':>6} {'thr':>4} {'steps':>6} {'polyak samples/s':>17} "
            f"{'torch samples/s':>16} {'ratio':>6}"
        )
        print(header)
        print("-" * len(header))
        print(f"CPU pressure before: {cpu_pressure()}")
        for layers, batch in cases:
            for threads in args.threads:
                res, steps = bench_row(workers, layers, batch, threads, seconds, repeats, pause)
                ratio = res["polyak"] / res["torch"]
                name = "-".join(map(str, layers))
                print(
                    f"{name:<18} {batch:>6} {threads:>4} {steps:>6} {res['polyak']:>17,.0f} "
                    f"{res['torch']:>16,.0f} {ratio:>6.2f}",
                    flush=True,
                )
        print(f"CPU pressure after: {cpu_pressure()} (competing processes skew the figures)")


if __name__ == "__main__":
    main()
