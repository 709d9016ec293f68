"""Figures written to files, with matplotlib's object API only.

Every figure is a ``matplotlib.figure.Figure`` drawn by the Agg canvas and saved with
:func:`save_figure`: no pyplot, so no global figure state, no GUI backend, and nothing leaks
between calls (or between the tests that call them). matplotlib is imported inside the functions,
so importing this module costs nothing; nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gradscope.errors import GradscopeError, UsageError
from gradscope.store import Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gradscope.recommend import Recommendation

#: Pixels per inch of saved figures: sizes in pixels are figsize x DPI, exactly (no tight bbox).
DPI = 100
#: Above this many steps the series is drawn as per-bin max and median rather than every point.
MAX_POINTS = 4000
SUFFIXES = (".png", ".svg", ".pdf")
RECOMMEND_FIGSIZE = (12.0, 4.5)  # inches per optimizer row


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warning of numpy's or matplotlib's on stderr while drawing: an extreme value (a log axis up to
    max_norm=1e308 overflows) is drawn as well as it can be, and the report stays clean."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A Figure with an Agg canvas attached (the object API's equivalent of ``plt.figure``).

    ``layout=None`` leaves the margins to ``subplots_adjust`` (the report's charts: fixed margins draw faster).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def check_path(path: str | Path) -> Path:
    """``path`` as a Path when its suffix is one :func:`save_figure` writes.

    Raises:
        UsageError: any other suffix.
    """
    target = Path(path)
    if target.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--plot {target}: use a file name ending in {', '.join(SUFFIXES)}")
    return target


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` to ``path`` (.png, .svg or .pdf) at :data:`DPI`.

    Raises:
        UsageError: the suffix is not one matplotlib writes here.
        GradscopeError: the file cannot be written.
    """
    target = check_path(path)
    try:
        with quiet():
            fig.savefig(target, dpi=DPI)
    except OSError as exc:
        raise GradscopeError(f"cannot write the plot {target}: {exc.strerror or exc}") from None
    return target


def plot_recommend(run: Run, recommendations: Sequence[Recommendation], path: str | Path | None = None) -> Figure:
    """Draw, per optimizer, the norm over steps (log scale) with max_norm, and the norm histogram.

    Returns the Figure (two axes per optimizer: series, histogram), saved to ``path`` when given.
    """
    table = run.read_table("steps", ["step", "optimizer", "grad_norm", "skipped"])
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    fig = new_figure(RECOMMEND_FIGSIZE[0], RECOMMEND_FIGSIZE[1] * len(recommendations))
    grid = fig.add_gridspec(len(recommendations), 2, width_ratios=(2, 1))
    for row, rec in enumerate(recommendations):
        mine = columns["optimizer"] == rec.optimizer
        order = np.argsort(columns["step"][mine], kind="stable")
        steps, norms = columns["step"][mine][order], columns["grad_norm"][mine][order].astype(np.float64)
        skipped = columns["skipped"][mine][order].astype(bool)
        _draw_series(fig.add_subplot(grid[row, 0]), steps, norms, rec)
        used = np.isfinite(norms) & ~skipped & (steps >= steps.min() + rec.skip_steps)
        _draw_histogram(fig.add_subplot(grid[row, 1]), norms[used], rec)
    drawn = ", ".join(rec.optimizer_label for rec in recommendations)  # say which: --optimizer K draws one
    fig.suptitle(f"gradscope recommend: {recommendations[0].run_id}, optimizer{'s' * (len(recommendations) > 1)} {drawn}")
    if path is not None:
        save_figure(fig, path)
    return fig


def _draw_series(ax: Axes, steps: np.ndarray, norms: np.ndarray, rec: Recommendation) -> None:
    ax.axhline(rec.max_norm, color="tab:red", linestyle="--", linewidth=1.2,
               label=f"max_norm = {rec.max_norm:.4g} (p{rec.percentile:g}, clips {rec.clip_rate:.1%})")
    shown = np.isfinite(norms) & (norms > 0)  # a log axis cannot show 0, inf or NaN
    if len(steps) > MAX_POINTS:
        _draw_binned(ax, steps[shown], norms[shown])
    else:
        ax.plot(steps[shown], norms[shown], color="tab:blue", linewidth=0.8, label="pre-clip global norm")
    bad = steps[~np.isfinite(norms)]
    if len(bad):  # non-finite steps: ticks along the top edge
        ax.plot(bad, np.ones(len(bad)), "|", color="black", markersize=10, transform=ax.get_xaxis_transform(),
                label=f"non-finite ({len(bad)})")
    if rec.skip_steps:
        ax.axvspan(steps.min(), steps.min() + rec.skip_steps, color="0.85", label="left out (--skip-steps)")
    w = rec.warmup
    if w is not None and w.skip_steps > rec.skip_steps:  # the first steps recommend judges: an lr warm-up or not
        what = "lr warm-up" if w.kind == "warm-up" else "early steps (first 10%)"
        ax.axvspan(steps.min() + rec.skip_steps, steps.min() + w.skip_steps, color="tab:orange", alpha=0.12,
                   label=f"{what}: {w.skip_steps} steps")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"L{rec.norm_type:g} norm before clipping")
    ax.set_title(f"optimizer {rec.optimizer_label}: gradient norm per step")
    ax.legend(loc="upper right", fontsize="small")


def _draw_binned(ax: Axes, steps: np.ndarray, norms: np.ndarray) -> None:
    """Per-bin max and median: a million points would draw as a solid block, and slowly."""
    width = math.ceil(len(steps) / MAX_POINTS)
    n = len(steps) // width * width
    x = steps[:n].reshape(-1, width)[:, 0]
    binned = norms[:n].reshape(-1, width)
    ax.plot(x, binned.max(axis=1), color="tab:blue", linewidth=0.6, alpha=0.6, label=f"max per {width} steps")
    ax.plot(x, np.median(binned, axis=1), color="tab:blue", linewidth=1.0, label=f"median per {width} steps")


def _draw_histogram(ax: Axes, norms: np.ndarray, rec: Recommendation) -> None:
    positive = norms[norms > 0]
    if len(positive):
        low, high = positive.min(), positive.max()
        bins = np.geomspace(low, high if high > low else low * 1.01, 60)  # log-spaced: norms span decades
        ax.hist(positive, bins=bins, color="tab:blue", alpha=0.7)
    ax.set_xscale("log")
    d = rec.distribution
    marks = {"p50": d.median, "p90": d.p90, "p95": d.p95, "p99": d.p99}
    styles = {"p50": ":", "p90": "-.", "p95": "--", "p99": (0, (1, 3))}
    for label, value in marks.items():
        if value > 0 and not np.isclose(value, rec.max_norm):  # the one max_norm equals would hide under it
            ax.axvline(value, color="0.3", linestyle=styles[label], linewidth=1.0, label=f"{label} = {value:.3g}")
    ax.axvline(rec.max_norm, color="tab:red", linewidth=1.5, label=f"max_norm = p{rec.percentile:g} = {rec.max_norm:.3g}")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow log axis labels every minor tick, overlapping
    ax.set_xlabel("pre-clip global norm (log)")
    ax.set_yscale("log")  # the tail that clipping acts on is a few steps per bin: visible only on a log axis
    ax.set_ylabel("steps (log)")
    ax.set_title(f"distribution over {d.n_used} steps")
    ax.legend(loc="upper right", fontsize="small")


# --------------------------------------------------------------------------------------------------
# gradscope compare (loss curves of every arm on one axis; grad norm per arm with its threshold)
# --------------------------------------------------------------------------------------------------


if TYPE_CHECKING:
    from gradscope.compare.metrics import ArmResult, Comparison, SeedResult


def _arm_color(index: int) -> str:
    return f"C{index % 10}"  # the same colour for an arm in both compare plots


SEED_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 1)))


def _seed_style(k: int) -> str | tuple[int, tuple[int, ...]]:
    """The k-th seed's line style: an arm's seeds share its colour, so the style tells them apart."""
    return SEED_STYLES[k % len(SEED_STYLES)]


def _compare_panels(comparison: Comparison) -> list[tuple[int, str, list[ArmResult]]]:
    """(optimizer, name, its arms) for every optimizer compared: one panel each."""
    return [(k, name, comparison.of(k)) for k, name in comparison.names.items()]


def plot_compare_loss(comparison: Comparison, path: str | Path | None = None) -> Figure:
    """Loss per step of every arm and seed, one axis per optimizer: raw (faint) and smoothed (solid).

    Two lines per seed that recorded steps (raw, then the smoothed loss whose last value is the
    final loss), one legend entry per seed: an arm's seeds share its colour, each its own line style.
    An axis is logarithmic when every finite loss on it is positive, so spikes do not flatten the rest. Non-finite losses are gaps, with an ``x`` where a
    seed first diverged. Saved when ``path`` is given.
    """
    from gradscope.compare.metrics import smooth_window

    panels = _compare_panels(comparison)
    fig = new_figure(10.0, 1.0 + 4.5 * max(1, len(panels)))
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    for ax, (_, name, arms) in zip(axes, panels, strict=False):
        positive, window = True, 1
        for index, arm in enumerate(arms):
            for k, seed in enumerate(s for s in arm.seeds if s.n_steps):
                loss = seed.frame["loss"].astype(float)
                positive = positive and bool((loss[np.isfinite(loss)] > 0).all())
                window = smooth_window(len(loss))
                _draw_loss(ax, seed, _arm_color(index), f"{arm.title}, seed {seed.seed}", _seed_style(k))
        if positive and any(s.n_steps for a in arms for s in a.seeds):
            ax.set_yscale("log")
        ax.set(xlabel="optimizer step", ylabel="loss",
               title=f"{name}: loss per step, raw (faint) and trailing mean over {window} steps (solid)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize="small")
    if path is not None:
        save_figure(fig, path)
    return fig


def _draw_loss(ax: Axes, seed: SeedResult, color: str, label: str | None, style: object = "-") -> None:
    from gradscope.compare.metrics import smoothed

    steps, loss = seed.frame["step"].to_numpy(), seed.frame["loss"].astype(float)
    finite = np.isfinite(loss)
    ax.plot(steps, loss.where(finite).to_numpy(), color=color, alpha=0.22, linewidth=0.7, linestyle=style)
    ax.plot(steps, smoothed(loss).to_numpy(), color=color, linewidth=1.7, label=label, linestyle=style)
    if seed.first_nonfinite_step is not None and finite.any():  # a marker (a collection, not a line)
        ax.scatter([seed.first_nonfinite_step], [loss[finite].max()], marker="x", color=color, s=60)


def _draw_norms(ax: Axes, arm: ArmResult, color: str) -> None:
    drawn = [s for s in arm.seeds if s.n_steps]
    for k, seed in enumerate(drawn):
        norm = seed.frame["grad_norm"].astype(float)
        ax.plot(seed.frame["step"].to_numpy(), norm.where(np.isfinite(norm) & (norm > 0)).to_numpy(),
                color=color, linewidth=0.8, alpha=0.75, linestyle=_seed_style(k), label=f"seed {seed.seed}")


def _draw_thresholds(ax: Axes, arm: ArmResult, thresholds: list[tuple[int, float]]) -> None:
    """The arm's own threshold for this optimizer (dashed); on the baseline's axis, every arm's (dotted)."""
    if arm.max_norm is not None:
        ax.axhline(arm.max_norm, color="black", linestyle="--", linewidth=1.2, label=f"max_norm={arm.max_norm:g}")
        return
    if not arm.is_baseline:
        return  # a value-clipping arm has no norm threshold to draw
    for index, value in thresholds:
        ax.axhline(value, color=_arm_color(index), linestyle=":", linewidth=1.2, label=f"max_norm={value:g}")


def plot_compare_grad_norm(comparison: Comparison, path: str | Path | None = None) -> Figure:
    """Pre-clip global gradient norm per step: one row per arm, one column per optimizer (log y).

    Each axis has one line per seed that recorded steps, plus that optimizer's threshold in the arm
    as a dashed horizontal line; the baseline's axes draw every arm's threshold (dotted), to show
    where each would cut the unclipped norms. Saved when ``path`` is given.
    """
    panels = _compare_panels(comparison)
    n_rows = max((len(arms) for _, _, arms in panels), default=1)
    fig = new_figure(10.0 if len(panels) < 2 else 7.0 * len(panels), 1.0 + 2.4 * max(1, n_rows))
    grid = fig.subplots(max(1, n_rows), max(1, len(panels)), sharex="col", sharey="col", squeeze=False)
    for col, (_, name, arms) in enumerate(panels):
        thresholds = [(i, a.max_norm) for i, a in enumerate(arms) if a.max_norm is not None]
        for row, arm in enumerate(arms):
            ax = grid[row, col]
            _draw_norms(ax, arm, _arm_color(row))
            _draw_thresholds(ax, arm, thresholds)
            ax.set_title(f"{arm.title}: {name}" if len(panels) > 1 else arm.title, loc="left", fontsize=10)
            ax.set_ylabel("grad norm")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper right", fontsize="small")
        if any(s.n_steps for a in arms for s in a.seeds):
            grid[0, col].set_yscale("log")
        grid[-1, col].set_xlabel("optimizer step")
    fig.suptitle("Global gradient norm before clipping, per arm" + (" and optimizer" if len(panels) > 1 else ""))
    if path is not None:
        save_figure(fig, path)
    return fig
