"""The side-by-side benchmarks' two framework processes, and what they print about them."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection

import numpy as np
from threadpoolctl import threadpool_info


def framework_info(framework: str) -> str:
    """'torch 2.13.0, at::get_num_threads() : 2' or 'NumPy 2.4.6, BLAS openblas 0.3.31 kernel=Haswell'."""
    if framework == "torch":
        import torch

        return f"torch {torch.__version__}, {torch.__config__.parallel_info().splitlines()[1].strip()}"
    blas = [
        f"{i['internal_api']} {i['version']} kernel={i.get('architecture')}"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    ]
    return f"NumPy {np.__version__}, BLAS {'; '.join(blas)}"


@contextmanager
def side_by_side(worker: Callable) -> Iterator[dict[str, Connection]]:
    """One spawned process per framework, each running ``worker(name, conn)``: their connections by name, after
    printing what each runs on; at the end each is told to stop (``None``) and joined."""
    ctx = mp.get_context("spawn")
    workers, procs = {}, []
    for name in ("polyak", "torch"):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(name, child), daemon=True)
        proc.start()
        workers[name] = parent
        procs.append(proc)
    try:
        env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
        for conn in workers.values():
            conn.send(("info",))
        print(f"{workers['polyak'].recv()}; env {env or '(OPENBLAS_* unset)'}")
        print(f"{workers['torch'].recv()}; {os.cpu_count()} CPUs")
        yield workers
    finally:
        for conn in workers.values():
            conn.send(None)
        for proc in procs:
            proc.join(timeout=10)
