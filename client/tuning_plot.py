"""The plot of ``polyak lr-find``: the range test's smoothed loss against eta, the suggestion, the curvature bound."""

from __future__ import annotations

import io
import math


def lr_find_bytes(found: dict, image_type: str, title: str | None = None) -> bytes:
    """``found`` is lr-find's JSON object; the figure as an image of ``image_type`` (client.plot.image_formats)."""
    buffer = io.BytesIO()
    _figure(found, title).savefig(buffer, format=image_type, dpi=110)
    return buffer.getvalue()


def _figure(found: dict, title: str | None):
    from matplotlib.figure import Figure  # not pyplot: no display, no global backend

    test, curv = found["range_test"], found["curvature"]
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(test["lrs"], test["losses"], color="0.75", lw=0.8, label="loss of each step")
    ax.plot(test["lrs"], test["smoothed"], color="C0", lw=2, label="smoothed (EMA, bias-corrected)")
    ax.set_xscale("log")
    if test["suggested_lr"] is not None:
        ax.axvline(test["suggested_lr"], color="C2", ls="--",
                   label=f"range test: steepest descent, lr = {test['suggested_lr']:.3g}")
    if curv["gd_lr_bound"] is not None:
        ax.axvline(curv["gd_lr_bound"], color="C3", ls=":",
                   label=f"curvature: 2/λ_max = {curv['gd_lr_bound']:.3g} (GD's bound; "
                         f"λ_max = {curv['lambda_max']:.3g})")
    if curv["lr_bound"] is not None and not math.isclose(curv["lr_bound"], curv["gd_lr_bound"]):
        ax.axvline(curv["lr_bound"], color="C4", ls=":", label=f"curvature: {test['method']} stable for lr < "
                                                              f"{curv['lr_bound']:.3g}")
    if curv["heavy_ball"] is not None:
        hb = curv["heavy_ball"]
        ax.axvline(hb["lr"], color="C1", ls="-.", label=f"Polyak: lr = {hb['lr']:.4g}, alpha = {hb['alpha']:.4g}")
    ax.set_xlabel(f"lr (eta) of {test['method']}, growing geometrically each step")
    ax.set_ylabel("training loss")
    if test["smoothed"]:  # losses are >= 0; the last steps may blow up: keep the start's level in view
        ax.set_ylim(0, 1.5 * test["smoothed"][0])
    ax.set_title(title or "learning-rate range test")
    ax.legend(loc="best", fontsize="small")
    ax.grid(True, alpha=0.3)
    return fig
