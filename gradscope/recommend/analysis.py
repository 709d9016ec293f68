"""Turn a recorded run into a ``clip_grad_norm_`` threshold per optimizer, with the evidence behind it.

Pure analysis: :func:`recommend` reads a :class:`gradscope.store.Run` and returns one
:class:`~gradscope.recommend.model.Recommendation` per optimizer. Nothing here prints, plots, or
imports torch, rich or typer: ``view.py`` renders the result, ``plots.py`` draws it, and
``gradscope compare --max-norm auto`` calls :func:`recommend` directly.

Definitions (docs/recommend.md and the JSON output say the same):

* every percentile is numpy's default (linear interpolation between the two nearest ranks), over
  the *used* steps: finite pre-clip global norms of steps the GradScaler did not skip, from step
  ``skip_steps`` on (``steps.py``);
* a threshold ``t`` *clips* a step when its norm is greater than ``t`` (``clip_grad_norm_`` then
  multiplies the gradients by ``t / norm``);
* a *spike* is a used step whose norm exceeds :data:`gradscope.stats.NORM_SPIKE`'s factor times the
  median of the used steps in its window before it.

The steps table is read whole (``steps.py``); the layers table, which can hold 10^8 rows, is
streamed once (``layers.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradscope.errors import NoDataError, UsageError
from gradscope.recommend.layers import LAYER_BATCH_ROWS, LayerData, LayerPlan, scan_layers
from gradscope.recommend.model import (
    ClipRate,
    Distribution,
    LayerShare,
    NonFinite,
    Note,
    Recommendation,
    Spike,
    Spikes,
    Warmup,
)
from gradscope.recommend.steps import CLIP_SOURCES, OptimizerView, read_steps, select_optimizers
from gradscope.stats import NORM_SPIKE, clip_rate, percentile_of_sorted
from gradscope.store import Run

#: The percentile ``max_norm`` is taken at unless the caller asks for another.
DEFAULT_PERCENTILE = 95.0
#: Percentiles shown in the distribution and offered as candidate thresholds.
SHOWN_PERCENTILES = (50.0, 90.0, 95.0, 99.0)
#: Fixed thresholds people pick without measuring: transformers' 1.0, RNN folklore's 5.0.
COMMON_DEFAULTS = ((1.0, "common default (transformers)"), (5.0, "common default (RNNs)"))
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
#: Non-finite layers named for the first non-finite step.
NONFINITE_LAYERS_SHOWN = 10

PERCENTILE_METHOD = "numpy.percentile default: linear interpolation between the two nearest ranks"


def recommend(run: Run, percentile: float = DEFAULT_PERCENTILE, skip_steps: int = 0,
              optimizer: int | None = None, with_layers: bool = True,
              layer_batch_rows: int = LAYER_BATCH_ROWS) -> list[Recommendation]:
    """Recommend ``max_norm`` for each optimizer of ``run`` (or only ``optimizer``).

    Args:
        run: a run opened with :func:`gradscope.store.load_run`; an incomplete one is analysed too.
        percentile: ``max_norm`` is this percentile of the used steps' pre-clip global norm, in (0, 100].
        skip_steps: leave each optimizer's first ``skip_steps`` steps out (warm-up).
        optimizer: the optimizer index to analyse; ``None`` for all of them.
        with_layers: read the layers table (per-layer stats, the layers behind spikes and the first
            non-finite layer). ``False`` reads only the steps table: the threshold and its evidence
            in seconds even for 10^8 layer rows (what ``compare --max-norm auto`` needs).
        layer_batch_rows: rows per record batch of the layers stream: bounds memory, never
            changes the result.

    Returns:
        One :class:`Recommendation` per optimizer with data, in optimizer order.

    Raises:
        UsageError: bad ``percentile``/``skip_steps``/``layer_batch_rows``, an unknown ``optimizer``,
            or ``skip_steps`` leaving nothing.
        NoDataError: the run recorded no step, or no used step has a finite norm.
        RunFormatError: a table of the run cannot be read.
    """
    _check_arguments(percentile, skip_steps, layer_batch_rows)
    steps = read_steps(run)
    if len(steps["step"]) == 0:
        raise NoDataError(f"run {run.id} recorded no optimizer step: nothing to recommend from")
    views, empty = select_optimizers(run, steps, optimizer, skip_steps)
    plans = {k: _layer_plan(view, percentile) for k, view in views.items()}
    if with_layers:
        single = len(np.unique(steps["optimizer"])) == 1
        layer_data = scan_layers(run, plans, single, layer_batch_rows)
    else:
        layer_data = {k: LayerData() for k in plans}
    notes = _run_notes(empty)
    return [
        _recommend_one(run, view, percentile, skip_steps, layer_data[k], notes)
        for k, view in sorted(views.items())
    ]


def _check_arguments(percentile: float, skip_steps: int, layer_batch_rows: int) -> None:
    if not (0.0 < percentile <= 100.0) or np.isnan(percentile):
        raise UsageError(f"--percentile must be in (0, 100], got {percentile:g}")
    if skip_steps < 0:
        raise UsageError(f"--skip-steps must be 0 or more, got {skip_steps}")
    if layer_batch_rows < 1:
        raise UsageError(f"layer_batch_rows must be 1 or more, got {layer_batch_rows}")


def _layer_plan(view: OptimizerView, percentile: float) -> LayerPlan:
    """Which steps the layers pass keeps for one optimizer: the used ones, and those to explain."""
    size = int(view.cols["step"].max()) + 2  # the last slot stays False: out-of-range steps land there
    use = np.zeros(size, dtype=bool)
    use[view.used_steps] = True
    interest = list(view.used_steps[_top_spikes(view)])
    if view.first_nonfinite_step is not None:
        interest.append(view.first_nonfinite_step)
    return LayerPlan(use=use, interest_steps=np.unique(np.asarray(interest, dtype=np.int64)),
                     n_used=len(view.norms), percentile=percentile)


def _distribution(view: OptimizerView, skip_steps: int) -> Distribution:
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


def _candidates(view: OptimizerView, percentile: float, max_norm: float) -> tuple[ClipRate, ...]:
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


def _recorded_thresholds(view: OptimizerView) -> dict[str, float]:
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


def _top_spikes(view: OptimizerView) -> np.ndarray:
    """Indices (into the used steps) of the SPIKES_SHOWN largest ratios above the spike factor."""
    ratios, _ = view.spike_ratios
    hits = np.flatnonzero(ratios > NORM_SPIKE.factor)
    return hits[np.argsort(-ratios[hits], kind="stable")[:SPIKES_SHOWN]]


def _spikes(view: OptimizerView, at_step: dict[int, list[tuple[str, float]]]) -> Spikes:
    ratios, medians = view.spike_ratios
    steps, norms = view.used_steps, view.norms
    shown = tuple(
        Spike(step=int(steps[i]), norm=float(norms[i]), rolling_median=float(medians[i]),
              ratio=float(ratios[i]), layers=_top_shares(at_step.get(int(steps[i]), [])))
        for i in _top_spikes(view)
    )
    count = int(np.count_nonzero(ratios > NORM_SPIKE.factor))
    return Spikes(factor=NORM_SPIKE.factor, window=NORM_SPIKE.window, count=count, shown=shown)


def _top_shares(layer_norms: list[tuple[str, float]]) -> tuple[LayerShare, ...]:
    """The layers with the largest share of the squared norm at one step."""
    finite = [(name, norm) for name, norm in layer_norms if np.isfinite(norm)]
    total = sum(norm * norm for _, norm in finite)
    if total <= 0:
        return ()
    ranked = sorted(finite, key=lambda item: -item[1])[:SPIKE_LAYERS_SHOWN]
    return tuple(LayerShare(name, norm, norm * norm / total) for name, norm in ranked)


def _nonfinite(view: OptimizerView, layers: LayerData) -> NonFinite:
    cols, first = view.cols, view.first_nonfinite_step
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


def _warmup(view: OptimizerView, percentile: float, max_norm: float, skip_steps: int) -> Warmup | None:
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


def _recommend_one(run: Run, view: OptimizerView, percentile: float, skip_steps: int,
                   layers: LayerData, run_notes: list[Note]) -> Recommendation:
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
        norm_type=float(run.meta.norm_type), percentile=float(percentile),
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
        error = run.meta.error or "an exception"
        return f"the script failed at step {last} ({error}): using the steps before the failure"
    if status == "interrupted":
        return f"interrupted at step {last}: using the steps recorded before the interruption"
    return None


def _run_notes(empty: list[str]) -> list[Note]:
    """Notes about the run as a whole: optimizers left without a recommendation, and why."""
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
