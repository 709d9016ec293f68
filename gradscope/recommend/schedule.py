"""The first steps of a run: a warm-up when the recorded lr ramps up over them, else just *early steps*.

Either way the question is the same: do the first steps hold most of the steps above ``max_norm``?
The answer is read differently. Under an lr warm-up the large early norms meet a small lr, so they
say little about the rest of the run and the threshold is better set without them
(``--skip-steps``). At a constant lr the early steps are full-size updates far from a solution:
clipping them is a spike guard at work, and the threshold then rarely acts after them.
"""

from __future__ import annotations

import numpy as np

from gradscope.recommend.model import Warmup
from gradscope.recommend.steps import OptimizerView
from gradscope.stats import clip_rate

#: Without an lr ramp in the data, the window is the first 10% of steps, at most this many.
WARMUP_MAX_STEPS = 1000
#: The window dominates the tail when at least this share of the clipped steps falls inside it.
WARMUP_DOMINATES = 0.5
#: Below this many used steps the window is not judged.
WINDOW_MIN_STEPS = 20
#: The lr "ramps" when its first value is below this fraction of its peak.
RAMP_RATIO = 0.99


def first_steps(view: OptimizerView, percentile: float, max_norm: float, skip_steps: int) -> Warmup | None:
    """Share of the clipped steps in the first steps (a warm-up or the early steps), and the threshold without them.

    ``None`` under :data:`WINDOW_MIN_STEPS` used steps.
    """
    norms = view.norms
    if len(norms) < WINDOW_MIN_STEPS:
        return None
    lr = view.cols["lr"][view.used]
    window, basis = warmup_window(lr, len(norms))
    clipped = norms > max_norm
    n_clipped = int(clipped.sum())
    share = float(clipped[:window].sum() / n_clipped) if n_clipped else None
    rest = norms[window:]
    without = float(np.percentile(rest, percentile))
    _, rate_without, _ = clip_rate(rest, max_norm)
    _, rate_all, _ = clip_rate(norms, without)
    skip = int(view.used_steps[window] - view.first_step)
    dominates = share is not None and share >= WARMUP_DOMINATES
    return Warmup(window, basis, max(skip, skip_steps), share, dominates, without, rate_without,
                  kind="warm-up" if basis == "lr-ramp" else "early-steps", lr_first=_finite(lr[0]),
                  lr_after=_finite(lr[window]),
                  max_norm_without_clip_rate=rate_all)


def warmup_window(lr: np.ndarray, n: int) -> tuple[int, str]:
    """The lr warm-up length when the lr visibly ramps up to its peak early, else the first 10%."""
    finite = np.isfinite(lr)
    if finite.all() and n:
        peak = int(np.argmax(lr))  # first step at the peak learning rate
        if lr[0] < RAMP_RATIO * lr[peak] and 0 < peak <= n // 2:
            return peak, "lr-ramp"
    return max(1, min(n // 10, WARMUP_MAX_STEPS)), "first-10%"


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def lr_evidence(window: Warmup) -> str:
    """The recorded lr that makes the window a warm-up or not, in words."""
    first, after = window.lr_first, window.lr_after
    if first is None or after is None:
        return "the lr was not recorded"
    if window.kind == "warm-up":
        return f"the lr rises from {first:.3g} at the first step to its peak {after:.3g} after {window.window} steps"
    if f"{first:.3g}" == f"{after:.3g}":
        return f"no lr warm-up: lr {first:.3g} at the first step and after them"
    return f"no lr warm-up: lr {first:.3g} at the first step, {after:.3g} after them"
