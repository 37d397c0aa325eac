"""The client half of the ``polyak`` CLI: submit, resubmit, follow, list, status, metrics, cancel, weights, plot,
ray-submit.

``service.cli`` adds ``serve`` and ``train`` to ``cli``. The group keeps ``url`` and ``token`` in
``ctx.obj`` (a command's own ``--url``/``--token`` overwrite them there); an optional
``ctx.obj["client_factory"]`` (called as ``factory(url=..., token=...)``) lets tests hand the commands a
Client built on a mock transport.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

import click
from polyak.client.display import TrainingDisplay, criteria_table, metrics_table, state_text
from polyak.client.errors import PolyakError, SpecError
from polyak.client.files import check_output, is_uri, npz_bytes, write_output
from polyak.client.models import JobInfo, JobState
from polyak.client.sdk import DEFAULT_URL, Client, Job
from polyak.client.spec import optimizer_summary, parse_spec
from rich.console import Console
from rich.table import Table
from rich.text import Text

EXIT_CODES = """\b
Exit status, the same for every command:
  0    done
  1    the job failed or was cancelled, or the server refused the request (no such job, a conflict, a wrong token)
  2    bad input or usage: a bad spec, a file that cannot be read or written, a bad option
  3    a server, Ray cluster or port that cannot be reached or used
  130  interrupted (Ctrl-C)
"""

# How the SDK words a transport failure (client.sdk.Client._transport_error) and client.ray_job an unreachable
# Ray dashboard: the request never got an answer, so nothing was refused and nothing was wrong with the input.
_UNREACHABLE = re.compile(r"cannot reach |connection to the polyak server failed")


class BadInput(PolyakError):
    """Something the user gave a command cannot be used (an output file's folder, an image type): exit 2."""


class _Group(click.Group):
    """Turns every PolyakError into one red ``error:`` line and the exit status of EXIT_CODES, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PolyakError as e:
            _print_error(e)
            ctx.exit(exit_code(e))
        except KeyboardInterrupt:  # click's own handling would say "Aborted!" and exit 1
            click.echo("interrupted", err=True)
            ctx.exit(130)


def exit_code(e: PolyakError) -> int:
    """The exit status EXIT_CODES gives this error."""
    if isinstance(e, (SpecError, BadInput)):
        return 2
    if e.status_code is None and _UNREACHABLE.search(e.message):  # also a lost event stream's closing error
        return 3
    return 1


@click.group(name="polyak", cls=_Group, epilog=EXIT_CODES)
@click.version_option(package_name="polyak", prog_name="polyak")
@click.option("--url", envvar="POLYAK_URL", default=DEFAULT_URL, show_default=True, show_envvar=True,
              help="polyak server URL")
@click.option("--token", envvar="POLYAK_TOKEN", default=None, show_envvar=True,
              help="bearer token, if the server wants one")
@click.pass_context
def cli(ctx: click.Context, url: str, token: str | None) -> None:
    """polyak: distributed minibatch SGD with heavy-ball momentum, as a job service.

    --url and --token may also follow the command (polyak list --url ...).
    """
    ctx.ensure_object(dict)
    ctx.obj["url"] = url
    ctx.obj["token"] = token


def server_options(command: Callable) -> Callable:
    """``--url``/``--token`` after the command as well (``polyak list --url ...``); given there, they win."""

    def keep(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(dict)[param.name] = value

    command = click.option("--token", default=None, expose_value=False, callback=keep,
                           help="bearer token  [default: polyak --token, or env POLYAK_TOKEN]")(command)
    return click.option("--url", default=None, expose_value=False, callback=keep,
                        help="polyak server URL  [default: polyak --url, or env POLYAK_URL]")(command)


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
    check_output_option(output)
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


@cli.command(name="ray-submit")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--address", envvar="RAY_API_SERVER_ADDRESS", default="http://127.0.0.1:8265", show_default=True,
              help="the Ray cluster's dashboard  [env: RAY_API_SERVER_ADDRESS]")
@click.option("--working-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=".",
              show_default=True, help="uploaded as the job's working directory; must contain SPEC")
@click.option("--runtime-env", "runtime_env_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="runtime_env YAML/JSON, e.g. deploy/runtime_env.yaml, instead of the default")
@click.option("--follow", is_flag=True, help="show each epoch's metrics until the job ends")
@click.option("-o", "--output", default=None,
              help="wait for the job and write its final weights here (.npz, on this machine; or a URI)")
def ray_submit(spec: Path, address: str, working_dir: Path, runtime_env_file: Path | None, follow: bool,
               output: str | None) -> None:
    """Run SPEC as a Ray job (`python -m polyak train`) on a cluster, without the service.

    With token authentication on the cluster, set RAY_AUTH_MODE=token here too: Ray then sends the
    token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
    """
    from polyak.client import ray_job

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
    if output is not None:
        check_output_option(output)
    job_id = ray_job.submit_spec(address, spec, working_dir, runtime_env)
    click.echo(job_id)
    if not follow and output is None:
        return
    last, failed = None, None
    try:
        with TrainingDisplay(max_epochs=job_spec.stopping.max_epochs, console=make_console()) as display:
            try:
                for m in ray_job.follow(address, job_id):
                    last = m
                    display.update(m)
            except ray_job.RayJobFailed as e:
                display.finish(e.status.lower(), last.stop if last else None, e.message)
                failed = e
            else:
                display.finish("succeeded", last.stop if last else None)
    except KeyboardInterrupt:
        make_console().print(Text(f"stopped following {job_id}; it runs on (`ray job stop {job_id}` ends it)"))
        raise click.exceptions.Exit(130) from None
    if output is not None and (failed is None or last is not None):  # a failed job keeps its last weights
        where = write_output(output, ray_job.fetch_weights(address, job_id))
        make_console().print(Text(f"wrote the weights of ray job {job_id} to {shown_path(where)}"), soft_wrap=True)
    if failed is not None:
        raise click.exceptions.Exit(1)


def check_output_option(target: str) -> None:
    """client.files.check_output, before any request; what it rejects is the user's input: exit 2."""
    try:
        check_output(target)
    except PolyakError as e:
        raise BadInput(e.message) from None


def check_image_output(output: str) -> str:
    """An -o for a plot: an image type matplotlib writes, in a folder that exists (else exit 2); its type."""
    from polyak.client.plot import image_formats

    image_type = PurePath(output).suffix.lstrip(".").lower()
    if image_type not in image_formats():
        extensions = ", ".join(f".{ext}" for ext in image_formats())
        raise BadInput(f"cannot write {output}: not an image type matplotlib writes; use one of {extensions}")
    check_output_option(output)
    return image_type


def shown_path(where: str) -> str:
    """Where a file went: a local one by its absolute path, so it can be found whatever folder this ran in."""
    return where if is_uri(where) else str(Path(where).absolute())


def _title(name: str, spec) -> str:
    """The live view's header: the job and how it is optimized."""
    return f"{name} · {optimizer_summary(spec.optimizer)}"


def client_of(ctx: click.Context) -> Client:
    obj = ctx.obj
    factory = obj.get("client_factory", Client)
    return ctx.with_resource(factory(url=obj["url"], token=obj["token"]))


def make_console() -> Console:
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
            # A locally parsed spec already lists its field errors in the message, and a spec file that cannot
            # be read carries the message itself as its one error.
            if err["message"] not in e.message:
                console.print(f"  {err['field']}: {err['message']}", style="red", markup=False, soft_wrap=True)


def _epoch(info: JobInfo) -> str:
    epoch = "-" if info.epoch is None else str(info.epoch)
    return f"{epoch}/{info.spec.stopping.max_epochs}"


def _time(t: Any) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _or_dash(x: Any) -> str:
    return "-" if x is None else str(getattr(x, "value", x))


def _or_none(x: Any) -> str | None:
    return None if x is None else str(getattr(x, "value", x))

