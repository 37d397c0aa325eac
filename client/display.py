"""Live training progress on a terminal, one compact line per epoch everywhere else.

Shared by ``polyak submit --follow`` (epochs from the event stream) and ``polyak train``
(epochs from the trainer itself): both only call ``update`` and ``finish``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from polyak.contract.wire import Criterion, EpochMetrics

METRIC_COLUMNS = (
    "epoch", "step", "n'", "lr", "train loss", "val loss", "val acc", "weight change", "grad noise",
    "samples/s",
)
# Only async jobs report these; the table grows the columns when some epoch has them.
ASYNC_COLUMNS = ("staleness", "dropped")
_STATE_STYLES = {
    "succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "queued": "blue",
}


class TrainingDisplay:
    """``with TrainingDisplay(max_epochs) as d: d.update(m) ...; d.finish(state, stop_reason, error)``.

    ``title`` heads the view (the job's name); ``all_epochs`` says where to see every epoch when the live
    table had to drop the oldest ones (``polyak metrics JOB``).
    """

    def __init__(
        self,
        max_epochs: int | None = None,
        console: Console | None = None,
        title: str | None = None,
        rows: int = 10,
        all_epochs: str | None = None,
    ):
        self.max_epochs = max_epochs
        self.console = console or Console()
        self.title = title
        self.all_epochs = all_epochs
        # The live view keeps only the last epochs so it never outgrows the terminal.
        self._recent: deque[EpochMetrics] = deque(maxlen=rows)
        self._seen = 0
        self._live: Live | None = None

    def __enter__(self) -> TrainingDisplay:
        if self.title:
            self.console.print(Text(self.title, style="bold"))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def note(self, text: str) -> None:
        """A line above the live view: what is starting, where the job runs."""
        self.console.print(Text(text, style="dim"), soft_wrap=True)

    def update(self, m: EpochMetrics) -> None:
        self._recent.append(m)
        self._seen += 1
        if self.console.is_terminal:
            self._show_live()
        else:
            line = compact_line(m, self.max_epochs)
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def finish(self, state: str, stop_reason: str | None, error: str | None = None) -> None:
        shown_live = self._live is not None
        self._stop()
        if shown_live and self._seen > len(self._recent):
            note = f"showing the last {len(self._recent)} of {self._seen} epochs"
            self.note(f"{note}; {self.all_epochs}" if self.all_epochs else note)
        self.console.print(final_line(state, stop_reason, error), soft_wrap=True)

    def _show_live(self) -> None:
        # Started at the first epoch, not before: what comes first (Ray starting, a queued job's wait) prints
        # plain lines, and a library writing to stderr meanwhile cannot tear a frame that is not up yet.
        if self._live is None:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4)
            self._live.start()
        else:
            self._live.update(self._render())

    def _stop(self) -> None:
        # Also the way out on Ctrl-C: the last frame stays on screen, drawn once.
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()
            self._live = None

    def _render(self) -> Group:
        latest = self._recent[-1] if self._recent else None
        parts: list[Any] = [self._progress(latest), metrics_table(self._recent)]
        if latest is not None and latest.criteria:
            parts.append(criteria_table(latest.criteria))
        return Group(*parts)

    def _progress(self, latest: EpochMetrics | None) -> Table:
        epoch = latest.epoch if latest else 0
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            Text("epoch", style="bold"),
            # total=None makes rich pulse: the right look when the number of epochs is unknown.
            ProgressBar(total=self.max_epochs or None, completed=epoch, width=40),
            Text(f"{epoch}/{self.max_epochs}" if self.max_epochs else str(epoch)),
        )
        return bar


def metrics_table(metrics: Iterable[EpochMetrics], title: str | None = None) -> Table:
    metrics = list(metrics)
    has_async = any(is_async(m) for m in metrics)
    table = Table(title=title, header_style="bold")
    for name in METRIC_COLUMNS + (ASYNC_COLUMNS if has_async else ()):
        table.add_column(name, justify="right", no_wrap=True)
    for m in metrics:
        table.add_row(*metric_cells(m, has_async))
    return table


def metric_cells(m: EpochMetrics, async_columns: bool = False) -> list[str]:
    cells = [
        str(m.epoch),
        str(m.step),
        str(m.batch_size),
        fmt(m.lr),
        fmt(m.train_loss),
        fmt(m.val_loss),
        percent(m.val_accuracy),
        fmt(m.weight_change),
        fmt(m.grad_noise),
        f"{m.samples_per_second:,.0f}",
    ]
    if async_columns:
        cells += [staleness(m), _or_dash(m.dropped_gradients)]
    return cells


def criteria_table(criteria: Iterable[Criterion]) -> Table:
    table = Table(title="stopping criteria", header_style="bold")
    table.add_column("criterion", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("threshold", justify="right", no_wrap=True)
    table.add_column("met", justify="center")
    for c in criteria:
        table.add_row(c.name, fmt(c.value), fmt(c.threshold), Text("✓", style="bold green") if c.met else "·")
    return table


def compact_line(m: EpochMetrics, max_epochs: int | None = None) -> str:
    """One log-friendly line per epoch: the numbers of the live table, then the criteria."""
    epoch = f"{m.epoch}/{max_epochs}" if max_epochs else str(m.epoch)
    fields = [
        f"epoch {epoch}",
        f"step {m.step}",
        f"n'={m.batch_size}",
        f"lr={fmt(m.lr)}",
        f"train_loss={fmt(m.train_loss)}",
    ]
    fields += [f"{name}={value}" for name, value in (
        ("val_loss", fmt(m.val_loss)),
        ("val_acc", percent(m.val_accuracy)),
        ("weight_change", fmt(m.weight_change)),
        ("grad_noise", fmt(m.grad_noise)),
    ) if value != "-"]
    fields.append(f"{m.samples_per_second:,.0f} samples/s")
    if is_async(m):
        fields.append(f"staleness={staleness(m)}  dropped={_or_dash(m.dropped_gradients)}")
    if m.criteria:
        fields.append("criteria: " + ", ".join(
            f"{c.name} {fmt(c.value)}/{fmt(c.threshold)}{' ✓' if c.met else ''}" for c in m.criteria
        ))
    return "  ".join(fields)


def final_line(state: Any, stop_reason: Any, error: str | None = None) -> Text:
    """``job succeeded (max_epochs)``, ``job failed (diverged): <error>``, ``job cancelled``."""
    state, stop_reason = _value(state), _value(stop_reason)
    line = Text(f"job {state}", style=f"bold {_STATE_STYLES.get(state, '')}".strip())
    # "cancelled (cancelled)" and "failed (error)" would only repeat the state or the error that follows.
    if stop_reason and stop_reason != state and not (error and stop_reason == "error"):
        line.append(f" ({stop_reason})")
    if error:
        line.append(f": {error}", style="red")
    return line


def state_text(state: Any) -> Text:
    state = _value(state)
    return Text(state, style=_STATE_STYLES.get(state, ""))


def fmt(x: float | None) -> str:
    """Four significant digits: readable for a loss of 2.31 and a weight change of 3.2e-05 alike."""
    return "-" if x is None else f"{x:.4g}"


def staleness(m: EpochMetrics) -> str:
    """Async steps behind, ``mean/max``: how old the weights were that the applied gradients were computed on."""
    if m.staleness_mean is None:
        return "-"
    return f"{m.staleness_mean:.2g}/{_or_dash(m.staleness_max)}"


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def is_async(m: EpochMetrics) -> bool:
    """Whether the epoch came from an async run: only those report staleness and dropped gradients."""
    return m.staleness_mean is not None or m.dropped_gradients is not None


def _or_dash(x: Any) -> str:
    return "-" if x is None else str(x)


def _value(x: Any) -> Any:
    # States and stop reasons arrive as str enums or plain strings; show their value either way.
    return getattr(x, "value", x)
