"""bench/bench_peers.py: its torch systems train exactly what polyak trains (heavy ball as torch's SGD, the same
batches, rows and weights, a batch split over ranks), and the figures its table is made of. No benchmark runs here."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_peers as peers  # noqa: E402

from polyak.contract.spec import BatchSpec  # noqa: E402
from polyak.service.engine.local_engine import LocalEngine  # noqa: E402
from polyak.service.engine.schedules import epoch_batches, epoch_order  # noqa: E402
from polyak.service.engine.trainer import initial_weights  # noqa: E402
from polyak.workers.data import prepare  # noqa: E402


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peers")
    peers.write_digits(folder)
    return folder


@pytest.fixture
def one_torch_thread():
    """Small matrices: torch's second thread only spins (3x the CPU time on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torch_params(run) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in run.net.parameters()])


def averaged_step(runs, X, y, batch) -> None:
    """What DDP does with the ranks' backward passes: every rank's gradient becomes their mean, then each steps."""
    for run in runs:
        run.opt.zero_grad(set_to_none=True)
        run.loss(X, y, batch).backward()
    for params in zip(*(run.net.parameters() for run in runs), strict=True):
        mean = sum(p.grad for p in params) / len(params)
        for p in params:
            p.grad = mean.clone()
    for run in runs:
        run.opt.step()


def test_torch_systems_take_polyaks_steps_on_the_same_rows(digits_files, one_torch_thread):
    """Two epochs of the bench's torch loop (one process, and two ranks splitting every batch) against polyak's
    in-process loop over the files the bench writes: the same weights after every epoch, the same accuracy."""
    import torch

    spec = peers.digits_spec(digits_files)
    engine = LocalEngine(spec, prepare(spec.data, spec.model), initial_weights(spec))
    d = np.load(digits_files / "digits_split.npz")
    X, y, X_val, y_val = (torch.from_numpy(d[k]) for k in ("X_train", "y_train", "X_val", "y_val"))
    w0, orders = dict(np.load(digits_files / "digits_w0.npz")), np.load(digits_files / "digits_orders.npy")
    make = lambda rank, world: peers.TorchRun(w0, spec.model.layers, spec.optimizer.lr,  # noqa: E731
                                              spec.optimizer.alpha, rank, world)
    single, ranks = make(0, 1), [make(0, 2), make(1, 2)]
    W0 = initial_weights(spec)
    for epoch in range(2):
        for batch in epoch_batches(spec.batch, spec.model.seed, epoch, len(X)):  # the last one has 30 rows
            engine.step(batch)
        for batch in peers.batches_of(orders[epoch], spec.batch.size):
            single.step(X, y, batch)
            averaged_step(ranks, X, y, batch)
        W = engine.weights()
        assert np.abs(W - W0).max() > 0.1  # it moved by far more than the tolerance below
        for run in (single, *ranks):
            np.testing.assert_allclose(torch_params(run), W, atol=2e-5, err_msg=f"epoch {epoch + 1}")
    _, correct, n = engine.evaluate(W)
    assert single.accuracy(X_val, y_val) == pytest.approx(correct / n) and n == len(y_val) == 359


def test_heavy_ball_is_torch_sgd_with_these_arguments():
    """polyak's rule, written out: u <- (1-alpha)u - alpha*lr*g, W <- W+u, three steps, against torch's SGD."""
    import torch

    lr, alpha, rng = 0.5, 0.2, np.random.default_rng(3)
    W, u = rng.standard_normal(5), np.zeros(5)
    p = torch.nn.Parameter(torch.from_numpy(W.copy()))
    opt = torch.optim.SGD([p], **peers.torch_sgd_kwargs(lr, alpha))
    for _ in range(3):
        g = rng.standard_normal(5)
        u = (1 - alpha) * u - alpha * lr * g
        W = W + u
        p.grad = torch.from_numpy(g)
        opt.step()
        np.testing.assert_allclose(p.detach().numpy(), W, rtol=1e-14)


def test_batches_are_polyaks_epoch_batches():
    order = epoch_order(0, 3, 1000)
    ours = peers.batches_of(order, 128)
    theirs = list(epoch_batches(BatchSpec(size=128), 0, 3, 1000))
    assert [b.tolist() for b in ours] == [b.tolist() for b in theirs] and len(ours[-1]) == 1000 - 7 * 128


def test_ranks_split_a_batch_into_disjoint_halves():
    batch = np.arange(11) * 3
    halves = [peers.local_rows(batch, rank, 2) for rank in (0, 1)]
    assert sorted(np.concatenate(halves).tolist()) == batch.tolist() and [len(h) for h in halves] == [6, 5]


def test_peak_rss_sees_a_child_process():
    """The tree's RSS includes a child holding 128 MB; the sampler keeps the peak after the child is gone."""
    sampler = peers.PeakRSS(peers.os.getpid(), interval=0.02)
    sampler.start()
    before, _ = peers.tree_rss(peers.os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import numpy, time; a = numpy.ones(2**24); print(1, flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()
        during, processes = peers.tree_rss(peers.os.getpid())
        time.sleep(0.1)
    finally:
        child.kill()
        child.wait()
    sampler.stop()
    assert during > before + 120 * 2**20 and processes >= 2
    assert sampler.peak >= during - 10 * 2**20 and peers.tree_rss(peers.os.getpid())[0] < sampler.peak - 100 * 2**20


def test_figures_count_from_launch_and_from_the_first_step():
    r = {"train_start": 105.0, "reached": 112.5, "epochs": 4, "rate128": 1.0, "rate1024": 2.0}
    f = peers.figures(r, launched=100.0, peak_rss=3 * 2**20)
    assert (f["tta"], f["tta_train"], f["startup"], f["rss"], f["epochs"]) == (12.5, 7.5, 5.0, 3.0, 4)
    missed = peers.figures({**r, "reached": None, "epochs": None}, 100.0, 0)
    assert missed["tta"] is None and missed["tta_train"] is None


def test_table_and_goals_use_medians_against_the_baseline():
    runs = {
        "ddp": [{**dict.fromkeys(k for k, *_ in peers.METRICS), "rate1024": v, "tta": 10.0} for v in (90, 100, 300)],
        "ray_train": [{**dict.fromkeys(k for k, *_ in peers.METRICS), "rate1024": 80.0, "tta": 20.0}],
        "polyak_sync2": [{**dict.fromkeys(k for k, *_ in peers.METRICS), "rate1024": v, "tta": 25.0}
                         for v in (95, 86, 91)],
    }
    stats = peers.stats_of(runs)
    assert stats["ddp"]["rate1024"] == (90, 100, 300) and stats["ddp"]["rate128"] is None
    row = next(x for x in peers.table(stats) if x.strip().startswith("polyak Ray sync K=2") and "91" in x)
    assert row.split()[-4:] == ["86", "91", "95", "0.91x"]  # min, median, max; median over DDP's median
    assert peers.goals(stats) == [
        "polyak sync K=2 samples/s at n'=1024 = 1.14x Ray Train 2 x 1 thr (goal >= 1.0x): met",
        "polyak sync K=2 samples/s at n'=1024 = 0.91x torch DDP 2 x 1 thr (goal >= 1.0x): missed",
        "polyak sync K=2 time to 0.97 with start-up = 25.00 s, Ray Train 20.00 s (goal: no worse): missed",
    ]


def test_every_system_runs_once_a_round_in_a_rotated_order():
    assert peers.plan_of(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a")]
