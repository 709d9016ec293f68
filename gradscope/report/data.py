"""The report's numbers: each optimizer's series from the steps table, downsampled for drawing.

A page cannot hold a million points per curve, and a chart of a million points draws as a solid
block: every series longer than :data:`MAX_POINTS` is cut into equal bins of consecutive steps and
drawn as each bin's max and median (the max keeps every spike visible, the median the typical
step). The page says so under each chart. The steps table is small (one row per step) and read
whole; the layers table is streamed (``heatmap.py``). Nothing here imports torch or matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradscope.store import Run

#: Above this many steps a series is drawn as per-bin max and median.
MAX_POINTS = 2000
#: Steps marked one by one (clipped, non-finite, AMP-skipped) before marks are thinned to one per bin.
MAX_MARKS = 2000
STEP_COLUMNS = ("step", "optimizer", "grad_norm", "applied_norm", "clip_coef", "loss", "lr", "skipped", "nonfinite")


@dataclass(frozen=True)
class Binned:
    """A series cut into bins of ``width`` consecutive points: each bin's first step, max and median."""

    x: np.ndarray
    max: np.ndarray
    median: np.ndarray
    width: int  # 1: the series itself, not binned

    @property
    def note(self) -> str:
        """What the page says under a downsampled chart (empty when nothing was downsampled)."""
        return "" if self.width == 1 else f"downsampled: max and median of every {self.width:,} steps"


def binned(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> Binned:
    """``y`` over ``x`` as per-bin max and median of at most ``max_points`` bins; NaN-aware.

    A bin whose values are all NaN stays NaN (a gap in the line). The last bin may be shorter.
    """
    y = np.asarray(y, dtype=np.float64)
    if len(x) <= max_points:
        return Binned(np.asarray(x), y, y, 1)
    width = -(-len(x) // max_points)
    pad = (-len(y)) % width
    blocks = np.concatenate([y, np.full(pad, np.nan)]).reshape(-1, width)
    empty = np.isnan(blocks).all(axis=1)
    blocks[empty, 0] = 0.0  # an all-NaN bin: computed as 0, then put back to NaN, without numpy's warnings
    top, mid = np.nanmax(blocks, axis=1), np.nanmedian(blocks, axis=1)
    top[empty], mid[empty] = np.nan, np.nan
    return Binned(np.asarray(x)[::width], top, mid, width)


def thinned(steps: np.ndarray, max_marks: int = MAX_MARKS) -> np.ndarray:
    """At most ``max_marks`` of ``steps``: the first of each bin of the step range when there are more."""
    if len(steps) <= max_marks:
        return steps
    lo, hi = int(steps.min()), int(steps.max())
    width = max(1, -(-(hi - lo + 1) // max_marks))
    _, first = np.unique((steps - lo) // width, return_index=True)
    return steps[first]


def thinned_max(steps: np.ndarray, values: np.ndarray, max_marks: int = MAX_MARKS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_marks`` of (``steps``, ``values``), steps ascending: each bin's largest value when there are more."""
    if len(steps) <= max_marks:
        return steps, values
    lo = int(steps.min())
    width = max(1, -(-(int(steps.max()) - lo + 1) // max_marks))
    bins = (steps - lo) // width
    order = np.lexsort((-values, bins))  # by bin, the largest value first
    first = order[np.r_[True, bins[order][1:] != bins[order][:-1]]]
    return steps[first], values[first]


@dataclass(frozen=True)
class OptimizerSeries:
    """One optimizer's recorded columns, sorted by step, as float arrays (NaN where null)."""

    optimizer: int
    step: np.ndarray
    grad_norm: np.ndarray
    applied_norm: np.ndarray
    clip_coef: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    skipped: np.ndarray  # bool: GradScaler skipped the update
    nonfinite: np.ndarray  # bool: grad_norm is inf or NaN

    def clipped_steps(self, threshold: float) -> np.ndarray:
        """Steps whose finite pre-clip norm is greater than ``threshold`` (recommend's clip rule)."""
        finite = np.isfinite(self.grad_norm)
        return self.step[finite & (self.grad_norm > threshold)]


def read_series(run: Run) -> dict[int, OptimizerSeries]:
    """Every optimizer's series from one read of the steps table, keyed by optimizer index."""
    table = run.read_table("steps", list(STEP_COLUMNS))
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in STEP_COLUMNS}
    out = {}
    for k in np.unique(cols["optimizer"]):
        mine = np.flatnonzero(cols["optimizer"] == k)
        mine = mine[np.argsort(cols["step"][mine], kind="stable")]
        floats = {name: _floats(cols[name][mine]) for name in ("grad_norm", "applied_norm", "clip_coef", "loss", "lr")}
        flags = {name: _flags(cols[name][mine]) for name in ("skipped", "nonfinite")}
        out[int(k)] = OptimizerSeries(int(k), cols["step"][mine].astype(np.int64), **floats, **flags)
    return out


def _floats(values: np.ndarray) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64) if values.dtype == object \
        else values.astype(np.float64)


def _flags(values: np.ndarray) -> np.ndarray:
    return np.array([bool(v) for v in values], dtype=bool) if values.dtype == object else values.astype(bool)


def clip_rate_curve(norms: np.ndarray, n_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of ``norms`` (the used steps) greater than each of ``n_points`` log-spaced thresholds.

    The thresholds span the positive norms' range, a little beyond both ends, so the curve runs from
    1 (every step clipped) to 0 (none).
    """
    positive = np.sort(norms[np.isfinite(norms) & (norms > 0)])
    if len(positive) == 0:
        return np.array([]), np.array([])
    low, high = positive[0] / 1.5, positive[-1] * 1.5
    thresholds = np.geomspace(low, high, n_points)
    above = len(norms) - np.searchsorted(positive, thresholds, side="right")  # strictly greater, as clip_rate
    return thresholds, above / max(1, len(norms))
