"""Statistics shared by ``recommend`` and ``compare``: percentiles, clip rates, spikes.

Plain numpy (pandas only for the rolling median); never torch. Each definition lives here once so
both commands count the same way:

* a percentile is numpy's default (linear interpolation between the two nearest ranks);
* a threshold ``t`` *clips* a value when the value is greater than ``t``;
* a *spike* is a value far above the median of the values just before it. Two rules use that
  definition on purpose with different constants: :data:`NORM_SPIKE` for pre-clip gradient norms
  (``recommend``, and ``compare``'s norm spikes) and :data:`LOSS_SPIKE` for losses (``compare``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpikeRule:
    """A value is a spike when it exceeds ``factor`` x the median of the ``window`` values before it.

    No value is judged before ``min_history`` values precede it.
    """

    factor: float
    window: int
    min_history: int


#: Gradient-norm spikes (Megatron uses 10x, Lightning 2x): rare, large jumps that clipping guards against.
NORM_SPIKE = SpikeRule(factor=5.0, window=50, min_history=10)
#: Loss spikes: a loss jumps less than a norm before training is visibly hurt, so the bar is lower.
LOSS_SPIKE = SpikeRule(factor=3.0, window=20, min_history=5)


def percentile_of_sorted(values: np.ndarray, q: Sequence[float] | float) -> np.ndarray:
    """``numpy.percentile(values, q)`` (linear method) for ``values`` already sorted ascending, NaN-free.

    The same arithmetic as numpy's own (virtual index ``(n - 1) * q / 100``, then numpy's two-sided
    lerp), so the results are bit-identical to ``np.percentile(values, list(q))``; the test suite
    checks that. It skips numpy's partition, which is the cost when values are already sorted.
    """
    quantiles = np.true_divide(np.atleast_1d(np.asarray(q, dtype=np.float64)), 100)
    n = len(values)
    virtual = (n - 1) * quantiles
    below = np.floor(virtual)
    top = virtual >= n - 1  # numpy takes the last value for both neighbours there
    lower = np.where(top, n - 1, below).astype(np.intp)
    upper = np.where(top, n - 1, below + 1).astype(np.intp)
    gamma = virtual - np.where(top, -1.0, below)
    low, high = values[lower], values[upper]
    diff = high - low
    out = np.add(low, diff * gamma)
    np.subtract(high, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out


def clip_rate(norms: np.ndarray, threshold: float) -> tuple[int, float, float | None]:
    """How often ``threshold`` clips ``norms``: (steps clipped, fraction clipped, mean scale-down).

    The mean scale-down is the mean of ``threshold / norm`` over the clipped steps (what
    ``clip_grad_norm_`` multiplies their gradients by), ``None`` when no step is clipped.
    """
    clipped = norms[norms > threshold]
    n = len(clipped)
    scale = float(np.mean(threshold / clipped)) if n else None
    return n, n / len(norms) if len(norms) else 0.0, scale


def rolling_median_before(values: np.ndarray, window: int, min_history: int) -> np.ndarray:
    """The median of the ``window`` values before each one (NaN until ``min_history`` exist).

    NaN values are left out of a window and do not count toward ``min_history``.
    """
    import pandas as pd  # only here: pandas' rolling median is O(n log w) in C

    series = pd.Series(values, dtype="float64")
    return series.rolling(window, min_periods=min_history).median().shift(1).to_numpy()


def spike_ratios(values: np.ndarray, rule: SpikeRule = NORM_SPIKE) -> tuple[np.ndarray, np.ndarray]:
    """Each value over the rolling median before it, and those medians, for non-negative series.

    A ratio is NaN where the median is missing (too little history) or not positive, so it is never
    a spike there; a spike is a ratio above ``rule.factor``.
    """
    medians = rolling_median_before(values, rule.window, rule.min_history)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(medians > 0, values / medians, np.nan)
    return ratios, medians


def spike_mask(values: np.ndarray, rule: SpikeRule) -> np.ndarray:
    """True where a value exceeds ``rule.factor`` x the median of the finite values before it.

    Works for series that can be negative (a loss): the test reads "more than ``factor - 1`` x
    |median| above the median", which for a positive median is ``value / median > factor`` as in
    :func:`spike_ratios`. Non-finite values are never spikes (they are counted on their own) and
    leave the windows of the values after them.
    """
    series = np.asarray(values, dtype=np.float64)
    finite = np.where(np.isfinite(series), series, np.nan)
    median = rolling_median_before(finite, rule.window, rule.min_history)
    with np.errstate(invalid="ignore"):
        return (finite - median) > (rule.factor - 1.0) * np.abs(median)
