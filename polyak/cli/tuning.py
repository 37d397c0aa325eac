"""Choosing hyperparameters: `polyak sweep` (a grid of jobs as one group), `polyak compare` (jobs ranked
side by side, curves overlaid) and `polyak lr-find` (step sizes from the loss, before training).

sweep and compare print the ranking of ``polyak.client.sweep.rank``; ``sweep`` goes through
``Client.submit_sweep``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from polyak.cli.app import (
    check_image_output,
    cli,
    client_of,
    fail,
    make_console,
    prepare_run,
    server_options,
    shown_path,
)
from polyak.client.display import final_line, fmt, percent, state_text
from polyak.client.files import write_output
from polyak.client.sdk import Sweep
from polyak.client.sweep import (
    RANK_METRICS,
    RankedJob,
    default_metric,
    default_mode,
    differing_params,
    job_label,
    parse_grid,
    plan_sweep,
    rank,
    value_text,
)
from polyak.contract.errors import BadInput, PolyakError
from polyak.contract.spec import optimizer_summary
from polyak.contract.wire import JobInfo, JobState

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
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from polyak.cli.app import check_image_output, make_console
    from polyak.client.files import write_output
    from polyak.client.tuning_plot import lr_find_bytes
    from polyak.contract.errors import PolyakError
    from polyak.service.engine.trainer import initial_weights
    from polyak.service.engine.tuning import curvature, load_problem, range_test
    from polyak.workers.backend import DeviceError, get_backend

    if output is not None:
        try:
            check_image_output(output)
        except PolyakError as e:
            fail(e.message)
    job_spec, info = prepare_run(spec, output)
    console = make_console()
    progress_console = Console(stderr=True, highlight=False)
    try:
        W0 = initial_weights(job_spec).astype(np.float64)
        problem = load_problem(job_spec, get_backend(job_spec.cluster.device).xp, info)
    except (ValueError, DeviceError) as e:  # data, weights, device
        fail(str(e))
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
            fail(e.message)
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
