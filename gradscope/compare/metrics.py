"""Metrics of ``gradscope compare``: what each arm's recorded steps say, per optimizer.

Pure functions on loaded runs (pandas, numpy); no torch, no printing, no files. Every arm, seed
and optimizer goes through the same definitions, named once here:

- **smoothed loss**: the trailing mean over ``smooth_window(n)`` steps, the last
  :data:`LAST_FRACTION` (10%) of the steps, at least one step; only full windows count;
- **final loss**: the smoothed loss at the last step (the mean of the last 10% of the steps);
- **best loss**: the lowest smoothed loss over the run; the final loss is one of the values it is
  the minimum of, so best <= final always;
- **volatility**: standard deviation of the step-to-step loss change (finite steps only);
- **loss spike**: a step whose loss exceeds ``stats.LOSS_SPIKE.factor`` x the median of the
  previous ``stats.LOSS_SPIKE.window`` finite losses; a **norm spike** is ``gradscope recommend``'s
  definition, ``stats.NORM_SPIKE`` (the same rule, for pre-clip norms, with larger constants);
- **non-finite**: steps whose loss, or the pre-clip norm of an applied update, is inf or NaN
  (a step GradScaler skipped is routine loss scaling, not divergence);
- **clipped**: fraction of steps whose clipping coefficient was below 1.
- **a distributed job's step** is one row (:func:`one_row_per_step`): the lowest rank's norms, which
  are the job's, and the loss averaged over the ranks (each rank's loss is its own batch's).

:mod:`gradscope.compare.verdict` decides what the final losses say (a paired test over seeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gradscope import stats
from gradscope.compare.verdict import Verdict, decide
from gradscope.record.config import Thresholds
from gradscope.stats import LOSS_SPIKE, NORM_SPIKE, SpikeRule
from gradscope.store import OptimizerMeta, Run

LAST_FRACTION = 0.10  # "final" loss: the last 10% of the steps; also the smoothing window
CLIPPED_BELOW = 1.0 - 1e-6  # clip_coef under this: the step was scaled down
BASELINE = "baseline"
NOT_INJECTED = "not injected"  # how an arm's meta.json starts its injection field when it could not clip

#: Per-seed metrics that are averaged over seeds, in table order.
METRICS = ("final_loss", "best_loss", "volatility", "loss_spikes", "norm_spikes", "nonfinite",
           "clipped_fraction", "train_time_s")


@dataclass(frozen=True)
class Clip:
    """What an arm does: nothing (the baseline), ``clip_grad_norm_`` per optimizer, or ``clip_grad_value_``."""

    max_norm: Thresholds | None = None
    clip_value: float | None = None

    @property
    def is_baseline(self) -> bool:
        """No clipping at all (the script's own clipping disabled too)."""
        return self.max_norm is None and self.clip_value is None

    @property
    def title(self) -> str:
        """How the arm is named to a person: ``no clipping``, ``max_norm=0.5``, ``max_norm=1/5``, ``clip_value=0.1``."""
        if self.clip_value is not None:
            return f"clip_value={self.clip_value:g}"
        if self.max_norm is not None:
            return "max_norm=" + "/".join(f"{v:g}" for v in self.max_norm.values)
        return "no clipping"

    @property
    def key(self) -> str:
        """The key the seeds of one arm share (``arm`` in compare.json): ``baseline`` or its title."""
        return BASELINE if self.is_baseline else self.title

    def max_norm_of(self, optimizer: int) -> float | None:
        """The max_norm this arm gives optimizer ``optimizer`` (None: not clipped by norm)."""
        return self.max_norm.of(optimizer) if self.max_norm is not None else None


def optimizer_name(meta: OptimizerMeta | None, index: int) -> str:
    """``optimizer 1 (Adam, G.*)``: index, class and the common prefix of its parameters' names."""
    if meta is None:
        return f"optimizer {index}"
    parts = [name.split(".") for name in meta.names]
    common: list[str] = []
    for pieces in zip(*parts, strict=False) if parts else ():
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    if len(parts) == 1:
        prefix = ".".join(parts[0])
    else:
        prefix = ".".join(common) + ".*" if common else f"{len(parts)} tensors"
    return f"optimizer {index} ({meta.class_name}, {prefix})" if parts else f"optimizer {index} ({meta.class_name})"


@dataclass
class SeedRun:
    """One seed of one arm, as it came back from its subprocess (or the recorded run reused)."""

    clip: Clip
    seed: int
    run: Run | None  # None when the arm never made a run directory
    status: str  # the run's status, or "not run" / "interrupted"
    error: str | None = None
    step_cap: int | None = None  # analyse only the first N steps (a reused, longer recorded run)
    reused: bool = False
    log: Path | None = None


@dataclass
class SeedResult:
    """The metrics of one seed of one arm, for one optimizer."""

    seed: int
    run_id: str | None
    status: str  # "ok" | "diverged" | "crashed" | "interrupted" | "no steps" | "not run" | "not injected: ..."
    error: str | None
    n_steps: int
    metrics: dict[str, float]
    first_nonfinite_step: int | None
    reused: bool
    frame: pd.DataFrame = field(repr=False)  # step, loss, grad_norm: what the plots draw
    log: Path | None = None

    @property
    def counts(self) -> bool:
        """True when this seed enters the arm's mean: it finished (even if it diverged)."""
        return self.status in ("ok", "diverged")


@dataclass
class ArmResult:
    """One arm (baseline or one threshold) on one optimizer, over all its seeds."""

    clip: Clip
    optimizer: int
    seeds: list[SeedResult]

    @property
    def arm(self) -> str:
        """The arm's key (``baseline`` or its title)."""
        return self.clip.key

    @property
    def title(self) -> str:
        """The arm's name for a person."""
        return self.clip.title

    @property
    def is_baseline(self) -> bool:
        """The unclipped arm."""
        return self.clip.is_baseline

    @property
    def max_norm(self) -> float | None:
        """This optimizer's max_norm in this arm (None: not clipped by norm)."""
        return self.clip.max_norm_of(self.optimizer)

    def by_seed(self, metric: str) -> dict[int, float]:
        """``metric`` of every seed that counts, by seed."""
        return {s.seed: float(s.metrics[metric]) for s in self.seeds if s.counts}

    def values(self, metric: str) -> np.ndarray:
        """``metric`` of every seed that counts, as an array (NaN where the seed diverged)."""
        return np.array(list(self.by_seed(metric).values()), dtype=float)

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
class Comparison:
    """Everything ``compare`` measured: one result per (optimizer, arm), the optimizers' names, the verdict."""

    arms: list[ArmResult]  # optimizer by optimizer, the arms in run order within each
    names: dict[int, str]  # optimizer index -> "optimizer 1 (Adam, G.*)"
    verdict: Verdict

    def of(self, optimizer: int) -> list[ArmResult]:
        """The arms' results on one optimizer."""
        return [a for a in self.arms if a.optimizer == optimizer]


# --------------------------------------------------------------------------------------------------
# Per-series definitions
# --------------------------------------------------------------------------------------------------


def smooth_window(n_steps: int) -> int:
    """The smoothing window: the last :data:`LAST_FRACTION` of the steps, at least one step."""
    return max(1, math.ceil(n_steps * LAST_FRACTION))


def smoothed(values: pd.Series) -> pd.Series:
    """Trailing mean over :func:`smooth_window` steps; NaN until the first full window, and wherever
    the window holds an inf or NaN (a diverged stretch has no smoothed loss)."""
    window = smooth_window(len(values))
    finite = values.where(np.isfinite(values))
    return finite.rolling(window, min_periods=window).mean()


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
    """The smoothed loss at the last step: the mean of the last 10% (inf/NaN when the arm diverged there)."""
    if loss.empty:
        return math.nan
    tail = loss.iloc[-smooth_window(len(loss)):]
    return float(tail.mean(skipna=False))


def best_loss(loss: pd.Series) -> float:
    """The lowest smoothed loss; never above :func:`final_loss` when that is finite."""
    best = smoothed(loss).min()
    return float(best) if pd.notna(best) else math.nan


def volatility(loss: pd.Series) -> float:
    """Standard deviation of the step-to-step change of the loss, over finite consecutive steps."""
    diffs = loss.diff()
    diffs = diffs[np.isfinite(diffs)]
    return float(diffs.std(ddof=1)) if len(diffs) > 1 else math.nan


# --------------------------------------------------------------------------------------------------
# One seed of one arm
# --------------------------------------------------------------------------------------------------


def optimizers_of(run: Run) -> list[int]:
    """The optimizer indices that recorded steps, else the ones meta.json names."""
    steps = run.steps
    found = sorted(int(k) for k in steps["optimizer"].unique()) if len(steps) else []
    return found or [o.index for o in run.meta.optimizers]


def one_row_per_step(steps: pd.DataFrame) -> pd.DataFrame:
    """A distributed job's steps as one row per (optimizer, step): the lowest rank's row, whose norms are
    the job's (DDP's ranks step on the same averaged gradients; sharded norms are combined by the store),
    with ``loss`` the mean over the ranks that recorded that step (each rank sees its own batch). A rank's
    NaN loss makes the mean NaN, as one rank's divergence is the job's. One process: ``steps`` unchanged.
    """
    if "rank" not in steps or steps["rank"].nunique() <= 1:
        return steps
    keys = [steps["optimizer"], steps["step"]]
    losses = steps["loss"].astype(float)
    mean = losses.groupby(keys).mean().where(~losses.isna().groupby(keys).any())
    lead = steps[steps["rank"] == steps["rank"].min()].reset_index(drop=True)
    index = pd.MultiIndex.from_frame(lead[["optimizer", "step"]])
    return lead.assign(loss=mean.reindex(index).to_numpy())


def step_frame(run: Run, step_cap: int | None = None, optimizer: int | None = None) -> pd.DataFrame:
    """One optimizer's steps (``step``, ``loss``, ``grad_norm``, ``clip_coef``, ``time_s``...); the first by default.

    ``step_cap`` keeps what a run stopped after N steps of the first optimizer (the one
    ``--max-steps`` counts) would have recorded: its first N steps, and the other optimizers' steps
    made before the N-th one ended.
    """
    steps = one_row_per_step(run.steps)
    first = int(steps["optimizer"].min()) if len(steps) else 0
    chosen = first if optimizer is None else optimizer
    frame = steps[steps["optimizer"] == chosen] if len(steps) else steps
    if step_cap is not None and len(steps):
        if chosen == first:
            frame = frame[frame["step"] < step_cap]
        else:
            lead = steps[(steps["optimizer"] == first) & (steps["step"] < step_cap)]
            frame = frame[frame["time_s"] <= lead["time_s"].max()] if len(lead) else frame.iloc[:0]
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
    return {
        "final_loss": final_loss(loss),
        "best_loss": best_loss(loss),
        "volatility": volatility(loss),
        "loss_spikes": float(spike_mask(loss).sum()),
        "norm_spikes": float(norm_spike_mask(norm).sum()),
        "nonfinite": float(nonfinite_mask(frame).sum()),
        "clipped_fraction": float((frame["clip_coef"].fillna(1.0) < CLIPPED_BELOW).mean()) if len(frame) else math.nan,
        "train_time_s": float(frame["time_s"].iloc[-1]) if len(frame) else math.nan,
    }


def _first_nonfinite(frame: pd.DataFrame) -> int | None:
    bad = frame[nonfinite_mask(frame)]
    return int(bad["step"].iloc[0]) if len(bad) else None


def injection_of(run: Run | None) -> str | None:
    """The run's ``clipping.injection``: None, ``applied`` or ``not injected: <reason>``."""
    return None if run is None else run.meta.clipping.injection


def _seed_status(seed_run: SeedRun, n_steps: int, first_bad: int | None) -> str:
    injection = injection_of(seed_run.run)
    if seed_run.status == "interrupted":
        return "interrupted"
    if seed_run.run is None:
        return "not run" if seed_run.status == "not run" else "crashed"
    if injection is not None and injection.startswith(NOT_INJECTED):
        return injection  # the arm ran unclipped: never a result of its threshold
    if first_bad is not None:
        return "diverged"  # even when the script then raised: the divergence is the news
    if seed_run.status != "complete":
        return "crashed"
    return "ok" if n_steps else "no steps"


def measure_seed(seed_run: SeedRun, optimizer: int | None = None) -> SeedResult:
    """Metrics and status of one seed of one arm on one optimizer (``status``: does it enter the means)."""
    empty = pd.DataFrame({"step": [], "loss": [], "grad_norm": []})
    frame = step_frame(seed_run.run, seed_run.step_cap, optimizer) if seed_run.run is not None else empty
    first_bad = _first_nonfinite(frame) if len(frame) else None
    status = _seed_status(seed_run, len(frame), first_bad)
    metrics = seed_metrics(frame) if len(frame) else dict.fromkeys(METRICS, math.nan)
    return SeedResult(seed_run.seed, seed_run.run.id if seed_run.run is not None else None, status,
                      seed_run.error, len(frame), metrics, first_bad, seed_run.reused,
                      frame[["step", "loss", "grad_norm"]] if len(frame) else empty, seed_run.log)


def compare_arms(seed_runs: list[SeedRun], names: dict[int, str] | None = None) -> Comparison:
    """Measure every seed run on every optimizer, group them into arms (first-seen order) and decide.

    ``names``: the optimizers to measure and how to show them; by default every optimizer any
    run recorded, named from its meta.json.
    """
    names = names or _names(seed_runs)
    arms: list[ArmResult] = []
    for optimizer in names:
        order: dict[str, ArmResult] = {}
        for seed_run in seed_runs:
            arm = order.setdefault(seed_run.clip.key, ArmResult(seed_run.clip, optimizer, []))
            arm.seeds.append(measure_seed(seed_run, optimizer))
        for arm in order.values():
            arm.seeds.sort(key=lambda s: s.seed)
        arms.extend(order.values())
    return Comparison(arms, names, decide(arms, names))


def _names(seed_runs: list[SeedRun]) -> dict[int, str]:
    runs = [s.run for s in seed_runs if s.run is not None]
    indices = sorted({k for run in runs for k in optimizers_of(run)}) or [0]
    metas = {o.index: o for run in reversed(runs) for o in run.meta.optimizers}
    return {k: optimizer_name(metas.get(k), k) for k in indices}
