"""polyak side by side with what a user would pick instead for data-parallel training, on the same 2 cores.

    python bench/bench_peers.py                       # 3 rounds of every system, interleaved
    python bench/bench_peers.py --quick               # one round
    python bench/bench_peers.py --systems ddp polyak_sync2 --rounds 5

Systems (each run is its own subprocess, so its start-up and peak RSS are its own):
- torch:          one process, torch.set_num_threads(2)
- ddp:            torch DistributedDataParallel, 2 spawned processes x 1 thread, gloo on loopback
- ray_train:      Ray Train's TorchTrainer, 2 workers x 1 CPU x 1 thread (DDP inside, gloo)
- polyak_local:   polyak in-process (cluster.num_workers 0), 2 BLAS threads
- polyak_sync1 / polyak_sync2 / polyak_async2: polyak on a local Ray (num_cpus=2), sync K=1, K=2, async K=2

The same everything: the data (a 60,000 x 784 float32 synthetic table and scikit-learn's digits, written once
as .npy files that every system reads), the initial weights, the batches of each epoch (polyak's own
``epoch_batches``, handed to the torch systems as arrays), the model (ReLU, softmax cross-entropy, float32), and
heavy ball: polyak's u <- (1-alpha)u - alpha*eta*g, W <- W+u is torch.optim.SGD(lr=alpha*eta,
momentum=1-alpha, dampening=0) exactly (tests/test_bench_peers.py). A DDP rank takes every world-th row of a
global batch and scales its summed loss by world/n', so DDP's average of the ranks' gradients is the global
batch's mean gradient, the exact step polyak's sync mode takes.

Measured per run: samples/s at n'=128 and n'=1024 (784-256-10; one epoch over the 60,000 rows warms up, the
next epoch is timed, for every system); time to 0.97 validation accuracy on digits (64-64-10, heavy ball lr 0.5
alpha 0.2, n'=64, 20% held out, validated after every epoch) from the subprocess's launch (with start-up:
interpreter, imports, Ray, worker spawn, data) and from the first step; peak RSS summed over the run's whole
process tree (Ray's gcs, raylet and workers are children of the driver that started them), sampled by psutil
every 0.1 s. Runs are interleaved, each round in a rotated order, and every figure is min / median / max over
the rounds with a ratio of medians against torch DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEMS = {
    "torch": "torch 1 process x 2 thr",
    "ddp": "torch DDP 2 x 1 thr",
    "ray_train": "Ray Train 2 x 1 thr",
    "polyak_local": "polyak in-process 2 thr",
    "polyak_sync1": "polyak Ray sync K=1",
    "polyak_sync2": "polyak Ray sync K=2",
    "polyak_async2": "polyak Ray async K=2",
}
POLYAK = {"polyak_local": (0, "sync"), "polyak_sync1": (1, "sync"), "polyak_sync2": (2, "sync"),
          "polyak_async2": (2, "async")}
BASELINE = "ddp"
SEED = 0
BIG = {"layers": [784, 256, 10], "rows": 60_000, "lr": 0.05, "alpha": 0.1, "batches": (128, 1024), "epochs": 2}
DIGITS = {"layers": [64, 64, 10], "lr": 0.5, "alpha": 0.2, "batch": 64, "validation": 0.2, "target": 0.97,
          "max_epochs": 60}


# -- the same heavy ball, batches and loss in torch -------------------------------------------------------
def torch_sgd_kwargs(lr: float, alpha: float) -> dict:
    """polyak's heavy ball (u <- (1-alpha)u - alpha*lr*g; W <- W+u) as torch.optim.SGD's arguments: torch keeps
    buf <- momentum*buf + g and steps W <- W - lr'*buf, so u = -alpha*lr*buf with momentum 1-alpha."""
    return {"lr": alpha * lr, "momentum": 1.0 - alpha, "dampening": 0.0}


def batches_of(order: np.ndarray, size: int) -> list[np.ndarray]:
    """An epoch's order cut into steps of ``size`` rows, the last taking what is left (polyak's epoch_batches)."""
    return [order[i : i + size] for i in range(0, len(order), size)]


def local_rows(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """The rows of a global batch that rank ``rank`` of ``world`` computes: every world-th one."""
    return batch[rank::world]


class TorchRun:
    """One process's share of the training loop: polyak's MLP, initial weights and heavy ball in torch."""

    def __init__(self, weights: dict, layers: list[int], lr: float, alpha: float, rank: int = 0, world: int = 1,
                 wrap=lambda model: model, dtype=None):
        import torch

        self.torch, self.rank, self.world = torch, rank, world
        mods = []
        for l in range(1, len(layers)):
            lin = torch.nn.Linear(layers[l - 1], layers[l], dtype=dtype or torch.float32)
            with torch.no_grad():  # polyak's W^(l) is (m_out, m_in), as torch.nn.Linear.weight
                lin.weight.copy_(torch.from_numpy(weights[f"W{l}"]))
                lin.bias.copy_(torch.from_numpy(weights[f"b{l}"]))
            mods += [lin, torch.nn.ReLU()] if l < len(layers) - 1 else [lin]
        self.net = torch.nn.Sequential(*mods)
        self.model = wrap(self.net)
        self.opt = torch.optim.SGD(self.model.parameters(), **torch_sgd_kwargs(lr, alpha))

    def loss(self, X, y, batch: np.ndarray):
        """This rank's part of the batch's mean loss: summed over its rows, times world / n'. DDP averages the
        ranks' gradients, so the step's gradient is the global batch's mean whatever the split."""
        rows = self.torch.from_numpy(local_rows(batch, self.rank, self.world))
        out = self.model(X[rows])
        return self.torch.nn.functional.cross_entropy(out, y[rows], reduction="sum") * (self.world / len(batch))

    def step(self, X, y, batch: np.ndarray) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(X, y, batch)
        loss.backward()
        self.opt.step()
        return loss.item()  # polyak's trainer reads every step's loss too

    def accuracy(self, X, y) -> float:
        with self.torch.no_grad():
            return float((self.net(X).argmax(1) == y).double().mean())


# -- the tasks every torch system runs, in each of its processes ------------------------------------------
def torch_tasks(folder: str, rank: int, world: int, wrap, barrier) -> dict:
    """Digits to the target accuracy, then samples/s at each n': what rank ``rank`` of ``world`` measured."""
    import torch

    f = Path(folder)
    d = np.load(f / "digits_split.npz")
    Xt, yt, Xv, yv = (torch.from_numpy(d[k]) for k in ("X_train", "y_train", "X_val", "y_val"))
    orders = np.load(f / "digits_orders.npy")
    run = TorchRun(dict(np.load(f / "digits_w0.npz")), DIGITS["layers"], DIGITS["lr"], DIGITS["alpha"], rank, world,
                   wrap)
    out = {"train_start": time.time()}
    for epoch, order in enumerate(orders, start=1):
        for batch in batches_of(order, DIGITS["batch"]):
            run.step(Xt, yt, batch)
        if run.accuracy(Xv, yv) >= DIGITS["target"]:  # the ranks hold the same W: they stop together
            out |= {"reached": time.time(), "epochs": epoch}
            break
    table = np.load(f / "synthetic.npy", mmap_mode="r")  # every rank holds every row, as a TensorDataset would
    X = torch.from_numpy(np.ascontiguousarray(table[:, :-1]))
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    del table
    big_orders, w0 = np.load(f / "synthetic_orders.npy"), dict(np.load(f / "synthetic_w0.npz"))
    for size in BIG["batches"]:
        run = TorchRun(w0, BIG["layers"], BIG["lr"], BIG["alpha"], rank, world, wrap)
        for batch in batches_of(big_orders[0], size):  # warm-up epoch
            run.step(X, y, batch)
        barrier()
        started = time.perf_counter()
        for batch in batches_of(big_orders[1], size):
            run.step(X, y, batch)
        barrier()
        out[f"rate{size}"] = len(big_orders[1]) / (time.perf_counter() - started)
    return out


def torch_child(folder: str) -> dict:
    import torch

    torch.set_num_threads(2)
    return torch_tasks(folder, 0, 1, lambda m: m, lambda: None)


def ddp_rank(rank: int, world: int, port: int, folder: str, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = torch_tasks(folder, rank, world, torch.nn.parallel.DistributedDataParallel, dist.barrier)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        queue.put(out)


def ddp_child(folder: str) -> dict:
    """Two spawned processes (what torch.multiprocessing.spawn and torchrun start), rank 0's figures."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=ddp_rank, args=(rank, 2, port, folder, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a DDP rank failed: exit codes {[p.exitcode for p in procs]}")
    return queue.get()


def ray_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = torch_tasks(config["folder"], rank, world, ray.train.torch.prepare_model, torch.distributed.barrier)
    if rank == 0:
        Path(config["result"]).write_text(json.dumps(out))


def ray_train_child(folder: str) -> dict:
    import logging

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # As polyak's own connect(): a local Ray of 2 CPUs, no dashboard, workers' output not forwarded.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="polyak-peers-train-") as scratch:
            result = Path(scratch, "result.json")
            TorchTrainer(
                ray_train_loop, train_loop_config={"folder": folder, "result": str(result)},
                scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                torch_config=TorchConfig(backend="gloo"),
                run_config=RunConfig(storage_path=scratch, name="peers"),
            ).fit()
            return json.loads(result.read_text())
    finally:
        ray.shutdown()


# -- polyak, through its own trainer ----------------------------------------------------------------------
def polyak_spec(data: dict, layers, lr: float, alpha: float, batch: int, epochs: int, workers: int, mode: str):
    from polyak.contract.spec import parse_spec

    return parse_spec({
        "model": {"layers": layers, "seed": SEED},
        "data": data,
        "optimizer": {"method": "heavy_ball", "lr": lr, "alpha": alpha},
        "batch": {"size": batch},
        "stopping": {"max_epochs": epochs},
        "cluster": {"num_workers": workers, "mode": mode, "device": "cpu", "dtype": "float32"},
    })


def digits_spec(folder, workers: int = 0, mode: str = "sync"):
    data = {"source": "file", "path": str(Path(folder, "digits.npy")), "validation_fraction": DIGITS["validation"],
            "standardize": True}
    return polyak_spec(data, DIGITS["layers"], DIGITS["lr"], DIGITS["alpha"], DIGITS["batch"], DIGITS["max_epochs"],
                       workers, mode)


def big_spec(folder, batch: int, workers: int = 0, mode: str = "sync"):
    data = {"source": "file", "path": str(Path(folder, "synthetic.npy"))}
    return polyak_spec(data, BIG["layers"], BIG["lr"], BIG["alpha"], batch, BIG["epochs"], workers, mode)


def polyak_to_target(spec) -> dict:
    """Train until an epoch's validation accuracy reaches the target: when training started and when it did."""
    from polyak.service.engine.trainer import Hooks, train_job

    out = {}

    def on_epoch(m) -> None:
        if "reached" not in out and m.val_accuracy is not None and m.val_accuracy >= DIGITS["target"]:
            out.update(reached=time.time(), epochs=m.epoch)

    hooks = Hooks(on_epoch=on_epoch, on_start=lambda where: out.update(train_start=time.time()),
                  should_cancel=lambda: "reached" in out)
    train_job(spec, "peers", hooks)
    return out


def polyak_child(system: str, folder: str) -> dict:
    """Digits to the target, then each n' through bench_ray's measure: the trainer's second-epoch samples/s and,
    on Ray, the step's split (compute, comm, update) from the actors' own timestamps."""
    from bench_ray import measure
    from threadpoolctl import threadpool_limits

    workers, mode = POLYAK[system]
    if workers:
        from polyak.service.engine.placement import connect

        connect(None, num_cpus=2)
    with threadpool_limits(2 if workers == 0 else None, user_api="blas"):
        out = polyak_to_target(digits_spec(folder, workers, mode))
        for size in BIG["batches"]:
            r = measure(big_spec(folder, size, workers, mode))
            out[f"rate{size}"] = r["rate"]
            if workers:
                out[f"split{size}"] = [r[k] for k in ("step", "compute", "comm", "update")]
    if workers:
        import ray

        ray.shutdown()
    return out


CHILDREN = {"torch": torch_child, "ddp": ddp_child, "ray_train": ray_train_child}


# -- the data every system reads --------------------------------------------------------------------------
def write_data(folder: Path) -> None:
    """The tables (features, then the label), and for the torch systems what polyak derives from them itself:
    each epoch's row order and the initial weights; the synthetic table is kept when it is there."""
    if not (folder / "synthetic.npy").exists():
        from polyak.contract.spec import DataSpec
        from polyak.workers.generated import synthetic_dataset

        data = DataSpec(source="synthetic", name="classification", n_samples=BIG["rows"], n_features=784,
                        n_classes=10)
        X, y = synthetic_dataset(data, SEED)
        np.save(folder / "synthetic.npy", np.column_stack([X, y]).astype(np.float32))
    rows = np.load(folder / "synthetic.npy", mmap_mode="r").shape[0]  # a kept table may be another size
    print(f"data: synthetic {rows:,} x 784 float32, digits 1,797 x 64; in {folder}", flush=True)
    write_torch_side(folder, "synthetic", big_spec(folder, BIG["batches"][0]), rows)
    write_digits(folder)


def write_digits(folder: Path) -> None:
    """scikit-learn's digits as a table, and for the torch systems its split as polyak makes it (standardized
    by the training rows, training rows in training order), each epoch's order and the initial weights."""
    from polyak.workers.data import load_dataset
    from polyak.workers.generated import sklearn_dataset

    X, y = sklearn_dataset("digits")
    np.save(folder / "digits.npy", np.column_stack([X, y]).astype(np.float32))
    spec = digits_spec(folder)
    ds = load_dataset(spec.data, spec.model)
    np.savez(folder / "digits_split.npz", X_train=ds.X_train.astype(np.float32), y_train=ds.y_train.astype(np.int64),
             X_val=ds.X_val.astype(np.float32), y_val=ds.y_val.astype(np.int64))
    write_torch_side(folder, "digits", spec, ds.n_train)


def write_torch_side(folder: Path, name: str, spec, n_train: int) -> None:
    """Every epoch's row order (polyak's epoch_order: its batches are the order cut into n' rows) and W0."""
    from polyak.contract.network import to_dict
    from polyak.service.engine.schedules import epoch_order
    from polyak.service.engine.trainer import initial_weights

    orders = [epoch_order(SEED, epoch, n_train) for epoch in range(spec.stopping.max_epochs)]
    np.save(folder / f"{name}_orders.npy", np.stack(orders))
    np.savez(folder / f"{name}_w0.npz", **to_dict(initial_weights(spec), spec.model.layers))


# -- one run of one system, watched from outside ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> tuple[int, int]:
    """RSS bytes summed over a process and all its descendants, and how many there are."""
    import psutil

    try:
        procs = [root := psutil.Process(pid), *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # gone between the listing and the reading
    return total, len(procs)


class PeakRSS(threading.Thread):
    """Samples ``tree_rss`` of a process every ``interval`` seconds until stopped: the largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self.processes = pid, interval, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            rss, n = tree_rss(self.pid)
            if rss > self.peak:
                self.peak, self.processes = rss, n

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def figures(r: dict, launched: float, peak_rss: int) -> dict:
    """A run's figures from its child's timestamps (wall clock, one machine) and the peak RSS seen."""
    reached = r.get("reached")
    return {
        "rate128": r["rate128"], "rate1024": r["rate1024"],
        "tta": reached - launched if reached else None,
        "tta_train": reached - r["train_start"] if reached else None,
        "startup": r["train_start"] - launched,
        "epochs": r.get("epochs"),
        "rss": peak_rss / 2**20,
        "split1024": r.get("split1024"), "split128": r.get("split128"),
    }


def run_system(system: str, folder: Path, timeout: float) -> dict:
    """One subprocess running ``system``'s tasks, its process tree's RSS sampled throughout."""
    launched = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--child", system, str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sampler = PeakRSS(proc.pid)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    finally:
        sampler.stop()
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return figures(json.loads(lines[-1][len("RESULT "):]), launched, sampler.peak) | {"processes": sampler.processes}


# -- the table --------------------------------------------------------------------------------------------
METRICS = [  # key, title, format, what the ratio against the baseline means
    ("rate128", "samples/s, n'=128 (784-256-10)", "{:,.0f}", "higher is faster"),
    ("rate1024", "samples/s, n'=1024 (784-256-10)", "{:,.0f}", "higher is faster"),
    ("tta", "s to 0.97 on digits, from launch (with start-up)", "{:.2f}", "lower is faster"),
    ("tta_train", "s to 0.97 on digits, from the first step", "{:.2f}", "lower is faster"),
    ("startup", "s from launch to the first step", "{:.2f}", "lower is faster"),
    ("epochs", "epochs to 0.97", "{:.0f}", ""),
    ("rss", "peak RSS of the process tree, MB", "{:,.0f}", "lower is leaner"),
    ("processes", "processes in the tree at that peak", "{:.0f}", ""),
]


def spread(values) -> tuple[float, float, float] | None:
    """(min, median, max) of the values that are there; None when there are none."""
    xs = [v for v in values if v is not None]
    return (min(xs), float(np.median(xs)), max(xs)) if xs else None


def stats_of(runs: dict[str, list[dict]]) -> dict[str, dict[str, tuple | None]]:
    """Each metric's spread per system; a system whose every run failed has None throughout."""
    return {system: {key: spread(r.get(key) for r in rs) for key, *_ in METRICS} for system, rs in runs.items()}


def table(stats: dict, baseline: str = BASELINE) -> list[str]:
    """One block per metric: each system's min, median and max, and its median over the baseline's."""
    lines = []
    for key, title, fmt, sense in METRICS:
        lines.append(f"{title:<44}{'min':>10}{'median':>10}{'max':>10}{f'x {baseline}':>10}")
        base = stats.get(baseline, {}).get(key)
        for system, s in stats.items():
            if s[key] is None:
                lines.append(f"  {SYSTEMS[system]:<42}{'-':>10}{'-':>10}{'-':>10}")
                continue
            ratio = f"{s[key][1] / base[1]:.2f}x" if base and base[1] and sense else ""
            lines.append(f"  {SYSTEMS[system]:<42}" + "".join(f"{fmt.format(v):>10}" for v in s[key]) + f"{ratio:>10}")
        lines.append("")
    return lines


def goals(stats: dict) -> list[str]:
    """The issue's goals, by medians: met or missed, with the figures."""
    med = lambda system, key: (stats.get(system, {}).get(key) or (None, None))[1]  # noqa: E731
    ours, lines = "polyak_sync2", []
    for peer in ("ray_train", "ddp"):
        if med(ours, "rate1024") and med(peer, "rate1024"):
            r = med(ours, "rate1024") / med(peer, "rate1024")
            lines.append(f"polyak sync K=2 samples/s at n'=1024 = {r:.2f}x {SYSTEMS[peer]} (goal >= 1.0x): "
                         f"{'met' if r >= 1.0 else 'missed'}")
    if med(ours, "tta") and med("ray_train", "tta"):
        a, b = med(ours, "tta"), med("ray_train", "tta")
        lines.append(f"polyak sync K=2 time to 0.97 with start-up = {a:.2f} s, Ray Train {b:.2f} s (goal: no worse): "
                     f"{'met' if a <= b else 'missed'}")
    return lines


def splits(runs: dict[str, list[dict]]) -> list[str]:
    """polyak's Ray steps taken apart from the actors' timestamps (bench_ray's split), medians over the rounds."""
    lines = [f"{'polyak on Ray, ms a step (medians)':<44}{'step':>10}{'compute':>10}{'comm':>10}{'update':>10}"]
    for system, rs in runs.items():
        for size in BIG["batches"]:
            parts = [r[f"split{size}"] for r in rs if r.get(f"split{size}")]
            if parts:
                label = f"{SYSTEMS[system]}, n'={size}"
                lines.append(f"  {label:<42}" + "".join(f"{v * 1e3:>10.2f}" for v in np.median(parts, axis=0)))
    return lines if len(lines) > 1 else []


def plan_of(systems: list[str], rounds: int) -> list[tuple[int, str]]:
    """Every system once a round, interleaved, each round's order rotated by one."""
    return [(r, systems[(r + i) % len(systems)]) for r in range(rounds) for i in range(len(systems))]


# -- the driver -------------------------------------------------------------------------------------------
def machine() -> str:
    from _frameworks import framework_info

    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    import ray

    return (f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu}, {os.cpu_count()} CPUs; {framework_info('torch')}; "
            f"ray {ray.__version__}; {framework_info('numpy')}")


def run_all(systems: list[str], rounds: int, folder: Path, timeout: float) -> tuple[dict[str, list[dict]], list[str]]:
    """Every system ``rounds`` times, interleaved: each system's runs, and a line for each run that failed."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    runs: dict[str, list[dict]] = {system: [] for system in systems}
    failures: list[str] = []
    plan = plan_of(systems, rounds)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("runs", total=len(plan))
        for r, system in plan:
            bar.update(task, description=f"round {r + 1}: {SYSTEMS[system]}")
            try:
                f = run_system(system, folder, timeout)
            except RuntimeError as e:
                bar.console.print(f"round {r + 1}: {e}")
                failures.append(f"round {r + 1}: {str(e).splitlines()[0]} {str(e).splitlines()[-1]}")
            else:
                runs[system].append(f)
                tta = f"{f['tta']:.2f} s" if f["tta"] else "not reached"
                bar.console.print(f"round {r + 1} {SYSTEMS[system]:<26} {f['rate128']:>9,.0f} {f['rate1024']:>9,.0f} "
                                  f"samples/s; to 0.97 {tta} ({f['epochs']} epochs); {f['rss']:,.0f} MB in "
                                  f"{f['processes']} processes")
            bar.advance(task)
            time.sleep(2)  # the previous run's processes gone, its threads asleep
    return runs, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round (default 3)")
    parser.add_argument("--rounds", type=int, help="rounds of every system")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--data-dir", type=Path, help="keep the data here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take")
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        system, folder = args.child
        result = polyak_child(system, folder) if system in POLYAK else CHILDREN[system](folder)
        print("RESULT " + json.dumps(result), flush=True)
        return
    from bench_core import cpu_pressure

    print(machine())
    with tempfile.TemporaryDirectory(prefix="polyak-peers-") as scratch:
        folder = args.data_dir or Path(scratch)
        folder.mkdir(exist_ok=True)
        write_data(folder)
        print(f"CPU pressure before: {cpu_pressure()}", flush=True)
        runs, failures = run_all(args.systems, args.rounds or (1 if args.quick else 3), folder, args.timeout)
    print(f"CPU pressure after: {cpu_pressure()} (other processes on these cores skew every figure)\n")
    stats = stats_of(runs)
    failed = ["", "failed:", *failures] if failures else []
    print("\n".join([*table(stats), *splits(runs), "", *goals(stats), *failed]))


if __name__ == "__main__":
    main()
