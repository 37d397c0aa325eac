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
    from service.checkpoint import save_npz
    from service.trainer import Hooks, train_job
    from workers.data import DataError, load_dataset
    from workers.mlp import to_dict

    try:
        job_spec = parse_spec(spec)
        dataset = load_dataset(job_spec.data, job_spec.model)
    except SpecError as e:
        _fail(f"{spec}: {e.message}")
    except DataError as e:
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
            from service.ray_engine import connect

            started_ray = connect(ray_address)
        with tempfile.TemporaryDirectory(prefix="polyak-") as scratch:
            hooks = Hooks(should_cancel=cancel.is_set, job_dir=job_dir or Path(scratch))
            if as_json:
                hooks.on_epoch = lambda m: print(m.model_dump_json(), flush=True)
                result = train_job(job_spec, "train", hooks, dataset)
            else:
                with TrainingDisplay(max_epochs=job_spec.stopping.max_epochs, title=str(spec)) as display:
                    hooks.on_epoch = display.update
                    result = train_job(job_spec, "train", hooks, dataset)
                    display.finish(result.state.value, result.stop_reason.value, result.error)
    except (DataError, ValueError) as e:
        _fail(str(e))
    finally:
        signal.signal(signal.SIGINT, previous)
        if started_ray:
            import ray

            ray.shutdown()
    save_npz(output, to_dict(result.weights, job_spec.model.layers))
    click.echo(f"weights written to {output}", err=True)
    if as_json:
        click.echo(json.dumps({"state": result.state.value, "stop_reason": result.stop_reason.value,
                               "error": result.error, "weights": str(output)}), err=True)
    if result.state == JobState.FAILED:
        _fail(result.error or "training failed", 1)
    if result.stop_reason == StopReason.CANCELLED:
        sys.exit(130)


def main() -> None:
    cli(prog_name="polyak")
