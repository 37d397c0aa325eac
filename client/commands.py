"""The client half of the ``polyak`` CLI: submit, list, status, metrics, cancel, weights, plot.

``service.cli`` adds ``serve`` and ``train`` to ``cli``. The group keeps ``url`` and ``token`` in
``ctx.obj``; an optional ``ctx.obj["client_factory"]`` (called as ``factory(url=..., token=...)``)
lets tests hand the commands a Client built on a mock transport.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from client.display import TrainingDisplay, criteria_table, metrics_table, state_text
from client.errors import PolyakError, SpecError
from client.models import JobInfo, JobState
from client.sdk import DEFAULT_URL, Client, Job
from client.spec import parse_spec


class _Group(click.Group):
    """Turns every PolyakError into one red ``error:`` line and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PolyakError as e:
            _print_error(e)
            ctx.exit(1)


@click.group(name="polyak", cls=_Group)
@click.option("--url", envvar="POLYAK_URL", default=DEFAULT_URL, show_default=True, help="polyak server URL")
@click.option("--token", envvar="POLYAK_TOKEN", default=None, help="bearer token, if the server wants one")
@click.pass_context
def cli(ctx: click.Context, url: str, token: str | None) -> None:
    """polyak: distributed minibatch SGD with heavy-ball momentum, as a job service."""
    ctx.ensure_object(dict)
    ctx.obj["url"] = url
    ctx.obj["token"] = token


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--follow", is_flag=True, help="show live progress until the job ends")
@click.pass_context
def submit(ctx: click.Context, spec: Path, follow: bool) -> None:
    """Queue the job described by the YAML/JSON file SPEC and print its id."""
    job_spec = parse_spec(spec)
    job = _client(ctx).submit(job_spec)
    click.echo(job.id)
    if follow:
        _follow(ctx, job, job_spec.stopping.max_epochs)


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--follow", is_flag=True, help="show live progress until the new job ends")
@click.pass_context
def resubmit(ctx: click.Context, job_id: str, follow: bool) -> None:
    """Start a finished job again from its last checkpoint (say, after its cluster lost a node), as a new job."""
    client = _client(ctx)
    job = client.resubmit(job_id)
    click.echo(job.id)
    if follow:
        _follow(ctx, job, client.get(job.id).spec.stopping.max_epochs)


def _follow(ctx: click.Context, job: Job, max_epochs: int) -> None:
    """The live view of a job until it ends; exit 1 unless it succeeded, 130 on Ctrl-C (the job runs on)."""
    placement = None
    try:
        with TrainingDisplay(max_epochs=max_epochs, console=_console()) as display:
            for kind, event in job.events():
                if kind == "epoch":
                    display.update(event)
                elif kind == "end":
                    final = event
                elif event.placement and event.placement != placement:
                    placement = event.placement
                    display.note(f"running {placement}")
            display.finish(final.state, final.stop_reason, final.error)
    except KeyboardInterrupt:
        _console().print(Text(f"stopped following {job.id}; it runs on (`polyak cancel {job.id}` ends it)"))
        raise click.exceptions.Exit(130) from None
    if final.state != JobState.SUCCEEDED:
        ctx.exit(1)


@cli.command(name="list")
@click.option("--state", type=click.Choice([s.value for s in JobState]), help="only jobs in this state")
@click.pass_context
def list_jobs(ctx: click.Context, state: str | None) -> None:
    """All jobs, newest first, as the server orders them."""
    jobs = _client(ctx).list(state)
    table = Table(header_style="bold")
    for name in ("id", "name", "state", "priority", "queue", "epoch", "stop reason", "created"):
        table.add_column(name, no_wrap=name in ("id", "state", "created"))
    for j in jobs:
        table.add_row(
            j.id,
            Text(j.name or "-"),
            state_text(j.state),
            str(j.priority),
            _or_dash(j.queue_position),
            _epoch(j),
            _or_dash(j.stop_reason),
            _time(j.created_at),
        )
    _console().print(table if jobs else "no jobs")


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.pass_context
def status(ctx: click.Context, job_id: str) -> None:
    """One job: its state, timing, latest metrics and stopping criteria."""
    info = _client(ctx).get(job_id)
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    rows = [
        ("id", info.id),
        ("name", info.name),
        ("state", state_text(info.state)),
        ("priority", str(info.priority)),
        ("queue position", _or_none(info.queue_position)),
        ("waiting for", info.waiting_reason),
        ("created", _time(info.created_at)),
        ("started", _time(info.started_at) if info.started_at else None),
        ("finished", _time(info.finished_at) if info.finished_at else None),
        ("epoch", _epoch(info)),
        ("stop reason", _or_none(info.stop_reason)),
        ("error", Text(info.error, style="red") if info.error else None),
    ]
    for key, value in rows:
        if value is not None:
            summary.add_row(key, value if isinstance(value, Text) else Text(value))
    console = _console()
    console.print(summary)
    if info.metrics is not None:
        console.print(metrics_table([info.metrics], title="latest epoch"))
        if info.metrics.criteria:
            console.print(criteria_table(info.metrics.criteria))


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="one EpochMetrics JSON object per line")
@click.pass_context
def metrics(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Every epoch's metrics so far."""
    history = _client(ctx).metrics(job_id)
    if as_json:
        for m in history:
            click.echo(m.model_dump_json())
    else:
        _console().print(metrics_table(history) if history else f"job {job_id} has no metrics yet")


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.pass_context
def cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel a job: a queued one at once, a running one at its next step."""
    info = _client(ctx).cancel(job_id)
    if info.state.is_terminal():
        _console().print(Text(f"job {info.id} is {info.state.value}"))
    else:
        _console().print(Text(f"job {info.id} is {info.state.value}: it stops at its next step"))


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path), required=True,
              help=".npz file to write")
@click.option("--which", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="best = lowest validation loss")
@click.pass_context
def weights(ctx: click.Context, job_id: str, output: Path, which: str) -> None:
    """Download a job's weights (W1, b1, ..., WL, bL) to an .npz file."""
    arrays = _client(ctx).weights(job_id, which)
    # An open file, not a name: np.savez would append ".npz" to a name without it.
    with output.open("wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
    n = sum(a.size for a in arrays.values())
    message = f"wrote {which} weights of job {job_id} to {output} ({len(arrays)} arrays, {n:,} values)"
    _console().print(Text(message))


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="image file to write  [default: JOB.png]")
@click.pass_context
def plot(ctx: click.Context, job_id: str, output: Path | None) -> None:
    """Plot a job's training curves: loss, accuracy, weight change / gradient noise, lr / batch size."""
    from client.plot import plot_metrics

    client = _client(ctx)
    history = client.metrics(job_id)
    if not history:
        raise PolyakError(f"job {job_id} has no metrics yet")
    info = client.get(job_id)
    title = f"{info.name or 'job'} {info.id} ({info.state.value})"
    path = plot_metrics(history, output or Path(f"{job_id}.png"), title=title)
    _console().print(Text(f"wrote {path}"))


@cli.command(name="ray-submit")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--address", envvar="RAY_API_SERVER_ADDRESS", default="http://127.0.0.1:8265", show_default=True,
              help="the Ray cluster's dashboard  [env: RAY_API_SERVER_ADDRESS]")
@click.option("--working-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=".",
              show_default=True, help="uploaded as the job's working directory; must contain SPEC")
@click.option("--runtime-env", "runtime_env_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="runtime_env YAML/JSON, e.g. deploy/runtime_env.yaml, instead of the default")
@click.option("--follow", is_flag=True, help="show each epoch's metrics until the job ends")
def ray_submit(spec: Path, address: str, working_dir: Path, runtime_env_file: Path | None, follow: bool) -> None:
    """Run SPEC as a Ray job (`python -m service train`) on a cluster, without the service.

    With token authentication on the cluster, set RAY_AUTH_MODE=token here too: Ray then sends the
    token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
    """
    from client import ray_job

    runtime_env = None
    if runtime_env_file is not None:
        import yaml

        try:
            runtime_env = yaml.safe_load(runtime_env_file.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise PolyakError(f"{runtime_env_file}: cannot read runtime_env: {e}") from None
        if not isinstance(runtime_env, dict):
            raise PolyakError(f"{runtime_env_file}: a runtime_env must be a mapping")
    job_spec = parse_spec(spec)
    job_id = ray_job.submit_spec(address, spec, working_dir, runtime_env)
    click.echo(job_id)
    if not follow:
        return
    last = None
    try:
        with TrainingDisplay(max_epochs=job_spec.stopping.max_epochs, console=_console()) as display:
            try:
                for m in ray_job.follow(address, job_id):
                    last = m
                    display.update(m)
            except ray_job.RayJobFailed as e:
                display.finish(e.status.lower(), last.stop if last else None, e.message)
                raise click.exceptions.Exit(1) from None
            display.finish("succeeded", last.stop if last else None)
    except KeyboardInterrupt:
        _console().print(Text(f"stopped following {job_id}; it runs on (`ray job stop {job_id}` ends it)"))
        raise click.exceptions.Exit(130) from None


def _client(ctx: click.Context) -> Client:
    obj = ctx.obj
    factory = obj.get("client_factory", Client)
    return ctx.with_resource(factory(url=obj["url"], token=obj["token"]))


def _console() -> Console:
    # Made per command so it writes to whatever stdout is current (click's test runner swaps it).
    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped to a file or a log there is no screen to fit: rich's 80 columns would truncate table cells.
        console.width = max(console.width, 200)
    return console


def _print_error(e: PolyakError) -> None:
    console = Console(stderr=True, highlight=False)
    console.print(f"error: {e.message}", style="red", markup=False, soft_wrap=True)
    if isinstance(e, SpecError):
        for err in e.errors:
            line = f"{err['field']}: {err['message']}"
            # A locally parsed spec already lists its field errors in the message.
            if line not in e.message:
                console.print(f"  {line}", style="red", markup=False, soft_wrap=True)


def _epoch(info: JobInfo) -> str:
    epoch = "-" if info.epoch is None else str(info.epoch)
    return f"{epoch}/{info.spec.stopping.max_epochs}"


def _time(t: Any) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _or_dash(x: Any) -> str:
    return "-" if x is None else str(getattr(x, "value", x))


def _or_none(x: Any) -> str | None:
    return None if x is None else str(getattr(x, "value", x))

