"""The compares of a run, for the report: their compare.json, the arms' runs, and their charts.

``gradscope compare`` writes ``compare.json`` into its own directory: ``<runs dir>/compare-<time>/``
unless ``--out DIR`` put it elsewhere (then the report is told with ``--compare DIR``). A compare
belongs to a run when its ``run_path`` is that run's directory. The verdict and every statistic are
read from compare.json as compare computed them, never recomputed; the arms' loss and norm curves
come from the arms' own runs (the ``run_id`` of each seed, in the same runs directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gradscope import plots, store
from gradscope.compare.metrics import smoothed
from gradscope.errors import GradscopeError
from gradscope.report.charts import figure
from gradscope.report.data import binned

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COMPARE_FILE = "compare.json"
COMPARE_FORMAT = "gradscope-compare"
#: What the page says under each compare chart.
CHART_NOTE = ("loss: thin line the mean over seeds, band the seeds' min to max, bold compare's trailing mean "
              "(the final loss is its last value); norm: the median over seeds, each arm's threshold dashed")


@dataclass
class ArmCurves:
    """One arm of a compare, for one optimizer: per-seed loss and norm arrays aligned on the step."""

    title: str
    max_norm: float | None
    seeds: list[int]
    loss: np.ndarray  # (seeds, steps), NaN where a seed has no finite value
    norm: np.ndarray
    first_step: int


@dataclass
class CompareData:
    """One compare of the run: its directory, its compare.json, and each optimizer's arms."""

    path: Path
    doc: dict[str, Any]
    arms: dict[int, list[ArmCurves]] = field(default_factory=dict)  # optimizer -> its arms
    missing: list[str] = field(default_factory=list)  # arm runs that are gone

    @property
    def names(self) -> dict[int, str]:
        """Each compared optimizer's name, as compare wrote it."""
        return {int(o["index"]): str(o["name"]) for o in self.doc.get("optimizers", [])}


def find_compares(run: store.Run, extra: list[Path] | None = None) -> list[CompareData]:
    """Every compare of ``run``: the runs directory's ``*/compare.json`` of this run, and each of ``extra``.

    Raises:
        GradscopeError: a directory of ``extra`` holds no readable compare.json.
    """
    found: dict[Path, dict[str, Any]] = {}
    for path in sorted(run.path.parent.glob(f"*/{COMPARE_FILE}")):
        doc = _read(path)
        if doc is not None and _same_run(doc, run):
            found[path.parent.resolve()] = doc
    for folder in extra or []:
        doc = _read(folder / COMPARE_FILE)
        if doc is None:
            raise GradscopeError(f"--compare {folder}: no readable {COMPARE_FILE} of gradscope compare there")
        found[folder.resolve()] = doc
    return [_load_arms(path, doc, run) for path, doc in found.items()]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == COMPARE_FORMAT else None


def _same_run(doc: dict[str, Any], run: store.Run) -> bool:
    try:
        return Path(str(doc.get("run_path"))).resolve() == run.path.resolve()
    except OSError:
        return False


def _load_arms(path: Path, doc: dict[str, Any], run: store.Run) -> CompareData:
    data = CompareData(path, doc)
    for arm in doc.get("arms", []):
        frames = {}
        for seed in arm.get("seeds", []):
            seed_run = _seed_run(seed, run, data)
            if seed_run is not None:
                frames[int(seed["seed"])] = seed_run.read_table("steps", ["step", "optimizer", "loss", "grad_norm"]
                                                                ).to_pandas()
        for entry in arm.get("optimizers", []):
            k = int(entry["optimizer"])
            data.arms.setdefault(k, []).append(_curves(str(arm.get("title", arm.get("arm"))), entry.get("max_norm"),
                                                       frames, k))
    return data


def _seed_run(seed: dict[str, Any], run: store.Run, data: CompareData) -> store.Run | None:
    if seed.get("reused_recorded_run"):
        return run
    if not seed.get("run_id"):
        return None
    try:
        return store.load_run(run.path.parent / str(seed["run_id"]))
    except GradscopeError:
        data.missing.append(str(seed["run_id"]))
        return None


def _curves(title: str, max_norm: float | None, frames: dict[int, pd.DataFrame], k: int) -> ArmCurves:
    mine = {s: f[f["optimizer"] == k].sort_values("step") for s, f in frames.items()}
    mine = {s: f for s, f in mine.items() if len(f)}
    first = min((int(f["step"].iloc[0]) for f in mine.values()), default=0)
    length = max((int(f["step"].iloc[-1]) - first + 1 for f in mine.values()), default=0)
    loss, norm = np.full((len(mine), length), np.nan), np.full((len(mine), length), np.nan)
    for row, f in enumerate(mine.values()):
        at = f["step"].to_numpy() - first
        loss[row, at] = f["loss"].astype(float).to_numpy()
        norm[row, at] = f["grad_norm"].astype(float).to_numpy()
    return ArmCurves(title, max_norm, list(mine), loss, norm, first)


def compare_chart(data: CompareData, k: int) -> Figure:
    """Optimizer ``k`` of one compare: the loss of each arm (mean over seeds, the seeds' range shaded,
    compare's smoothed loss solid) above, the pre-clip norm of each arm (median over seeds) below."""
    fig = figure(11.0, 6.4, left=0.1, right=0.7)
    loss_ax, norm_ax = fig.subplots(2, 1, sharex=True)
    with plots.quiet():
        for index, arm in enumerate(data.arms.get(k, [])):
            if arm.loss.size:
                _draw_arm(loss_ax, norm_ax, arm, f"C{index % 10}")
        for ax in (loss_ax, norm_ax):
            if _all_positive(ax):
                ax.set_yscale("log")
    name = data.names.get(k, f"optimizer {k}")
    loss_ax.set(ylabel="loss", title=f"{name}: loss per arm")
    norm_ax.set(xlabel="optimizer step", ylabel="pre-clip norm", title=f"{name}: gradient norm per arm")
    for ax in (loss_ax, norm_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def _draw_arm(loss_ax: Axes, norm_ax: Axes, arm: ArmCurves, color: str) -> None:
    steps = arm.first_step + np.arange(arm.loss.shape[1])
    seeds = f"{len(arm.seeds)} seed{'s' * (len(arm.seeds) != 1)}"
    mean = binned(steps, np.nanmean(arm.loss, axis=0))
    low, high = binned(steps, np.nanmin(arm.loss, axis=0)), binned(steps, np.nanmax(arm.loss, axis=0))
    loss_ax.fill_between(mean.x, low.median, high.median, color=color, alpha=0.18, linewidth=0)
    loss_ax.plot(mean.x, mean.median, color=color, linewidth=0.8, alpha=0.8, label=f"{arm.title} ({seeds})")
    smooth = np.nanmean([smoothed(pd.Series(row)).to_numpy() for row in arm.loss], axis=0)
    loss_ax.plot(mean.x, binned(steps, smooth).median, color=color, linewidth=2.0)
    norm = binned(steps, np.nanmedian(np.where(arm.norm > 0, arm.norm, np.nan), axis=0))
    norm_ax.plot(norm.x, norm.median, color=color, linewidth=0.9, label=arm.title)
    if arm.max_norm is not None:
        norm_ax.axhline(arm.max_norm, color=color, linestyle="--", linewidth=1.2, label=f"max_norm={arm.max_norm:g}")


def _all_positive(ax: Axes) -> bool:
    ys = [line.get_ydata() for line in ax.get_lines()]
    values = np.concatenate([np.asarray(y, dtype=float) for y in ys]) if ys else np.array([])
    values = values[np.isfinite(values)]
    return bool(len(values)) and bool((values > 0).all())
