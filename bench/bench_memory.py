"""Memory of the data path: what each process holds while a job trains on a big file.

    python bench/bench_memory.py                 # ~1 GB float32 table as .npy and as a parquet directory
    python bench/bench_memory.py --gigabytes 8 --formats npy --workers 2   # the big run (file deleted after)

For every (format, num_workers) a fresh driver process trains 784-64-10 for 50 steps (standardize: true,
validation 5%), while a sampler reads the RSS and PSS of the driver, the parameter server and each worker
(psutil, every 0.1 s) and, at the end, each process's peak RSS (VmHWM). Printed per case: peak RSS of each
process, the sum at the moment it peaked (PSS: shared pages counted once), the time from start to the first
step, and samples/s of the 50 steps. The baseline of each format's rows is the same job on the same rows read
from an ``.npz`` file (a whole-file reader: every worker loads all of it), run in the same session.

Goals (issue 9): each worker <= its shard's bytes x 1.2 + 500 MB; the driver <= 500 MB; in-process <= the
data's bytes x 1.3 + 500 MB; all processes at K=2 <= 1.5 x the data + 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
D, CLASSES, STEPS, BATCH = 784, 10, 50, 1024
MB = 2**20


# -- the data -----------------------------------------------------------------------------------------
def rows_for(gigabytes: float) -> int:
    return int(gigabytes * 2**30 / ((D + 1) * 4))


def write_npy(path: Path, n: int, chunk: int = 50_000) -> None:
    """n rows of 784 features then a class id, float32, written in chunks: this process never holds it."""
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D + 1))
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((D, CLASSES)).astype(np.float32)
    for lo in range(0, n, chunk):
        X = rng.standard_normal((min(chunk, n - lo), D), dtype=np.float32)
        table[lo : lo + len(X), :D] = X
        table[lo : lo + len(X), D] = (X @ mix).argmax(axis=1)
    table.flush()
    del table


def write_parquet_dir(npy: Path, folder: Path, files: int = 8, row_group: int = 16_384) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = np.load(npy, mmap_mode="r")
    folder.mkdir()
    names = [f"x{j}" for j in range(D)] + ["label"]
    bounds = np.linspace(0, len(table), files + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        with pq.ParquetWriter(folder / f"part-{i:03d}.parquet", pa.schema([(n, pa.float32()) for n in names])) as w:
            for start in range(lo, hi, row_group):
                block = np.asarray(table[start : min(hi, start + row_group)])
                w.write_table(pa.table({n: block[:, j] for j, n in enumerate(names)}), row_group_size=row_group)


def write_npz(npy: Path, path: Path) -> None:
    table = np.load(npy, mmap_mode="r")
    np.savez(path, X=table[:, :D], y=table[:, D])


# -- one case, in its own driver process ------------------------------------------------------------------
class Sampler:
    """Peak RSS and PSS of a set of processes, sampled in a thread; the set grows as actors appear."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.pids: dict[str, int] = {"driver": os.getpid()}
        self.peak_rss: dict[str, int] = {}
        self.peak_sum_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for name, pid in list(self.pids.items()):
                try:
                    info = self.psutil.Process(pid).memory_full_info()
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
                self.peak_rss[name] = max(self.peak_rss.get(name, 0), info.rss)
                total += info.pss
            self.peak_sum_pss = max(self.peak_sum_pss, total)
            self._stop.wait(0.1)

    def high_water_marks(self) -> None:
        """The kernel's own peak (VmHWM): catches a spike between two samples."""
        for name, pid in self.pids.items():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), hwm)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_case(path: str, workers: int) -> dict:
    from polyak.contract.spec import parse_spec
    from polyak.service.engine.trainer import Hooks, initial_weights, make_engine, run
    from polyak.workers.data import prepare

    sampler = Sampler()
    started = time.perf_counter()
    spec = parse_spec({
        "model": {"layers": [D, 64, CLASSES], "seed": 0},
        "data": {"source": "file", "path": path, "validation_fraction": 0.05, "standardize": True},
        "optimizer": {"method": "heavy_ball", "lr": 0.1, "alpha": 0.1},
        "batch": {"size": BATCH},
        "stopping": {"max_steps": STEPS, "max_epochs": 1},
        "cluster": {"num_workers": workers, "device": "cpu", "dtype": "float32"},
    })
    if workers:
        import ray

        from polyak.service.engine.placement import connect

        connect(None, num_cpus=max(2, workers))
    info = prepare(spec.data, spec.model)
    engine = make_engine(spec, info, initial_weights(spec))
    if workers:
        import ray

        sampler.pids["server"] = ray.get(engine.ps.pid.remote())
        for k, w in enumerate(engine.workers):
            sampler.pids[f"worker {k + 1}"] = ray.get(w.pid.remote())
    loaded = time.perf_counter() - started
    seen = []

    def on_epoch(m):
        sampler.high_water_marks()  # before close() ends the actors
        seen.append(m)

    try:
        run(spec, info, engine, "bench", Hooks(on_epoch=on_epoch))
    finally:
        sampler.stop()
        engine.close()
    shard_bytes = info.n_train * (D + 1) * 4 // max(1, workers)
    return {"peak_rss": sampler.peak_rss, "peak_sum_pss": sampler.peak_sum_pss, "load_seconds": loaded,
            "samples_per_second": seen[-1].samples_per_second, "shard_bytes": shard_bytes}


def case_in_subprocess(path: Path, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", str(path), str(workers)], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"case {path.name} K={workers} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the report ------------------------------------------------------------------------------------------
def verdicts(r: dict, data_bytes: int, workers: int) -> list[str]:
    rss, out = r["peak_rss"], []
    if workers == 0:
        out.append(f"in-process {'ok' if rss['driver'] <= 1.3 * data_bytes + 500 * MB else 'OVER'}")
        return out
    out.append(f"driver {'ok' if rss['driver'] <= 500 * MB else 'OVER'}")
    worst = max(v for k, v in rss.items() if k.startswith("worker"))
    out.append(f"workers {'ok' if worst <= 1.2 * r['shard_bytes'] + 500 * MB else 'OVER'}")
    if workers == 2:
        total = sum(rss.values())
        out.append(f"sum {'ok' if total <= 1.5 * data_bytes + 2048 * MB else 'OVER'}")
    return out


def report(fmt: str, workers: int, r: dict, data_bytes: int, baseline: float | None) -> str:
    rss = r["peak_rss"]
    each = " ".join(f"{k}={v / MB:,.0f}" for k, v in rss.items())
    ratio = f"{r['samples_per_second'] / baseline:5.2f}x" if baseline else "  1.00x"
    return (f"{fmt:8} K={workers}  peak RSS MB: {each:60}  sum {sum(rss.values()) / MB:7,.0f}  "
            f"sum PSS {r['peak_sum_pss'] / MB:7,.0f}  first step {r['load_seconds']:6.1f} s  "
            f"{r['samples_per_second']:9,.0f} samples/s {ratio}  [{', '.join(verdicts(r, data_bytes, workers))}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--formats", default="npy,parquet", help="comma-separated: npy, parquet")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated num_workers values")
    parser.add_argument("--no-baseline", action="store_true", help="skip the .npz whole-file rows")
    parser.add_argument("--dir", default=None, help="where to write the data (default: a temp dir, deleted)")
    parser.add_argument("--case", nargs=2, metavar=("PATH", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]))))
        return

    folder = Path(tempfile.mkdtemp(prefix="polyak-mem-", dir=args.dir))
    try:
        n = rows_for(args.gigabytes)
        npy = folder / "table.npy"
        t = time.perf_counter()
        write_npy(npy, n)
        data_bytes = npy.stat().st_size
        print(f"data: {n:,} rows x {D + 1} float32 = {data_bytes / 2**30:.2f} GiB ({time.perf_counter() - t:.0f} s)")
        paths = {"npy": npy}
        if "parquet" in args.formats:
            paths["parquet"] = folder / "parquet"
            write_parquet_dir(npy, paths["parquet"])
        workers = [int(k) for k in args.workers.split(",")]
        baselines: dict[int, float] = {}
        if not args.no_baseline:
            npz = folder / "table.npz"
            write_npz(npy, npz)
            for k in workers:
                r = case_in_subprocess(npz, k)
                baselines[k] = r["samples_per_second"]
                print(report("npz", k, r, data_bytes, None), flush=True)
            npz.unlink()
        for fmt in args.formats.split(","):
            for k in workers:
                r = case_in_subprocess(paths[fmt], k)
                print(report(fmt, k, r, data_bytes, baselines.get(k)), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
