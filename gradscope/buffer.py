"""Pending step rows, kept on device, turned into store columns once per flush.

A step costs a few list appends here. The device values of all pending steps are stacked and copied
to the host in one transfer per flush: the only host synchronisation the recorder makes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch


@dataclass(slots=True)
class Row:
    """One optimizer step being recorded. Tensors are float32 0-dim (per_tensor: (P,)) on one device."""

    slot: Any  # recorder._Slot: the optimizer index, its names and its step counter
    per_tensor: torch.Tensor  # (P,) pre-clip norms, NaN where a param had no grad
    g_raw: torch.Tensor  # global pre-clip norm
    g_applied: torch.Tensor  # global norm after clipping
    loss: torch.Tensor | None = None
    loss_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None  # fused optimizer under GradScaler: skipped inside the kernel
    skipped: bool = False
    n_backward: int = 0
    lr: Any = None  # float, or a tensor for capturable optimizers
    max_norm: float | None = None
    clip_source: str = "none"
    step: int = 0
    time_s: float = 0.0


def _host_float(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0])  # at flush time only
    return float(value)


class StepBuffer:
    """Rows waiting for the next flush, grouped by optimizer slot at drain time."""

    def __init__(self) -> None:
        self._rows: list[Row] = []

    @property
    def pending(self) -> int:
        """Number of rows not yet written."""
        return len(self._rows)

    def add(self, row: Row) -> None:
        """Queue one committed step."""
        self._rows.append(row)

    def drain(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ("steps", columns) and ("layers", columns) for every pending row, then forget them."""
        rows, self._rows = self._rows, []
        if not rows:
            return
        by_slot: dict[int, list[Row]] = {}
        for row in rows:
            by_slot.setdefault(row.slot.index, []).append(row)
        for slot_rows in by_slot.values():  # one part per optimizer: each has its own tensor count
            step_cols, layer_cols = _columns(slot_rows)
            yield "steps", step_cols
            yield "layers", layer_cols


def _device_values(rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    """All device values of ``rows`` in one host copy: (N, P) per-tensor norms and (N, 5) scalars.

    Only the tensors a row holds are stacked: a missing loss, loss scale or found_inf is filled in on
    the host (NaN, NaN, 0.0, as the device placeholders were), and an unclipped row's applied norm,
    the same tensor as its raw norm, is copied from it. Fewer 0-dim tensors to stack per flush.
    """
    device = rows[0].per_tensor.device
    n = len(rows)
    scal = np.empty((n, 5), dtype=np.float64)
    scal[:, 2:4] = np.nan  # loss, loss_scale
    scal[:, 4] = 0.0  # found_inf
    tensors: list[torch.Tensor] = []
    where: list[int] = []  # flat index into scal of each stacked tensor
    same: list[int] = []  # rows whose applied norm is their raw norm (no clipping)
    for i, row in enumerate(rows):
        base = 5 * i
        tensors.append(row.g_raw)
        where.append(base)
        if row.g_applied is row.g_raw:
            same.append(i)
        else:
            tensors.append(row.g_applied)
            where.append(base + 1)
        if row.loss is not None:
            tensors.append(row.loss)
            where.append(base + 2)
        if row.loss_scale is not None:
            tensors.append(row.loss_scale)
            where.append(base + 3)
        if row.found_inf is not None:
            tensors.append(row.found_inf)
            where.append(base + 4)
    tensors = [s if s.device == device else s.to(device) for s in tensors]
    per = torch.stack([r.per_tensor if r.per_tensor.device == device else r.per_tensor.to(device) for r in rows])  # (N, P)
    flat = torch.cat([per.reshape(-1), torch.stack(tensors)]).cpu()  # the flush's one host sync
    p = per.shape[1]
    scal.reshape(-1)[where] = flat[n * p :].numpy()
    scal[same, 1] = scal[same, 0]
    return flat[: n * p].numpy().reshape(n, p), scal


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


def _strings(values: list[str] | np.ndarray, dictionary: list[str] | None = None) -> pa.Array:
    """A string column: int32 indices into ``dictionary`` (or the distinct values), cast to plain strings."""
    if dictionary is None:
        dictionary = sorted(set(values))
        where = {v: i for i, v in enumerate(dictionary)}
        values = [where[v] for v in values]
    encoded = [v.encode("utf-8") for v in dictionary]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    names = pa.Array.from_buffers(pa.string(), len(encoded), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])
    indices = _numeric(values, np.int32, pa.int32())
    return pa.DictionaryArray.from_arrays(indices, names).cast(pa.string())


def _columns(rows: list[Row]) -> tuple[dict[str, Any], dict[str, Any]]:
    per, scal = _device_values(rows)
    g_raw, g_applied, loss, loss_scale, found_inf = scal.T
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.where(g_raw > 0, g_applied / g_raw, 1.0)
    skipped = np.array([r.skipped for r in rows], dtype=bool) | (found_inf > 0)
    slot = rows[0].slot
    n, p = per.shape
    step = np.array([r.step for r in rows], dtype=np.int64)
    max_norm = [r.max_norm for r in rows]
    max_norm_valid = np.array([m is not None for m in max_norm], dtype=bool)
    steps = {
        "step": _numeric(step, np.int64, pa.int64()),
        "optimizer": _numeric(np.full(n, slot.index), np.int16, pa.int16()),
        "grad_norm": _numeric(g_raw, np.float64, pa.float64()),
        "applied_norm": _numeric(g_applied, np.float64, pa.float64()),
        "max_norm": _numeric([0.0 if m is None else m for m in max_norm], np.float64, pa.float64(), max_norm_valid),
        "clip_source": _strings([r.clip_source for r in rows]),
        "clip_coef": _numeric(coef, np.float64, pa.float64()),
        "loss": _numeric(loss, np.float64, pa.float64(), ~np.isnan(loss)),  # NaN: no loss this step (null)
        "n_backward": _numeric([r.n_backward for r in rows], np.int32, pa.int32()),
        "lr": _numeric([_host_float(r.lr) for r in rows], np.float64, pa.float64()),
        "loss_scale": _numeric(loss_scale, np.float64, pa.float64(), ~np.isnan(loss_scale)),
        "skipped": _numeric(skipped, bool, pa.bool_()),
        "nonfinite": _numeric(~np.isfinite(g_raw), bool, pa.bool_()),
        "time_s": _numeric([r.time_s for r in rows], np.float64, pa.float64()),
    }
    layers = {
        "step": _numeric(np.repeat(step, p), np.int64, pa.int64()),
        "optimizer": _numeric(np.full(n * p, slot.index), np.int16, pa.int16()),
        # One index per row and the names once: converting n*p Python strings was most of a flush on
        # models with many tensors. The column written is the same string column.
        "layer": _strings(np.tile(np.arange(p, dtype=np.int32), n), list(slot.names)),
        "norm": _numeric(per.reshape(-1), np.float32, pa.float32()),
    }
    return steps, layers
