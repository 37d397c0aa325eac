"""PolyakClassifier against scikit-learn's MLPClassifier: speed per epoch and cross-validated accuracy.

    python bench/bench_estimator.py             # 60,000 x 784 rows, 3 epochs a fit, 3 rounds; digits, breast_cancer
    python bench/bench_estimator.py --quick     # 10,000 rows, 1 round
    python bench/bench_estimator.py --rounds 7  # more rounds (a noisy machine), --speed-only: no accuracy part
    python bench/bench_estimator.py --realtime  # both fits under SCHED_FIFO: other processes cannot preempt them

Speed: the same synthetic data (60,000 x 784 float32, 10 classes), the same network (784-256-10, relu), the same
optimizer (Adam, lr 1e-3, scikit-learn's defaults), batch 200 (scikit-learn's "auto"), the same epochs
(neither stops early: n_iter_no_change above the epochs for both), float32 for both (MLPClassifier keeps
float32 input in float32), in this one process, so both use the same NumPy BLAS on the same cores. The fits
alternate, which goes first swapping each round; seconds per epoch are min / median / max over the rounds, and
the ratio is scikit-learn's median over polyak's (above 1: polyak is faster); each round's own ratio (its two
fits back to back) is printed too, with its median, min and max.
polyak runs in this process (num_workers=0). On a machine shared with other work, two BLAS threads that wait for
each other lose whole time slices to any other process; ``--realtime`` moves every thread of this process (BLAS's
included) to SCHED_FIFO first (root or CAP_SYS_NICE), so that neither fit is preempted, as on an idle machine.

Accuracy: 5-fold ``cross_val_score`` of StandardScaler + each classifier, 64 hidden units, 100 epochs, on
scikit-learn's digits and breast_cancer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import cross_val_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info

from polyak import PolyakClassifier


def classifiers(hidden: tuple[int, ...], epochs: int, dtype: str) -> dict:
    """The two, configured alike: Adam lr 1e-3, batch 200, a fixed number of epochs."""
    return {
        "polyak": PolyakClassifier(hidden_layer_sizes=hidden, max_iter=epochs, n_iter_no_change=epochs + 1,
                                   batch_size=200, method="adam", lr=1e-3, random_state=0, dtype=dtype),
        "sklearn": MLPClassifier(hidden_layer_sizes=hidden, max_iter=epochs, n_iter_no_change=epochs + 1,
                                 batch_size=200, solver="adam", learning_rate_init=1e-3, random_state=0),
    }


def speed(n_rows: int, epochs: int, rounds: int) -> None:
    X, y = make_classification(n_rows, 784, n_informative=60, n_classes=10, random_state=0)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    per_epoch = {"polyak": [], "sklearn": []}
    for r in range(rounds):
        order = ["polyak", "sklearn"] if r % 2 == 0 else ["sklearn", "polyak"]
        for name in order:
            clf = classifiers((256,), epochs, "float32")[name]
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(X, y)
            per_epoch[name].append((time.perf_counter() - t) / clf.n_iter_)
            print(f"  round {r + 1} {name:8s} {per_epoch[name][-1]:.3f} s/epoch ({clf.n_iter_} epochs, "
                  f"train accuracy {clf.score(X[:5000], y[:5000]):.3f})", flush=True)
    print(f"\n784-256-10, {n_rows} rows, batch 200, Adam, float32, {epochs} epochs a fit, {rounds} round(s):")
    for name, times in per_epoch.items():
        print(f"  {name:8s} s/epoch min {min(times):.3f}  median {statistics.median(times):.3f}  max {max(times):.3f}")
    ratio = statistics.median(per_epoch["sklearn"]) / statistics.median(per_epoch["polyak"])
    print(f"  polyak speed / scikit-learn speed = {ratio:.2f}x by the medians (goal >= 1.5x)")
    # A round's two fits run back to back, so the host's slow minutes fall on both: their ratio drifts less than
    # either time does.
    paired = [s / p for s, p in zip(per_epoch["sklearn"], per_epoch["polyak"], strict=True)]
    print(f"  each round's ratio (its two fits back to back): median {statistics.median(paired):.2f}x, min "
          f"{min(paired):.2f}x, max {max(paired):.2f}x")


def accuracy() -> None:
    print("\n5-fold cross_val_score, StandardScaler + classifier, 64 hidden, 100 epochs:")
    for name, loader in (("digits", load_digits), ("breast_cancer", load_breast_cancer)):
        X, y = loader(return_X_y=True)
        scores = {}
        for kind, clf in classifiers((64,), 100, "float64").items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                scores[kind] = cross_val_score(make_pipeline(StandardScaler(), clf), X, y, cv=5).mean()
        gap = scores["polyak"] - scores["sklearn"]
        print(f"  {name:14s} polyak {scores['polyak']:.4f}  scikit-learn {scores['sklearn']:.4f}  "
              f"difference {gap:+.4f} (goal >= -0.01)")


def realtime(priority: int = 10) -> None:
    """Every thread of this process (NumPy's BLAS pool is already running) under SCHED_FIFO."""
    param = os.sched_param(priority)
    try:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setscheduler(int(tid), os.SCHED_FIFO, param)
    except (PermissionError, AttributeError, FileNotFoundError) as e:
        raise SystemExit(f"--realtime: cannot use SCHED_FIFO here ({e}); it needs Linux and root or "
                         "CAP_SYS_NICE") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 rows and one round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the speed part (default 3)")
    parser.add_argument("--speed-only", action="store_true", help="skip the accuracy part")
    parser.add_argument("--realtime", action="store_true",
                        help="run every thread under SCHED_FIFO, shielded from other processes (root/CAP_SYS_NICE)")
    args = parser.parse_args()
    if args.realtime:
        realtime()
    blas = [f"{i['internal_api']} {i['version']} threads={i['num_threads']}" for i in threadpool_info()
            if i["user_api"] == "blas"]
    print(f"NumPy {np.__version__}, BLAS {'; '.join(blas)}{'; SCHED_FIFO' if args.realtime else ''}; "
          f"1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    speed(10_000 if args.quick else 60_000, 3, 1 if args.quick else args.rounds)
    if not args.speed_only:
        accuracy()


if __name__ == "__main__":
    main()
