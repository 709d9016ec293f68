"""The steps table: read once, split per optimizer, and the *used* steps of each.

A used step has a finite pre-clip global norm, was not skipped by GradScaler, and comes at or after
the optimizer's first step plus ``skip_steps``. The table is small (one row per step) and read whole,
but only the columns the analysis uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradscope.errors import NoDataError, RunFormatError, UsageError
from gradscope.stats import NORM_SPIKE, spike_ratios
from gradscope.store import SCOPES_KEY, Run, rank_disagreement

# A null grad_norm (not NaN) with nonfinite false is a step whose optimizer had no gradient at all (everything under
# torch.no_grad, a loss that never reached the parameters): not a non-finite step.
_STEP_COLUMNS = ["step", "optimizer", "grad_norm", "nonfinite", "skipped", "max_norm", "clip_source", "lr", "whole_sq"]


@dataclass(frozen=True)
class Ranks:
    """What the steps table says about the ranks of a distributed job (one rank for a single process)."""

    n_ranks: int = 1
    # the rank whose rows are analysed (after store.join_ranks, a sharded optimizer's hold the full norms); None: a
    # table without ranks
    rank: int | None = None
    scopes: dict[int, str] = field(default_factory=dict)  # optimizer index -> global | sharded | rank-local
    spread: dict[int, float] = field(default_factory=dict)  # optimizer index -> ranks' largest relative disagreement

    def scope(self, index: int) -> str:
        """The optimizer's norm scope; a single process's optimizers are global."""
        return self.scopes.get(index, "global")


def read_steps(run: Run) -> tuple[dict[str, np.ndarray], Ranks]:
    """The steps columns the analysis uses, as numpy arrays sorted by (optimizer, step), and the ranks they
    come from. A job's table (with a ``rank`` column) is read for one rank: every rank's row of a step holds
    the same combined norm, or, for a rank-local optimizer, that rank's own."""
    try:
        table = run.read_table("steps", _STEP_COLUMNS)
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunFormatError(f"{run.path}: steps table unreadable: {exc}") from None
    table, ranks = _one_rank(run, table)
    out = {name: _floats(table.column(name)) for name in ("grad_norm", "max_norm", "lr")}
    out["step"] = table.column("step").to_numpy().astype(np.int64)
    out["optimizer"] = table.column("optimizer").to_numpy().astype(np.int64)
    out["skipped"] = _flags(table.column("skipped"))
    out["no_grad"] = _flags(pc.is_null(table.column("grad_norm"))) & ~_flags(table.column("nonfinite"))
    out["clip_source"] = _clip_source_codes(table.column("clip_source"))
    key = out["optimizer"] * (int(out["step"].max(initial=0)) + 1) + out["step"]
    if len(key) and (np.diff(key) < 0).any():  # written in order; sort only if something is not
        order = np.argsort(key, kind="stable")
        out = {name: values[order] for name, values in out.items()}
    return out, ranks


def _one_rank(run: Run, table: pa.Table) -> tuple[pa.Table, Ranks]:
    """``table`` reduced to its lowest rank's rows, and the job's ranks, scopes and disagreement."""
    if "rank" not in table.column_names:
        # one rank's own run read alone: a sharded optimizer's norms are then that rank's pieces only
        scopes = {k: "rank-local" if v == "sharded" else v for k, v in _meta_scopes(run).items()}
        return table, Ranks(scopes=scopes)
    raw = (table.schema.metadata or {}).get(SCOPES_KEY)
    scopes = {int(k): str(v) for k, v in json.loads(raw).items()} if raw else _meta_scopes(run)
    present = np.unique(table.column("rank").to_numpy())
    if len(present) == 0:
        return table, Ranks(scopes=scopes)
    spread = rank_disagreement(table, scopes) if len(present) > 1 else {}
    rank = int(present.min())
    return table.filter(pc.equal(table.column("rank"), rank)), Ranks(len(present), rank, scopes, spread)


def rank_rows(batch: pa.RecordBatch, rank: int | None) -> pa.RecordBatch:
    """A batch of a job's layers table reduced to ``rank``'s rows (a batch without ``rank``: as it is)."""
    if rank is None or "rank" not in batch.schema.names:
        return batch
    return batch.filter(pc.equal(batch.column("rank"), rank))


def _meta_scopes(run: Run) -> dict[int, str]:
    return {o.index: o.norm_scope for o in run.meta.optimizers if o.norm_scope is not None}


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
class OptimizerView:
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
        """The step numbers of the used steps, in step order."""
        return self.cols["step"][self.used]

    @cached_property
    def spike_ratios(self) -> tuple[np.ndarray, np.ndarray]:
        """Each used norm over the rolling median before it (NaN without history), and those medians."""
        return spike_ratios(self.norms, NORM_SPIKE)

    @cached_property
    def first_nonfinite_step(self) -> int | None:
        """The first step (used or not) whose global norm is inf or NaN; ``None`` when there is none."""
        bad = np.flatnonzero(~np.isfinite(self.cols["grad_norm"]) & ~self.cols["no_grad"])
        return int(self.cols["step"][bad[0]]) if len(bad) else None


def select_optimizers(run: Run, steps: dict[str, np.ndarray], optimizer: int | None,
                       skip_steps: int) -> tuple[dict[int, OptimizerView], list[str]]:
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


def _view(run: Run, steps: dict[str, np.ndarray], k: int, skip_steps: int) -> OptimizerView:
    rows = steps["optimizer"] == k
    cols = {name: values[rows] for name, values in steps.items()}
    first = int(cols["step"].min())
    finite = np.isfinite(cols["grad_norm"])
    used = finite & ~cols["skipped"] & (cols["step"] >= first + skip_steps)
    return OptimizerView(index=k, label=run.optimizer_label(k), cols=cols, used=used, first_step=first)


def _why_empty(view: OptimizerView, skip_steps: int) -> str:
    cols = view.cols
    finite = np.isfinite(cols["grad_norm"]) & ~cols["skipped"]
    if finite.any():  # the steps were there: skip_steps took them all
        return (f"optimizer {view.label} has {int(finite.sum())} usable steps, none at or after "
                f"step {view.first_step + skip_steps}: lower --skip-steps")
    if cols["no_grad"].all():
        return (f"none of the {len(cols['step'])} recorded steps of optimizer {view.label} had a gradient "
                f"(no parameter's .grad was set: a loss that never reached them, or a step under torch.no_grad): "
                f"nothing to set a threshold from")
    return (f"every one of the {len(cols['step'])} recorded norms of optimizer {view.label} is non-finite "
            f"or AMP-skipped: nothing to set a threshold from")

