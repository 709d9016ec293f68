"""The verdict of ``gradscope compare``: a paired test over seeds, per optimizer, stated with its numbers.

    verdict = decide(arms, names)   # arms: metrics.ArmResult, one per (arm, optimizer)

Seeds are paired: seed k of a clipped arm and seed k of the baseline start from the same
initialisation and draw the same batches, so their difference cancels what the seed does. For each
optimizer and each arm the primary metric is the final loss (:func:`gradscope.compare.metrics.final_loss`),
and the test is a **paired t interval**: the mean of the per-seed differences (arm - baseline) and
its two-sided 95% interval ``mean ± t(0.975, n-1) · sd / sqrt(n)``. An effect is claimed only when
the interval excludes 0 *and* at least :data:`MIN_PAIRS` pairs finished with a finite final loss;
with fewer the words are "indicative only". Loss volatility, spikes and non-finite steps are
reported beside the loss, never in its place. Pure arithmetic: no torch, no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradscope.compare.metrics import ArmResult

MIN_PAIRS = 3  # fewer paired seeds than this: an interval is shown but no effect is claimed
CONFIDENCE = 0.95
TEST = "paired t interval (95%) of the final-loss difference over seeds"
#: t(0.975, df) for df = 1..30 (two-sided 95%); larger df use the Cornish-Fisher expansion below.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)
Z975 = 1.959964


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975  # Cornish-Fisher to 1/df^2: within 1e-4 of the exact value for df > 30
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df * df)


@dataclass(frozen=True)
class PairedDiff:
    """Mean paired difference (arm - baseline) and its 95% t interval (None with one pair)."""

    n: int
    mean: float
    low: float | None
    high: float | None

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly above or below 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    @property
    def claimed(self) -> bool:
        """An effect is claimed: enough pairs, and the interval excludes 0."""
        return self.n >= MIN_PAIRS and self.excludes_zero


def paired_difference(arm: Sequence[float], base: Sequence[float]) -> PairedDiff:
    """The paired t interval of ``arm[k] - base[k]`` (both finite; the caller pairs them by seed)."""
    diffs = [a - b for a, b in zip(arm, base, strict=True)]
    n = len(diffs)
    if n == 0:
        return PairedDiff(0, math.nan, None, None)
    mean = sum(diffs) / n
    if n == 1:
        return PairedDiff(1, mean, None, None)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return PairedDiff(n, mean, mean - half, mean + half)


@dataclass(frozen=True)
class Effect:
    """One arm against the baseline, on one optimizer's final loss."""

    optimizer: int
    arm: str
    title: str
    claim: str  # "lower" | "higher" | "no effect" | "indicative only" | "could not compare"
    diff: PairedDiff | None
    relative: float | None  # mean difference / mean baseline final loss over the pairs
    text: str


@dataclass(frozen=True)
class Verdict:
    """The effects, the best arm (only when an effect supports it) and the text a person reads."""

    best: str | None
    effects: tuple[Effect, ...]
    summary: str

    @property
    def text(self) -> str:
        """Every effect's line, then the summary."""
        return "\n".join([*(e.text for e in self.effects), self.summary])


def _fmt(value: float) -> str:
    return f"{value:+.3g}" if math.isfinite(value) else str(value)


def _pairs(arm: ArmResult, base: ArmResult) -> tuple[list[float], list[float]]:
    """Final losses of the seeds both arms finished with a finite value, paired by seed."""
    mine, theirs = arm.by_seed("final_loss"), base.by_seed("final_loss")
    seeds = [s for s in mine if s in theirs and math.isfinite(mine[s]) and math.isfinite(theirs[s])]
    return [mine[s] for s in seeds], [theirs[s] for s in seeds]


def _failures(arm: ArmResult) -> list[str]:
    """'seed K <status>: error (log: PATH)' for every seed that did not finish."""
    out = []
    for seed in arm.seeds:
        if not seed.counts:
            error = f": {seed.error}" if seed.error and not seed.status.startswith("not injected") else ""
            log = f" (log: {seed.log})" if seed.log else ""
            out.append(f"seed {seed.seed} {seed.status}{error}{log}")
    return out


def _diverged(arm: ArmResult) -> list[int]:
    return [s.seed for s in arm.seeds if s.counts and not math.isfinite(s.metrics.get("final_loss", math.nan))]


def _stability(arm: ArmResult, base: ArmResult) -> str:
    """Volatility, spikes and non-finite steps of both arms: reported beside the loss, not judged."""
    def pair(metric: str, digits: int) -> str:
        return f"{arm.mean(metric):.{digits}g} vs {base.mean(metric):.{digits}g}"
    parts = [f"volatility {pair('volatility', 3)}", f"loss spikes {pair('loss_spikes', 2)}",
             f"non-finite steps {pair('nonfinite', 2)}"]
    for who, seeds in ((arm.title, _diverged(arm)), ("no clipping", _diverged(base))):
        if seeds:
            parts.append(f"{who} diverged in seed {', '.join(map(str, seeds))}")
    return "beside it: " + ", ".join(parts)


def effect(arm: ArmResult, base: ArmResult, name: str) -> Effect:
    """Judge ``arm`` against ``base`` on one optimizer (``name``: how the optimizer is shown)."""
    where = f"{name}: {arm.title} vs no clipping"
    failed = _failures(arm) + [f"the baseline's {f}" for f in _failures(base)]
    a, b = _pairs(arm, base)
    if not a:
        why = "; ".join(failed) or "no seed finished with a finite final loss in both arms"
        beside = f"; {_stability(arm, base)}" if arm.n_counted and base.n_counted else ""
        return Effect(arm.optimizer, arm.arm, arm.title, "could not compare", None, None,
                      f"{where}: could not compare: {why}{beside}")
    diff = paired_difference(a, b)
    base_mean = sum(b) / len(b)
    relative = diff.mean / abs(base_mean) if base_mean else None
    numbers = (f"final loss {sum(a) / len(a):.4g} vs {base_mean:.4g}, difference {_fmt(diff.mean)}"
               + (f" ({relative:+.1%})" if relative is not None else ""))
    if diff.low is not None and diff.high is not None:
        numbers += f", 95% CI [{_fmt(diff.low)}, {_fmt(diff.high)}]"
    numbers += f" over {diff.n} paired seed{'s' if diff.n != 1 else ''}"
    if diff.claimed:
        claim = "lower" if diff.mean < 0 else "higher"
        words = f"clipping makes the final loss {claim}: the interval excludes 0"
    elif diff.n >= MIN_PAIRS:
        claim, words = "no effect", "no effect beyond seed noise: the interval includes 0"
    else:
        claim = "indicative only"
        words = f"indicative only: fewer than {MIN_PAIRS} paired seeds (use --seeds {MIN_PAIRS} or more)"
    tail = f"; not counted: {'; '.join(failed)}" if failed else ""
    return Effect(arm.optimizer, arm.arm, arm.title, claim, diff, relative,
                  f"{where}: {numbers}: {words}; {_stability(arm, base)}{tail}")


def _best(effects: list[Effect]) -> str | None:
    """The arm with a claimed lower final loss on the most optimizers and a claimed higher one on none;
    ties go to the larger mean relative improvement."""
    by_arm: dict[str, list[Effect]] = {}
    for e in effects:
        by_arm.setdefault(e.arm, []).append(e)
    scored = []
    for arm, mine in by_arm.items():
        if any(e.claim in ("higher", "could not compare") for e in mine):
            continue
        wins = [e for e in mine if e.claim == "lower"]
        if wins:
            gain = sum(-(e.relative or 0.0) for e in wins) / len(wins)
            scored.append((len(wins), gain, arm))
    return max(scored)[2] if scored else None


def _summary(effects: list[Effect], best: str | None, titles: dict[str, str]) -> str:
    claims = {e.claim for e in effects}
    if best is not None:
        return f"best: {titles[best]} (a lower final loss than no clipping, by the {TEST})"
    if not effects:
        return "could not compare: no clipped arm to compare with the baseline"
    if claims == {"could not compare"}:
        return "could not compare: no clipped arm has a finished seed to pair with the baseline's (above)"
    if "indicative only" in claims or "could not compare" in claims:
        return ("no conclusion: some comparisons are indicative only or could not be made (above); "
                f"no arm showed a lower final loss backed by {MIN_PAIRS}+ paired seeds")
    if "higher" in claims:
        return "no threshold lowered the final loss; at least one raised it beyond seed noise (above)"
    return f"no threshold changed the final loss beyond seed noise ({TEST})"


def decide(arms: list[ArmResult], names: dict[int, str]) -> Verdict:
    """Pair every clipped arm with the baseline of the same optimizer and judge each pair."""
    effects = []
    for optimizer, name in names.items():
        mine = [a for a in arms if a.optimizer == optimizer]
        base = next((a for a in mine if a.is_baseline), None)
        if base is None:
            continue
        effects.extend(effect(a, base, name) for a in mine if not a.is_baseline)
    best = _best(effects)
    titles = {a.arm: a.title for a in arms}
    return Verdict(best, tuple(effects), _summary(effects, best, titles))

