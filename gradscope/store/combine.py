"""The ranks of a distributed job read as one table: the ``rank`` column, and the true norms of sharded models.

Each rank of a job records its own run with no collective (docs/distributed.md). An optimizer whose
parameters are sharded (FSDP, tensor parallel) has, on each rank, only its pieces' norms; meta.json
says so per optimizer (``norm_scope``) and per tensor (``shard_weights``: 1 counts, 0 is a duplicate
piece, null is a whole tensor). This module combines them, vectorised (numpy), torch-free:

- steps: ``grad_norm = sqrt(whole_sq of the row's own rank + sum over ranks of shard_sq)``, and
  ``applied_norm = grad_norm * clip_coef``;
- layers: a sharded tensor's ``norm = sqrt(sum over ranks of weight * norm^2)``; whole tensors keep
  each rank's own value.

The combined value goes on every rank's row. A step that not every rank of the optimizer recorded (a
rank that died early) cannot be combined: its combined values are null, never a partial sum. Optimizers
whose pieces cannot be combined (``rank-local``) keep each rank's values.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradscope.store.meta import RunMeta

#: The joined table's schema metadata key holding {optimizer index: norm scope} as JSON.
SCOPES_KEY = b"gradscope.norm_scopes"
#: Relative spread of replicated norms across ranks beyond which the ranks did not hold the same gradients.
AGREEMENT_TOLERANCE = 1e-5

PerRank = Sequence[tuple[int, RunMeta, pa.Table]]


def job_scopes(metas: Sequence[RunMeta]) -> dict[int, str]:
    """Each optimizer index's scope over the job's ranks: ``rank-local`` if any rank says so, else ``sharded``
    if any does, else ``global`` (a single-process run, with no scope recorded, is global)."""
    scopes: dict[int, str] = {}
    order = {"global": 0, "sharded": 1, "rank-local": 2}
    for meta in metas:
        for opt in meta.optimizers:
            scope = opt.norm_scope or "global"
            if order[scope] >= order[scopes.get(opt.index, "global")]:
                scopes[opt.index] = scope
    return scopes


def join_ranks(kind: str, per_rank: PerRank) -> pa.Table:
    """Every rank's rows of table ``kind`` ("steps" or "layers") with a ``rank`` column (int32), the norms of
    sharded optimizers replaced by the combined ones on every rank's row (see the module docstring)."""
    ordered = sorted(per_rank, key=lambda item: item[0])
    if not ordered:
        raise ValueError("join_ranks needs at least one rank")
    sharded = {k for k, scope in job_scopes([meta for _, meta, _ in ordered]).items() if scope == "sharded"}
    tables = [table for _, _, table in ordered]
    if sharded and len(ordered) > 1 and all(t.num_rows for t in tables):
        if kind == "steps" and all("shard_sq" in t.column_names for t in tables):
            tables = _combine_steps(ordered, sharded)
        elif kind == "layers" and all({"layer", "norm", "step", "optimizer"} <= set(t.column_names) for t in tables):
            tables = _combine_layers(ordered, sharded)
    out = [with_rank(t, rank) for (rank, _, _), t in zip(ordered, tables, strict=True)]
    schema = pa.unify_schemas([t.schema for t in out], promote_options="permissive")
    joined = pa.concat_tables([t.cast(schema) if t.schema != schema else t for t in out])
    scopes = job_scopes([meta for _, meta, _ in ordered])
    # the readers of the joined table (recommend) learn each optimizer's scope from it
    return joined.replace_schema_metadata({**(joined.schema.metadata or {}), SCOPES_KEY: json.dumps(scopes).encode()})


def _column(table: pa.Table, name: str, dtype: type = np.float64) -> np.ndarray:
    column = table.column(name)
    if pa.types.is_floating(column.type) or pa.types.is_null(column.type):
        return np.array(pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy(), dtype=dtype)  # writable
    return np.array(column.to_numpy(), dtype=dtype)


def _expected_ranks(ordered: PerRank, index: int) -> int:
    """How many ranks hold pieces of optimizer ``index``: those whose meta calls it sharded."""
    return sum(any(o.index == index and o.norm_scope == "sharded" for o in meta.optimizers) for _, meta, _ in ordered)


def _positions(keys: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The union of the ranks' step numbers and each rank's rows' positions in it."""
    union = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    return union, [np.searchsorted(union, k) for k in keys]


def _nulls(table: pa.Table, name: str) -> np.ndarray:
    return pc.is_null(table.column(name)).to_numpy(zero_copy_only=False).astype(bool)


def _combine_steps(ordered: PerRank, sharded: set[int]) -> list[pa.Table]:
    tables = [t for _, _, t in ordered]
    opt = [_column(t, "optimizer", np.int64) for t in tables]
    step = [_column(t, "step", np.int64) for t in tables]
    grad = [_column(t, "grad_norm") for t in tables]
    null = [_nulls(t, "grad_norm") for t in tables]
    applied = [_column(t, "applied_norm") for t in tables]
    for index in sorted(sharded):
        rows = [np.flatnonzero(o == index) for o in opt]
        union, pos = _positions([s[r] for s, r in zip(step, rows, strict=True)])
        total = np.zeros(len(union))
        count = np.zeros(len(union), dtype=np.int64)
        for t, r, p in zip(tables, rows, pos, strict=True):
            held = ~_nulls(t, "shard_sq")[r]  # null: no gradient on this rank at this step
            total += np.bincount(p[held], weights=_column(t, "shard_sq")[r][held], minlength=len(union))
            count += np.bincount(p[held], minlength=len(union))
        complete = count == _expected_ranks(ordered, index)
        for i, (t, r, p) in enumerate(zip(tables, rows, pos, strict=True)):
            with np.errstate(invalid="ignore"):
                grad[i][r] = np.sqrt(_column(t, "whole_sq")[r] + total[p])
            null[i][r] = _nulls(t, "whole_sq")[r] | ~complete[p]
            coef = _column(t, "clip_coef")[r]
            applied[i][r] = grad[i][r] * np.where(np.isnan(coef), 1.0, coef)
    out = []
    for t, g, a, n in zip(tables, grad, applied, null, strict=True):
        t = _replace(t, "grad_norm", pa.array(g, mask=n))  # not combinable: null, as a step without a gradient
        t = _replace(t, "applied_norm", pa.array(a, mask=n))
        if "nonfinite" in t.column_names:
            t = _replace(t, "nonfinite", pa.array(~np.isfinite(g) & ~n))
        out.append(t)
    return out


def _replace(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i).with_type(values.type), values)


def _layer_codes(table: pa.Table, names: Sequence[str]) -> np.ndarray:
    """Each row's layer as an index into ``names`` (-1: not one of them), from the dictionary when it is one."""
    lookup = pa.array(list(names), pa.string())
    codes = []
    for chunk in table.column("layer").chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = pc.dictionary_encode(chunk)
        mapping = pc.fill_null(pc.index_in(chunk.dictionary.cast(pa.string()), value_set=lookup), -1).to_numpy()
        indices = chunk.indices.to_numpy(zero_copy_only=False)
        # the recorder's dictionary is the names in order: the indices are the codes (no gather over the rows)
        identity = len(mapping) <= len(names) and np.array_equal(mapping, np.arange(len(mapping)))
        codes.append(indices if identity else mapping.astype(np.int32)[indices])
    return np.concatenate(codes).astype(np.int32, copy=False) if codes else np.zeros(0, dtype=np.int32)


def _weights(meta: RunMeta, index: int, names: Sequence[str]) -> np.ndarray:
    """This rank's weight per layer of optimizer ``index``, NaN for whole tensors, with a last entry (NaN)
    for rows of a layer the meta does not name."""
    opt = next((o for o in meta.optimizers if o.index == index), None)
    if opt is None or opt.shard_weights is None or tuple(opt.names) != tuple(names):
        return np.full(len(names) + 1, np.nan)
    return np.array([np.nan if w is None else float(w) for w in opt.shard_weights] + [np.nan])


def _floats32(table: pa.Table, name: str) -> np.ndarray:
    """A float column as a new writable float32 array (nulls as NaN), in one copy."""
    column = table.column(name)
    if column.null_count:
        column = pc.fill_null(column, np.nan)
    chunks = [c.to_numpy(zero_copy_only=False) for c in column.chunks]
    return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, dtype=np.float32)


def _rows_of(table: pa.Table, index: int) -> np.ndarray | slice:
    """The rows of optimizer ``index``: a slice when they are all of the table's (no index array to make)."""
    column = table.column("optimizer")
    bounds = pc.min_max(column)
    if bounds["min"].as_py() == index == bounds["max"].as_py() and not column.null_count:
        return slice(None)
    return np.flatnonzero(column.to_numpy(zero_copy_only=False) == index)


def _combine_layers(ordered: PerRank, sharded: set[int]) -> list[pa.Table]:
    tables = [t for _, _, t in ordered]
    norms = [_floats32(t, "norm") for t in tables]
    for index in sorted(sharded):
        names = next(o.names for _, meta, _ in ordered for o in meta.optimizers if o.index == index)
        rows = [_rows_of(t, index) for t in tables]
        weights = [_weights(meta, index, names) for _, meta, _ in ordered]
        views = [n[r] for n, r in zip(norms, rows, strict=True)]
        expected = _expected_ranks(ordered, index)
        if expected == len(ordered) and _dense(tables, rows, names):
            _combine_dense(views, weights, len(names))
        else:
            codes = [_layer_codes(t, names)[r] for t, r in zip(tables, rows, strict=True)]
            steps = [t.column("step").to_numpy()[r] for t, r in zip(tables, rows, strict=True)]
            _combine_sparse(views, weights, steps, codes, len(names), expected)
        for n, r, view in zip(norms, rows, views, strict=True):
            if not isinstance(r, slice):
                n[r] = view  # fancy-indexed rows were combined in a copy (a slice's view was combined in place)
    return [_replace(t, "norm", pa.array(n)) for t, n in zip(tables, norms, strict=True)]


def _tiled(table: pa.Table, names: Sequence[str]) -> bool:
    """Every row's layer is names[row % len(names)], checked chunk by chunk on the dictionary indices (no copy;
    the reader's chunks need not end on a step)."""
    width, offset = len(names), 0
    order = np.arange(width)
    lookup = pa.array(list(names), pa.string())
    tile = order
    for chunk in table.column("layer").chunks:
        if not pa.types.is_dictionary(chunk.type) or chunk.null_count:
            return False
        mapping = pc.fill_null(pc.index_in(chunk.dictionary.cast(pa.string()), value_set=lookup), -1).to_numpy()
        codes = chunk.indices.to_numpy()
        if not np.array_equal(mapping, order[:len(mapping)]):  # a row group's dictionary in another order
            codes = mapping[codes]
        if len(tile) < len(chunk) + width:
            tile = np.tile(order, len(chunk) // width + 2)
        start = offset % width
        if not np.array_equal(codes, tile[start:start + len(chunk)]):
            return False
        offset += len(chunk)
    return True


def _strided(column: pa.ChunkedArray, positions: np.ndarray) -> np.ndarray:
    """``column``'s values at the sorted ``positions``, chunk by chunk (no copy of the whole column)."""
    out = np.empty(len(positions), dtype=np.int64)
    start = 0
    for chunk in column.chunks:
        values = chunk.to_numpy(zero_copy_only=False)
        lo, hi = np.searchsorted(positions, [start, start + len(values)])
        out[lo:hi] = values[positions[lo:hi] - start]
        start += len(values)
    return out


def _dense(tables: list[pa.Table], rows: list[np.ndarray | slice], names: Sequence[str]) -> bool:
    """The recorder's layout: each rank's rows (all of its table's) are whole steps of the layers in the names'
    order, and every rank has the same steps; then the norms combine as (steps, layers) matrices."""
    width = len(names)
    first: np.ndarray | None = None
    for table, r in zip(tables, rows, strict=True):
        if not isinstance(r, slice) or width == 0 or len(table) % width or not _tiled(table, names):
            return False
        heads = _strided(table.column("step"), np.arange(0, len(table), width))
        tails = _strided(table.column("step"), np.arange(width - 1, len(table), width))
        first = heads if first is None else first
        if not (np.array_equal(heads, first) and np.array_equal(tails, first)):
            return False
    return True


def _combine_dense(views: list[np.ndarray], weights: list[np.ndarray], width: int) -> None:
    """Combine in place: each rank's sharded columns take sqrt(sum over ranks of weight * norm^2). Whole rows,
    masks broadcast over the layers: no column gathers (strided copies cost 3x these passes)."""
    mats = [v.reshape(-1, width) for v in views]
    acc = np.zeros(mats[0].shape, dtype=np.float32)
    seen = np.zeros(mats[0].shape, dtype=bool)
    scratch = np.empty_like(mats[0])  # one buffer for every rank: fresh pages cost more than the arithmetic
    for mat, w in zip(mats, weights, strict=True):
        held = ~np.isnan(mat)
        held &= w[:width] == 1
        seen |= held
        np.square(mat, out=scratch)
        np.copyto(scratch, np.float32(0), where=~held)
        acc += scratch
    np.sqrt(acc, out=acc)
    acc[~seen] = np.nan
    for mat, w in zip(mats, weights, strict=True):
        # weight 1 or 0: the tensor is sharded, whatever this rank holds of it
        np.copyto(mat, acc, where=~np.isnan(w[:width]))


def _combine_sparse(views: list[np.ndarray], weights: list[np.ndarray], steps: list[np.ndarray],
                    codes: list[np.ndarray], width: int, expected: int) -> None:
    """Combine in place, row by row, when the ranks' steps differ (a rank stopped early) or rows are out of order;
    a step not every rank recorded gets NaN."""
    union, pos = _positions(steps)
    cols = width + 1  # the last column: layers the meta does not name (left as they are)
    codes = [np.where(c < 0, width, c) for c in codes]
    acc = np.zeros(len(union) * cols)
    seen = np.zeros(len(union) * cols, dtype=bool)
    count = np.zeros(len(union), dtype=np.int64)
    for view, p, c, w in zip(views, pos, codes, weights, strict=True):
        counts = (w[c] == 1) & ~np.isnan(view)
        flat = p * cols + c
        acc += np.bincount(flat[counts], weights=view[counts].astype(np.float64) ** 2, minlength=acc.size)
        seen[flat[counts]] = True
        count[np.unique(p)] += 1
    combined = np.where(seen, np.sqrt(acc), np.nan)
    combined[np.repeat(count != expected, cols)] = np.nan
    for view, p, c, w in zip(views, pos, codes, weights, strict=True):
        piece = ~np.isnan(w[c])
        view[piece] = combined[(p * cols + c)[piece]]


def rank_disagreement(steps: pa.Table, scopes: dict[int, str]) -> dict[int, float]:
    """Per optimizer of a multi-rank steps table (with ``rank``), the largest relative spread across ranks of a
    value every rank should hold identically: ``grad_norm`` for global optimizers (DDP), ``sqrt(whole_sq)`` for
    sharded ones (their replicated tensors). Beyond :data:`AGREEMENT_TOLERANCE` the ranks' gradients differed
    (a setup bug: a parameter outside DDP, ranks fed different data under tensor parallelism)."""
    if "rank" not in steps.column_names or steps.num_rows == 0:
        return {}
    opt, step = _column(steps, "optimizer", np.int64), _column(steps, "step", np.int64)
    out: dict[int, float] = {}
    for index, scope in scopes.items():
        if scope == "rank-local":
            continue
        rows = np.flatnonzero(opt == index)
        if scope == "sharded":
            values = np.sqrt(_column(steps, "whole_sq")[rows]) if "whole_sq" in steps.column_names else None
        else:
            values = _column(steps, "grad_norm")[rows]
        if values is None or len(np.unique(_column(steps, "rank", np.int64)[rows])) < 2:
            continue
        out[index] = _max_spread(step[rows], values)
    return out


def _max_spread(step: np.ndarray, values: np.ndarray) -> float:
    """max over steps of (max - min) / max(|max|, |min|) across the rows of each step (finite values only)."""
    ok = np.isfinite(values)
    step, values = step[ok], values[ok]
    if not len(step):
        return 0.0
    order = np.lexsort((values, step))
    step, values = step[order], values[order]
    starts = np.flatnonzero(np.r_[True, step[1:] != step[:-1]])
    low, high = values[starts], values[np.r_[starts[1:], len(values)] - 1]
    scale = np.maximum(np.abs(low), np.abs(high))
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.where(scale > 0, (high - low) / scale, 0.0)
    return float(spread.max(initial=0.0))


def with_rank(table: pa.Table, rank: int) -> pa.Table:
    """``table`` with a constant ``rank`` column appended (replaced if present): a single process is rank 0."""
    if "rank" in table.column_names:
        table = table.drop_columns(["rank"])
    return table.append_column("rank", pa.repeat(pa.scalar(rank, pa.int32()), table.num_rows))
