"""The report's charts: matplotlib's object API, each figure saved as a PNG and inlined as a data URI.

PNG rather than SVG: a chart's size then depends on its pixels, not on its points, so a downsampled
million-step series and a 100-layer heat map cost tens of kilobytes each, and the page needs no
script to draw them. Every figure comes from :func:`gradscope.plots.new_figure` (no pyplot, no
global state) and every series arrives already downsampled (``data.py``, ``heatmap.py``).
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

import numpy as np

from gradscope import plots
from gradscope.report.data import Binned, OptimizerSeries, binned, clip_rate_curve, thinned, thinned_max
from gradscope.report.heatmap import HeatMap

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gradscope.recommend import Recommendation

WIDTH = 11.0  # inches at plots.DPI: 1100 pixels, the page's content width
SPIKES_ANNOTATED = 5  # spikes named on the chart; the page lists every one recommend shows


def data_uri(fig: Figure) -> str:
    """``fig`` as a ``data:image/png;base64,...`` URI: the page carries its images, it loads nothing."""
    buffer = io.BytesIO()
    with plots.quiet():
        fig.savefig(buffer, format="png", dpi=plots.DPI, pil_kwargs={"compress_level": 3})  # zlib 6 costs 2x, saves ~10%
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure(width: float, height: float, left: float, right: float, hspace: float = 0.35) -> Figure:
    """A figure with fixed margins (fractions of the width; 0.6 in below, 0.45 in above the axes).

    Fixed rather than matplotlib's constrained layout: measuring every label to place the axes
    costs as much as drawing them again, and these charts' labels are of known sizes.
    """
    fig = plots.new_figure(width, height, layout=None)
    fig.subplots_adjust(left=left, right=right, bottom=0.6 / height, top=1 - 0.45 / height, hspace=hspace,
                        wspace=0.22)
    return fig


def _line(ax: Axes, b: Binned, color: str, label: str) -> None:
    if b.width == 1:
        ax.plot(b.x, b.max, color=color, linewidth=0.9, label=label)
        return
    ax.plot(b.x, b.max, color=color, linewidth=0.6, alpha=0.55, label=f"{label}: max per {b.width:,} steps")
    ax.plot(b.x, b.median, color=color, linewidth=1.1, label=f"{label}: median per {b.width:,} steps")


def _edge_marks(ax: Axes, steps: np.ndarray, top: bool, color: str, label: str) -> None:
    """Ticks along the top (or bottom) edge of ``ax`` at ``steps``, thinned to one per bin when many."""
    if len(steps) == 0:
        return
    shown = thinned(steps)
    ax.plot(shown, np.full(len(shown), 0.985 if top else 0.015), "|", color=color, markersize=9,
            transform=ax.get_xaxis_transform(), label=f"{label} ({len(steps):,})")


def _shade_first_steps(ax: Axes, s: OptimizerSeries, rec: Recommendation) -> None:
    first = float(s.step[0])
    if rec.skip_steps:
        ax.axvspan(first, first + rec.skip_steps, color="0.8", alpha=0.6, label="left out (--skip-steps)")
    w = rec.warmup
    if w is not None and w.skip_steps > rec.skip_steps:
        what = "lr warm-up" if w.kind == "warm-up" else "early steps (first 10%)"
        ax.axvspan(first + rec.skip_steps, first + w.skip_steps, color="tab:orange", alpha=0.12,
                   label=f"{what}: {w.skip_steps:,} steps")


def norm_chart(s: OptimizerSeries, rec: Recommendation) -> Figure:
    """The pre-clip global norm over steps, the candidate thresholds, clipped steps, spikes and warm-up."""
    fig = figure(WIDTH, 4.6, left=0.1, right=0.62)
    ax = fig.add_subplot()
    with plots.quiet():
        shown = np.where(np.isfinite(s.grad_norm) & (s.grad_norm > 0), s.grad_norm, np.nan)
        _line(ax, binned(s.step, shown), "tab:blue", "pre-clip global norm")
        _thresholds(ax, rec)
        clipped = s.clipped_steps(rec.max_norm)
        if len(clipped):
            marks, values = thinned_max(clipped, s.grad_norm[np.searchsorted(s.step, clipped)])
            ax.scatter(marks, values, s=9, color="tab:red", zorder=3,
                       label=f"clipped at max_norm ({len(clipped):,} steps" + (", the largest per bin)" if
                                                                                  len(marks) < len(clipped) else ")"))
        _edge_marks(ax, s.step[s.nonfinite], True, "black", "non-finite")
        _edge_marks(ax, s.step[s.skipped], False, "tab:purple", "AMP-skipped")
        _shade_first_steps(ax, s, rec)
        _annotate_spikes(ax, rec)
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel=f"L{rec.norm_type:g} norm before clipping",
           title=f"optimizer {rec.optimizer_label}: global gradient norm per step")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def _thresholds(ax: Axes, rec: Recommendation) -> None:
    """Every candidate threshold, the recommended one red and drawn last (on top), each named in the legend."""
    styles = iter([":", "-.", (0, (5, 2)), (0, (1, 2)), (0, (3, 1, 1, 1)), (0, (8, 3))])
    for c in rec.clip_rates:
        if c.recommended or not np.isfinite(c.threshold) or c.threshold <= 0:
            continue
        ax.axhline(c.threshold, color="0.35", linewidth=0.9, linestyle=next(styles, "--"),
                   label=f"{c.label} = {c.threshold:.4g} (clips {c.clip_rate:.1%})")
    ax.axhline(rec.max_norm, color="tab:red", linewidth=1.6, zorder=4,
               label=f"max_norm = p{rec.percentile:g} = {rec.max_norm:.4g} (clips {rec.clip_rate:.1%})")


def _annotate_spikes(ax: Axes, rec: Recommendation) -> None:
    """The largest spikes, numbered as in recommend's spike table, each with the layer that carried most of it;
    the labels step down from the top so that spikes close in steps do not write over each other."""
    for i, spike in enumerate(rec.spikes.shown[:SPIKES_ANNOTATED]):
        top = f"{spike.layers[0].layer} {spike.layers[0].share:.0%}" if spike.layers else "no layer data"
        ax.annotate(f"#{i + 1} step {spike.step}, {spike.ratio:.0f}x: {top}", (spike.step, spike.norm),
                    xytext=(0.01, 0.93 - 0.06 * i), textcoords="axes fraction", fontsize=7, color="tab:red",
                    arrowprops={"arrowstyle": "-", "color": "tab:red", "linewidth": 0.5, "alpha": 0.6})


def distribution_chart(s: OptimizerSeries, rec: Recommendation) -> Figure:
    """The histogram of the used steps' norms (log x and y) and the clip-rate curve, side by side."""
    from matplotlib.ticker import NullFormatter

    used = _used(s, rec)
    fig = figure(WIDTH, 3.8, left=0.08, right=0.98)
    left, right = fig.subplots(1, 2)
    with plots.quiet():
        positive = used[used > 0]
        if len(positive):
            low, high = positive.min(), positive.max()
            left.hist(positive, bins=np.geomspace(low, high if high > low else low * 1.01, 60), color="tab:blue",
                      alpha=0.7)
        left.set_xscale("log")
        left.set_yscale("log")
        left.xaxis.set_minor_formatter(NullFormatter())  # a narrow log axis labels every minor tick, overlapping
        _vertical_thresholds(left, rec)
        thresholds, rates = clip_rate_curve(used)
        right.plot(thresholds, rates, color="tab:blue", linewidth=1.2)
        right.set_xscale("log")
        _vertical_thresholds(right, rec)
        for c in rec.clip_rates:
            right.plot([c.threshold], [c.clip_rate], "o", color="tab:red" if c.recommended else "0.35", markersize=4)
    left.set(xlabel="pre-clip global norm (log)", ylabel="steps (log)", title=f"distribution over {len(used):,} used steps")
    right.set(xlabel="threshold (log)", ylabel="fraction of used steps clipped", title="clip rate vs threshold")
    left.legend(loc="upper right", fontsize="x-small")
    return fig


def _vertical_thresholds(ax: Axes, rec: Recommendation) -> None:
    """p50/p90/p99 grey, max_norm red: the percentile it equals is named in its own label, not hidden under it."""
    d = rec.distribution
    for label, value, style in (("p50", d.median, ":"), ("p90", d.p90, "-."), ("p95", d.p95, "--"),
                                ("p99", d.p99, (0, (1, 3)))):
        if value > 0 and not np.isclose(value, rec.max_norm):
            ax.axvline(value, color="0.35", linestyle=style, linewidth=1.0, label=f"{label} = {value:.3g}")
    ax.axvline(rec.max_norm, color="tab:red", linewidth=1.6, label=f"max_norm = p{rec.percentile:g} = {rec.max_norm:.3g}")


def _used(s: OptimizerSeries, rec: Recommendation) -> np.ndarray:
    """recommend's used steps: finite, not AMP-skipped, from the first step + skip_steps on."""
    keep = np.isfinite(s.grad_norm) & ~s.skipped & (s.step >= s.step[0] + rec.skip_steps)
    return s.grad_norm[keep]


def heat_chart(heat: HeatMap, label: str) -> Figure:
    """Layers x steps on a log colour scale: the per-bin max above, the per-bin median below."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import NullFormatter

    n_layers, n_bins = heat.max.shape
    rows = max(1.5, min(0.07 * n_layers, 6.0))  # inches per panel: 50 labels at 6 pt fit in 6 inches
    fig = figure(WIDTH, 1.2 + 2 * rows, left=0.2, right=0.99, hspace=0.25)
    axes = fig.subplots(2, 1, sharex=True)
    finite = heat.max[np.isfinite(heat.max) & (heat.max > 0)]
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (1e-3, 1.0)
    extent = (heat.first_step, heat.first_step + n_bins * heat.width, n_layers - 0.5, -0.5)
    for ax, values, what in ((axes[0], heat.max, "max"), (axes[1], heat.median, "median")):
        with plots.quiet():
            image = ax.imshow(np.where(values > 0, values, np.nan), aspect="auto", interpolation="nearest",
                              norm=LogNorm(low, high if high > low else low * 10), cmap="viridis", extent=extent)
        _layer_ticks(ax, heat.layers)
        ax.set_title(f"optimizer {label}: per-layer norm, {what} per "
                     + ("step" if heat.width == 1 else f"{heat.width:,} steps"), fontsize=10)
        bar = fig.colorbar(image, ax=ax, label="L2 norm (log)", pad=0.01)
        bar.ax.yaxis.set_minor_formatter(NullFormatter())  # a label per minor tick: slow mathtext, and cluttered
    axes[1].set_xlabel("optimizer step")
    return fig


def _layer_ticks(ax: Axes, layers: list[str]) -> None:
    step = max(1, -(-len(layers) // 50))  # at most 50 labels: more overlap, and each costs drawing time
    ax.set_yticks(range(0, len(layers), step))
    ax.set_yticklabels([layers[i] for i in range(0, len(layers), step)], fontsize=6)


def loss_lr_chart(s: OptimizerSeries, label: str) -> Figure:
    """Loss (log when all positive) and lr over steps, with non-finite and AMP-skipped steps marked."""
    fig = figure(WIDTH, 4.4, left=0.1, right=0.84, hspace=0.1)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    with plots.quiet():
        finite = s.loss[np.isfinite(s.loss)]
        _line(loss_ax, binned(s.step, np.where(np.isfinite(s.loss), s.loss, np.nan)), "tab:green", "loss")
        if len(finite) and (finite > 0).all():
            loss_ax.set_yscale("log")
        _edge_marks(loss_ax, s.step[s.nonfinite], True, "black", "non-finite norm")
        _edge_marks(loss_ax, s.step[s.skipped], False, "tab:purple", "AMP-skipped")
        _line(lr_ax, binned(s.step, s.lr), "tab:gray", "lr")
    loss_ax.set(ylabel="loss", title=f"optimizer {label}: loss and learning rate per step")
    lr_ax.set(xlabel="optimizer step", ylabel="lr (group 0)")
    if not np.isfinite(s.loss).any():
        loss_ax.text(0.5, 0.5, "no loss recorded", transform=loss_ax.transAxes, ha="center")
    for ax in (loss_ax, lr_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig
