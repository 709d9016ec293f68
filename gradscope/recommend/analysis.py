"""Turn a recorded run into a ``clip_grad_norm_`` threshold, with the evidence behind it.

Pure analysis: :func:`analyse` reads a :class:`gradscope.store.Run` and returns one
:class:`Recommendation` per optimizer. Nothing here prints, plots, or imports torch, rich or typer;
``report.py`` renders the result and ``plots.py`` draws it, and ``gradscope compare --max-norm auto``
calls :func:`analyse` directly.

Definitions (the README and the JSON output say the same):

* every percentile is numpy's default (``numpy.percentile``, linear interpolation between the two
  nearest ranks), over the *used* steps: finite pre-clip global norms of steps the GradScaler did
  not skip, from step ``skip_steps`` on;
* a threshold ``t`` *clips* a step when its norm is greater than ``t`` (``clip_grad_norm_`` then
  multiplies the gradients by ``t / norm``);
* a *spike* is a used step whose norm exceeds :data:`SPIKE_FACTOR` times the median of the
  :data:`SPIKE_WINDOW` used steps before it.

Runs can hold 10^8 per-layer rows, so the layers table is streamed once, in record batches, keeping
only the float32 norms of the steps that count (``_scan_layers``); the steps table is small and read
whole, but only the columns used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradscope.errors import NoDataError, RunFormatError, UsageError
from gradscope.store import Run

#: The percentile ``max_norm`` is taken at unless the caller asks for another.
DEFAULT_PERCENTILE = 95.0
#: Percentiles shown in the distribution and offered as candidate thresholds.
SHOWN_PERCENTILES = (50.0, 90.0, 95.0, 99.0)
#: Fixed thresholds people pick without measuring: transformers' 1.0, RNN folklore's 5.0.
COMMON_DEFAULTS = ((1.0, "common default (transformers)"), (5.0, "common default (RNNs)"))
#: A spike is a norm this many times the rolling median before it (Megatron uses 10x, Lightning 2x).
SPIKE_FACTOR = 5.0
#: Steps in the rolling median a spike is measured against, and how many it needs before judging.
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 10
#: Spikes reported in detail (the largest ratios); all are counted.
SPIKES_SHOWN = 10
#: Layers named per spike: those carrying the largest share of the squared norm at that step.
SPIKE_LAYERS_SHOWN = 3
#: Without an lr ramp in the data, the warm-up window is the first 10% of steps, at most this many.
WARMUP_MAX_STEPS = 1000
#: The warm-up dominates the tail when at least this share of the clipped steps falls inside it.
WARMUP_DOMINATES = 0.5
#: Percentile at or above which the threshold is a spike guard, at or below which it normalizes.
SPIKE_GUARD_MIN_P = 80.0
NORMALIZATION_MAX_P = 25.0
#: Clipping more often than this is flagged: a threshold meant for rare events fires routinely.
FREQUENT_CLIP_RATE = 0.2
#: Below this many used steps, percentiles (and p99 above all) rest on a handful of values.
FEW_STEPS = 100
#: Rows per record batch of the layers stream: ~12 MB of columns at a time.
LAYER_BATCH_ROWS = 1 << 20
#: Non-finite layers named for the first non-finite step.
NONFINITE_LAYERS_SHOWN = 10

PERCENTILE_METHOD = "numpy.percentile default: linear interpolation between the two nearest ranks"

# grad_norm itself says whether a step is non-finite: the nonfinite column is not read.
_STEP_COLUMNS = ["step", "optimizer", "grad_norm", "skipped", "max_norm", "clip_source", "lr"]


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------


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
    """Whether the first steps dominate the tail, and the threshold without them."""

    window: int  # used steps in the warm-up window
    basis: str  # "lr-ramp" (the lr rose to its peak) or "first-10%"
    skip_steps: int  # the --skip-steps value that leaves the window out
    tail_share: float | None  # share of the clipped steps inside the window; None when nothing clipped
    dominates: bool
    max_norm_without: float | None  # the recommendation over the steps after the window
    clip_rate_without: float | None  # the full recommendation's clip rate over the steps after the window


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
    intent: str  # "spike-guard" | "normalization" | "intermediate"
    intent_text: str
    distribution: Distribution
    clip_rates: tuple[ClipRate, ...]  # ascending threshold
    spikes: Spikes
    nonfinite: NonFinite
    warmup: Warmup | None  # None when too few steps to tell
    layers: tuple[LayerStats, ...]  # every layer, largest threshold first
    notes: tuple[Note, ...] = field(default=())


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def analyse(run: Run, percentile: float = DEFAULT_PERCENTILE, skip_steps: int = 0,
            optimizer: int | None = None, with_layers: bool = True) -> list[Recommendation]:
    """Recommend ``max_norm`` for each optimizer of ``run`` (or only ``optimizer``).

    Args:
        run: a run opened with :func:`gradscope.store.load_run`; an incomplete one is analysed too.
        percentile: ``max_norm`` is this percentile of the used steps' pre-clip global norm, in (0, 100].
        skip_steps: leave each optimizer's first ``skip_steps`` steps out (warm-up).
        optimizer: the optimizer index to analyse; ``None`` for all of them.
        with_layers: read the layers table (per-layer stats, the layers behind spikes and the first
            non-finite layer). ``False`` reads only the steps table: the threshold and its evidence
            in seconds even for 10^8 layer rows (what ``compare --max-norm auto`` needs).

    Returns:
        One :class:`Recommendation` per optimizer with data, in optimizer order.

    Raises:
        UsageError: bad ``percentile``/``skip_steps``, an unknown ``optimizer``, or ``skip_steps``
            leaving nothing.
        NoDataError: the run recorded no step, or no used step has a finite norm.
    """
    _check_arguments(percentile, skip_steps)
    with _small_pages():
        steps = _read_steps(run)
        if len(steps["step"]) == 0:
            raise NoDataError(f"run {run.id} recorded no optimizer step: nothing to recommend from")
        views, empty = _select_optimizers(run, steps, optimizer, skip_steps)
        plans = {k: view.layer_plan(percentile) for k, view in views.items()}
        single = len(np.unique(steps["optimizer"])) == 1
        layer_data = _scan_layers(run, plans, single) if with_layers else {k: _LayerData() for k in plans}
        notes = _run_notes(run, empty)
        return [
            _recommend_one(run, view, percentile, skip_steps, layer_data[k], notes)
            for k, view in sorted(views.items())
        ]


@contextmanager
def _small_pages() -> Iterator[None]:
    """Turn off numpy's transparent-huge-page advice for large arrays while analysing, then restore it.

    With the kernel's THP defrag set to "madvise" (a common default), every fresh multi-megabyte
    numpy array asks for huge pages and the kernel compacts memory synchronously to find them: on a
    busy machine that cost ~1.2 s of system time for the 400 MB per-layer matrix alone, against 0.2 s
    with normal pages (measured; numpy documents NUMPY_MADVISE_HUGEPAGE=0 for the same reason).
    """
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if setter is None:  # a numpy without the switch: nothing to turn off
        yield
        return
    previous = setter(False)
    try:
        yield
    finally:
        setter(previous)


def _check_arguments(percentile: float, skip_steps: int) -> None:
    if not (0.0 < percentile <= 100.0) or np.isnan(percentile):
        raise UsageError(f"--percentile must be in (0, 100], got {percentile:g}")
    if skip_steps < 0:
        raise UsageError(f"--skip-steps must be 0 or more, got {skip_steps}")


# --------------------------------------------------------------------------------------------------
# Steps: the global norm per optimizer
# --------------------------------------------------------------------------------------------------


def _read_steps(run: Run) -> dict[str, np.ndarray]:
    """The steps columns the analysis uses, as numpy arrays sorted by (optimizer, step)."""
    try:
        table = run.read_table("steps", _STEP_COLUMNS)
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunFormatError(f"{run.path}: steps table unreadable: {exc}") from None
    out = {name: _floats(table.column(name)) for name in ("grad_norm", "max_norm", "lr")}
    out["step"] = table.column("step").to_numpy().astype(np.int64)
    out["optimizer"] = table.column("optimizer").to_numpy().astype(np.int64)
    out["skipped"] = _flags(table.column("skipped"))
    out["clip_source"] = _clip_source_codes(table.column("clip_source"))
    key = out["optimizer"] * (int(out["step"].max(initial=0)) + 1) + out["step"]
    if len(key) and (np.diff(key) < 0).any():  # written in order; sort only if something is not
        order = np.argsort(key, kind="stable")
        out = {name: values[order] for name, values in out.items()}
    return out


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy()


def _flags(column: pa.ChunkedArray) -> np.ndarray:
    # A null flag means "not recorded": count it as False.
    return pc.fill_null(column, False).to_numpy(zero_copy_only=False).astype(bool)


#: clip_source values, coded by their index (a million Python strings would cost ~60 MB and a second).
CLIP_SOURCES = ("none", "script", "script-disabled", "injected")


def _clip_source_codes(column: pa.ChunkedArray) -> np.ndarray:
    out = np.zeros(len(column), dtype=np.int8)
    for code, name in enumerate(CLIP_SOURCES[1:], start=1):
        out[_flags(pc.equal(column, name))] = code
    return out


@dataclass
class _OptimizerView:
    """One optimizer's rows of the steps table, and the used subset (in step order)."""

    index: int
    label: str
    cols: dict[str, np.ndarray]  # this optimizer's rows only
    used: np.ndarray  # bool mask over cols rows
    first_step: int

    @cached_property
    def norms(self) -> np.ndarray:
        """Pre-clip global norms of the used steps, in step order."""
        return self.cols["grad_norm"][self.used]

    @cached_property
    def sorted_norms(self) -> np.ndarray:
        """The used norms sorted: every percentile of them is then a lookup (percentile_of_sorted)."""
        return np.sort(self.norms)

    @cached_property
    def used_steps(self) -> np.ndarray:
        return self.cols["step"][self.used]

    @cached_property
    def spike_ratios(self) -> tuple[np.ndarray, np.ndarray]:
        """Each used norm over the rolling median before it (NaN without history), and those medians."""
        medians = rolling_median_before(self.norms)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(medians > 0, self.norms / medians, np.nan)
        return ratios, medians

    def layer_plan(self, percentile: float) -> _LayerPlan:
        """Which steps the layers pass keeps for this optimizer: used ones, and those to explain."""
        size = int(self.cols["step"].max()) + 2  # the last slot stays False: out-of-range steps land there
        use = np.zeros(size, dtype=bool)
        use[self.used_steps] = True
        interest = list(self.used_steps[_top_spikes(self)])
        first_bad = _first_nonfinite_step(self.cols)
        if first_bad is not None:
            interest.append(first_bad)
        return _LayerPlan(use=use, interest_steps=np.unique(np.asarray(interest, dtype=np.int64)),
                          n_used=len(self.norms), percentile=percentile)


def _select_optimizers(run: Run, steps: dict[str, np.ndarray], optimizer: int | None,
                       skip_steps: int) -> tuple[dict[int, _OptimizerView], list[str]]:
    """A view per analysed optimizer; the labels of those that have no usable step."""
    present = sorted(int(k) for k in np.unique(steps["optimizer"]))
    if optimizer is not None and optimizer not in present:
        raise UsageError(f"run {run.id} has no optimizer {optimizer}; it has {', '.join(map(str, present))}")
    views, empty = {}, []
    for k in [optimizer] if optimizer is not None else present:
        view = _view(run, steps, k, skip_steps)
        if view.used.any():
            views[k] = view
        else:
            empty.append(_why_empty(view, skip_steps))
    if not views:
        if optimizer is None and len(present) > 1:
            raise NoDataError(f"run {run.id}: no optimizer has a usable step ({'; '.join(empty)})")
        cls = UsageError if empty[0].endswith("--skip-steps") else NoDataError
        raise cls(f"run {run.id}: {empty[0]}")
    return views, empty


def _view(run: Run, steps: dict[str, np.ndarray], k: int, skip_steps: int) -> _OptimizerView:
    rows = steps["optimizer"] == k
    cols = {name: values[rows] for name, values in steps.items()}
    first = int(cols["step"].min())
    finite = np.isfinite(cols["grad_norm"])
    used = finite & ~cols["skipped"] & (cols["step"] >= first + skip_steps)
    return _OptimizerView(index=k, label=run.optimizer_label(k), cols=cols, used=used, first_step=first)


def _why_empty(view: _OptimizerView, skip_steps: int) -> str:
    cols = view.cols
    finite = np.isfinite(cols["grad_norm"]) & ~cols["skipped"]
    if finite.any():  # the steps were there: skip_steps took them all
        return (f"optimizer {view.label} has {int(finite.sum())} usable steps, none at or after "
                f"step {view.first_step + skip_steps}: lower --skip-steps")
    return (f"every one of the {len(cols['step'])} recorded norms of optimizer {view.label} is non-finite "
            f"or AMP-skipped: nothing to set a threshold from")


def _distribution(view: _OptimizerView, skip_steps: int) -> Distribution:
    norms, cols = view.sorted_norms, view.cols
    p50, p90, p95, p99 = percentile_of_sorted(norms, SHOWN_PERCENTILES)
    return Distribution(
        n_recorded=len(cols["step"]),
        n_used=len(norms),
        n_nonfinite=int((~np.isfinite(cols["grad_norm"])).sum()),
        n_skipped=int(cols["skipped"].sum()),
        n_before_skip=int((cols["step"] < view.first_step + skip_steps).sum()),
        min=float(norms[0]), median=float(p50), p90=float(p90), p95=float(p95), p99=float(p99),
        max=float(norms[-1]), mean=float(norms.mean()),
    )


# --------------------------------------------------------------------------------------------------
# Candidate thresholds and their clip rates
# --------------------------------------------------------------------------------------------------


def clip_rate(norms: np.ndarray, threshold: float) -> tuple[int, float, float | None]:
    """How often ``threshold`` clips ``norms``: (steps clipped, fraction clipped, mean scale-down).

    The mean scale-down is the mean of ``threshold / norm`` over the clipped steps (what
    ``clip_grad_norm_`` multiplies their gradients by), ``None`` when no step is clipped.
    """
    clipped = norms[norms > threshold]
    n = len(clipped)
    scale = float(np.mean(threshold / clipped)) if n else None
    return n, n / len(norms) if len(norms) else 0.0, scale


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


def _candidates(view: _OptimizerView, percentile: float, max_norm: float) -> tuple[ClipRate, ...]:
    """The recommended threshold, the shown percentiles, the script's own and the common defaults."""
    norms = view.sorted_norms
    offered: list[tuple[str, str, float, bool]] = [("p" + _fmt_p(percentile), "percentile", max_norm, True)]
    for p, value in zip(SHOWN_PERCENTILES, percentile_of_sorted(norms, SHOWN_PERCENTILES), strict=True):
        if p != percentile:
            offered.append(("p" + _fmt_p(p), "percentile", float(value), False))
    for source, value in _recorded_thresholds(view).items():
        offered.append((source, "script" if source.startswith("script") else "injected", value, False))
    offered += [(label, "default", value, False) for value, label in COMMON_DEFAULTS]
    rows = []
    for label, source, threshold, recommended in offered:
        n, rate, scale = clip_rate(norms, threshold)
        rows.append(ClipRate(label, source, float(threshold), recommended, n, rate, scale))
    return tuple(sorted(rows, key=lambda r: (r.threshold, not r.recommended)))


def _recorded_thresholds(view: _OptimizerView) -> dict[str, float]:
    """The max_norm the script itself clipped with (last one used), and an injected one, if any."""
    cols, found = view.cols, {}
    labels = {"script": "script", "script-disabled": "script (disabled)", "injected": "injected"}
    for source, label in labels.items():
        rows = (cols["clip_source"] == CLIP_SOURCES.index(source)) & np.isfinite(cols["max_norm"])
        if rows.any():
            found[label] = float(cols["max_norm"][rows][-1])
    return found


def _fmt_p(p: float) -> str:
    return f"{p:g}"


def _intent(percentile: float, rate: float) -> tuple[str, str]:
    """Name what a threshold at ``percentile`` does: guard against spikes, or normalize every step."""
    p, share = _fmt_p(percentile), f"{rate:.1%}"
    if percentile >= SPIKE_GUARD_MIN_P:
        return "spike-guard", (f"spike guard: p{p} leaves typical steps alone and scales down only the largest "
                               f"~{100 - percentile:g}% ({share} of steps here)")
    if percentile <= NORMALIZATION_MAX_P:
        return "normalization", (f"normalization: p{p} scales down most steps ({share} here), as AutoClip's p10 "
                                 f"does; clipping then rescales nearly every update rather than catching spikes")
    return "intermediate", (f"in between: p{p} clips {share} of steps, more than a spike guard (p95-p99) and "
                            f"fewer than AutoClip-style normalization (p10)")


# --------------------------------------------------------------------------------------------------
# Spikes, non-finite steps, warm-up
# --------------------------------------------------------------------------------------------------


def rolling_median_before(norms: np.ndarray, window: int = SPIKE_WINDOW,
                          min_history: int = SPIKE_MIN_HISTORY) -> np.ndarray:
    """The median of the ``window`` values before each one (NaN until ``min_history`` exist)."""
    import pandas as pd  # only here: pandas' rolling median is O(n log w) in C

    series = pd.Series(norms, dtype="float64")
    return series.rolling(window, min_periods=min_history).median().shift(1).to_numpy()


def _top_spikes(view: _OptimizerView) -> np.ndarray:
    """Indices (into the used steps) of the SPIKES_SHOWN largest ratios above SPIKE_FACTOR."""
    ratios, _ = view.spike_ratios
    hits = np.flatnonzero(ratios > SPIKE_FACTOR)
    return hits[np.argsort(-ratios[hits], kind="stable")[:SPIKES_SHOWN]]


def _spikes(view: _OptimizerView, at_step: dict[int, list[tuple[str, float]]]) -> Spikes:
    ratios, medians = view.spike_ratios
    steps, norms = view.used_steps, view.norms
    shown = tuple(
        Spike(step=int(steps[i]), norm=float(norms[i]), rolling_median=float(medians[i]),
              ratio=float(ratios[i]), layers=_top_shares(at_step.get(int(steps[i]), [])))
        for i in _top_spikes(view)
    )
    count = int(np.count_nonzero(ratios > SPIKE_FACTOR))
    return Spikes(factor=SPIKE_FACTOR, window=SPIKE_WINDOW, count=count, shown=shown)


def _top_shares(layer_norms: list[tuple[str, float]]) -> tuple[LayerShare, ...]:
    """The layers with the largest share of the squared norm at one step."""
    finite = [(name, norm) for name, norm in layer_norms if np.isfinite(norm)]
    total = sum(norm * norm for _, norm in finite)
    if total <= 0:
        return ()
    ranked = sorted(finite, key=lambda item: -item[1])[:SPIKE_LAYERS_SHOWN]
    return tuple(LayerShare(name, norm, norm * norm / total) for name, norm in ranked)


def _first_nonfinite_step(cols: dict[str, np.ndarray]) -> int | None:
    bad = np.flatnonzero(~np.isfinite(cols["grad_norm"]))
    return int(cols["step"][bad[0]]) if len(bad) else None


def _nonfinite(view: _OptimizerView, layers: _LayerData) -> NonFinite:
    cols = view.cols
    first = _first_nonfinite_step(cols)
    bad_rows = ~np.isfinite(cols["grad_norm"])
    count, not_skipped = int(bad_rows.sum()), int((bad_rows & ~cols["skipped"]).sum())
    if first is None:
        return NonFinite(count, not_skipped, None, False, None, (), 0)
    at_first = layers.at_step.get(first, [])
    # A NaN layer norm means either NaN gradients or no gradient at all (store.py). A layer that had a
    # finite norm on some used step normally has a gradient, so its NaN here is a real NaN.
    with_grad = {s.layer for s in layers.stats}
    bad = [name for name, norm in at_first if np.isinf(norm) or (np.isnan(norm) and name in with_grad)]
    if not bad:  # every NaN layer never had a finite norm: name them rather than nothing
        bad = [name for name, norm in at_first if not np.isfinite(norm)]
    skipped = bool(cols["skipped"][cols["step"] == first].any())
    # Table order at a step is the optimizer's parameter order: the first listed is nearest the input.
    shown = tuple(bad[:NONFINITE_LAYERS_SHOWN])
    return NonFinite(count, not_skipped, first, skipped, bad[0] if bad else None, shown, len(bad))


def _warmup(view: _OptimizerView, percentile: float, max_norm: float, skip_steps: int) -> Warmup | None:
    """Share of the clipped steps that fall in the warm-up window, and the threshold without it."""
    norms = view.norms
    if len(norms) < 20:
        return None
    window, basis = _warmup_window(view.cols["lr"][view.used], len(norms))
    clipped = norms > max_norm
    n_clipped = int(clipped.sum())
    share = float(clipped[:window].sum() / n_clipped) if n_clipped else None
    rest = norms[window:]
    without = float(np.percentile(rest, percentile))
    _, rate_without, _ = clip_rate(rest, max_norm)
    skip = int(view.used_steps[window] - view.first_step)
    dominates = share is not None and share >= WARMUP_DOMINATES
    return Warmup(window, basis, max(skip, skip_steps), share, dominates, without, rate_without)


def _warmup_window(lr: np.ndarray, n: int) -> tuple[int, str]:
    """The lr warm-up length when the lr visibly ramps up to its peak early, else the first 10%."""
    finite = np.isfinite(lr)
    if finite.all() and n:
        peak = int(np.argmax(lr))  # first step at the peak learning rate
        if lr[0] < 0.99 * lr[peak] and 0 < peak <= n // 2:
            return peak, "lr-ramp"
    return max(1, min(n // 10, WARMUP_MAX_STEPS)), "first-10%"


# --------------------------------------------------------------------------------------------------
# Layers: one streaming pass over a table that can hold 10^8 rows
# --------------------------------------------------------------------------------------------------


@dataclass
class _LayerPlan:
    """What the layers pass keeps for one optimizer."""

    use: np.ndarray  # indexed by step: the step counts toward per-layer distributions
    interest_steps: np.ndarray  # keep every layer's norm at these few steps (spikes, first non-finite)
    n_used: int  # used steps: the most columns the per-layer matrix can need
    percentile: float  # the per-layer threshold's percentile


@dataclass
class _LayerData:
    """What the layers pass kept for one optimizer."""

    stats: tuple[LayerStats, ...] = ()
    at_step: dict[int, list[tuple[str, float]]] = field(default_factory=dict)  # step -> [(layer, norm)]


class _LayerCollector:
    """Collects one optimizer's per-layer norms from the record batches of the layers table.

    The recorder writes every step as one block of the same layers in the same order, so a batch
    usually reshapes to (steps, layers) and is copied, transposed, into one preallocated
    (layers, used steps) float32 matrix: no sort, no per-batch allocation, and each layer's norms
    end up contiguous. Rows left over at a batch's end are carried into the next batch. Anything
    irregular (several optimizers' blocks, a changed layer set) falls back to grouping by a stable
    sort of the layer ids into per-layer lists of chunks.
    """

    def __init__(self, plan: _LayerPlan) -> None:
        self.plan = plan
        self.samples: dict[int, list[np.ndarray]] = {}  # layer id -> float32 chunks (fallback path)
        self.picked: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (steps, ids, norms) of interest
        self.pattern: np.ndarray | None = None  # layer ids of one step's block, once learned
        self.matrix: np.ndarray | None = None  # (layers, capacity) norms of used steps, regular path
        self.filled = 0  # columns of matrix written
        self.carry: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, step: np.ndarray, ids: np.ndarray, norm: np.ndarray) -> None:
        """Take one batch's rows of this optimizer."""
        self._pick_interesting(step, ids, norm)
        if self.carry is not None and self.pattern is not None:
            # Complete the block the last batch cut in two, then go on with the aligned rest (views).
            need = min(len(self.pattern) - len(self.carry[0]), len(step))
            head = tuple(np.concatenate(pair) for pair in zip(self.carry, (step[:need], ids[:need], norm[:need]),
                                                                strict=True))
            self.carry = None
            self._add_rows(*head)
            step, ids, norm = step[need:], ids[need:], norm[need:]
        self._add_rows(step, ids, norm)

    def finish(self) -> dict[int, list[np.ndarray]]:
        """Every layer's finite norms of the used steps, as chunks (the matrix rows come first)."""
        if self.carry is not None:
            self._add_grouped(*self.carry)
            self.carry = None
        if self.matrix is not None and self.pattern is not None:
            for row, layer_id in enumerate(self.pattern.tolist()):
                values = self.matrix[row, : self.filled]
                if not np.isfinite(values.sum(dtype=np.float64)):  # rare: an inf or NaN somewhere in the row
                    values = values[np.isfinite(values)]
                self.samples.setdefault(layer_id, []).insert(0, values)
        return self.samples

    def _add_rows(self, step: np.ndarray, ids: np.ndarray, norm: np.ndarray) -> None:
        if self.carry is not None:  # a batch too short to complete the carried block: keep carrying
            step, ids, norm = (np.concatenate(pair) for pair in zip(self.carry, (step, ids, norm), strict=True))
            self.carry = None
        whole = self._regular_prefix(step, ids)
        if whole and self._add_blocks(step[:whole], norm[:whole]):
            self.carry = (step[whole:], ids[whole:], norm[whole:]) if whole < len(step) else None
        else:
            self._add_grouped(step, ids, norm)

    def _pick_interesting(self, step: np.ndarray, ids: np.ndarray, norm: np.ndarray) -> None:
        interest = self.plan.interest_steps
        if not len(step) or not len(interest):
            return
        low, high = step.min(), step.max()  # two cheap passes spare a lookup over every row
        if not ((interest >= low) & (interest <= high)).any():
            return
        hit = np.isin(step, interest)
        self.picked.append((step[hit], ids[hit], norm[hit]))

    def _regular_prefix(self, step: np.ndarray, ids: np.ndarray) -> int:
        """Rows at the start that form whole blocks of the learned pattern (0 when they do not)."""
        if self.pattern is None and not self._learn_pattern(step, ids):
            return 0
        width = len(self.pattern)
        whole = len(step) // width * width
        if whole == 0:
            return 0
        ids2, step2 = ids[:whole].reshape(-1, width), step[:whole].reshape(-1, width)
        regular = (ids2 == self.pattern).all() and (step2 == step2[:, :1]).all()
        return whole if regular else 0

    def _learn_pattern(self, step: np.ndarray, ids: np.ndarray) -> bool:
        changes = np.flatnonzero(step != step[0]) if len(step) else np.zeros(0, np.intp)
        if not len(changes):
            return False  # not one whole block in sight yet
        block = ids[: changes[0]]
        if len(np.unique(block)) != len(block):
            return False
        self.pattern = block.copy()
        self.matrix = np.empty((len(block), self.plan.n_used), dtype=np.float32)
        return True

    def _add_blocks(self, step: np.ndarray, norm: np.ndarray) -> bool:
        """Copy whole blocks into the matrix; False when they do not fit (duplicated steps)."""
        width = len(self.pattern)
        step2, norm2 = step.reshape(-1, width), norm.reshape(-1, width)
        used = self.plan.use[np.minimum(step2[:, 0], len(self.plan.use) - 1)]
        kept = norm2 if used.all() else norm2[used]  # (used steps, layers)
        if self.filled + len(kept) > self.matrix.shape[1]:
            return False
        self.matrix[:, self.filled: self.filled + len(kept)] = kept.T
        self.filled += len(kept)
        return True

    def _add_grouped(self, step: np.ndarray, ids: np.ndarray, norm: np.ndarray) -> None:
        keep = self.plan.use[np.minimum(step, len(self.plan.use) - 1)] & np.isfinite(norm)
        ids, values = ids[keep], norm[keep]
        if not len(ids):
            return
        small = ids.astype(np.int16) if ids.max() < 2**15 else ids
        order = np.argsort(small, kind="stable")  # radix sort for int16 keys
        ids, values = ids[order], values[order]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(ids)) + 1))
        for begin, end in zip(starts, np.append(starts[1:], len(ids)), strict=True):
            self.samples.setdefault(int(ids[begin]), []).append(values[begin:end])


def _scan_layers(run: Run, plans: dict[int, _LayerPlan], single: bool) -> dict[int, _LayerData]:
    """Stream the layers table once: per-layer norm samples of used steps, all norms of steps of interest.

    ``single``: the run has one optimizer, so the layers' optimizer column need not be read.
    """
    names: dict[str, int] = {}  # layer name -> id, in order of first appearance (parameter order)
    collectors = {k: _LayerCollector(plan) for k, plan in plans.items()}
    for step, opt, ids, norm in _layer_batches(run, names, single):
        for k, collector in collectors.items():
            if opt is None:
                collector.add(step, ids, norm)
            else:
                mine = opt == k
                collector.add(step[mine], ids[mine], norm[mine])
    id_to_name = np.array(list(names), dtype=object)
    result = {}
    for k, collector in collectors.items():
        samples = collector.finish()
        result[k] = _LayerData(_layer_stats(samples, id_to_name, plans[k]), _group_by_step(collector.picked, id_to_name))
        collector.matrix = None  # free each optimizer's norms as soon as its stats are done
    return result


def _layer_batches(run: Run, names: dict[str, int],
                   single: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]]:
    """(step, optimizer or None, layer id, norm) arrays per record batch, reading only what is needed."""
    columns = ["step", "layer", "norm"] if single else ["step", "optimizer", "layer", "norm"]
    try:
        run.read_table("layers", columns=[])  # reads no data: checks it is a gradscope file of a known schema
        for batch in run.iter_batches("layers", columns, batch_size=LAYER_BATCH_ROWS):
            opt = None if single else batch.column("optimizer").to_numpy()
            ids = _layer_ids(batch.column("layer"), names)
            yield batch.column("step").to_numpy(), opt, ids, batch.column("norm").to_numpy(zero_copy_only=False)
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunFormatError(f"{run.path}: layers table unreadable: {exc}") from None


def _layer_ids(column: pa.Array, names: dict[str, int]) -> np.ndarray:
    """Map a batch's layer names to stable small-integer ids (first seen, first numbered)."""
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    lookup = np.array([names.setdefault(name, len(names)) for name in column.dictionary.to_pylist()],
                      dtype=np.int32)
    indices = column.indices.to_numpy(zero_copy_only=False)
    if np.array_equal(lookup, np.arange(len(lookup))):
        return indices  # the usual case: every row group's dictionary lists the layers in one order
    return lookup[indices]


def _layer_stats(samples: dict[int, list[np.ndarray]], id_to_name: np.ndarray,
                 plan: _LayerPlan) -> tuple[LayerStats, ...]:
    """Per-layer median, p95, the requested percentile and max; largest threshold first."""
    ids = sorted(samples)
    # numpy's sort and reductions release the GIL, so threads use every core for the 100 sorts.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(lambda layer_id: _one_layer(samples[layer_id], plan.percentile), ids))
    total = sum(row[-1] for row in rows if row is not None)
    stats = [LayerStats(str(id_to_name[layer_id]), n, med, p95, thr, mx, sq / total if total > 0 else 0.0)
             for layer_id, row in zip(ids, rows, strict=True) if row is not None
             for n, med, p95, thr, mx, sq in [row]]
    return tuple(sorted(stats, key=lambda s: (-s.threshold, -s.median, s.layer)))


def _one_layer(chunks: list[np.ndarray], percentile: float) -> tuple[int, float, float, float, float, float] | None:
    """(n, median, p95, threshold, max, sum of squares) of one layer's norms; None when it has none."""
    values = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    if not len(values):
        return None
    values.sort()  # in place (a matrix row): numpy's SIMD sort beats percentile's partitioning
    median, p95, threshold = percentile_of_sorted(values, [50.0, 95.0, percentile])
    squares = float(np.square(values, dtype=np.float64).sum())
    return len(values), float(median), float(p95), float(threshold), float(values[-1]), squares


def _group_by_step(picked: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   id_to_name: np.ndarray) -> dict[int, list[tuple[str, float]]]:
    at_step: dict[int, list[tuple[str, float]]] = {}
    for steps, ids, norms in picked:
        for step, layer_id, norm in zip(steps.tolist(), ids.tolist(), norms.tolist(), strict=True):
            at_step.setdefault(step, []).append((str(id_to_name[layer_id]), norm))
    return at_step


# --------------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------------


def _recommend_one(run: Run, view: _OptimizerView, percentile: float, skip_steps: int,
                   layers: _LayerData, run_notes: list[Note]) -> Recommendation:
    max_norm = float(percentile_of_sorted(view.sorted_norms, percentile)[0])
    _, rate, _ = clip_rate(view.sorted_norms, max_norm)
    intent, intent_text = _intent(percentile, rate)
    distribution = _distribution(view, skip_steps)
    candidates = _candidates(view, percentile, max_norm)
    warmup = _warmup(view, percentile, max_norm, skip_steps)
    nonfinite = _nonfinite(view, layers)
    notes = run_notes + _notes(distribution, candidates, rate, warmup, nonfinite, max_norm)
    return Recommendation(
        run_id=run.id, run_path=str(run.path), run_status=run.status, complete=run.complete,
        status_note=status_note(run, view.cols["step"]), optimizer=view.index, optimizer_label=view.label,
        norm_type=float(run.meta.get("norm_type") or 2.0), percentile=float(percentile),
        skip_steps=skip_steps, max_norm=max_norm, clip_rate=rate, intent=intent, intent_text=intent_text,
        distribution=distribution, clip_rates=candidates, spikes=_spikes(view, layers.at_step),
        nonfinite=nonfinite, warmup=warmup, layers=layers.stats, notes=tuple(notes),
    )


def status_note(run: Run, steps: np.ndarray) -> str | None:
    """One line on how the run ended when that limits the data; ``None`` for a finished run."""
    last = int(steps.max()) if len(steps) else 0
    status = run.status
    if status == "killed":
        return f"incomplete run (killed at step {last}): using the steps recorded up to its last flush"
    if status == "running":
        return f"incomplete run (still running, at step {last}): using the steps recorded up to its last flush"
    if not run.compacted:
        return f"incomplete run ({status} at step {last}, never compacted): using its part files"
    if status == "failed":
        error = run.meta.get("error") or "an exception"
        return f"the script failed at step {last} ({error}): using the steps before the failure"
    if status == "interrupted":
        return f"interrupted at step {last}: using the steps recorded before the interruption"
    return None


def _run_notes(run: Run, empty: list[str]) -> list[Note]:
    return [Note("optimizer-without-data", f"no recommendation for it: {why}") for why in empty]


def _notes(dist: Distribution, candidates: Sequence[ClipRate], rate: float, warmup: Warmup | None,
           nonfinite: NonFinite, max_norm: float) -> list[Note]:
    """The warnings that apply, each with a stable slug (listed in docs/recommend.md)."""
    notes = []
    if dist.n_used < FEW_STEPS:
        notes.append(Note("few-steps", f"only {_steps(dist.n_used)} used: the tail percentiles rest on a handful "
                                       f"of values; record a longer run for a firmer number"))
    if rate >= FREQUENT_CLIP_RATE:
        notes.append(Note("frequent-clipping", f"max_norm={max_norm:.4g} clips {rate:.0%} of steps. " + SYMPTOM))
    for row in candidates:
        if row.source == "script" and row.clip_rate >= FREQUENT_CLIP_RATE:
            notes.append(Note("script-clips-often", f"the script's own max_norm={row.threshold:.4g} clips "
                                                    f"{row.clip_rate:.0%} of steps. " + SYMPTOM))
    if warmup is not None and warmup.dominates and warmup.tail_share is not None:
        notes.append(Note("warmup-dominates", (
            f"{warmup.tail_share:.0%} of the steps above max_norm fall in the first {warmup.window} steps "
            f"(warm-up); without them max_norm would be {warmup.max_norm_without:.4g}: "
            f"try --skip-steps {warmup.skip_steps}")))
    notes += _nonfinite_notes(dist, nonfinite)
    if max_norm <= 0:
        notes.append(Note("zero-threshold", "max_norm is 0: most gradients are exactly zero, and clipping "
                                            "at 0 would zero every update; check that the model trains"))
    return notes


#: The advice every frequent-clipping warning ends with.
SYMPTOM = ("Frequent clipping is a symptom, not a cure: a learning rate that is too high, a missing or too "
           "short warm-up, or mixed-precision trouble (gradients clipped before GradScaler.unscale_) all "
           "show up as norms above a threshold meant for rare spikes. Fix the cause, or choose "
           "normalization on purpose (AutoClip's p10).")


def _nonfinite_notes(dist: Distribution, nonfinite: NonFinite) -> list[Note]:
    notes = []
    if dist.n_skipped:
        notes.append(Note("amp-skipped", f"{_steps(dist.n_skipped)} skipped by GradScaler (inf/NaN found, "
                                         f"routine under fp16 loss scaling); they are left out"))
    real = nonfinite.count_not_skipped
    if real > 0 and nonfinite.first_step is not None:
        where = f", first non-finite layer {nonfinite.first_layer}" if nonfinite.first_layer else ""
        notes.append(Note("nonfinite-steps", (
            f"{_steps(real)} had a non-finite gradient norm that GradScaler did not skip (first at step "
            f"{nonfinite.first_step}{where}); clipping cannot repair inf/NaN gradients, it turns them into NaN")))
    return notes


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"
