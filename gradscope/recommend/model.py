"""The result of ``gradscope recommend``: one :class:`Recommendation` per optimizer, and its parts.

Plain frozen dataclasses, no behaviour: :func:`gradscope.recommend.recommend` fills them,
``view.py`` renders them, ``plots.py`` draws them, and ``dataclasses.asdict`` turns them into the
JSON document (its keys are the field names, documented in docs/recommend.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Distribution:
    """The pre-clip global norm over the used steps of one optimizer."""

    n_recorded: int  # rows of this optimizer in steps.parquet
    n_used: int  # finite, not AMP-skipped, at or after skip_steps
    n_nonfinite: int  # grad_norm is inf or NaN (AMP-skipped ones included)
    n_skipped: int  # GradScaler skipped the update (inf/NaN found)
    n_before_skip: int  # rows left out by skip_steps
    min: float
    median: float
    p90: float
    p95: float
    p99: float
    max: float
    mean: float


@dataclass(frozen=True)
class ClipRate:
    """What one candidate threshold would have done to the used steps."""

    label: str  # "p95", "script", "common default (transformers)", ...
    source: str  # "percentile" | "script" | "injected" | "default"
    threshold: float
    recommended: bool
    n_clipped: int  # used steps with norm > threshold
    clip_rate: float  # n_clipped / n_used
    mean_scale: float | None  # mean of threshold / norm over the clipped steps; None when none clipped


@dataclass(frozen=True)
class LayerShare:
    """One layer's part of a step's squared global norm."""

    layer: str
    norm: float
    share: float  # norm**2 / sum of every layer's norm**2 at that step


@dataclass(frozen=True)
class Spike:
    """A step whose norm jumped far above the rolling median before it."""

    step: int
    norm: float
    rolling_median: float
    ratio: float
    layers: tuple[LayerShare, ...]  # the largest shares of the squared norm; empty without layer data


@dataclass(frozen=True)
class Spikes:
    """Spike detection: every spike counted, the largest shown."""

    factor: float
    window: int
    count: int
    shown: tuple[Spike, ...]  # at most SPIKES_SHOWN, largest ratio first


@dataclass(frozen=True)
class NonFinite:
    """Where the global norm first went inf or NaN, and the layers that did."""

    count: int
    count_not_skipped: int  # of those, steps GradScaler did not skip: the optimizer consumed inf/NaN
    first_step: int | None
    first_step_amp_skipped: bool  # GradScaler skipped that step: routine under fp16 loss scaling
    first_layer: str | None  # first non-finite layer at that step, in the model's parameter order
    layers: tuple[str, ...]  # non-finite layers at that step (at most NONFINITE_LAYERS_SHOWN)
    n_layers: int  # how many layers were non-finite at that step


@dataclass(frozen=True)
class Warmup:
    """Whether the first steps dominate the tail, and the threshold without them.

    The window is a *warm-up* only when the recorded lr rises over it (``basis == "lr-ramp"``);
    otherwise it is just the run's *early steps* at the lr the run started with.
    """

    window: int  # used steps in the window
    basis: str  # "lr-ramp" (the lr rose to its peak) or "first-10%"
    skip_steps: int  # the --skip-steps value that leaves the window out
    tail_share: float | None  # share of the clipped steps inside the window; None when nothing clipped
    dominates: bool
    max_norm_without: float | None  # the recommendation over the steps after the window
    clip_rate_without: float | None  # the full recommendation's clip rate over the steps after the window
    kind: str = "early-steps"  # "warm-up" (the lr ramps up over the window) or "early-steps"
    lr_first: float | None = None  # the lr of the first used step; None when not recorded
    lr_after: float | None = None  # the lr of the first step after the window (a ramp's peak); None when not recorded
    max_norm_without_clip_rate: float | None = None  # max_norm_without's clip rate over every used step


@dataclass(frozen=True)
class LayerStats:
    """One layer's pre-clip norm over the used steps (finite values only)."""

    layer: str
    n: int
    median: float
    p95: float
    threshold: float  # at the requested percentile: a per-layer max_norm
    max: float
    sq_share: float  # this layer's share of the summed squared norms over all used steps


@dataclass(frozen=True)
class ValueClipping:
    """``clip_grad_value_``: the largest |gradient| element of each step, and thresholds on it.

    Built from the layers table's ``max_abs`` column (each tensor's largest |g| before clipping),
    recorded on the steps where the script clips by value or value clipping is injected. A threshold
    ``v`` clips a step when the step's largest |g| is greater than ``v``.
    """

    n_steps: int  # used steps with a recorded max |g|
    median: float
    p95: float
    p99: float
    max: float
    clip_value: float  # the recommendation: the requested percentile of the per-step max |g|
    clip_rate: float  # of clip_value over those steps
    script_clip_value: float | None  # the value the script clipped with (meta.json)
    script_n_clipped: int | None  # steps whose max |g| exceeded the script's value: the steps it changed
    script_clip_rate: float | None
    injected_clip_value: float | None  # a value gradscope injected (a compare arm)
    injected_n_clipped: int | None


@dataclass(frozen=True)
class Closure:
    """An optimizer whose ``step(closure)`` evaluates the loss several times per step (LBFGS)."""

    n_steps: int  # optimizer steps recorded (rows of the steps table)
    n_evaluations: int | None  # closure calls over the run; None when the run did not record them
    per_step: float | None  # n_evaluations / n_steps


@dataclass(frozen=True)
class Note:
    """A warning with a stable slug (documented in docs/recommend.md) and one sentence."""

    slug: str
    message: str


@dataclass(frozen=True)
class Recommendation:
    """A clipping threshold for one optimizer of one run, with the evidence for it."""

    run_id: str
    run_path: str
    run_status: str  # complete | failed | interrupted | running | killed
    complete: bool
    status_note: str | None  # e.g. "incomplete run (killed at step N): ..."
    optimizer: int
    optimizer_label: str
    norm_type: float
    percentile: float
    skip_steps: int
    max_norm: float
    clip_rate: float  # of max_norm over the used steps
    intent: str  # "spike-guard" | "normalization" | "intermediate" | "too-few-steps"
    intent_text: str
    distribution: Distribution
    clip_rates: tuple[ClipRate, ...]  # ascending threshold
    spikes: Spikes
    nonfinite: NonFinite
    warmup: Warmup | None  # None when too few steps to tell
    layers: tuple[LayerStats, ...]  # every layer, largest threshold first
    notes: tuple[Note, ...] = field(default=())
    clip_value: float | None = None  # a clip_grad_value_ threshold, when the run recorded max |g|
    value_clipping: ValueClipping | None = None  # the evidence for clip_value
    closure: Closure | None = None  # set for closure optimizers (LBFGS)
    # A distributed job: "global" (every rank held the whole gradients, or a single process), "sharded" (the
    # full model's norms, combined from the ranks' pieces) or "rank-local" (one rank's own gradients only)
    norm_scope: str = "global"
    n_ranks: int = 1  # ranks whose rows were read
