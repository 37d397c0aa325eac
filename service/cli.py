"""The ``polyak`` entry point: the client's commands plus ``serve`` and ``train``.

Ray is imported only inside ``serve`` and ``train``, so ``polyak submit`` starts fast.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
from pathlib import Path

import click

from client.commands import cli
from client.display import TrainingDisplay
from client.errors import SpecError
from client.models import JobState, StopReason
from client.spec import parse_spec


def _fail(message: str, code: int = 2) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default="weights.npz", show_default=True,
              help="where to write the final weights (.npz)")
@click.option("--json", "as_json", is_flag=True, help="print one EpochMetrics JSON object per line")
@click.option("--ray-address", default=None, help="Ray cluster to join; default: start a local Ray")
@click.option("--job-dir", type=click.Path(path_type=Path), default=None,
              help="checkpoint folder; a run pointed at an existing one resumes from its checkpoint")
def train(spec: Path, output: Path, as_json: bool, ray_address: str | None, job_dir: Path | None) -> None:
    """Train one job on Ray without the service (local mode, and the `ray job submit` entrypoint)."""
    from service.engine.checkpoint import save_npz
    from service.engine.trainer import Hooks, train_job, weights_file
    from workers.backend import DeviceError
    from workers.data import prepare

    try:
        job_spec = parse_spec(spec)
        info = prepare(job_spec.data, job_spec.model)
    except SpecError as e:
        _fail(f"{spec}: {e.message}")
    except ValueError as e:  # DataError, and generators' own complaints (sklearn's make_classification)
        _fail(str(e))

    cancel = threading.Event()

    def on_sigint(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        click.echo("cancelling at the next step (Ctrl-C again to abort)", err=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    started_ray = False
    try:
        if job_spec.cluster.num_workers > 0:
            from service.engine.ray_engine import cluster_summary, connect

            started_ray = connect(ray_address)
            if not started_ray:  # joined a cluster: say which one, before anything runs on it
                click.echo(f"joined the {cluster_summary()}", err=True)
        with tempfile.TemporaryDirectory(prefix="polyak-") as scratch:
            hooks = Hooks(should_cancel=cancel.is_set, job_dir=job_dir or Path(scratch))
            if as_json:
                hooks.on_epoch = lambda m: print(m.model_dump_json(), flush=True)
                hooks.on_start = lambda where: click.echo(f"running {where}", err=True)
                result = train_job(job_spec, "train", hooks, info)
            else:
                with TrainingDisplay(max_epochs=job_spec.stopping.max_epochs, title=str(spec)) as display:
                    hooks.on_epoch = display.update
                    hooks.on_start = lambda where: display.note(f"running {where}")
                    result = train_job(job_spec, "train", hooks, info)
                    display.finish(result.state.value, result.stop_reason.value, result.error)
    except (ValueError, DeviceError, ConnectionError) as e:  # data, weights, device, Ray address
        _fail(str(e))
    finally:
        signal.signal(signal.SIGINT, previous)
        if started_ray:
            import ray

            ray.shutdown()
    save_npz(output, weights_file(result.weights, job_spec, info))
    click.echo(f"weights written to {output}", err=True)
    if as_json:
        click.echo(json.dumps({"state": result.state.value, "stop_reason": result.stop_reason.value,
                               "error": result.error, "weights": str(output)}), err=True)
    if result.state == JobState.FAILED:
        _fail(result.error or "training failed", 1)
    if result.stop_reason == StopReason.CANCELLED:
        sys.exit(130)


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
    import logging
    import os
    import sqlite3

    import uvicorn

    from service.server.api import create_app
    from service.server.cluster import Cluster, ClusterUnavailable
    from service.server.scheduler import Scheduler
    from service.server.store import Store

    server_token = server_token or None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may well resolve to a public address
        loopback = False
    if not loopback and server_token is None:
        _fail(f"refusing to listen on {host} without a token: anyone who can reach it could run jobs. "
              "Pass --token (or set POLYAK_TOKEN), or listen on 127.0.0.1.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    # Ray's driver would take SIGTERM over from uvicorn and die on it at once: no graceful shutdown,
    # and the local Ray left running.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        lock = _lock_data_dir(data_dir)  # held until the process exits, however it exits
        store = Store(data_dir)
    except (OSError, sqlite3.Error) as e:
        _fail(f"cannot open the job database in {data_dir}: {e}")
    cluster = Cluster(ray_address)
    try:
        if ray_address:
            cluster.capacity()  # a wrong address should fail now, not with the first job
        scheduler = Scheduler(store, cluster, max_concurrent_jobs)
        app = create_app(scheduler, token=server_token, data_root=data_root)
        app.state.data_dir_lock = lock
        logging.getLogger("polyak").info(
            "starting polyak on http://%s:%d (data dir %s, up to %d job(s) at once%s)", host, port,
            data_dir.resolve(), max_concurrent_jobs, ", token required" if server_token else "")
        # Open event streams would otherwise hold a shutdown until their jobs end.
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    except ClusterUnavailable as e:
        _fail(str(e))
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it has already shut down on
        pass
    finally:  # the app's lifespan stops Ray; this covers failing before it ran (a port in use)
        cluster.shutdown()
        store.close()


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
