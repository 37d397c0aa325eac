"""`polyak sweep` (a grid of jobs as one group) and `polyak compare` (jobs ranked side by side, curves overlaid).

Both print the ranking of ``client.sweep.rank``; ``sweep`` goes through the SDK's ``Client.submit_sweep``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import click
from polyak.client.commands import (
    BadInput,
    check_image_output,
    cli,
    client_of,
    make_console,
    server_options,
    shown_path,
)
from polyak.client.display import final_line, fmt, percent, state_text
from polyak.client.errors import PolyakError
from polyak.client.files import write_output
from polyak.client.models import JobInfo, JobState
from polyak.client.sweep import (
    RANK_METRICS,
    RankedJob,
    Sweep,
    default_metric,
    default_mode,
    differing_params,
    job_label,
    parse_grid,
    plan_sweep,
    rank,
    value_text,
)
from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

_POLL_SECONDS = 1.0


def ranking_options(command: Callable) -> Callable:
    """--metric and --mode, the same for sweep and compare."""
    command = click.option("--mode", type=click.Choice(["min", "max"]), default=None,
                           help="best is the smallest or the largest  [default: max for val_accuracy and "
                                "samples_per_second, else min]")(command)
    return click.option("--metric", type=click.Choice(RANK_METRICS), default=None,
                        help="rank by this figure of the last epoch  [default: val_loss with validation data, "
                             "else train_loss]")(command)


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--grid", "grids", multiple=True, required=True, metavar="KEY=V1,V2,...",
              help="a dotted spec key and its values (YAML scalars), e.g. optimizer.lr=0.05,0.2; repeat for more keys")
@click.option("--group", default=None, help="the jobs' group  [default: sweep-<date>-<time>-<4 hex>]")
@click.option("--follow", is_flag=True, help="one live line per job until all end, then the ranking")
@click.option("--wait", is_flag=True, help="wait until all jobs end, then print the ranking")
@ranking_options
@click.option("--json", "as_json", is_flag=True,
              help="wait, then one JSON object per job, best first: id, state, stop_reason, epochs, params, final")
@server_options
@click.pass_context
def sweep(ctx: click.Context, spec: Path, grids: tuple[str, ...], group: str | None, follow: bool, wait: bool,
          metric: str | None, mode: str | None, as_json: bool) -> None:
    """Queue one job of SPEC per combination of the grids (their cross product), as one group.

    Every combination is validated first; one bad value queues nothing. The group's name is printed first:
    `polyak cancel --group NAME` cancels the sweep, `polyak compare --group NAME` ranks it. With --wait,
    --follow or --json, exits 1 unless every job succeeded.
    """
    plan = plan_sweep(spec, parse_grid(grids), group)
    # With --json, stdout carries only the ranking; what a person reads goes to stderr.
    out = Console(stderr=True, highlight=False) if as_json else make_console()
    out.print(Text(f"group {plan.group}: {len(plan.trials)} jobs"), soft_wrap=True)
    try:
        submitted = client_of(ctx).submit_sweep(plan)
        for job, trial in zip(submitted.jobs, plan.trials, strict=True):
            out.print(Text(f"  {job.id}  {job_label(trial.params)}"), soft_wrap=True)
        if not (follow or wait or as_json):
            out.print(Text(f"`polyak compare --group {plan.group}` ranks them", style="dim"), soft_wrap=True)
            return
        infos = _watch(submitted, out) if follow else submitted.wait()
    except KeyboardInterrupt:
        out.print(Text(f"stopped watching group {plan.group}; its jobs run on: `polyak compare --group {plan.group}` "
                       f"ranks them, `polyak cancel --group {plan.group}` cancels them"), soft_wrap=True)
        raise click.exceptions.Exit(130) from None
    ranked = rank(infos, submitted.params, metric, mode)
    _report(ranked, infos, metric, mode, as_json)
    failed = sum(info.state != JobState.SUCCEEDED for info in infos)
    if failed:
        out.print(Text(f"{failed} of {len(infos)} jobs did not succeed", style="red"), soft_wrap=True)
        ctx.exit(1)


@cli.command()
@click.argument("job_ids", nargs=-1, metavar="[JOB]...")
@click.option("--group", default=None, help="all the jobs of this group (a sweep) instead of JOB...")
@ranking_options
@click.option("--json", "as_json", is_flag=True,
              help="one JSON object per job, best first: id, state, stop_reason, epochs, params, final")
@click.option("-o", "--output", default=None, help="also draw the jobs' loss curves overlaid into this image file")
@server_options
@click.pass_context
def compare(ctx: click.Context, job_ids: tuple[str, ...], group: str | None, metric: str | None, mode: str | None,
            as_json: bool, output: str | None) -> None:
    """Rank jobs side by side: the params that differ, epochs, steps, final losses and accuracy, stop reason,
    wall time and samples/s; best first by the last epoch's --metric."""
    if bool(job_ids) == bool(group):
        raise BadInput("give either JOB... or --group NAME (exactly one of them)")
    image_type = check_image_output(output) if output is not None else None
    client = client_of(ctx)
    if group:
        # The server lists newest first; a sweep reads best in the order its jobs were queued.
        infos = list(reversed(client.list(group=group, limit=10_000)))
        if not infos:
            raise PolyakError(f"no jobs in group {group}")
    else:
        infos = [client.get(job_id) for job_id in dict.fromkeys(job_ids)]
    ranked = rank(infos, differing_params([i.spec for i in infos]), metric, mode)
    _report(ranked, infos, metric, mode, as_json)
    if output is not None:
        from polyak.client.plot import compare_bytes

        curves = {_curve_label(row): client.metrics(row.id) for row in ranked}
        title = f"group {group}" if group else f"{len(infos)} jobs"
        image = compare_bytes(curves, image_type, title=f"{title}: loss curves")
        where = write_output(output, image)
        (Console(stderr=True, highlight=False) if as_json else make_console()).print(
            Text(f"wrote {shown_path(where)}"), soft_wrap=True)


# --- output --------------------------------------------------------------------------------------------------


def _report(ranked: list[RankedJob], infos: list[JobInfo], metric: str | None, mode: str | None,
            as_json: bool) -> None:
    if as_json:
        for row in ranked:
            click.echo(row.model_dump_json())
        return
    metric = metric or default_metric([i.spec for i in infos])
    make_console().print(ranking_table(ranked, {i.id: i for i in infos}, metric, mode or default_mode(metric)))


def ranking_table(ranked: list[RankedJob], infos: dict[str, JobInfo], metric: str, mode: str) -> Table:
    """Best first: rank, id, one column per differing param, then how far each job got and how it ended."""
    keys = list(ranked[0].params) if ranked else []
    table = Table(title=f"ranked by {metric} ({mode})", header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("id", no_wrap=True)
    for key in keys:
        table.add_column(key, no_wrap=True)
    for name in ("state", "epochs", "steps", "train loss", "val loss", "val acc", "stop reason", "wall time",
                 "samples/s"):
        table.add_column(name, justify="left" if name in ("state", "stop reason") else "right", no_wrap=True)
    for position, row in enumerate(ranked, 1):
        m, info = row.final, infos[row.id]
        table.add_row(
            str(position),
            row.id,
            *(Text(value_text(row.params[k])) for k in keys),
            state_text(row.state),
            str(row.epochs),
            "-" if m is None else str(m.step),
            fmt(m and m.train_loss),
            fmt(m and m.val_loss),
            percent(m and m.val_accuracy),
            "-" if row.stop_reason is None else row.stop_reason.value,
            _wall_time(info),
            "-" if m is None or m.elapsed_seconds <= 0 else f"{m.samples_seen / m.elapsed_seconds:,.0f}",
        )
    return table


def _wall_time(info: JobInfo) -> str:
    """started -> finished (-> now, while it runs)."""
    if info.started_at is None:
        return "-"
    seconds = ((info.finished_at or datetime.now(timezone.utc)) - info.started_at).total_seconds()
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)}m {seconds % 60:04.1f}s"


def _curve_label(row: RankedJob) -> str:
    return f"{row.id} {job_label(row.params)}".strip()


# --- following a sweep -------------------------------------------------------------------------------------


def _watch(submitted: Sweep, console: Console) -> list[JobInfo]:
    """One line per job, live on a terminal (a line as each job ends elsewhere), until all jobs have ended."""
    view = _SweepView(submitted, console)
    with view:
        while True:
            infos = submitted.infos()
            view.update(infos)
            if all(info.state.is_terminal() for info in infos):
                return infos
            time.sleep(_POLL_SECONDS)


class _SweepView:
    def __init__(self, submitted: Sweep, console: Console):
        self.labels = {job.id: job_label(p) for job, p in zip(submitted.jobs, submitted.params, strict=True)}
        self.console = console
        self._live: Live | None = None
        self._ended: set[str] = set()

    def __enter__(self) -> _SweepView:
        if self.console.is_terminal:
            self._live = Live(Text(""), console=self.console, refresh_per_second=4)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()  # also on Ctrl-C: the last frame stays on screen

    def update(self, infos: list[JobInfo]) -> None:
        if self._live is not None:
            self._live.update(self._table(infos))
            return
        for info in infos:  # a log gets one line per job, when it ends
            if info.state.is_terminal() and info.id not in self._ended:
                self._ended.add(info.id)
                line = Text(f"{info.id}  {self.labels[info.id]}  ").append(_figures(info)).append("  ")
                self.console.print(line.append(final_line(info.state, info.stop_reason, info.error)), soft_wrap=True)

    def _table(self, infos: list[JobInfo]) -> Table:
        table = Table.grid(padding=(0, 2))
        for info in infos:
            max_epochs = info.spec.stopping.max_epochs
            table.add_row(
                info.id,
                Text(self.labels[info.id]),
                ProgressBar(total=max_epochs or None, completed=info.epoch or 0, width=30),
                f"{info.epoch or 0}/{max_epochs}",
                state_text(info.state),
                _figures(info),
            )
        return table


def _figures(info: JobInfo) -> Text:
    m = info.metrics
    if m is None:
        return Text("")
    parts = [f"train_loss={fmt(m.train_loss)}"]
    if m.val_loss is not None:
        parts.append(f"val_loss={fmt(m.val_loss)}")
    if m.val_accuracy is not None:
        parts.append(f"val_acc={percent(m.val_accuracy)}")
    return Text("  ".join(parts))
