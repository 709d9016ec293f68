"""Metrics of ``gradscope compare``: what each arm's recorded steps say, and which arm is best.

Pure functions on loaded runs (pandas, numpy); no torch, no printing, no files. Every arm and every
seed goes through the same definitions, named once here:

- **final loss**: mean loss over the last 10% of the steps (at least one step);
- **best loss**: the lowest value of the *smoothed* loss (trailing mean over ``smooth_window`` steps),
  so one lucky mini-batch does not count as the best the arm reached;
- **volatility**: standard deviation of the step-to-step loss change (finite steps only);
- **loss spike**: a step whose loss exceeds ``stats.LOSS_SPIKE.factor`` x the median of the
  previous ``stats.LOSS_SPIKE.window`` finite losses; a **norm spike** is ``gradscope recommend``'s
  definition, ``stats.NORM_SPIKE`` (the same rule, for pre-clip norms, with larger constants), so
  both commands count the same steps;
- **non-finite**: steps whose loss, or the pre-clip norm of an applied update, is inf or NaN
  (a step GradScaler skipped is routine loss scaling, not divergence);
- **clipped**: fraction of steps whose clipping coefficient was below 1.

The verdict ranks arms by mean final loss over seeds; arms that tie within seed noise are ranked by
volatility. A lead "exceeds the seed spread" when the gap to the baseline is larger than
``SPREAD_FACTOR`` x the pooled standard deviation of the two arms over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from gradscope import stats
from gradscope.stats import LOSS_SPIKE, NORM_SPIKE, SpikeRule
from gradscope.store import Run

LAST_FRACTION = 0.10  # "final" loss: the last 10% of the steps
SPREAD_FACTOR = 2.0  # a lead is real when it exceeds 2x the pooled seed standard deviation
CLIPPED_BELOW = 1.0 - 1e-6  # clip_coef under this: the step was scaled down
BASELINE = "baseline"

#: Per-seed metrics that are averaged over seeds, in table order.
METRICS = ("final_loss", "best_loss", "volatility", "loss_spikes", "norm_spikes", "nonfinite",
           "clipped_fraction", "train_time_s")


@dataclass
class SeedRun:
    """One seed of one arm, as it came back from its subprocess (or the recorded run reused)."""

    arm: str
    max_norm: float | None
    seed: int
    run: Run | None  # None when the arm never made a run directory
    status: str  # the run's status, or "not run" / "interrupted"
    error: str | None = None
    step_cap: int | None = None  # analyse only the first N steps (a reused, longer recorded run)
    reused: bool = False


@dataclass
class SeedResult:
    """The metrics of one seed of one arm."""

    seed: int
    run_id: str | None
    status: str  # "ok" | "diverged" | "crashed" | "interrupted" | "no steps" | "not run"
    error: str | None
    n_steps: int
    metrics: dict[str, float]
    first_nonfinite_step: int | None
    reused: bool
    frame: pd.DataFrame = field(repr=False)  # step, loss, grad_norm: what the plots draw

    @property
    def counts(self) -> bool:
        """True when this seed enters the arm's mean: it finished (even if it diverged)."""
        return self.status in ("ok", "diverged")


@dataclass
class ArmResult:
    """One arm (baseline or one threshold) over all its seeds."""

    arm: str
    max_norm: float | None
    seeds: list[SeedResult]

    def values(self, metric: str) -> np.ndarray:
        """``metric`` of every seed that counts, as an array (NaN where the seed diverged)."""
        return np.array([s.metrics[metric] for s in self.seeds if s.counts], dtype=float)

    def mean(self, metric: str) -> float:
        """Mean of ``metric`` over the counted seeds; NaN when none counts or one diverged to NaN."""
        values = self.values(metric)
        return float(values.mean()) if values.size else math.nan

    def std(self, metric: str) -> float:
        """Sample standard deviation of ``metric`` over seeds; NaN with fewer than two seeds."""
        values = self.values(metric)
        return float(values.std(ddof=1)) if values.size > 1 else math.nan

    @property
    def n_counted(self) -> int:
        """How many seeds finished and enter the means."""
        return sum(s.counts for s in self.seeds)


@dataclass
class Verdict:
    """Which arm is best, and whether its lead over the baseline is larger than seed noise."""

    best: str | None
    exceeds_spread: bool | None  # None: unknown (one seed, or nothing to compare with)
    gap: float | None
    spread: float | None
    text: str


@dataclass
class Comparison:
    """Everything ``compare`` measured: the arms in run order and the verdict."""

    arms: list[ArmResult]
    verdict: Verdict


class HasMaxNorm(Protocol):
    """An arm as anything names it: a planned arm, a measured one."""

    @property
    def max_norm(self) -> float | None: ...


def arm_title(arm: HasMaxNorm | float | None) -> str:
    """How an arm is named to a person: ``no clipping`` or ``max_norm=0.5``.

    Takes an arm (``ArmResult``, ``ArmSpec``) or its threshold itself (None: no clipping).
    """
    max_norm = arm if arm is None or isinstance(arm, int | float) else arm.max_norm
    return "no clipping" if max_norm is None else f"max_norm={max_norm:g}"


def arm_key(max_norm: float | None) -> str:
    """The key the seeds of one arm share (``arm`` in compare.json): ``baseline`` or its title."""
    return BASELINE if max_norm is None else arm_title(max_norm)


# --------------------------------------------------------------------------------------------------
# Per-series definitions
# --------------------------------------------------------------------------------------------------


def smooth_window(n_steps: int) -> int:
    """Trailing-mean window for the smoothed loss: 5% of the steps, at least 5."""
    return max(5, n_steps // 20)


def smoothed(values: pd.Series) -> pd.Series:
    """Trailing mean over :func:`smooth_window` steps, ignoring non-finite values."""
    finite = values.where(np.isfinite(values))
    return finite.rolling(smooth_window(len(values)), min_periods=1).mean()


def spike_mask(values: pd.Series, rule: SpikeRule = LOSS_SPIKE) -> pd.Series:
    """True at steps whose value exceeds ``rule.factor`` x the median of the previous ``rule.window``
    finite steps (:func:`gradscope.stats.spike_mask`, as a Series aligned with ``values``).

    Non-finite steps are never spikes: they are counted separately.
    """
    return pd.Series(stats.spike_mask(values.to_numpy(dtype=float), rule), index=values.index, dtype=bool)


def norm_spike_mask(norms: pd.Series) -> pd.Series:
    """Grad-norm spikes exactly as ``gradscope recommend`` counts them (:data:`gradscope.stats.NORM_SPIKE`)."""
    return spike_mask(norms, NORM_SPIKE)


def final_loss(loss: pd.Series) -> float:
    """Mean of the last :data:`LAST_FRACTION` of the steps (inf/NaN when the arm diverged there)."""
    if loss.empty:
        return math.nan
    tail = loss.iloc[-max(1, math.ceil(len(loss) * LAST_FRACTION)):]
    return float(tail.mean(skipna=False))


def volatility(loss: pd.Series) -> float:
    """Standard deviation of the step-to-step change of the loss, over finite consecutive steps."""
    diffs = loss.diff()
    diffs = diffs[np.isfinite(diffs)]
    return float(diffs.std(ddof=1)) if len(diffs) > 1 else math.nan


# --------------------------------------------------------------------------------------------------
# One seed of one arm
# --------------------------------------------------------------------------------------------------


def step_frame(run: Run, step_cap: int | None = None) -> pd.DataFrame:
    """The first optimizer's steps (``step``, ``loss``, ``grad_norm``, ``clip_coef``, ``time_s``...).

    ``compare`` judges arms by the first optimizer, the one ``--max-steps`` counts; ``step_cap``
    keeps the first N steps, which is what a run stopped after N steps would have recorded.
    """
    steps = run.steps
    frame = steps[steps["optimizer"] == steps["optimizer"].min()] if len(steps) else steps
    if step_cap is not None:
        frame = frame[frame["step"] < step_cap]
    frame = frame.reset_index(drop=True)
    frame["loss"] = frame["loss"].astype(float)  # null losses (non-scalar roots) become NaN
    return frame


def nonfinite_mask(frame: pd.DataFrame) -> pd.Series:
    """Steps where training went non-finite: the loss, or the norm of an update that was applied.

    A step GradScaler skipped (inf/NaN in fp16 gradients, then a smaller loss scale) is routine
    loss scaling, not divergence: its norm does not count, its loss does.
    """
    skipped = frame["skipped"].fillna(False).astype(bool) if "skipped" in frame else False
    norm_bad = ~np.isfinite(frame["grad_norm"].astype(float)) & ~skipped
    return ~np.isfinite(frame["loss"]) | norm_bad


def seed_metrics(frame: pd.DataFrame) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one seed's step frame (see the module docstring)."""
    loss, norm = frame["loss"], frame["grad_norm"].astype(float)
    nonfinite = nonfinite_mask(frame)
    best = smoothed(loss).min()
    return {
        "final_loss": final_loss(loss),
        "best_loss": float(best) if pd.notna(best) else math.nan,
        "volatility": volatility(loss),
        "loss_spikes": float(spike_mask(loss).sum()),
        "norm_spikes": float(norm_spike_mask(norm).sum()),
        "nonfinite": float(nonfinite.sum()),
        "clipped_fraction": float((frame["clip_coef"].fillna(1.0) < CLIPPED_BELOW).mean()) if len(frame) else math.nan,
        "train_time_s": float(frame["time_s"].iloc[-1]) if len(frame) else math.nan,
    }


def _first_nonfinite(frame: pd.DataFrame) -> int | None:
    bad = frame[nonfinite_mask(frame)]
    return int(bad["step"].iloc[0]) if len(bad) else None


def _seed_status(seed_run: SeedRun, n_steps: int, first_bad: int | None) -> str:
    if seed_run.status == "interrupted":
        return "interrupted"
    if seed_run.run is None:
        return "not run" if seed_run.status == "not run" else "crashed"
    if first_bad is not None:
        return "diverged"  # even when the script then raised: the divergence is the news
    if seed_run.status != "complete":
        return "crashed"
    return "ok" if n_steps else "no steps"


def measure_seed(seed_run: SeedRun) -> SeedResult:
    """Metrics and status of one seed of one arm (``status`` says whether it enters the means)."""
    empty = pd.DataFrame({"step": [], "loss": [], "grad_norm": []})
    frame = step_frame(seed_run.run, seed_run.step_cap) if seed_run.run is not None else empty
    first_bad = _first_nonfinite(frame) if len(frame) else None
    status = _seed_status(seed_run, len(frame), first_bad)
    metrics = seed_metrics(frame) if len(frame) else dict.fromkeys(METRICS, math.nan)
    return SeedResult(seed_run.seed, seed_run.run.id if seed_run.run is not None else None, status,
                      seed_run.error, len(frame), metrics, first_bad, seed_run.reused,
                      frame[["step", "loss", "grad_norm"]] if len(frame) else empty)


# --------------------------------------------------------------------------------------------------
# Arms and the verdict
# --------------------------------------------------------------------------------------------------


def compare_arms(seed_runs: list[SeedRun]) -> Comparison:
    """Group seed runs into arms (in first-seen order), measure each, and name the best arm."""
    order: dict[str, ArmResult] = {}
    for seed_run in seed_runs:
        arm = order.setdefault(seed_run.arm, ArmResult(seed_run.arm, seed_run.max_norm, []))
        arm.seeds.append(measure_seed(seed_run))
    for arm in order.values():
        arm.seeds.sort(key=lambda s: s.seed)
    arms = list(order.values())
    return Comparison(arms, verdict(arms))


def pooled_std(a: ArmResult, b: ArmResult, metric: str = "final_loss") -> float:
    """sqrt of the mean of the two arms' seed variances; NaN when either has fewer than two seeds."""
    sa, sb = a.std(metric), b.std(metric)
    return math.sqrt((sa * sa + sb * sb) / 2.0) if math.isfinite(sa) and math.isfinite(sb) else math.nan


def rank_arms(arms: list[ArmResult]) -> list[ArmResult]:
    """Arms with a finite mean final loss, best first.

    Arms whose final loss is within seed noise of the lowest (``SPREAD_FACTOR`` x pooled std) tie,
    and ties are broken by lower volatility: a smoother curve to the same loss is the better arm.
    """
    usable = sorted((a for a in arms if math.isfinite(a.mean("final_loss"))), key=lambda a: a.mean("final_loss"))
    if not usable:
        return []
    lowest = usable[0]
    tied = [a for a in usable if a is lowest or _within_noise(lowest, a)]
    tied.sort(key=lambda a: (_nan_last(a.mean("volatility")), a.mean("final_loss")))
    return tied + [a for a in usable if a not in tied]


def _within_noise(a: ArmResult, b: ArmResult) -> bool:
    spread = pooled_std(a, b)
    return math.isfinite(spread) and abs(b.mean("final_loss") - a.mean("final_loss")) <= SPREAD_FACTOR * spread


def _nan_last(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _loss_text(arm: ArmResult) -> str:
    mean, std = arm.mean("final_loss"), arm.std("final_loss")
    return f"{mean:.4g} ± {std:.2g}" if math.isfinite(std) else f"{mean:.4g}"


def verdict(arms: list[ArmResult]) -> Verdict:
    """Name the best arm and say whether its lead over the baseline exceeds the seed spread.

    The lead is measured in final loss, or in volatility when the final losses tie within noise
    (that is what made the arm best then).
    """
    ranked = rank_arms(arms)
    if not ranked:
        return Verdict(None, None, None, None, "no arm finished with a finite loss: see the arm logs")
    best = ranked[0]
    baseline = next((a for a in arms if a.arm == BASELINE), None)
    if best.arm == BASELINE:
        rival = ranked[1] if len(ranked) > 1 else None
        head = f"best: {arm_title(best)} (final loss {_loss_text(best)}); no threshold beat the unclipped baseline"
        metric = "volatility" if rival is not None and _within_noise(best, rival) else "final_loss"
        return _lead_verdict(best, rival, head, metric)
    head = f"best: {arm_title(best)} (final loss {_loss_text(best)}"
    if baseline is None or not math.isfinite(baseline.mean("final_loss")):
        why = "crashed" if baseline is None or baseline.n_counted == 0 else "diverged (non-finite loss)"
        return Verdict(best.arm, None, None, None, f"{head}); the unclipped baseline {why}")
    head += f" vs {_loss_text(baseline)} unclipped)"
    if _within_noise(best, baseline):
        head += (f"; final losses tie within seed noise, and it is smoother: volatility "
                 f"{best.mean('volatility'):.3g} vs {baseline.mean('volatility'):.3g}")
        return _lead_verdict(best, baseline, head, "volatility")
    return _lead_verdict(best, baseline, head, "final_loss")


def _lead_verdict(best: ArmResult, other: ArmResult | None, head: str, metric: str) -> Verdict:
    if other is None:
        return Verdict(best.arm, None, None, None, head + "; nothing else to compare with")
    gap = other.mean(metric) - best.mean(metric)
    spread = pooled_std(best, other, metric)
    if not math.isfinite(spread):
        return Verdict(best.arm, None, gap, None, f"{head}; seed spread unknown with fewer than two finished "
                                                  "seeds per arm: rerun with --seeds 3 to tell the effect from seed noise")
    exceeds = gap > SPREAD_FACTOR * spread
    judged = "exceeds" if exceeds else "does not exceed"
    what = "a real effect" if exceeds else "not distinguishable from seed noise"
    name = "final-loss" if metric == "final_loss" else "volatility"
    return Verdict(best.arm, exceeds, gap, spread, f"{head}; its {name} lead of {gap:.3g} {judged} "
                                                   f"{SPREAD_FACTOR:g}x the seed spread ({spread:.2g}): {what}")
