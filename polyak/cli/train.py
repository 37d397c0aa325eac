"""`polyak train` (one job on Ray or in this process, no service) and `polyak serve` (the job service).

Ray is imported only inside these commands, so `polyak submit` starts fast.
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

import click
import numpy as np

from polyak.cli.app import (
    cli,
    fail,
    prepare_run,
    require,
)
from polyak.client.display import TrainingDisplay
from polyak.client.files import npz_bytes, write_output
from polyak.client.ray_job import WEIGHTS_LINE_KEY
from polyak.contract.errors import PolyakError
from polyak.contract.spec import optimizer_summary
from polyak.contract.wire import JobState, StopReason


class MemorySize(click.ParamType):
    """A number of bytes, with an optional unit: 512M, 16G, 1.5GiB, 1000000."""

    name = "size"
    _UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("b").removesuffix("i")
        number, unit = text.rstrip("kmgt"), text[len(text.rstrip("kmgt")):]
        try:
            size = int(float(number) * self._UNITS[unit])
        except (ValueError, KeyError):
            size = 0
        if size < 1:
            self.fail(f"{value!r} is no memory size: a positive number of bytes, or with a unit (512M, 16G)", param,
                      ctx)
        return size


MAX_JOB_MEMORY_HELP = ("refuse a job whose estimated memory (weights, optimizer buffers, each worker's gradient and "
                       "batch activations; README: Limits) is above this, e.g. 16G  [default: half this machine's "
                       "memory]")


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
@click.option("--max-job-memory", type=MemorySize(), default=None, help=MAX_JOB_MEMORY_HELP)
def train(spec: Path, output: str, emit_weights: bool, as_json: bool, ray_address: str | None,
          job_dir: Path | None, max_job_memory: int | None) -> None:
    """Train one job on Ray without the service (local mode, and the `ray job submit` entrypoint)."""
    from polyak.service.engine.trainer import weights_file

    job_spec, info = prepare_run(spec, output, max_job_memory=max_job_memory)
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
        fail(e.message, 1)
    click.echo(f"weights written to {where}", err=True)
    if emit_weights:
        print(json.dumps({WEIGHTS_LINE_KEY: base64.b64encode(weights).decode()}), flush=True)
    if as_json:
        click.echo(json.dumps({"state": result.state.value, "stop_reason": result.stop_reason.value,
                               "error": result.error, "weights": str(output)}), err=True)
    if result.state == JobState.FAILED:
        fail(result.error or "training failed", 1)
    if result.stop_reason == StopReason.CANCELLED:
        sys.exit(130)


def _train(job_spec, info, display: TrainingDisplay | None, ray_address: str | None, job_dir: Path | None):
    """The TrainResult, shown live on ``display``, or as JSON lines on stdout and notes on stderr without one."""
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
        fail(str(e), 3)
    except (ValueError, DeviceError) as e:  # data, weights, device
        fail(str(e))


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
    require("train", "ray", "threadpoolctl")
    from polyak.service.engine.placement import cluster_summary, connect

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
@click.option("--max-dataset-bytes", type=click.IntRange(min=1), default=1 << 30, show_default=True,
              help="the largest upload POST /datasets stores (413 beyond it)")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="a Host name the server answers to besides the loopback names and --host (repeatable; '*': "
                   "any); other Hosts get 400, which keeps DNS-rebinding pages out. A server listening beyond "
                   "loopback (it has a token) answers to any Host unless names are given")
@click.option("--max-listeners", type=click.IntRange(min=1), default=100, show_default=True,
              help="event streams (GET /jobs/{id}/events) open at once; 503 beyond it")
@click.option("--max-job-memory", type=MemorySize(), default=None, help=MAX_JOB_MEMORY_HELP + "; 422 at submit")
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=20.0, show_default=True,
              help="seconds a connection has for a request's headers, and between two reads of its body; then it "
                   "is closed (an idle keep-alive connection: at most 5 s)")
def serve(host: str, port: int, data_dir: Path, ray_address: str | None, max_concurrent_jobs: int,
          server_token: str | None, data_root: Path | None, max_dataset_bytes: int, allowed_hosts: tuple[str, ...],
          max_listeners: int, max_job_memory: int | None, request_timeout: float) -> None:
    """Run the job service: HTTP API, durable job queue and scheduler."""
    require("server", "fastapi", "uvicorn", "ray")
    import ipaddress

    import uvicorn

    from polyak.service.server.api import create_app
    from polyak.service.server.cluster import Cluster, ClusterUnavailable
    from polyak.service.server.connections import with_deadline
    from polyak.service.server.guard import ANY_HOST, LOOPBACK_HOSTS
    from polyak.service.server.scheduler import Scheduler

    server_token = server_token or None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may well resolve to a public address
        loopback = False
    if not loopback and server_token is None:
        fail(f"refusing to listen on {host} without a token: anyone who can reach it could run jobs. "
              "Pass --token (or set POLYAK_TOKEN), or listen on 127.0.0.1.")
    _check_port(host, port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    # Ray's driver would take SIGTERM over from uvicorn and die on it at once: no graceful shutdown,
    # and the local Ray left running.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    _quiet_ray()
    lock, store = _open_data_dir(data_dir, data_root)
    cluster = Cluster(ray_address)
    try:
        if ray_address:
            cluster.connect()  # a wrong address should fail now, not with the first job
            cluster.capacity()  # read now: from the first request on, submit refuses a job too big for it
            logging.getLogger("polyak").info("joined the %s", _cluster_summary())
        scheduler = Scheduler(store, cluster, max_concurrent_jobs, max_job_memory=max_job_memory)
        # Beyond loopback the token keeps pages out, and clients reach the server by names it cannot know (a
        # Kubernetes Service, a load balancer): any Host, unless the operator names them.
        hosts = allowed_hosts or ((ANY_HOST,) if not loopback else ())
        app = create_app(scheduler, token=server_token, data_root=data_root, max_dataset_bytes=max_dataset_bytes,
                         allowed_hosts=(*LOOPBACK_HOSTS, host, *hosts), max_listeners=max_listeners)
        app.state.data_dir_lock = lock
        logging.getLogger("polyak").info(
            "starting polyak on http://%s:%d (data dir %s, up to %d job(s) at once%s)", host, port,
            data_dir.resolve(), max_concurrent_jobs, ", token required" if server_token else "")
        # Open event streams would otherwise hold a shutdown until their jobs end.
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3,
                    http=with_deadline(request_timeout), timeout_keep_alive=min(5.0, request_timeout))
    except ClusterUnavailable as e:
        fail(str(e), 3)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it has already shut down on
        pass
    finally:  # the app's lifespan stops Ray; this covers failing before it ran (a port taken meanwhile)
        cluster.shutdown()
        store.close()


def _open_data_dir(data_dir: Path, data_root: Path | None):
    """(the data dir's lock, held until the process exits however it exits; the job database). A database that
    takes no writes is said in one line: the server still serves its jobs and results. With a data root, files are
    checked where they are opened too, by this process and the workers of the Ray it starts."""
    import sqlite3

    from polyak.service.server.store import Store
    from polyak.workers.readers import confine_data

    if data_root is not None:
        confine_data([data_root, data_dir / "datasets"])

    try:
        lock = _lock_data_dir(data_dir)
        store = Store(data_dir)
    except (OSError, sqlite3.Error) as e:
        fail(f"cannot open the job database in {data_dir}: {e}")
    if store.write_error:
        logging.getLogger("polyak").warning("%s: serving reads only; every write is a 503 until it can be written "
                                            "(/health says when)", store.write_error)
    return lock, store


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
            fail(f"cannot listen on {host}:{port}: address already in use (another polyak serve? pick --port)", 3)
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}", 3)


def _cluster_summary() -> str:
    from polyak.service.engine.placement import cluster_summary

    return cluster_summary()


def _lock_data_dir(data_dir: Path):
    """Two servers on one data dir would both resume its running jobs: the second one is refused."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / "serve.lock", "w")  # stays open, and locked, while the server runs
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"another `polyak serve` is using the data dir {data_dir.resolve()}")
    return lock
