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

import dataclasses

import numpy as np

from gradscope.errors import NoDataError, UsageError
from gradscope.recommend.layers import LAYER_BATCH_ROWS, LayerData, LayerPlan, scan_layers
from gradscope.recommend.model import (
    ClipRate,
    Closure,
    Distribution,
    LayerShare,
    NonFinite,
    Note,
    Recommendation,
    Spike,
    Spikes,
)
from gradscope.recommend.notes import (
    MIN_PERCENTILE_STEPS,
    clipping_notes,
    count_notes,
    first_steps_notes,
    nonfinite_notes,
    rank_notes,
    value_notes,
)
from gradscope.recommend.schedule import first_steps
from gradscope.recommend.steps import CLIP_SOURCES, OptimizerView, read_steps, select_optimizers
from gradscope.recommend.values import read_step_max_abs, value_clipping
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
#: Percentile at or above which the threshold is a spike guard, at or below which it normalizes.
SPIKE_GUARD_MIN_P = 80.0
NORMALIZATION_MAX_P = 25.0
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
    steps, ranks = read_steps(run)
    if len(steps["step"]) == 0:
        raise NoDataError(f"run {run.id} recorded no optimizer step: nothing to recommend from")
    views, empty = select_optimizers(run, steps, optimizer, skip_steps)
    plans = {k: _layer_plan(view, percentile) for k, view in views.items()}
    single = len(np.unique(steps["optimizer"])) == 1
    if with_layers:
        layer_data = scan_layers(run, plans, single, layer_batch_rows, ranks.rank)
    else:
        layer_data = {k: LayerData() for k in plans}
    # Value clipping's evidence is a few columns of one pass, and compare's `--clip-value auto` needs it
    # without the per-layer statistics: read it whether or not with_layers.
    max_abs = read_step_max_abs(run, views, single, layer_batch_rows, ranks.rank)
    notes = _run_notes(empty)
    return [
        dataclasses.replace(
            _recommend_one(run, view, percentile, skip_steps, (layer_data[k], max_abs.get(k)),
                           [*notes, *rank_notes(ranks.scope(k), ranks.n_ranks, ranks.rank, ranks.spread.get(k))]),
            norm_scope=ranks.scope(k), n_ranks=ranks.n_ranks)
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


def _intent(percentile: float, rate: float, n_used: int) -> tuple[str, str]:
    """Name what a threshold at ``percentile`` does: guard against spikes, or normalize every step.

    The measured rate is quoted only when it agrees with the percentile's promise; with too few steps
    for a percentile, or ties that make it clip far more or less than ~(100-P)%, the text says that instead.
    """
    p, share = _fmt_p(percentile), f"{rate:.1%}"
    if n_used < MIN_PERCENTILE_STEPS:
        return "too-few-steps", (f"none can be read from {n_used} used step{'s' * (n_used != 1)}: a p{p} needs at "
                                 f"least {MIN_PERCENTILE_STEPS}; max_norm is indicative only")
    expected = (100.0 - percentile) / 100.0
    measured = (f"({share} of steps here)" if abs(rate - expected) <= max(0.5 * expected, 2.0 / n_used)
                else f"(yet {share} of steps here: many steps share the same norm)")
    if percentile >= SPIKE_GUARD_MIN_P:
        return "spike-guard", (f"spike guard: p{p} leaves typical steps alone and scales down only the largest "
                               f"~{100 - percentile:g}% {measured}")
    if percentile <= NORMALIZATION_MAX_P:
        return "normalization", (f"normalization: p{p} scales down most steps {measured}, as AutoClip's p10 "
                                 f"does; clipping then rescales nearly every update rather than catching spikes")
    return "intermediate", (f"in between: p{p} clips ~{100 - percentile:g}% of steps {measured}, more than a spike "
                            f"guard (p95-p99) and fewer than AutoClip-style normalization (p10)")


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
    bad_rows = ~np.isfinite(cols["grad_norm"]) & ~cols["no_grad"]  # no gradient at all is not non-finite
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


def _recommend_one(run: Run, view: OptimizerView, percentile: float, skip_steps: int,
                   evidence: tuple[LayerData, np.ndarray | None], run_notes: list[Note]) -> Recommendation:
    layers, step_max_abs = evidence
    max_norm = float(percentile_of_sorted(view.sorted_norms, percentile)[0])
    _, rate, _ = clip_rate(view.sorted_norms, max_norm)
    distribution = _distribution(view, skip_steps)
    intent, intent_text = _intent(percentile, rate, distribution.n_used)
    candidates = _candidates(view, percentile, max_norm)
    warmup = first_steps(view, percentile, max_norm, skip_steps)
    nonfinite = _nonfinite(view, layers)
    values = value_clipping(run, view, step_max_abs, percentile)
    closure = _closure(run, view)
    notes = [*run_notes, *count_notes(distribution, percentile, closure),
             *clipping_notes(candidates, rate, max_norm, enough=distribution.n_used >= MIN_PERCENTILE_STEPS),
             *value_notes(values), *first_steps_notes(warmup), *nonfinite_notes(distribution, nonfinite)]
    return Recommendation(
        run_id=run.id, run_path=str(run.path), run_status=run.status, complete=run.complete,
        status_note=status_note(run, view.cols["step"]), optimizer=view.index, optimizer_label=view.label,
        norm_type=float(run.meta.norm_type), percentile=float(percentile),
        skip_steps=skip_steps, max_norm=max_norm, clip_rate=rate, intent=intent, intent_text=intent_text,
        distribution=distribution, clip_rates=candidates, spikes=_spikes(view, layers.at_step),
        nonfinite=nonfinite, warmup=warmup, layers=layers.stats, notes=tuple(notes),
        clip_value=None if values is None else values.clip_value, value_clipping=values, closure=closure,
    )


#: Optimizers whose step evaluates a closure several times, for runs that did not count evaluations.
CLOSURE_CLASSES = ("LBFGS",)


def _closure(run: Run, view: OptimizerView) -> Closure | None:
    """Steps and closure evaluations of a closure optimizer; ``None`` for any other optimizer."""
    entry = next((o for o in run.meta.optimizers if o.index == view.index), None)
    if entry is None:
        return None
    n_steps = len(view.cols["step"])
    evaluations = entry.n_evaluations
    if evaluations > 0:
        return Closure(n_steps, evaluations, evaluations / n_steps if n_steps else None)
    if entry.class_name in CLOSURE_CLASSES:  # a run recorded before evaluations were counted
        return Closure(n_steps, None, None)
    return None


def status_note(run: Run, steps: np.ndarray) -> str | None:
    """One line on how the run ended when that limits the data; ``None`` for a finished run."""
    last = int(steps.max()) if len(steps) else 0
    status = run.status
    if run.incomplete:  # gradscope could not write everything it recorded (disk full, a file-size limit)
        return f"incomplete run ({run.incomplete}): using the {len(steps)} steps that were written"
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
