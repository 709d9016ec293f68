"""The layers table: one streaming pass over a table that can hold 10^8 rows.

Per optimizer, :func:`scan_layers` keeps only what the analysis needs: the float32 norms of the
used steps (for per-layer statistics) and every layer's norm at a few steps of interest (the largest
spikes, the first non-finite step). The table is read in record batches of ``batch_rows`` rows, so
memory stays bounded whatever the run's length; the result does not depend on the batch size.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradscope.errors import RunFormatError
from gradscope.recommend.model import LayerStats
from gradscope.recommend.steps import rank_rows
from gradscope.stats import percentile_of_sorted
from gradscope.store import Run

#: Rows per record batch of the layers stream: ~12 MB of columns at a time.
LAYER_BATCH_ROWS = 1 << 20


@dataclass
class LayerPlan:
    """What the layers pass keeps for one optimizer."""

    use: np.ndarray  # indexed by step: the step counts toward per-layer distributions
    interest_steps: np.ndarray  # keep every layer's norm at these few steps (spikes, first non-finite)
    n_used: int  # used steps: the most columns the per-layer matrix can need
    percentile: float  # the per-layer threshold's percentile


@dataclass
class LayerData:
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

    def __init__(self, plan: LayerPlan) -> None:
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
        self.matrix = _ordinary_pages_matrix(len(block), self.plan.n_used)
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


def _ordinary_pages_matrix(rows: int, columns: int) -> np.ndarray:
    """A float32 (rows, columns) matrix on ordinary pages, whatever numpy's huge-page advice.

    numpy asks the kernel for transparent huge pages for every array of 4 MB or more. Where the
    kernel's THP defrag setting is "madvise" (a common default), each such page fault compacts
    memory synchronously: on a busy machine that cost ~1.2 s of system time for a 400 MB matrix,
    against 0.2 s on ordinary pages (measured). An anonymous mapping carries no such advice, and only
    this array is affected: numpy's own switch would change every allocation of the process.
    """
    nbytes = rows * columns * np.dtype(np.float32).itemsize
    if nbytes == 0:
        return np.empty((rows, columns), dtype=np.float32)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.float32).reshape(rows, columns)


def scan_layers(run: Run, plans: dict[int, LayerPlan], single: bool,
                batch_rows: int = LAYER_BATCH_ROWS, rank: int | None = None) -> dict[int, LayerData]:
    """Stream the layers table once: per-layer norm samples of used steps, all norms of steps of interest.

    Args:
        run: the run whose layers table is read.
        plans: per optimizer index, what to keep (see :class:`LayerPlan`).
        single: the run has one optimizer, so the layers' optimizer column need not be read.
        rank: a job's rank whose rows are read (a single process's table has no ``rank``).
        batch_rows: rows per record batch; bounds memory, never changes the result.

    Raises:
        RunFormatError: the layers table cannot be read.
    """
    names: dict[str, int] = {}  # layer name -> id, in order of first appearance (parameter order)
    collectors = {k: _LayerCollector(plan) for k, plan in plans.items()}
    for step, opt, ids, norm in _layer_batches(run, names, single, batch_rows, rank):
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
        result[k] = LayerData(_layer_stats(samples, id_to_name, plans[k]), _group_by_step(collector.picked, id_to_name))
        collector.matrix = None  # free each optimizer's norms as soon as its stats are done
    return result


def _layer_batches(run: Run, names: dict[str, int], single: bool, batch_rows: int,
                   rank: int | None) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]]:
    """(step, optimizer or None, layer id, norm) arrays per record batch, reading only what is needed."""
    columns = ["step", "layer", "norm"] if single else ["step", "optimizer", "layer", "norm"]
    try:
        run.read_table("layers", columns=[])  # reads no data: checks it is a gradscope file of a known schema
        for batch in run.iter_batches("layers", columns, batch_size=batch_rows):
            batch = rank_rows(batch, rank)  # a job's table: one rank's rows (each holds the combined norms)
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
                 plan: LayerPlan) -> tuple[LayerStats, ...]:
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

