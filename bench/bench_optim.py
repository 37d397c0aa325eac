"""Cost of one parameter-server update per method, against the memory bandwidth of a plain copy.

    python bench/bench_optim.py

p = 1.86M (784-1024-1024-10), float32, one thread, best of 20 after a warm-up. Each rule is timed through
the parameter server's own path (``Optimizer.apply`` on an ``OptState``). Bytes moved count each array pass
the rule makes over p floats (read or write, per elementwise operation, as written in optim.py); the
baseline is ``np.copyto`` of p floats (one read, one write) in the same process. Goal (issue 14): every
update at >= 0.5x the copy's bandwidth, i.e. memory-bound.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polyak.contract.network import param_count  # noqa: E402
from polyak.contract.spec import parse_spec  # noqa: E402
from polyak.service.engine.optim import BUFFERS, Optimizer, new_state  # noqa: E402

LAYERS = [784, 1024, 1024, 10]
# Array passes over p floats per update, counted from the rules' operations in optim.py: an in-place op
# reads its target and operand and writes the target (3, or 2 with a scalar operand); an op into a
# temporary or the scratch array reads its inputs and writes the result.
PASSES = {"sgd": 5, "heavy_ball": 10, "nesterov": 15, "adagrad": 17, "rmsprop": 21, "adam": 31}


def best(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = param_count(LAYERS)
    rng = np.random.default_rng(0)
    g = rng.standard_normal(p).astype(np.float32)
    with threadpool_limits(1):
        src, dst = g.copy(), np.empty_like(g)
        copy = best(lambda: np.copyto(dst, src))
        copy_bw = 2 * p * 4 / copy
        print(f"p = {p:,} float32, one thread; np.copyto: {copy * 1e3:.2f} ms, {copy_bw / 1e9:.1f} GB/s")
        print(f"{'method':<12}{'ms/update':>10}{'vs heavy ball':>15}{'GB/s':>8}{'vs copy':>9}")
        hb = None
        for method in BUFFERS:
            spec = parse_spec({"model": {"layers": LAYERS}, "optimizer": {"method": method, "lr": 1e-3}})
            opt = Optimizer(spec.optimizer, LAYERS)
            state = new_state(rng.standard_normal(p).astype(np.float32), np, opt.buffers)
            seconds = best(lambda: opt.apply(state, g))  # noqa: B023
            hb = seconds if method == "heavy_ball" else hb
            bw = PASSES[method] * p * 4 / seconds
            ratio = f"{seconds / hb:.2f}x" if hb else "-"
            print(f"{method:<12}{seconds * 1e3:>10.2f}{ratio:>15}{bw / 1e9:>8.1f}{bw / copy_bw:>8.2f}x")


if __name__ == "__main__":
    main()
