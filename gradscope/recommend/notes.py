"""The warnings of a recommendation: each a :class:`Note` with a stable slug (listed in docs/recommend.md).

Nothing here computes a statistic: every function reads the parts :mod:`gradscope.recommend.analysis`
already built and says, in one sentence each, which caveats apply to them.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradscope.recommend.model import ClipRate, Closure, Distribution, NonFinite, Note, ValueClipping, Warmup
from gradscope.recommend.schedule import lr_evidence
from gradscope.store import AGREEMENT_TOLERANCE

#: Below this many used steps no percentile is supported: p95 of 2 values is an interpolation
#: between them, and its "clip rate" is a count of one step.
MIN_PERCENTILE_STEPS = 20
#: Below this many used steps, the tail percentiles (p99 above all) rest on a handful of values.
FEW_STEPS = 100
#: Clipping more often than this is flagged: a threshold meant for rare events fires routinely.
FREQUENT_CLIP_RATE = 0.2

#: The advice every frequent-clipping warning ends with.
SYMPTOM = ("Frequent clipping is a symptom, not a cure: a learning rate that is too high, a missing or too "
           "short warm-up, or mixed-precision trouble (gradients clipped before GradScaler.unscale_) all "
           "show up as norms above a threshold meant for rare spikes. Fix the cause, or choose "
           "normalization on purpose (AutoClip's p10).")


def steps_text(n: int) -> str:
    """``"1 step"``, ``"2 steps"``."""
    return f"{n} step" if n == 1 else f"{n} steps"


def count_notes(dist: Distribution, percentile: float, closure: Closure | None) -> list[Note]:
    """How many steps the numbers rest on, and what a closure optimizer's steps are."""
    notes = []
    if closure is not None:
        evaluations = ("its closure evaluations were not recorded" if closure.n_evaluations is None else
                       f"{closure.n_evaluations} closure evaluations (~{closure.per_step:.3g} per step)")
        notes.append(Note("closure-optimizer", (
            f"a closure optimizer: {steps_text(closure.n_steps)} recorded, {evaluations}; each step's norm is "
            f"the gradient of the step's first evaluation, so the percentiles are over steps, not evaluations")))
    if dist.n_used < MIN_PERCENTILE_STEPS:
        notes.append(Note("too-few-steps", (
            f"only {steps_text(dist.n_used)} used: too few to support a p{percentile:g} (at least "
            f"{MIN_PERCENTILE_STEPS} needed); max_norm is an interpolation between the largest norms, not a tail "
            f"estimate, and the clip rates count single steps; record more steps")))
    elif dist.n_used < FEW_STEPS:
        notes.append(Note("few-steps", f"only {steps_text(dist.n_used)} used: the tail percentiles rest on a "
                                       f"handful of values; record a longer run for a firmer number"))
    return notes


def clipping_notes(candidates: Sequence[ClipRate], rate: float, max_norm: float, enough: bool) -> list[Note]:
    """Thresholds that clip too often: the recommendation's own (with enough steps to say) and the script's."""
    notes = []
    if enough and rate >= FREQUENT_CLIP_RATE:
        notes.append(Note("frequent-clipping", f"max_norm={max_norm:.4g} clips {rate:.0%} of steps. " + SYMPTOM))
    for row in candidates:
        if row.source == "script" and row.clip_rate >= FREQUENT_CLIP_RATE:
            notes.append(Note("script-clips-often", f"the script's own max_norm={row.threshold:.4g} clips "
                                                    f"{row.clip_rate:.0%} of steps. " + SYMPTOM))
    if max_norm <= 0:
        notes.append(Note("zero-threshold", "max_norm is 0: most gradients are exactly zero, and clipping "
                                            "at 0 would zero every update; check that the model trains"))
    return notes


def value_notes(values: ValueClipping | None) -> list[Note]:
    """The script clips by value: what that did, and what max_norm means beside it."""
    if values is None or values.script_clip_value is None:
        return []
    rate = values.script_clip_rate or 0.0
    notes = [Note("script-clips-by-value", (
        f"the script clips by value (clip_grad_value_ at {values.script_clip_value:.4g}): it changed "
        f"{values.script_n_clipped} of {steps_text(values.n_steps)} ({rate:.0%}), those whose largest |gradient| "
        f"exceeded it; max_norm is measured before that clipping. clip_value={values.clip_value:.4g} is the "
        f"same percentile of each step's largest |gradient|, for clip_grad_value_"))]
    if rate >= FREQUENT_CLIP_RATE:
        notes.append(Note("script-clips-often", f"the script's own clip_value={values.script_clip_value:.4g} "
                                                f"clips {rate:.0%} of steps. " + SYMPTOM))
    return notes


def first_steps_notes(warmup: Warmup | None) -> list[Note]:
    """The first steps hold most of the clipped steps: a warm-up (skip it) or early steps (say what that means)."""
    if warmup is None or not warmup.dominates or warmup.tail_share is None:
        return []
    if warmup.kind == "warm-up":
        return [Note("warmup-dominates", (
            f"{warmup.tail_share:.0%} of the steps above max_norm fall in the lr warm-up ({lr_evidence(warmup)}); "
            f"without them max_norm would be {warmup.max_norm_without:.4g}: try --skip-steps {warmup.skip_steps}"))]
    return [Note("early-steps-dominate", (
        f"{warmup.tail_share:.0%} of the steps above max_norm fall in the first {warmup.window} steps "
        f"({lr_evidence(warmup)}): max_norm scales down those full-lr early updates and clips "
        f"{warmup.clip_rate_without:.1%} of the steps after them. That is a spike guard at work on a rough start "
        f"(an lr warm-up is the other cure), and the recommendation stands. For a threshold that also acts later, "
        f"--skip-steps {warmup.skip_steps} gives {warmup.max_norm_without:.4g}, which would clip "
        f"{warmup.max_norm_without_clip_rate:.0%} of all steps"))]


def nonfinite_notes(dist: Distribution, nonfinite: NonFinite) -> list[Note]:
    """AMP-skipped steps, and non-finite steps GradScaler let through."""
    notes = []
    if dist.n_skipped:
        notes.append(Note("amp-skipped", f"{steps_text(dist.n_skipped)} skipped by GradScaler (inf/NaN found, "
                                         f"routine under fp16 loss scaling); they are left out"))
    real = nonfinite.count_not_skipped
    if real > 0 and nonfinite.first_step is not None:
        where = f", first non-finite layer {nonfinite.first_layer}" if nonfinite.first_layer else ""
        notes.append(Note("nonfinite-steps", (
            f"{steps_text(real)} had a non-finite gradient norm that GradScaler did not skip (first at step "
            f"{nonfinite.first_step}{where}); clipping cannot repair inf/NaN gradients, it turns them into NaN")))
    return notes


def rank_notes(scope: str, n_ranks: int, rank: int | None, spread: float | None) -> list[Note]:
    """A distributed job's caveats: an optimizer whose norms are one rank's own, and ranks that disagree on
    norms they should all hold (docs/distributed.md)."""
    notes = []
    whose = "this rank's" if rank is None else f"rank {rank}'s"
    if scope == "rank-local":
        notes.append(Note("rank-local", (
            f"the norms are {whose} own gradients, not the global norm: one rank's run read alone, or ranks "
            f"whose gradients gradscope cannot combine (no DDP or FSDP above them, a Partial DTensor placement); "
            f"clip_grad_norm_ on every rank would clip each rank by its own norm")))
    if spread is not None and spread > AGREEMENT_TOLERANCE:
        notes.append(Note("ranks-disagree", (
            f"the {n_ranks} ranks' norms of tensors they should all hold whole differ by up to {spread:.2%}: "
            f"a setup problem (a parameter outside DDP, tensor-parallel ranks fed different batches); "
            f"the numbers are {whose}")))
    return notes
