"""The ``polyak`` entry point: the client's commands plus ``serve``, ``train`` and ``lr-find``.

Ray is imported only inside ``serve`` and ``train``, so ``polyak submit`` starts fast.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import NoReturn

import click
import polyak.client.model_commands  # noqa: F401  (registers predict, evaluate, export)
import polyak.client.sweep_commands  # noqa: F401  (registers sweep, compare)
from polyak.client.commands import cli
from polyak.client.display import TrainingDisplay
from polyak.client.errors import SpecError
from polyak.client.models import JobState, StopReason
from polyak.client.ray_job import WEIGHTS_LINE_KEY
from polyak.client.spec import optimizer_summary, parse_spec


def _fail(message: str, code: int = 2) -> NoReturn:
    """One red ``error:`` line and the exit status of polyak's convention (see ``polyak --help``)."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("-o", "--output", default="weights.npz", show_default=True,
              help="where to write the final weights (.npz): a path in an existing folder, or a URI (s3://, gs://, "
                   "file://) for shared storage")
@click.option("--emit-weights", is_flag=True,
              help="also print the weights file on stdout as one JSON line (base64): how `polyak ray-submit -o` "
                   "brings a cluster job's weights back")
@click.option("--json", "as_json", is_flag=True, help="print one EpochMetrics JSON object per line")
@click.option("--ray-address", default=None, help="Ray cluster to join; default: start a local Ray")
@click.option("--job-dir", type=click.Path(path_type=Path), default=None,
              help="checkpoint folder; a run pointed at an existing one resumes from its checkpoint")
def train(spec: Path, output: str, emit_weights: bool, as_json: bool, ray_address: str | None,
          job_dir: Path | None) -> None:
    """Train one job on Ray without the service (local mode, and the `ray job submit` entrypoint)."""
    from polyak.client.errors import PolyakError
    from polyak.client.files import npz_bytes, write_output
    from polyak.service.engine.trainer import weights_file

    job_spec, info = _prepare(spec, output)
    display = None
    if not as_json:
        title = f"{job_spec.name or spec} · {optimizer_summary(job_spec.optimizer)}"
        display = TrainingDisplay(max_epochs=job_spec.stopping.max_epochs, title=title,
                                  all_epochs="--json prints every epoch")
    result = _train(job_spec, info, display, ray_address, job_dir)
    weights = npz_bytes(weights_file(result.weights, job_spec, info))
    try:
        where = write_output(output, weights)
    except PolyakError as e:
        _fail(e.message, 1)
    click.echo(f"weights written to {where}", err=True)
    if emit_weights:
        print(json.dumps({WEIGHTS_LINE_KEY: base64.b64encode(weights).decode()}), flush=True)
    if as_json:
        click.echo(json.dumps({"state": result.state.value, "stop_reason": result.stop_reason.value,
                               "error": result.error, "weights": str(output)}), err=True)
    if result.state == JobState.FAILED:
        _fail(result.error or "training failed", 1)
    if result.stop_reason == StopReason.CANCELLED:
        sys.exit(130)


def _prepare(spec: Path, output: str | None):
    """The spec and its data's shape, checked before Ray starts; a bad one exits 2 naming what is wrong."""
    from polyak.client.errors import PolyakError
    from polyak.client.files import check_output
    from polyak.workers.data import prepare

    try:
        if output is not None:
            check_output(output)
        job_spec = parse_spec(spec)
        return job_spec, prepare(job_spec.data, job_spec.model)
    except SpecError as e:
        _fail(e.message if str(spec) in e.message else f"{spec}: {e.message}")
    except PolyakError as e:
        _fail(e.message)
    except ValueError as e:  # DataError, and generators' own complaints (sklearn's make_classification)
        _fail(str(e))


def _train(job_spec, info, display: TrainingDisplay | None, ray_address: str | None, job_dir: Path | None):
    """The TrainResult, shown live on ``display``, or as JSON lines on stdout and notes on stderr without one."""
    import numpy as np
    from polyak.service.engine.trainer import Hooks, train_job
    from polyak.workers.backend import DeviceError

    say = display.note if display is not None else _note
    cancel = threading.Event()
    try:
        with contextlib.ExitStack() as stack:
            if display is not None:
                stack.enter_context(display)
            stack.enter_context(_cancel_on_sigint(cancel, say))
            if job_spec.cluster.num_workers > 0:
                _connect_ray(ray_address, job_spec.cluster.num_workers, say, stack)
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="polyak-"))
            hooks = Hooks(should_cancel=cancel.is_set, job_dir=job_dir or Path(scratch),
                          on_start=lambda where: say(f"running {where}"),
                          on_epoch=display.update if display is not None else _print_json)
            # A diverging run overflows NumPy on its way to a non-finite loss; the trainer detects that and
            # reports it as the job's error, so NumPy's own warnings would only say it again, worse.
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                result = train_job(job_spec, "train", hooks, info)
            if display is not None:
                # Without the error: it follows once, as the `error:` line.
                display.finish(result.state, result.stop_reason)
            return result
    except ConnectionError as e:  # a Ray cluster that cannot be reached, or refuses us
        _fail(str(e), 3)
    except (ValueError, DeviceError) as e:  # data, weights, device
        _fail(str(e))


@contextlib.contextmanager
def _cancel_on_sigint(cancel: threading.Event, say):
    """The first Ctrl-C stops training at its next step (its weights are still written); a second aborts."""

    def on_sigint(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        say("cancelling at the next step (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _connect_ray(address: str | None, workers: int, say, stack: contextlib.ExitStack) -> None:
    """Start or join Ray, saying which first: starting one takes seconds, and the screen would be blank."""
    from polyak.service.engine.ray_engine import cluster_summary, connect

    _quiet_ray()
    if address in (None, "", "local") and not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # connect()'s rule
        say(f"starting a local Ray for {workers} worker(s) ...")
    else:
        say(f"joining the Ray cluster at {address or 'auto'} ...")
    if connect(address):
        import ray

        stack.callback(ray.shutdown)
    else:  # joined a cluster: say which one, before anything runs on it
        say(f"joined the {cluster_summary()}")


# Ray's warnings that are no news for a Ray that polyak starts itself, by the logger that says them.
_NO_NEWS = {
    # Token authentication is Ray's default for a new local Ray, announced on every start.
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
    # `serve` starts Ray off the main thread on purpose: SIGTERM stays with uvicorn, for a graceful shutdown.
    "ray._private.worker": "SIGTERM handler is not set because current thread is not the main thread",
}


class _NoNews(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not record.getMessage().startswith(self.prefix)


def _quiet_ray() -> None:
    """Drop _NO_NEWS's warnings and nothing else: Ray's other warnings, and any error, still show.

    Filters on Ray's loggers, not RAY_AUTH_MODE=token: Ray reads that variable once, when it is imported, so
    setting it later would start a Ray whose own driver does not send the token it demands."""
    for name, prefix in _NO_NEWS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoNews) for f in logger.filters):
            logger.addFilter(_NoNews(prefix))


def _note(text: str) -> None:
    click.echo(text, err=True)


def _print_json(m) -> None:
    print(m.model_dump_json(), flush=True)


@cli.command(name="lr-find")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("-o", "--output", default=None,
              help="plot the range test and the curvature bound to this image file; its extension picks the type")
@click.option("--json", "as_json", is_flag=True, help="print both estimates as one JSON object")
@click.option("--steps", type=click.IntRange(20, 500), default=200, show_default=True,
              help="range-test steps from eta = 1e-6 to 10 (fewer when the loss blows up first)")
def lr_find(spec: Path, output: str | None, as_json: bool, steps: int) -> None:
    """Step sizes for SPEC from its loss, before training, two ways: a learning-rate range test (the smoothed
    loss's steepest descent), and the curvature at the initial weights (lambda_max gives the stable lr; for a
    quadratic loss also lambda_min, kappa and Polyak's heavy-ball lr and alpha, ready to paste)."""
    import numpy as np
    from polyak.client.commands import check_image_output, make_console
    from polyak.client.errors import PolyakError
    from polyak.client.files import write_output
    from polyak.client.tuning_plot import lr_find_bytes
    from polyak.service.engine.trainer import initial_weights
    from polyak.service.engine.tuning import curvature, load_problem, range_test
    from polyak.workers.backend import DeviceError, get_backend
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if output is not None:
        try:
            check_image_output(output)
        except PolyakError as e:
            _fail(e.message)
    job_spec, info = _prepare(spec, output)
    console = make_console()
    progress_console = Console(stderr=True, highlight=False)
    try:
        W0 = initial_weights(job_spec).astype(np.float64)
        problem = load_problem(job_spec, get_backend(job_spec.cluster.device).xp, info)
    except (ValueError, DeviceError) as e:  # data, weights, device
        _fail(str(e))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[now]}"),
                  console=progress_console, transient=True) as bar:
        task = bar.add_task("range test", total=steps, now="")
        test = range_test(job_spec, problem, W0, steps,
                          lambda t, lr, loss: bar.update(task, completed=t + 1, now=f"lr {lr:.2e}  loss {loss:.4g}"))
    with progress_console.status("curvature: Lanczos on Hessian-vector products ..."):
        curv = curvature(job_spec, problem, W0)
    found = {"range_test": test.as_dict(), "curvature": curv.as_dict()}
    if as_json:
        click.echo(json.dumps(found))
    else:
        _show_lr_find(console, job_spec, spec, found, problem.mlp.xp is np)
    if output is not None:
        title = f"lr-find: {job_spec.name or spec} · {optimizer_summary(job_spec.optimizer)}"
        try:
            where = write_output(output, lr_find_bytes(found, Path(output).suffix.lstrip(".").lower(), title))
        except PolyakError as e:
            _fail(e.message)
        click.echo(f"wrote {Path(where).absolute()}", err=True)


def _show_lr_find(console, job_spec, spec: Path, found: dict, on_cpu: bool) -> None:
    """The two estimates side by side, then Polyak's parameters as YAML to paste."""
    from rich.table import Table
    from rich.text import Text

    test, curv, o = found["range_test"], found["curvature"], job_spec.optimizer
    momentum = f" (alpha {o.alpha:g})" if o.method in ("heavy_ball", "nesterov") else ""

    def grid(rows):
        g = Table.grid(padding=(0, 2))
        g.add_column(style="bold", no_wrap=True)
        g.add_column()
        for key, value in rows:
            g.add_row(key, Text(value))
        return g

    def num(x, fmt=".4g"):
        return "-" if x is None else format(x, fmt)

    left = grid([
        ("suggested lr", num(test["suggested_lr"])),
        ("rule", test["rule"]),
        ("run", f"{test['steps']} steps of {test['method']}{momentum}, batch {test['batch_size']}, "
                f"lr {test['lr_min']:g} -> {test['lr_max']:g} geometrically"),
        ("stopped", test["stopped"]),
    ])
    bound = (f"lr < {num(curv['lr_bound'])} for {o.method}{momentum}" if curv["lr_bound"] is not None
             else f"none for {o.method} (per-coordinate steps)")
    rows = [("lambda_max", num(curv["lambda_max"])), ("stable", bound),
            ("GD bound", f"2 / lambda_max = {num(curv['gd_lr_bound'])}")]
    if curv["lambda_min"] is not None:
        rows += [("lambda_min", num(curv["lambda_min"])), ("kappa", num(curv["kappa"]))]
    if curv["heavy_ball"] is not None:
        hb = curv["heavy_ball"]
        rows.append(("Polyak", f"heavy_ball lr {num(hb['lr'])}, alpha {num(hb['alpha'])}"))
    rows.append(("from", f"{curv['batch']}; {curv['hvps']} Hessian-vector products (central differences of "
                         f"gradients, h = {curv['fd_step']:.1e}), Lanczos"))
    if curv["note"]:
        rows.append(("note", curv["note"]))
    table = Table(title=f"lr-find: {job_spec.name or spec} · {optimizer_summary(o)}")
    table.add_column("1. range test (from the initial weights)", max_width=70)
    table.add_column("2. curvature at the initial weights", max_width=70)
    table.add_row(left, grid(rows))
    console.print(table)
    standardized = "standardized (data.standardize)" if job_spec.data.standardize else "as given (not standardized)"
    console.print(Text(f"both in float64 on {'CPU' if on_cpu else 'GPU'}, features {standardized}", style="dim"))
    if curv["heavy_ball"] is not None:
        hb = curv["heavy_ball"]
        console.print(Text(f"Polyak's heavy ball for this data (kappa = {curv['kappa']:.4g}), ready to paste:"))
        console.print(Text(f"optimizer:\n  method: heavy_ball\n  lr: {hb['lr']:.4g}\n  alpha: {hb['alpha']:.4g}"),
                      soft_wrap=True)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=".polyak",
              show_default=True, help="job database, checkpoints, weights; a restart on it resumes every job")
@click.option("--ray-address", default=None,
              help="Ray cluster to join (auto, ADDR); default: a local Ray, started when a job needs it")
@click.option("--max-concurrent-jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="jobs running at once (each also needs its workers' CPUs/GPUs free)")
@click.option("--token", "server_token", envvar="POLYAK_TOKEN", default=None,
              help="require 'Authorization: Bearer TOKEN' on every route but /health  [env: POLYAK_TOKEN]")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="data.path and init_weights must lie in this folder; relative ones resolve against it")
def serve(host: str, port: int, data_dir: Path, ray_address: str | None, max_concurrent_jobs: int,
          server_token: str | None, data_root: Path | None) -> None:
    """Run the job service: HTTP API, durable job queue and scheduler."""
    import ipaddress
    import sqlite3

    import uvicorn
    from polyak.service.server.api import create_app
    from polyak.service.server.cluster import Cluster, ClusterUnavailable
    from polyak.service.server.scheduler import Scheduler
    from polyak.service.server.store import Store

    server_token = server_token or None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may well resolve to a public address
        loopback = False
    if not loopback and server_token is None:
        _fail(f"refusing to listen on {host} without a token: anyone who can reach it could run jobs. "
              "Pass --token (or set POLYAK_TOKEN), or listen on 127.0.0.1.")
    _check_port(host, port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    # Ray's driver would take SIGTERM over from uvicorn and die on it at once: no graceful shutdown,
    # and the local Ray left running.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    _quiet_ray()
    try:
        lock = _lock_data_dir(data_dir)  # held until the process exits, however it exits
        store = Store(data_dir)
    except (OSError, sqlite3.Error) as e:
        _fail(f"cannot open the job database in {data_dir}: {e}")
    cluster = Cluster(ray_address)
    try:
        if ray_address:
            cluster.capacity()  # a wrong address should fail now, not with the first job
            logging.getLogger("polyak").info("joined the %s", _cluster_summary())
        scheduler = Scheduler(store, cluster, max_concurrent_jobs)
        app = create_app(scheduler, token=server_token, data_root=data_root)
        app.state.data_dir_lock = lock
        logging.getLogger("polyak").info(
            "starting polyak on http://%s:%d (data dir %s, up to %d job(s) at once%s)", host, port,
            data_dir.resolve(), max_concurrent_jobs, ", token required" if server_token else "")
        # Open event streams would otherwise hold a shutdown until their jobs end.
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    except ClusterUnavailable as e:
        _fail(str(e), 3)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it has already shut down on
        pass
    finally:  # the app's lifespan stops Ray; this covers failing before it ran (a port taken meanwhile)
        cluster.shutdown()
        store.close()


def _check_port(host: str, port: int) -> None:
    """Fail before anything starts when HOST:PORT cannot be listened on: uvicorn would only log it, after Ray and
    the job database were up. SO_REUSEADDR, as uvicorn binds: a closed server's lingering connections are no
    obstacle, a listening server is."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            _fail(f"cannot listen on {host}:{port}: address already in use (another polyak serve? pick --port)", 3)
        _fail(f"cannot listen on {host}:{port}: {e.strerror or e}", 3)


def _cluster_summary() -> str:
    from polyak.service.engine.ray_engine import cluster_summary

    return cluster_summary()


def _lock_data_dir(data_dir: Path):
    """Two servers on one data dir would both resume its running jobs: the second one is refused."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / "serve.lock", "w")  # stays open, and locked, while the server runs
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _fail(f"another `polyak serve` is using the data dir {data_dir.resolve()}")
    return lock


def main() -> None:
    cli(prog_name="polyak")
