"""Training curves of one job as a 2x2 PNG (or any format matplotlib writes; a third row for async jobs), and the
loss curves of several jobs overlaid (``polyak compare -o``)."""

from __future__ import annotations

import io
from pathlib import Path

from polyak.contract.wire import EpochMetrics


def plot_metrics(metrics: list[EpochMetrics], path: str | Path, title: str | None = None) -> Path:
    """Loss, accuracy, convergence diagnostics and lr / batch size against epoch; returns ``path``."""
    _figure(metrics, title).savefig(path, dpi=110)
    return Path(path)


def plot_bytes(metrics: list[EpochMetrics], image_type: str, title: str | None = None) -> bytes:
    """The same figure as an image of ``image_type`` (one of ``image_formats()``), for client.files to write."""
    buffer = io.BytesIO()
    _figure(metrics, title).savefig(buffer, format=image_type, dpi=110)
    return buffer.getvalue()


def image_formats() -> list[str]:
    """The extensions matplotlib writes (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return list(FigureCanvasBase.get_supported_filetypes())


def _figure(metrics: list[EpochMetrics], title: str | None):
    # Imported here so `import client` stays fast; Figure (not pyplot) needs no display and no global backend.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not metrics:
        raise ValueError("no metrics to plot")
    stop = next((m for m in reversed(metrics) if m.stop is not None), None)
    stop_reason = stop.stop.value if stop is not None else None
    from polyak.client.display import is_async

    has_async = any(is_async(m) for m in metrics)
    layout = [["loss", "acc"], ["diag", "sched"]] + ([["async", "async"]] if has_async else [])
    fig = Figure(figsize=(12, 11 if has_async else 8), layout="constrained")
    panels = fig.subplot_mosaic(layout, sharex=True)
    loss, acc, diag, sched = (panels[name] for name in ("loss", "acc", "diag", "sched"))

    _curves(loss, metrics, {"train loss": "train_loss", "validation loss": "val_loss"}, log=True)
    loss.set_title("loss")
    _curves(acc, metrics, {"validation": "val_accuracy"}, log=False)
    acc.set_title("accuracy")
    if not acc.lines:
        acc.text(0.5, 0.5, "no accuracy reported\n(regression or no validation data)",
                 ha="center", va="center", transform=acc.transAxes, color="gray")
    _curves(diag, metrics, {
        "weight change ||ΔW|| / ||W before||": "weight_change",
        "grad noise σ/√n'": "grad_noise",
        "||mean gradient||": "grad_avg_norm",
    }, log=True)
    diag.set_title("convergence diagnostics")
    _schedule(sched, metrics)
    if has_async:
        _staleness(panels["async"], metrics)

    for ax in panels.values():
        if stop is not None:
            ax.axvline(stop.epoch, color="black", linestyle="--", linewidth=1, label=f"stop: {stop_reason}")
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for name in ("async",) if has_async else ("diag", "sched"):
        panels[name].set_xlabel("epoch")

    heading = title or f"job {metrics[0].job_id}"
    if stop is not None:
        heading += f"  (stopped at epoch {stop.epoch}: {stop_reason})"
    fig.suptitle(heading)
    return fig


def _curves(ax, metrics: list[EpochMetrics], series: dict[str, str], log: bool) -> None:
    """One line per metric field, skipping epochs where it is None; log y only if every value is > 0."""
    all_positive = True
    for label, field in series.items():
        # getattr's default: train accuracy is an optional extra the wire model may not carry.
        points = [(m.epoch, v) for m in metrics if (v := getattr(m, field, None)) is not None]
        if points:
            epochs, values = zip(*points, strict=True)
            ax.plot(epochs, values, marker="." if len(points) < 50 else None, label=label)
            # Written so that a NaN (a diverged loss) neither counts as positive nor vetoes the log scale.
            all_positive &= not any(v <= 0 for v in values)
    if log and ax.lines and all_positive:
        ax.set_yscale("log")


def _schedule(ax, metrics: list[EpochMetrics]) -> None:
    epochs = [m.epoch for m in metrics]
    ax.plot(epochs, [m.lr for m in metrics], color="tab:blue", label="learning rate η")
    ax.set_ylabel("learning rate η", color="tab:blue")
    ax.set_title("step size and batch size")
    batch = ax.twinx()
    batch.step(epochs, [m.batch_size for m in metrics], where="post", color="tab:orange")
    batch.set_ylabel("batch size n'", color="tab:orange")
    # The twin axis's line joins the main legend, so one box explains both; raising the main axis
    # above its twin keeps that box on top of the batch-size curve.
    ax.plot([], [], color="tab:orange", label="batch size n'")
    ax.set_zorder(batch.get_zorder() + 1)
    ax.patch.set_visible(False)


def _staleness(ax, metrics: list[EpochMetrics]) -> None:
    """Async only: how many steps old the weights were that applied gradients were computed on, and how many
    gradients the parameter server dropped as too stale, per epoch."""
    from matplotlib.ticker import MaxNLocator

    _curves(ax, metrics, {"staleness mean": "staleness_mean", "staleness max": "staleness_max"}, log=False)
    ax.set_ylabel("staleness (steps)")
    ax.set_title("async staleness and dropped gradients")
    points = [(m.epoch, m.dropped_gradients) for m in metrics if m.dropped_gradients is not None]
    if points:
        dropped = ax.twinx()
        epochs, counts = zip(*points, strict=True)
        dropped.step(epochs, counts, where="mid", color="tab:red")
        dropped.set_ylabel("dropped gradients", color="tab:red")
        dropped.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.plot([], [], color="tab:red", label="dropped gradients")  # into the main legend, as in _schedule
        ax.set_zorder(dropped.get_zorder() + 1)
        ax.patch.set_visible(False)


def compare_figure(curves: dict[str, list[EpochMetrics]], title: str | None = None):
    """Loss curves of several jobs overlaid, ``curves`` label -> epochs in ranking order: training loss on the
    left, validation loss on the right (when some job has it); one line per job on each, log y."""
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("no jobs to plot")
    has_val = any(m.val_loss is not None for history in curves.values() for m in history)
    fig = Figure(figsize=(13 if has_val else 8, 6.5), layout="constrained")
    axes = fig.subplots(1, 2 if has_val else 1, sharex=True, squeeze=False)[0]
    panels = [("train_loss", "training loss")] + ([("val_loss", "validation loss")] if has_val else [])
    for ax, (field, name) in zip(axes, panels, strict=True):
        for i, (label, history) in enumerate(curves.items()):
            points = [(m.epoch, v) for m in history if (v := getattr(m, field)) is not None]
            epochs, values = zip(*points, strict=True) if points else ((), ())
            # Colour and dash pattern both vary, so a line stays identifiable where colours are hard to tell apart.
            ax.plot(epochs, values, color=_COLOURS[i % len(_COLOURS)], linestyle=_DASHES[i % len(_DASHES)],
                    marker="." if len(points) < 50 else None, label=label)
        values = [v for line in ax.lines for v in line.get_ydata()]
        if values and not any(v <= 0 for v in values):  # so written, a NaN (diverged) does not veto log y
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    fig.legend(handles=axes[0].lines, loc="outside lower center", ncols=min(3, len(curves)), fontsize="small")
    fig.suptitle(title or f"{len(curves)} jobs")
    return fig


def compare_bytes(curves: dict[str, list[EpochMetrics]], image_type: str, title: str | None = None) -> bytes:
    """``compare_figure`` as an image of ``image_type`` (one of ``image_formats()``)."""
    buffer = io.BytesIO()
    compare_figure(curves, title).savefig(buffer, format=image_type, dpi=110)
    return buffer.getvalue()


_COLOURS = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")]
_DASHES = ["-", "--", "-.", ":"]
