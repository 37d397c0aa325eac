"""Rows/s of Model.predict (class ids from raw features) against torch on the same model, same threads.

    python bench/bench_predict.py              # 200k rows, 1 and 2 threads, standardized and raw models
    python bench/bench_predict.py --quick      # fewer repeats

The model: 784-256-10, relu, cross_entropy, seeded random weights; "standardized" carries x_mean/x_std (a
job with data.standardize: true), "raw" does not. polyak: ``Model(..., dtype=np.float32).predict(X)``.
torch: ``model.to_torch().float()``, the same weights (and Standardize module), ``net(X).argmax(1)`` under
``torch.inference_mode()``, two ways: the whole input in one call (what a torch user writes), and in
batches of polyak's chunk size (2674 rows); the ratio is against the faster of the two.
float32, 200,000 random rows of 784 features; 1 and 2 threads (threadpoolctl for NumPy's BLAS,
torch.set_num_threads for torch).

As in bench_core.py, each framework runs in its own process (idle BLAS/OpenMP threads spin and would steal
each other's cores), the parent alternates them (a warm-up, then interleaved repeats, alternating which goes
first, with a pause between), and the best repeat counts. The two must agree on the predicted classes.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _frameworks import framework_info, side_by_side
from threadpoolctl import threadpool_limits

from polyak.client.model import Model

LAYERS = (784, 256, 10)
N_ROWS = 200_000


def make_model(standardized: bool) -> Model:
    rng = np.random.default_rng(0)
    weights = {}
    for l, (m_in, m_out) in enumerate(zip(LAYERS[:-1], LAYERS[1:], strict=True), start=1):
        weights[f"W{l}"] = (rng.standard_normal((m_out, m_in)) * np.sqrt(2 / m_in)).astype(np.float32)
        weights[f"b{l}"] = (rng.standard_normal(m_out) * 0.1).astype(np.float32)
    mean = rng.uniform(0, 100, LAYERS[0]) if standardized else None
    std = rng.uniform(1, 30, LAYERS[0]) if standardized else None
    return Model(weights, "relu", "cross_entropy", mean, std, dtype=np.float32)


def make_rows(standardized: bool) -> np.ndarray:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((N_ROWS, LAYERS[0]), dtype=np.float32)
    if standardized:  # raw features around the model's statistics
        m = make_model(True)
        X = X * m.x_std.astype(np.float32) + m.x_mean.astype(np.float32)
    return X


def worker(framework: str, conn) -> None:
    """One framework in its own process: ("setup", standardized, threads) -> predictions;
    ("time",) -> {variant: seconds}; ("info",) -> a description; None -> exit."""
    limiter, run = None, None
    while (msg := conn.recv()) is not None:
        if msg[0] == "info":
            conn.send(framework_info(framework))
        elif msg[0] == "setup":
            _, standardized, threads = msg
            if limiter is not None:
                limiter.restore_original_limits()
            limiter = threadpool_limits(limits=threads, user_api="blas")
            model, X = make_model(standardized), make_rows(standardized)
            if framework == "torch":
                import torch

                torch.set_num_threads(threads)
                net = model.to_torch().float()
                Xt = torch.from_numpy(X)
                rows = model._rows_per_chunk()

                def one_call(net=net, Xt=Xt):
                    with torch.inference_mode():
                        return net(Xt).argmax(dim=1).numpy()

                def batched(net=net, Xt=Xt, rows=rows):
                    with torch.inference_mode():
                        return torch.cat([net(Xt[i : i + rows]).argmax(dim=1) for i in range(0, len(Xt), rows)]).numpy()

                run = {"torch one call": one_call, "torch batched": batched}
            else:
                run = {"polyak": lambda model=model, X=X: model.predict(X)}
            preds = {name: f() for name, f in run.items()}  # also the warm-up
            conn.send(preds)
        elif msg[0] == "time":
            out = {}
            for name, f in run.items():
                t0 = time.perf_counter()
                f()
                out[name] = time.perf_counter() - t0
            conn.send(out)


def cpu_pressure() -> str:
    """Linux PSI: the share of time some runnable task waited for a CPU (10 s and 60 s averages)."""
    try:
        with open("/proc/pressure/cpu") as f:
            fields = dict(kv.split("=") for kv in f.readline().split()[1:])
        return f"some avg10={fields['avg10']}% avg60={fields['avg60']}%"
    except (OSError, ValueError, KeyError):
        return f"load average {os.getloadavg()[0]:.2f}"


def bench_row(workers, standardized: bool, threads: int, repeats: int, pause: float) -> dict[str, float]:
    preds = {}
    for conn in workers.values():
        conn.send(("setup", standardized, threads))
        preds.update(conn.recv())
    ref = preds["polyak"]
    for name, p in preds.items():
        agree = float(np.mean(p == ref))
        if agree < 0.999:
            raise SystemExit(f"{name} and polyak disagree on {1 - agree:.2%} of the predicted classes")
    best: dict[str, float] = {}
    for r in range(repeats):
        order = list(workers) if r % 2 == 0 else list(workers)[::-1]  # interleaved, alternating first
        for name in order:
            time.sleep(pause)  # let the other process's spinning threads go to sleep
            workers[name].send(("time",))
            for variant, t in workers[name].recv().items():
                best[variant] = min(best.get(variant, float("inf")), t)
    return {variant: N_ROWS / t for variant, t in best.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--repeats", type=int, help="timed repeats per framework and row (default 7, quick 3)")
    args = parser.parse_args()
    repeats, pause = (3, 0.2) if args.quick else (7, 0.3)
    repeats = args.repeats or repeats

    with side_by_side(worker) as workers:
        print(f"model {'-'.join(map(str, LAYERS))} relu, float32, {N_ROWS:,} rows, best of {repeats}")
        header = (
            f"{'inputs':<13} {'thr':>4} {'polyak rows/s':>14} {'torch 1 call':>13} {'torch batched':>14} {'ratio':>6}"
        )
        print(header)
        print("-" * len(header))
        print(f"CPU pressure before: {cpu_pressure()}")
        for standardized in (True, False):
            for threads in args.threads:
                res = bench_row(workers, standardized, threads, repeats, pause)
                torch_best = max(res["torch one call"], res["torch batched"])
                print(
                    f"{'standardized' if standardized else 'raw':<13} {threads:>4} {res['polyak']:>14,.0f} "
                    f"{res['torch one call']:>13,.0f} {res['torch batched']:>14,.0f} "
                    f"{res['polyak'] / torch_best:>5.2f}x",
                    flush=True,
                )
        print(f"CPU pressure after: {cpu_pressure()} (competing processes skew the figures)")
        print("ratio: polyak rows/s over the faster torch variant")


if __name__ == "__main__":
    main()
