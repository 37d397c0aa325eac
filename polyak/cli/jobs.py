"""Jobs on a polyak server: submit, resubmit, follow, list, status, metrics, cancel, weights, plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from polyak.cli.app import (
    check_image_output,
    cli,
    client_of,
    make_console,
    server_options,
    shown_path,
)
from polyak.client.display import TrainingDisplay, criteria_table, metrics_table, state_text
from polyak.client.files import check_output, npz_bytes, write_output
from polyak.client.sdk import Client, Job
from polyak.contract.errors import BadInput, PolyakError
from polyak.contract.spec import optimizer_summary, parse_spec
from polyak.contract.wire import JobInfo, JobState


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--follow", is_flag=True, help="show live progress until the job ends")
@server_options
@click.pass_context
def submit(ctx: click.Context, spec: Path, follow: bool) -> None:
    """Queue the job described by the YAML/JSON file SPEC and print its id."""
    job_spec = parse_spec(spec)
    job = client_of(ctx).submit(job_spec)
    click.echo(job.id)
    if follow:
        _follow(ctx, job, job_spec.stopping.max_epochs, _title(job_spec.name or str(spec), job_spec))


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--follow", is_flag=True, help="show live progress until the new job ends")
@server_options
@click.pass_context
def resubmit(ctx: click.Context, job_id: str, follow: bool) -> None:
    """Start a finished job again from its last checkpoint (say, after its cluster lost a node), as a new job."""
    client = client_of(ctx)
    job = client.resubmit(job_id)
    click.echo(job.id)
    if follow:
        info = client.get(job.id)
        _follow(ctx, job, info.spec.stopping.max_epochs, _title(info.name or job.id, info.spec))


@cli.command()
@click.argument("job_id", metavar="JOB")
@server_options
@click.pass_context
def follow(ctx: click.Context, job_id: str) -> None:
    """Show a job's live progress until it ends (again, after Ctrl-C stopped `submit --follow`).

    Ctrl-C stops watching, not the job. Exits 1 unless the job succeeded.
    """
    client = client_of(ctx)
    info = client.get(job_id)
    _follow(ctx, client.job(job_id), info.spec.stopping.max_epochs, _title(info.name or job_id, info.spec))


def _follow(ctx: click.Context, job: Job, max_epochs: int, title: str) -> None:
    """The live view of a job until it ends; exit 1 unless it succeeded, 130 on Ctrl-C (the job runs on)."""
    placement, queued = None, False
    display = TrainingDisplay(max_epochs=max_epochs, console=make_console(), title=title,
                              all_epochs=f"`polyak metrics {job.id}` lists all")
    try:
        with display:
            for kind, event in job.events():
                if kind == "epoch":
                    display.update(event)
                elif kind == "end":
                    final = event
                elif event.state == JobState.QUEUED and not queued:  # else a queued job's view stays blank
                    queued = True
                    display.note(_queued(event))
                elif event.placement and event.placement != placement:
                    placement = event.placement
                    display.note(f"running {placement}")
            display.finish(final.state, final.stop_reason, final.error)
    except KeyboardInterrupt:
        make_console().print(Text(f"stopped following {job.id}; it runs on: `polyak follow {job.id}` re-attaches, "
                              f"`polyak cancel {job.id}` ends it"), soft_wrap=True)
        raise click.exceptions.Exit(130) from None
    if final.state != JobState.SUCCEEDED:
        ctx.exit(1)


def _queued(info: JobInfo) -> str:
    where = f" (position {info.queue_position})" if info.queue_position is not None else ""
    return f"queued{where}: {info.waiting_reason}" if info.waiting_reason else f"queued{where}; waiting to start"


@cli.command(name="list")
@click.option("--state", type=click.Choice([s.value for s in JobState]), help="only jobs in this state")
@click.option("--group", default=None, help="only the jobs of this group (a sweep)")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True, help="at most this many")
@click.option("--offset", type=click.IntRange(0), default=0, help="skip this many of the newest")
@server_options
@click.pass_context
def list_jobs(ctx: click.Context, state: str | None, group: str | None, limit: int, offset: int) -> None:
    """Jobs, newest first, as the server orders them."""
    jobs = client_of(ctx).list(state, group, limit, offset)
    table = Table(header_style="bold")
    for name in ("id", "name", "group", "state", "priority", "queue", "epoch", "stop reason", "created"):
        table.add_column(name, no_wrap=name in ("id", "state", "created"))
    for j in jobs:
        table.add_row(
            j.id,
            Text(j.name or "-"),
            Text(j.group or "-"),
            state_text(j.state),
            str(j.priority),
            _or_dash(j.queue_position),
            _epoch(j),
            _or_dash(j.stop_reason),
            _time(j.created_at),
        )
    make_console().print(table if jobs else "no jobs")
    if len(jobs) == limit:
        more = f"the newest {limit} after {offset}; more with --offset {offset + limit}"
        make_console().print(Text(more, style="dim"))


@cli.command()
@click.argument("job_id", metavar="JOB")
@server_options
@click.pass_context
def status(ctx: click.Context, job_id: str) -> None:
    """One job: its state, timing, latest metrics and stopping criteria."""
    info = client_of(ctx).get(job_id)
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
    console = make_console()
    console.print(summary)
    if info.metrics is not None:
        console.print(metrics_table([info.metrics], title="latest epoch"))
        if info.metrics.criteria:
            console.print(criteria_table(info.metrics.criteria))


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="one EpochMetrics JSON object per line")
@server_options
@click.pass_context
def metrics(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Every epoch's metrics so far."""
    history = client_of(ctx).metrics(job_id)
    if as_json:
        for m in history:
            click.echo(m.model_dump_json())
    else:
        make_console().print(metrics_table(history) if history else f"job {job_id} has no metrics yet")


@cli.command()
@click.argument("job_id", metavar="[JOB]", required=False)
@click.option("--group", default=None, help="cancel every job of this group (a sweep) that has not ended")
@server_options
@click.pass_context
def cancel(ctx: click.Context, job_id: str | None, group: str | None) -> None:
    """Cancel a job (or every unfinished job of a --group): a queued one at once, a running one at its next step."""
    if (job_id is None) == (group is None):
        raise BadInput("give either JOB or --group NAME (exactly one of them)")
    client = client_of(ctx)
    if group is not None:
        _cancel_group(client, group)
        return
    # The server answers a finished job's cancel with the job as it is: only asking first tells the two apart.
    ended = client.get(job_id)
    if ended.state.is_terminal():
        raise PolyakError(f"job {job_id} already ended ({ended.state.value}); nothing to cancel")
    info = client.cancel(job_id)
    if info.state.is_terminal():
        make_console().print(Text(f"job {info.id} is {info.state.value}"))
    else:
        make_console().print(Text(f"job {info.id} is {info.state.value}: it stops at its next step"))


def _cancel_group(client: Client, group: str) -> None:
    cancelled = client.cancel_group(group)
    if not cancelled:
        jobs = client.list(group=group, limit=10_000)
        if not jobs:
            raise PolyakError(f"no jobs in group {group}")
        # Not an error: cancelling a sweep that has already ended leaves it as the user wants it.
        ended = f"nothing to cancel: all {len(jobs)} jobs of group {group} have ended"
        make_console().print(Text(ended), soft_wrap=True)
        return
    for info in cancelled:
        running = "" if info.state.is_terminal() else ": it stops at its next step"
        make_console().print(Text(f"job {info.id} is {info.state.value}{running}"))
    make_console().print(Text(f"cancelled {len(cancelled)} jobs of group {group}"), soft_wrap=True)


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("-o", "--output", required=True,
              help=".npz file to write: a path in an existing folder, or a URI (s3://, gs://, file://)")
@click.option("--which", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="best = lowest validation loss")
@server_options
@click.pass_context
def weights(ctx: click.Context, job_id: str, output: str, which: str) -> None:
    """Download a job's weights (W1, b1, ..., WL, bL) to an .npz file."""
    check_output(output)
    arrays = client_of(ctx).weights(job_id, which)
    where = write_output(output, npz_bytes(arrays))
    n = sum(a.size for a in arrays.values())
    message = f"wrote {which} weights of job {job_id} to {shown_path(where)} ({len(arrays)} arrays, {n:,} values)"
    make_console().print(Text(message), soft_wrap=True)


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("-o", "--output", help="image file to write; its extension picks the type  [default: JOB.png]")
@server_options
@click.pass_context
def plot(ctx: click.Context, job_id: str, output: str | None) -> None:
    """Plot a job's training curves: loss, accuracy, weight change / gradient noise, lr / batch size
    (and staleness / dropped gradients of an async job)."""
    from polyak.client.plot import plot_bytes

    output = output or f"{job_id}.png"
    image_type = check_image_output(output)
    client = client_of(ctx)
    history = client.metrics(job_id)
    if not history:
        raise PolyakError(f"job {job_id} has no metrics yet")
    info = client.get(job_id)
    title = f"{info.name or 'job'} {info.id} ({info.state.value})"
    where = write_output(output, plot_bytes(history, image_type, title=title))
    make_console().print(Text(f"wrote {shown_path(where)}"), soft_wrap=True)


def _title(name: str, spec) -> str:
    """The live view's header: the job and how it is optimized."""
    return f"{name} · {optimizer_summary(spec.optimizer)}"


def _epoch(info: JobInfo) -> str:
    epoch = "-" if info.epoch is None else str(info.epoch)
    return f"{epoch}/{info.spec.stopping.max_epochs}"


def _time(t: Any) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _or_dash(x: Any) -> str:
    return "-" if x is None else str(getattr(x, "value", x))


def _or_none(x: Any) -> str | None:
    return None if x is None else str(getattr(x, "value", x))
