"""Training curves of one job as a 2x2 PNG (or any format matplotlib writes)."""

from __future__ import annotations

from pathlib import Path

from client.models import EpochMetrics


def plot_metrics(metrics: list[EpochMetrics], path: str | Path, title: str | None = None) -> Path:
    """Loss, accuracy, convergence diagnostics and lr / batch size against epoch; returns ``path``."""
    # Imported here so `import client` stays fast; Figure (not pyplot) needs no display and no global backend.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not metrics:
        raise ValueError("no metrics to plot")
    stop = next((m for m in reversed(metrics) if m.stop is not None), None)
    stop_reason = stop.stop.value if stop is not None else None
    fig = Figure(figsize=(12, 8), layout="constrained")
    (loss, acc), (diag, sched) = fig.subplots(2, 2, sharex=True)

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

    for ax in (loss, acc, diag, sched):
        if stop is not None:
            ax.axvline(stop.epoch, color="black", linestyle="--", linewidth=1, label=f"stop: {stop_reason}")
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (diag, sched):
        ax.set_xlabel("epoch")

    heading = title or f"job {metrics[0].job_id}"
    if stop is not None:
        heading += f"  (stopped at epoch {stop.epoch}: {stop_reason})"
    fig.suptitle(heading)
    fig.savefig(path, dpi=110)
    return Path(path)


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
