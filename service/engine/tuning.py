"""Step sizes from the loss itself, before training (``polyak lr-find``): two independent estimates.

1. The learning-rate range test (Smith 2017; fastai's ``lr_find``, Lightning's ``Tuner.lr_find``): a short run
   from the spec's initial weights, with its update rule and batch size, while eta grows geometrically from
   1e-6 to 10; the loss is smoothed (bias-corrected EMA) and the suggestion is the eta where it falls fastest
   against log(eta).
2. Curvature at the initial weights: Hessian-vector products as central differences of gradients, and Lanczos
   on them for the extreme eigenvalues. lambda_max bounds the stable step; for a quadratic loss (no hidden
   layers, mse) lambda_min gives kappa and Polyak's best heavy-ball parameters (MATH.md, "What theory predicts").

Both run in float64 on at most ``SAMPLE_ROWS`` training rows, standardized as training sees them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from polyak.contract.spec import JobSpec
from polyak.service.engine.optim import Optimizer, new_state
from polyak.service.engine.schedules import batch_size, epoch_batches
from polyak.workers.data import DataInfo, load_part, prepare, split_of
from polyak.workers.mlp import MLP
from polyak.workers.readers import open_source

LR_MIN, LR_MAX = 1e-6, 10.0
SMOOTHING = 0.98  # the EMA's beta, as fastai
BLOW_UP = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
SKIP_BEGIN, SKIP_END = 10, 1  # Lightning's: the first points are mostly the EMA warming up
RULE = (f"steepest: the lr where the smoothed loss falls fastest against log(lr) "
        f"(fastai/Lightning; first {SKIP_BEGIN} and last {SKIP_END} points skipped)")
SAMPLE_ROWS = 20_000  # beyond this, a fixed sample of the training rows: the HVPs stay cheap
LANCZOS_MAX_ITER = 80
LANCZOS_TOL = 1e-4  # relative residual ||H y - theta y|| / |theta| of the extreme Ritz pairs


# -- the data and the loss as training sees them ---------------------------------------------------------
@dataclass
class Problem:
    """The loss of a spec on fixed rows: mean loss and mean gradient (L2 included), in float64."""

    mlp: MLP
    X: object  # (n, m_0) standardized as data.standardize says, training order
    y: object
    optimizer: Optimizer  # its regularize() adds weight_decay * W to g, as the parameter server does
    n_train: int  # all training rows; len(X) may be fewer (a fixed sample)

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def full_batch(self) -> bool:
        return self.n == self.n_train

    def grad(self, W, idx=None) -> tuple[object, float]:
        """(g, mean loss) over the rows ``idx`` (training-order positions), or over all rows."""
        if idx is not None:
            idx = self.mlp.xp.asarray(idx)
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        g, loss_sum, n = self.mlp.loss_and_grad(W, X, y)
        g /= n
        return self.optimizer.regularize(g, W), loss_sum / n

    def describe(self) -> str:
        if self.full_batch:
            return f"full batch: all {self.n:,} training rows"
        return f"a fixed batch of {self.n:,} of the {self.n_train:,} training rows (the first of the training order)"


def load_problem(spec: JobSpec, xp=np, info: DataInfo | None = None, max_rows: int = SAMPLE_ROWS) -> Problem:
    """The first ``max_rows`` training rows (all, for small data), standardized with the statistics of all
    training rows (``info``'s, from ``prepare``), exactly as the engines load them. Raises DataError / ValueError
    as training would."""
    info = info if info is not None else prepare(spec.data, spec.model)
    source = open_source(spec.data, spec.model)
    rows = split_of(spec.data, spec.model, source.n).train_rows(0, min(info.n_train, max_rows))
    part = load_part(source, rows, np.float64, info.stats, spec.model.layers)
    back = np.argsort(np.argsort(rows, kind="stable"), kind="stable")  # load_part holds rows sorted
    m = spec.model
    mlp = MLP(m.layers, m.activation, m.loss, xp, np.float64)
    optimizer = Optimizer(spec.optimizer, m.layers)
    return Problem(mlp, xp.asarray(part.X[back]), xp.asarray(part.y[back]), optimizer, info.n_train)


# -- 1. the range test -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RangeTest:
    lrs: list[float]  # eta of each step taken
    losses: list[float]  # minibatch loss before each step
    smoothed: list[float]
    suggested_lr: float | None
    rule: str
    stopped: str  # why the run ended
    batch_size: int
    method: str

    def as_dict(self) -> dict:
        return {"suggested_lr": self.suggested_lr, "rule": self.rule, "stopped": self.stopped,
                "method": self.method, "batch_size": self.batch_size, "lr_min": LR_MIN, "lr_max": LR_MAX,
                "steps": len(self.lrs), "lrs": self.lrs, "losses": self.losses, "smoothed": self.smoothed}


def geometric_lrs(steps: int, lr_min: float = LR_MIN, lr_max: float = LR_MAX) -> np.ndarray:
    """eta_t = lr_min (lr_max / lr_min)^(t / (steps - 1)), t = 0..steps-1."""
    return lr_min * (lr_max / lr_min) ** (np.arange(steps) / (steps - 1))


def steepest(lrs, smoothed, skip_begin: int = SKIP_BEGIN, skip_end: int = SKIP_END) -> int | None:
    """Index of the most negative d(smoothed loss)/d(log eta), or None with too few points to tell."""
    lrs, smoothed = np.asarray(lrs), np.asarray(smoothed)
    if len(smoothed) < skip_begin + skip_end + 2:
        return None
    slope = np.gradient(smoothed, np.log(lrs))[skip_begin : len(smoothed) - skip_end]
    return skip_begin + int(np.argmin(slope))


def batches(spec: JobSpec, n: int) -> Iterator[np.ndarray]:
    """The trainer's batches, epoch after epoch (schedules.epoch_batches), without end."""
    return itertools.chain.from_iterable(epoch_batches(spec.batch, spec.model.seed, e, n) for e in itertools.count())


def range_test(spec: JobSpec, problem: Problem, W0, steps: int,
               on_step: Callable[[int, float, float], None] = lambda t, lr, loss: None) -> RangeTest:
    """Train from W0 with the spec's rule while eta grows geometrically; stop when the smoothed loss blows up.
    ``on_step(t, eta, loss)`` after each step (progress)."""
    lrs_all = geometric_lrs(steps)
    optimizer = Optimizer(spec.optimizer, spec.model.layers)
    optimizer.schedule = lambda t: float(lrs_all[t])  # the range replaces the spec's own schedule
    state = new_state(W0, problem.mlp.xp, optimizer.buffers)
    losses, smoothed, avg, best = [], [], 0.0, math.inf
    stopped = f"reached lr = {LR_MAX:g}"
    with np.errstate(all="ignore"):  # the last steps overflow on purpose
        for t, idx in zip(range(steps), batches(spec, problem.n), strict=False):
            g, loss = problem.grad(state.W, idx)
            if not math.isfinite(loss):
                stopped = f"the loss became non-finite at lr = {lrs_all[t]:.3g}"
                break
            # fastai's smoothing: an EMA from 0, divided by 1 - beta^t so its first values are not pulled to 0
            avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
            s = avg / (1 - SMOOTHING ** (t + 1))
            losses.append(loss)
            smoothed.append(s)
            on_step(t, float(lrs_all[t]), loss)
            best = min(best, s)
            if s > BLOW_UP * best:
                stopped = f"the smoothed loss passed {BLOW_UP:g}x its minimum at lr = {lrs_all[t]:.3g}"
                break
            optimizer.apply(state, g)
    lrs = lrs_all[: len(losses)]
    at = steepest(lrs, smoothed)
    return RangeTest([float(x) for x in lrs], [float(x) for x in losses], [float(x) for x in smoothed],
                     None if at is None else float(lrs[at]), RULE, stopped,
                     batch_size(spec.batch, problem.n, 0), spec.optimizer.method)


# -- 2. curvature ----------------------------------------------------------------------------------------------
def fd_hvp(grad: Callable, W, h: float) -> Callable:
    """v -> H v ~ (g(W + h v) - g(W - h v)) / (2 h) for unit v: exact on a quadratic, O(h^2) otherwise."""

    def hvp(v):
        return (grad(W + h * v) - grad(W - h * v)) / (2 * h)

    return hvp


def fd_step(W, xp=np) -> float:
    """The finite-difference step h of fd_hvp at W: 1e-6 (1 + ||W||).

    Small: a wider h lets a relu's kinks fall inside +-h v for some rows, and their gradient jumps / h then add
    curvature the a.e. Hessian (torch's) does not have, and a smooth loss's O(h^2) error grows; float64 keeps
    rounding at ~1e-16 / h. (On a quadratic any h is exact: its gradient is linear.)"""
    return 1e-6 * (1.0 + float(xp.linalg.norm(W)))


def lanczos(hvp: Callable, v0, xp=np, max_iter: int = LANCZOS_MAX_ITER, tol: float = LANCZOS_TOL,
            smallest: bool = False) -> tuple[float, float, int, bool]:
    """(largest, smallest Ritz value, HVPs used, converged) of symmetric H from products alone.

    Lanczos is power iteration that keeps its Krylov space: its top Ritz value is the best Rayleigh quotient in
    the span of every power iterate, so it is never worse than power iteration after as many products; its
    bottom one converges at a rate set by sqrt(kappa), where power iteration on lambda_max I - H has kappa. Full
    reorthogonalization keeps the basis orthogonal in floating point. Stops when the wanted extreme Ritz pairs'
    residuals ||H y - theta y|| = beta_k |s_k| are below tol |theta|, or the space is invariant (beta ~ 0)."""
    q = v0 / xp.linalg.norm(v0)
    Q, alphas, betas = [q], [], []
    for k in range(1, max_iter + 1):
        w = hvp(Q[-1])
        alphas.append(float(xp.dot(Q[-1], w)))
        basis = xp.stack(Q)  # (k, p)
        for _ in range(2):  # twice is enough (Kahan's "twice is enough")
            w = w - basis.T @ (basis @ w)
        beta = float(xp.linalg.norm(w))
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, S = np.linalg.eigh(T)
        wanted = [-1, 0] if smallest else [-1]
        if beta <= 1e-12 * max(abs(theta).max(), 1e-300) or all(
            beta * abs(S[-1, j]) <= tol * abs(theta[j]) for j in wanted
        ):
            return float(theta[-1]), float(theta[0]), k, True
        betas.append(beta)
        Q.append(w / beta)
    return float(theta[-1]), float(theta[0]), max_iter, False


def is_quadratic(spec: JobSpec) -> bool:
    """No hidden layers and mse: the loss is exactly quadratic in W (L2 weight decay keeps it so)."""
    return len(spec.model.layers) == 2 and spec.model.loss == "mse"


def polyak_heavy_ball(L: float, mu: float) -> tuple[float, float]:
    """The spec's (lr, alpha) for Polyak's best heavy ball on eigenvalues in [mu, L] (MATH.md):
    1 - alpha = ((sqrt(kappa) - 1)/(sqrt(kappa) + 1))^2 and alpha * lr = 4/(sqrt(L) + sqrt(mu))^2, so
    alpha = 4 sqrt(L mu)/(sqrt(L) + sqrt(mu))^2 and lr = 1/sqrt(L mu)."""
    root = math.sqrt(L) + math.sqrt(mu)
    return 1.0 / math.sqrt(L * mu), 4.0 * math.sqrt(L * mu) / root**2


def stable_lr(method: str, alpha: float, lam_max: float) -> float | None:
    """The largest stable ``optimizer.lr`` of the method on a quadratic of top curvature lambda_max (Jury's
    criterion on each eigen-direction's recursion, step s = alpha lr, momentum 1 - alpha):
    sgd lr lambda < 2; heavy ball s lambda < 2(2 - alpha); nesterov s lambda < 2(2 - alpha)/(3 - 2 alpha).
    None for the adaptive rules, whose per-coordinate scaling changes the curvature the step sees."""
    if lam_max <= 0:
        return None
    if method == "sgd":
        return 2.0 / lam_max
    if method == "heavy_ball":
        return 2.0 * (2.0 - alpha) / (alpha * lam_max)
    if method == "nesterov":
        return 2.0 * (2.0 - alpha) / ((3.0 - 2.0 * alpha) * alpha * lam_max)
    return None


@dataclass(frozen=True)
class Curvature:
    lambda_max: float
    lambda_min: float | None  # quadratic losses only
    lr_bound: float | None  # the spec's method: the largest stable optimizer.lr (stable_lr)
    gd_lr_bound: float | None  # 2 / lambda_max: plain gradient descent's bound
    heavy_ball: dict | None  # {"lr", "alpha"}: Polyak's, for a quadratic with lambda_min > 0
    hvps: int  # each one two gradients over the rows
    batch: str  # "full batch: ..." or "a fixed batch of ..."
    full_batch: bool
    rows: int
    h: float  # the finite-difference step
    note: str | None  # why lambda_min / heavy_ball are null

    @property
    def kappa(self) -> float | None:
        return self.lambda_max / self.lambda_min if self.lambda_min and self.lambda_min > 0 else None

    def as_dict(self) -> dict:
        return {"lambda_max": self.lambda_max, "lr_bound": self.lr_bound, "gd_lr_bound": self.gd_lr_bound,
                "lambda_min": self.lambda_min, "kappa": self.kappa, "heavy_ball": self.heavy_ball,
                "method": "lanczos on Hessian-vector products (central differences of gradients)",
                "hvps": self.hvps, "batch": self.batch, "full_batch": self.full_batch, "rows": self.rows,
                "fd_step": self.h, "note": self.note}


def curvature(spec: JobSpec, problem: Problem, W0, seed: int = 0) -> Curvature:
    """lambda_max of the loss's Hessian at W0 (and lambda_min, kappa, Polyak's parameters for a quadratic)."""
    xp = problem.mlp.xp
    W = xp.asarray(W0, dtype=np.float64)
    h = fd_step(W, xp)
    hvp = fd_hvp(lambda V: problem.grad(V)[0], W, h)
    v0 = xp.asarray(np.random.default_rng([seed, 17]).standard_normal(W.shape[0]))
    quadratic = is_quadratic(spec)
    lam_max, lam_min, k, converged = lanczos(hvp, v0, xp, smallest=quadratic)
    heavy, notes = None, []
    if not converged:
        notes.append(f"Lanczos stopped at {k} products, its residual still above {LANCZOS_TOL:g} |lambda|: rough")
    if not quadratic:
        lam_min = None
        notes.append("lambda_min, kappa and heavy-ball parameters need a quadratic loss (no hidden layers, mse)")
    elif lam_min <= 1e-12 * lam_max:
        notes.append(f"lambda_min = {lam_min:.3g}: not strongly convex (kappa infinite), no Polyak parameters")
    else:
        lr, alpha = polyak_heavy_ball(lam_max, lam_min)
        heavy = {"lr": lr, "alpha": alpha}
    o = spec.optimizer
    return Curvature(lam_max, lam_min, stable_lr(o.method, o.alpha, lam_max),
                     2.0 / lam_max if lam_max > 0 else None, heavy, k, problem.describe(),
                     problem.full_batch, problem.n, h, "; ".join(notes) or None)
