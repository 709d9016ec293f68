"""Value clipping (``clip_grad_value_``): each step's largest |gradient| element, and a threshold on it.

``clip_grad_value_(params, v)`` clamps every gradient element to ``[-v, v]``, so it changes a step
exactly when the step's largest |g| over all tensors is greater than ``v``. The recorder stores each
tensor's largest |g| before clipping in the layers table's ``max_abs`` column, on the steps where the
script clips by value or value clipping is injected; runs without it (older ones, or norm clipping)
get no value recommendation. The column is read in its own pass, and only when meta.json says value
clipping was in effect: a run of 10^8 layer rows that clips by norm pays nothing for it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradscope.errors import RunFormatError
from gradscope.recommend.model import ValueClipping
from gradscope.recommend.steps import OptimizerView, rank_rows
from gradscope.stats import clip_rate, percentile_of_sorted
from gradscope.store import Run

#: The layers table's column of per-tensor largest |g| (nullable; absent in older runs).
MAX_ABS = "max_abs"


def recorded_clip_values(run: Run) -> tuple[float | None, float | None]:
    """The script's own ``clip_value`` and an injected one, from meta.json (``None`` when not in effect)."""
    clipping = run.meta.clipping
    return clipping.script_clip_value, clipping.injected_clip_value


def value_clipping_in_effect(run: Run) -> bool:
    """meta.json says the script clipped by value, or gradscope injected value clipping."""
    return any(value is not None for value in recorded_clip_values(run))


def read_step_max_abs(run: Run, views: dict[int, OptimizerView], single: bool,
                      batch_rows: int, rank: int | None = None) -> dict[int, np.ndarray]:
    """Per optimizer, an array indexed by step: the step's largest ``max_abs`` over its tensors (NaN: none).

    Empty when value clipping was not in effect or the run has no ``max_abs`` column.

    Raises:
        RunFormatError: the layers table cannot be read.
    """
    if not value_clipping_in_effect(run) or not views:
        return {}
    out = {k: np.full(int(view.cols["step"].max()) + 1, np.nan) for k, view in views.items()}
    columns = ["step", MAX_ABS] if single else ["step", "optimizer", MAX_ABS]
    try:
        for batch in run.iter_batches("layers", columns, batch_size=batch_rows):
            batch = rank_rows(batch, rank)  # a job's table: one rank's rows
            values = pc.fill_null(pc.cast(batch.column(MAX_ABS), pa.float64()), np.nan).to_numpy()
            known = np.isfinite(values)
            if not known.any():
                continue
            step = batch.column("step").to_numpy()[known]
            opt = None if single else batch.column("optimizer").to_numpy()[known]
            for k, per_step in out.items():
                mine = (step < len(per_step)) if opt is None else (opt == k) & (step < len(per_step))
                np.fmax.at(per_step, step[mine], values[known][mine])  # fmax: a NaN slot takes the value
    except (KeyError, ValueError) as exc:  # no max_abs column: a run recorded before it existed
        if MAX_ABS in str(exc):
            return {}
        raise RunFormatError(f"{run.path}: layers table unreadable: {exc}") from None
    except OSError as exc:
        raise RunFormatError(f"{run.path}: layers table unreadable: {exc}") from None
    return out


def value_clipping(run: Run, view: OptimizerView, step_max_abs: np.ndarray | None,
                   percentile: float) -> ValueClipping | None:
    """The per-step largest |g| over the used steps, the recommended ``clip_value`` and what the recorded values did.

    ``None`` when no used step of this optimizer has a recorded largest |g|.
    """
    if step_max_abs is None:
        return None
    steps = view.used_steps[view.used_steps < len(step_max_abs)]
    values = np.sort(step_max_abs[steps][np.isfinite(step_max_abs[steps])])
    if not len(values):
        return None
    median, p95, p99, threshold = (float(v) for v in percentile_of_sorted(values, [50.0, 95.0, 99.0, percentile]))
    _, rate, _ = clip_rate(values, threshold)
    script, injected = recorded_clip_values(run)
    script_n = None if script is None else clip_rate(values, script)[0]
    return ValueClipping(
        n_steps=len(values), median=median, p95=p95, p99=p99, max=float(values[-1]), clip_value=threshold,
        clip_rate=rate, script_clip_value=script, script_n_clipped=script_n,
        script_clip_rate=None if script_n is None else script_n / len(values), injected_clip_value=injected,
        injected_n_clipped=None if injected is None else clip_rate(values, injected)[0],
    )
