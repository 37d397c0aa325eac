"""The CuPy path on a GPU, without Ray: the worker's gradient call checked and timed on the device.

    python bench/gpu_check.py            # on a machine with CUDA, CuPy and PyTorch

1. Correctness, float64: the gradient call of workers/gradient_worker.py (W from the host, rows
   gathered on the device, MLP.loss_and_grad, the sum back to the host) on CuPy against the same code
   on NumPy and against PyTorch autograd on CUDA (a second implementation), for every activation and
   loss. Printed as the largest relative difference.
2. Speed, float32: samples/s of that call at the benchmark sizes of bench/bench_core.py, CuPy against
   NumPy on all of the host's cores (the baseline) and against PyTorch on the same GPU doing the same
   call. Each runs 5 warm-up calls, then the best of 5 repeats of 20 calls, in this one process.
"""

from __future__ import annotations

import itertools
import os
import time

import cupy as cp
import numpy as np
import torch

from polyak.contract.network import unflatten
from polyak.workers.backend import get_backend, to_numpy
from polyak.workers.mlp import MLP, init_params

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
SIZES = [([784, 256, 10], 128), ([784, 256, 10], 1024), ([784, 1024, 1024, 10], 1024), ([784, 2048, 2048, 10], 2048)]
N_ROWS = 16384


def worker_call(mlp: MLP, xp, X, Y, W_host: np.ndarray, rows: np.ndarray):
    """What GradientWorker.gradient does: the host's W and rows in, the gradient sum out on the host."""
    idx = xp.asarray(rows)
    g, loss, count = mlp.loss_and_grad(xp.asarray(W_host), X[idx], Y[idx])
    return to_numpy(g), loss, count


def torch_call(layers, activation, loss, X, Y, W_host: np.ndarray, rows: np.ndarray):
    """The same call in PyTorch on CUDA: summed loss, autograd, the flat gradient back on the host."""
    W = torch.tensor(W_host, device="cuda", requires_grad=True)
    idx = torch.as_tensor(rows, device="cuda")
    a = X[idx]
    params = unflatten(W, layers)  # views into W: Wl (m_l, m_{l-1}) and bl (m_l,)
    for i, (Wl, bl) in enumerate(params):
        a = a @ Wl.T + bl
        if i < len(params) - 1:
            a = ACTIVATIONS[activation](a)
    if loss == "cross_entropy":
        total = torch.nn.functional.cross_entropy(a, Y[idx], reduction="sum")
    else:
        total = ((a - Y[idx]) ** 2).mean(dim=1).sum()  # per sample: the mean over outputs
    total.backward()
    return W.grad.cpu().numpy(), total.item()


def check_correctness() -> None:
    print("1. correctness, float64 (largest |difference| / largest |gradient|)")
    layers, rng = [20, 32, 16, 4], np.random.default_rng(0)
    W = init_params(layers, 1.0, rng, np, np.float64)
    X = rng.standard_normal((512, 20))
    rows = rng.choice(512, size=200, replace=False)
    worst = 0.0
    for loss in ("cross_entropy", "mse"):
        Y = rng.integers(0, 4, size=512) if loss == "cross_entropy" else rng.standard_normal((512, 4))
        for activation in ACTIVATIONS:
            g_np, l_np, _ = worker_call(MLP(layers, activation, loss, np, np.float64), np, X, Y, W, rows)
            g_cp, l_cp, _ = worker_call(MLP(layers, activation, loss, cp, np.float64), cp, cp.asarray(X),
                                        cp.asarray(Y), W, rows)
            g_t, l_t = torch_call(layers, activation, loss, torch.tensor(X, device="cuda"),
                                  torch.tensor(Y, device="cuda"), W, rows)
            scale = np.abs(g_np).max()
            vs_numpy, vs_torch = np.abs(g_cp - g_np).max() / scale, np.abs(g_cp - g_t).max() / scale
            worst = max(worst, vs_numpy, vs_torch)
            print(f"   {activation:8s} {loss:13s}  cupy vs numpy {vs_numpy:.1e}  cupy vs torch-cuda {vs_torch:.1e}"
                  f"  loss {l_cp:.6f} (numpy {l_np:.6f}, torch {l_t:.6f})")
    print(f"   worst {worst:.1e}: {'PASS' if worst < 1e-10 else 'FAIL'} (bound 1e-10)")


def best_rate(call, batch: int) -> float:
    for _ in range(5):
        call()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(20):
            call()
        best = min(best, time.perf_counter() - started)
    return 20 * batch / best


def check_speed() -> None:
    print(f"\n2. speed, float32: samples/s of one worker gradient call (host has {os.cpu_count()} cores)")
    print(f"   {'model':22s} {'batch':>5s} {'numpy':>12s} {'cupy':>12s} {'torch-cuda':>12s} {'cupy/numpy':>11s} "
          f"{'cupy/torch':>11s}")
    rng = np.random.default_rng(1)
    for layers, batch in SIZES:
        r_np, r_cp, r_t = time_row(layers, batch, rng)
        name = "-".join(map(str, layers))
        print(f"   {name:22s} {batch:5d} {r_np:12,.0f} {r_cp:12,.0f} {r_t:12,.0f} {r_cp / r_np:10.1f}x "
              f"{r_cp / r_t:10.2f}x")


def time_row(layers, batch: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Samples/s of NumPy, CuPy and PyTorch-CUDA, each drawing the same 8 batches in turn."""
    X = rng.standard_normal((N_ROWS, layers[0])).astype(np.float32)
    Y = rng.integers(0, layers[-1], size=N_ROWS)
    W = init_params(layers, 1.0, rng, np, np.float32)
    draws = itertools.cycle([rng.choice(N_ROWS, size=batch, replace=False) for _ in range(8)])
    host = MLP(layers, "relu", "cross_entropy", np, np.float32)
    device = MLP(layers, "relu", "cross_entropy", cp, np.float32)
    Xc, Yc = cp.asarray(X), cp.asarray(Y)
    Xt, Yt = torch.tensor(X, device="cuda"), torch.tensor(Y, device="cuda")
    return (
        best_rate(lambda: worker_call(host, np, X, Y, W, next(draws)), batch),
        best_rate(lambda: worker_call(device, cp, Xc, Yc, W, next(draws)), batch),  # to_numpy synchronizes
        best_rate(lambda: torch_call(layers, "relu", "cross_entropy", Xt, Yt, W, next(draws)), batch),
    )

if __name__ == "__main__":
    backend = get_backend("gpu")
    print(f"device: {backend.describe()}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"NumPy {np.__version__}")
    check_correctness()
    check_speed()
