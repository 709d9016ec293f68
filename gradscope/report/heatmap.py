"""The per-layer heat map's numbers: layers x step bins, each cell the max and the median of its norms.

The layers table holds one row per parameter tensor per step (10^8 rows for a million steps of a
100-tensor model), so it is streamed with :meth:`Run.iter_batches`, never read whole. Each
optimizer's step range is cut into at most :data:`MAX_BINS` bins of equal width; a bin's rows are
scattered into a small dense block (steps of the bin x layers) and, once the stream has moved past
the bin, reduced to one column of max and one of median. The recorder writes rows in step order,
so a bin is complete as soon as a batch starts beyond it and memory holds only a few bins; rows out
of order are still placed right, they only keep their bins open until the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradscope.store import Run

#: Columns (step bins) of the heat map at most.
MAX_BINS = 500
#: Rows per record batch of the layers stream: bounds memory, never changes the result.
BATCH_ROWS = 1 << 20


@dataclass
class HeatMap:
    """One optimizer's layers x bins matrices (float32, NaN where a layer had no finite norm)."""

    optimizer: int
    layers: list[str]
    first_step: int
    width: int  # steps per bin
    max: np.ndarray  # (layers, bins)
    median: np.ndarray

    @property
    def note(self) -> str:
        """What the page says under the heat map."""
        if self.width == 1:
            return "one column per step"
        return f"downsampled: each column is {self.width:,} steps, shown as the max and the median per layer"


@dataclass
class _Bins:
    """The open bins of one optimizer while the stream runs."""

    first_step: int
    width: int
    n_bins: int
    layer_ids: dict[str, int]
    open: dict[int, np.ndarray] = field(default_factory=dict)
    done: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def add(self, step: np.ndarray, lid: np.ndarray, norm: np.ndarray) -> None:
        b = (step - self.first_step) // self.width
        inside = (b >= 0) & (b < self.n_bins)  # a layer row of a step the steps table lacks (a killed run)
        if not inside.all():
            b, step, lid, norm = b[inside], step[inside], lid[inside], norm[inside]
        if len(b) == 0:
            return
        order = None if len(b) < 2 or bool((b[1:] >= b[:-1]).all()) else np.argsort(b, kind="stable")
        if order is not None:
            b, step, lid, norm = b[order], step[order], lid[order], norm[order]
        cuts = np.flatnonzero(np.diff(b)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(b)], strict=True):
            block = self._block(int(b[lo]), int(lid[lo:hi].max()) + 1)
            block[lid[lo:hi], step[lo:hi] - self.first_step - int(b[lo]) * self.width] = norm[lo:hi]
        if len(b) and order is None:  # rows in step order: every bin before this batch's first is complete
            for k in [k for k in self.open if k < int(b[0])]:
                self._close(k)

    def _block(self, k: int, n_layers: int) -> np.ndarray:
        block = self.open.get(k)
        need = max(n_layers, len(self.layer_ids))
        if block is None:  # (layers, steps): each layer's steps contiguous, for a fast median along them
            block = self.open[k] = np.full((need, self.width), np.nan, dtype=np.float32)
        elif block.shape[0] < need:  # a layer seen for the first time: grow the open block
            block = self.open[k] = np.concatenate([block, np.full((need - block.shape[0], self.width), np.nan,
                                                                  dtype=np.float32)])
        return block

    def _close(self, k: int) -> None:
        block = self.open.pop(k)
        seen = ~np.isnan(block).all(axis=1)
        top, mid = np.full(block.shape[0], np.nan, np.float32), np.full(block.shape[0], np.nan, np.float32)
        if seen.any():
            part = block[seen]
            # inf is marked on the steps charts; in a cell it would hide the colour scale: the max is the finite max
            finite = np.where(np.isfinite(part), part, -np.inf).max(axis=1)
            top[seen] = np.where(np.isfinite(finite), finite, np.nan)
            gaps = np.isnan(part).any(axis=1)  # a layer that missed a step of the bin (no gradient)
            middle = np.empty(len(part), dtype=np.float32)
            middle[~gaps] = _middle(part[~gaps])
            middle[gaps] = np.nanmedian(part[gaps], axis=1) if gaps.any() else middle[gaps]
            mid[seen] = middle
        self.done[k] = (top, mid)

    def finish(self, optimizer: int) -> HeatMap:
        for k in list(self.open):
            self._close(k)
        n_layers = len(self.layer_ids)
        top = np.full((n_layers, self.n_bins), np.nan, np.float32)
        mid = np.full((n_layers, self.n_bins), np.nan, np.float32)
        for k, (t, m) in self.done.items():
            top[: len(t), k], mid[: len(m), k] = t, m
        names = sorted(self.layer_ids, key=self.layer_ids.__getitem__)
        return HeatMap(optimizer, names, self.first_step, self.width, top, mid)


def _middle(rows: np.ndarray) -> np.ndarray:
    """Each row's median: its middle value, the upper of the two middle ones for an even count.

    One partition per row (np.median makes two for an even count, and this pass is the heat map's
    largest cost); at the thousands of steps of a bin the two middle values are all but equal.
    """
    middle = rows.shape[1] // 2
    return np.partition(rows, middle, axis=1)[:, middle]


class HeatMaps:
    """The heat maps of several optimizers, fed record batches of the layers table one at a time.

    A batch holds the columns ``step``, ``layer`` and ``norm``, and ``optimizer`` unless the run has one
    optimizer. :func:`heat_maps` feeds it from a pass of its own; the report feeds it the batches of
    recommend's pass instead, so the layers table is read once.
    """

    def __init__(self, run: Run, step_ranges: dict[int, tuple[int, int]], max_bins: int = MAX_BINS) -> None:
        self.bins = {}
        for k, (first, last) in step_ranges.items():
            width = max(1, -(-(last - first + 1) // max_bins))
            names = next((o.names for o in run.meta.optimizers if o.index == k), ())
            self.bins[k] = _Bins(first, width, -(-(last - first + 1) // width),
                                 {n: i for i, n in enumerate(dict.fromkeys(names))})
        self.fed = False

    def accepts(self, columns: list[str]) -> bool:
        """Whether batches of these columns carry what the heat maps need."""
        return {"step", "layer", "norm"} <= set(columns) and ("optimizer" in columns or len(self.bins) == 1)

    def add(self, batch: pa.RecordBatch) -> None:
        """Add one record batch (see the class)."""
        self.fed = True
        names = batch.schema.names
        for k, b in self.bins.items():
            rows = batch.filter(pc.equal(batch.column("optimizer"), k)) if "optimizer" in names else batch
            if rows.num_rows == 0:
                continue
            norm = rows.column("norm").to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            b.add(rows.column("step").to_numpy(zero_copy_only=False), _layer_ids(rows.column("layer"), b.layer_ids),
                  norm)

    def finish(self) -> dict[int, HeatMap]:
        """The heat maps, one per optimizer."""
        return {k: b.finish(k) for k, b in self.bins.items()}


def heat_maps(run: Run, step_ranges: dict[int, tuple[int, int]], max_bins: int = MAX_BINS,
              batch_rows: int = BATCH_ROWS) -> dict[int, HeatMap]:
    """One :class:`HeatMap` per optimizer of ``step_ranges`` (first and last step), from one pass.

    Rows are the layers in the optimizer's parameter order (meta.json), then any other layer in
    the order first seen.
    """
    maps = HeatMaps(run, step_ranges, max_bins)
    single = len(run.meta.optimizers) <= 1 and len(step_ranges) == 1  # one column less to read
    for batch in run.iter_batches("layers", ["step", "layer", "norm"] if single else
                                  ["step", "optimizer", "layer", "norm"], batch_rows):
        maps.add(batch)
    return maps.finish()


def _layer_ids(column: pa.Array, ids: dict[str, int]) -> np.ndarray:
    """Each row's layer as an index into ``ids``; a name seen for the first time is added at the end."""
    if not isinstance(column.type, pa.DictionaryType):
        column = pc.dictionary_encode(column)
    names = column.dictionary.to_pylist()  # the batch's few distinct names: the rows stay in Arrow
    codes = column.indices.to_numpy(zero_copy_only=False)
    if all(name in ids for name in names):  # the usual batch: every name known, no pass over the rows to count
        lookup = np.array([ids[name] for name in names], dtype=np.int64)
        return codes if np.array_equal(lookup, np.arange(len(names))) else lookup[codes]
    # A filtered column keeps the whole dictionary (the other optimizer's names too): add only names in use.
    present = np.bincount(codes, minlength=len(names)) > 0
    lookup = np.zeros(len(names), dtype=np.int64)
    for code in np.flatnonzero(present):
        lookup[code] = ids.setdefault(names[code], len(ids))
    return lookup[codes]
