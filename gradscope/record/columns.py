"""Host-side encoding of step rows: one device-to-host copy per flush, then Arrow columns for the store.

At a flush the device values of all pending rows are concatenated and copied to the host in one
transfer (the recorder's only host synchronisation); everything derived (the global norm, the
pre-clip norms under the script's clipping, the clip coefficient) is computed here, in float64
numpy, instead of as extra device ops on every step. Columns are built from buffers, never from
Python objects one at a time (see :func:`_numeric`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from gradscope.record.rows import MORE_DEFAULTS, Row


def encode(rows: list[Row]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("steps", columns) and ("layers", columns) per optimizer slot of ``rows``: one part each, since
    each optimizer has its own tensor count. Reads the rows' device values (a host sync: flush time only)."""
    by_slot: dict[int, list[Row]] = {}
    for row in rows:
        by_slot.setdefault(row.slot.index, []).append(row)
    for slot_rows in by_slot.values():
        step_cols, layer_cols = _columns(slot_rows)
        yield "steps", step_cols
        yield "layers", layer_cols


@dataclass
class _Decoded:
    """The device values of N rows of one slot, on the host."""

    values: np.ndarray  # (N, P + 1) float64: the P norms as read, then the loss; NaN where not read
    present: np.ndarray  # (N, P) bool: the parameter had a gradient (its norm was read)
    more: dict[str, np.ndarray]  # MORE_DEFAULTS key -> (N,) float64
    max_abs: np.ndarray  # (N, P) float64: pre-clip max |g| on steps clipped by value
    max_abs_set: np.ndarray  # (N, P) bool: max_abs was read (null in the table otherwise)


def _to_host(rows: list[Row]) -> tuple[np.ndarray, list[tuple[list[int], np.ndarray]], list[tuple[int, str]]]:
    """All device values of ``rows`` in one device-to-host copy (the flush's one host sync).

    Returns the flat float64 values and, for each chunk of them, (the rows it holds, the rows' offsets
    into the flat values): one chunk per preallocated block (the rows' span of it),
    one per row not in a block; then (row, key) of every ``more`` scalar, in order, after them. A row's
    ``max_abs`` vector is its own chunk, keyed ``(row, "max_abs")`` in that list, before the scalars.
    """
    device = rows[0].values.device
    pieces: list[torch.Tensor] = []
    chunks: list[tuple[list[int], np.ndarray]] = []
    start = 0
    by_block: dict[int, tuple[torch.Tensor, list[int]]] = {}
    for i, row in enumerate(rows):
        if row.block is not None:
            by_block.setdefault(id(row.block), (row.block, []))[1].append(i)
        else:
            pieces.append(row.values if row.values.device == device else row.values.to(device))
            chunks.append(([i], np.array([start])))
            start += row.cols.size
    for block, members in by_block.values():
        pos = np.array([rows[i].pos for i in members], dtype=np.int64)
        lo, hi, width = int(pos.min()), int(pos.max()) + 1, block.shape[1]
        pieces.append(block[lo:hi].reshape(-1).to(device))
        chunks.append((members, start + (pos - lo) * width))
        start += (hi - lo) * width
    tail: list[tuple[int, str]] = []
    for i, row in enumerate(rows):  # value clipping only: one vector per row, before the scalars
        if row.max_abs is not None:
            tail.append((i, "max_abs"))
            pieces.append(row.max_abs[0].detach().reshape(-1).to(device, torch.float32))
    for i, row in enumerate(rows):
        if row.more:
            for key, value in row.more.items():
                tail.append((i, key))
                pieces.append(value.detach().reshape(1).to(device, torch.float32))
    flat = torch.cat(pieces).cpu()
    return flat.numpy().astype(np.float64), chunks, tail


def _decode(rows: list[Row], p: int) -> _Decoded:
    """Place each row's values in its columns (vectorised per block and per column layout)."""
    flat, chunks, tail = _to_host(rows)
    n = len(rows)
    values = np.full((n, p + 1), np.nan)
    read = np.zeros((n, p + 1), dtype=bool)
    loose: dict[int, tuple[np.ndarray, list[int], list[int]]] = {}  # rows not in a block, by column layout
    for members, offsets in chunks:
        cols = rows[members[0]].cols  # the rows of one block share its column layout
        if len(members) == 1:
            group = loose.setdefault(id(cols), (cols, [], []))
            group[1].append(members[0])
            group[2].append(int(offsets[0]))
        else:
            _place(values, read, flat, cols, np.asarray(members), offsets)
    for cols, members, offsets in loose.values():
        _place(values, read, flat, cols, np.asarray(members), np.asarray(offsets))
    more = {key: np.full(n, default) for key, default in MORE_DEFAULTS.items()}
    max_abs, max_abs_set = np.full((n, p), np.nan), np.zeros((n, p), dtype=bool)
    vectors = [(i, rows[i].max_abs[1]) for i, key in tail if key == "max_abs"]  # type: ignore[index]
    start = flat.size - (len(tail) - len(vectors)) - sum(cols.size for _, cols in vectors)
    for i, cols in vectors:
        ok = cols >= 0  # -1: a param outside the row's layout
        max_abs[i, cols[ok]] = flat[start:start + cols.size][ok]  # a param given twice: the last value placed
        max_abs_set[i, cols[ok]] = True
        start += cols.size
    for i, key in tail[len(vectors):]:
        more[key][i] = flat[start]
        start += 1
    return _Decoded(values, read[:, :p], more, max_abs, max_abs_set)


def _place(values: np.ndarray, read: np.ndarray, flat: np.ndarray, cols: np.ndarray, members: np.ndarray,
           offsets: np.ndarray) -> None:
    """Rows ``members``, whose values start at ``offsets`` in ``flat``, go to their columns ``cols``."""
    width = cols.size
    if width and cols.max() == width - 1:  # the first `width` columns, permuted (the planned read): a gather
        values[members, :width] = flat[offsets[:, None] + np.argsort(cols)]  # 5x faster than the scatter below
        read[members, :width] = True
        return
    take = offsets[:, None] + np.arange(width)
    values[members[:, None], cols[None, :]] = flat[take]
    read[members[:, None], cols[None, :]] = True


def _norms(decoded: _Decoded, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pre-clip per-tensor norms (N, P), and the global pre-clip and applied norms (N,) each.

    The global norm is ``get_total_norm``'s: the L2 norm of the per-tensor norms, here in float64.
    """
    more = decoded.more
    # inf and NaN are data here (an AMP overflow step clipped by 0): numpy must not warn on the user's stderr.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        per = decoded.values[:, :p] / (more["grad_scale"] * more["script_coef"])[:, None]
        g_raw = np.sqrt(np.sum(np.where(decoded.present, per, 0.0) ** 2, axis=1))
        g_raw[~decoded.present.any(axis=1)] = np.nan  # no gradient at all: no norm
        g_applied = g_raw * more["script_coef"] * more["applied_coef"]
    explicit = ~np.isnan(more["g_applied"])
    g_applied[explicit] = more["g_applied"][explicit]
    return per, g_raw, g_applied


def _numeric(values: Any, dtype: Any, arrow_type: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    """An arrow column made from its buffers, ``valid`` False where it is null.

    Never ``pa.array()``: its first call imports pandas (about 45 MB of resident memory in the user's
    training process) and it converts Python objects one at a time.
    """
    data = np.ascontiguousarray(values, dtype=dtype)
    if arrow_type == pa.bool_():
        buffer = pa.py_buffer(np.packbits(data, bitorder="little"))
    else:
        buffer = pa.py_buffer(data)
    nulls = 0 if valid is None else int(len(valid) - np.count_nonzero(valid))
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(arrow_type, len(data), [bitmap, buffer], null_count=nulls)


def _string_array(encoded: list[bytes]) -> pa.Array:
    """A plain string column from its UTF-8 values, made from buffers (see :func:`_numeric`)."""
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(encoded), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


def _strings(values: list[str]) -> pa.Array:
    """A string column of few distinct values. Never ``Array.cast``: its first call loads arrow's compute
    kernels, ~0.1 s in the user's training process at the first flush."""
    encoded = {v: v.encode("utf-8") for v in set(values)}
    return _string_array([encoded[v] for v in values])


@functools.lru_cache(maxsize=64)
def _layer_names(names: tuple[str, ...]) -> pa.Array:
    """The layer names of one optimizer as the dictionary of the layers column: made once, not per flush
    (encoding 400 names cost ~0.3 ms a flush)."""
    return _string_array([name.encode("utf-8") for name in names])


def _columns(rows: list[Row]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The steps and layers columns of ``rows``, all of one optimizer slot."""
    slot = rows[0].slot
    p = len(slot.names)
    decoded = _decode(rows, p)
    per, g_raw, g_applied = _norms(decoded, p)
    loss, loss_scale, found_inf = decoded.values[:, p], decoded.more["loss_scale"], decoded.more["found_inf"]
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.where(g_raw > 0, g_applied / g_raw, 1.0)
    skipped = np.array([r.skipped for r in rows], dtype=bool) | (found_inf > 0)
    has_grad = decoded.present.any(axis=1)  # False: the optimizer stepped with no gradient at all (no_grad)
    n = len(rows)
    step = np.array([r.step for r in rows], dtype=np.int64)
    max_norm = [r.max_norm for r in rows]
    max_norm_valid = np.array([m is not None for m in max_norm], dtype=bool)
    steps = {
        "step": _numeric(step, np.int64, pa.int64()),
        "optimizer": _numeric(np.full(n, slot.index), np.int16, pa.int16()),
        "grad_norm": _numeric(g_raw, np.float64, pa.float64(), has_grad),  # null: no gradient at all
        "applied_norm": _numeric(g_applied, np.float64, pa.float64(), has_grad),
        "max_norm": _numeric([0.0 if m is None else m for m in max_norm], np.float64, pa.float64(), max_norm_valid),
        "clip_source": _strings([r.clip_source for r in rows]),
        "clip_coef": _numeric(coef, np.float64, pa.float64()),
        "loss": _numeric(loss, np.float64, pa.float64(), ~np.isnan(loss)),  # NaN: no loss this step (null)
        "n_backward": _numeric([r.n_backward for r in rows], np.int32, pa.int32()),
        "lr": _numeric([_host_float(r.lr) for r in rows], np.float64, pa.float64()),
        "loss_scale": _numeric(loss_scale, np.float64, pa.float64(), ~np.isnan(loss_scale)),
        "skipped": _numeric(skipped, bool, pa.bool_()),
        "nonfinite": _numeric(~np.isfinite(g_raw) & has_grad, bool, pa.bool_()),
        "time_s": _numeric([r.time_s for r in rows], np.float64, pa.float64()),
    }
    if slot.shard_weights is not None:  # a rank of a sharded optimizer: what the reader combines the ranks by
        shard_sq, whole_sq = _shard_sums(per, decoded.present, _weights(slot.shard_weights))
        steps["shard_sq"] = _numeric(shard_sq, np.float64, pa.float64(), has_grad)
        steps["whole_sq"] = _numeric(whole_sq, np.float64, pa.float64(), has_grad)
    layers = {
        "step": _numeric(np.repeat(step, p), np.int64, pa.int64()),
        "optimizer": _numeric(np.full(n * p, slot.index), np.int16, pa.int16()),
        # One index per row and the names once: converting n*p Python strings was most of a flush on
        # models with many tensors. The column written is the same string column.
        "layer": pa.DictionaryArray.from_arrays(_numeric(np.tile(np.arange(p, dtype=np.int32), n), np.int32, pa.int32()),
                                                _layer_names(tuple(slot.names))),
        "norm": _numeric(np.where(decoded.present, per, np.nan).reshape(-1), np.float32, pa.float32()),
        "max_abs": _numeric(decoded.max_abs.reshape(-1), np.float32, pa.float32(), decoded.max_abs_set.reshape(-1)),
    }
    return steps, layers


@functools.lru_cache(maxsize=64)
def _weights(shard_weights: tuple[int | None, ...]) -> np.ndarray:
    """The shard weights as floats, NaN for a whole tensor: made once per optimizer, not per flush."""
    return np.array([np.nan if w is None else float(w) for w in shard_weights])


def _shard_sums(per: np.ndarray, present: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, sum(weight * norm^2) over the sharded columns and sum(norm^2) over the whole ones, from the
    norms the row already holds (the same device read as grad_norm: no extra device op or host sync)."""
    with np.errstate(invalid="ignore", over="ignore"):
        sq = np.where(present, per, 0.0) ** 2
        return sq[:, weights == 1].sum(axis=1), sq[:, np.isnan(weights)].sum(axis=1)  # weights are 1, 0 or NaN


def _host_float(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0])  # at flush time only
    return float(value)
