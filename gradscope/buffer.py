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
import torch

from gradscope.measure import nan_on, zero_on


@dataclass
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
    """All device values of ``rows`` in one host copy: (N, P) per-tensor norms and (N, 5) scalars."""
    device = rows[0].per_tensor.device
    nan, zero = nan_on(device), zero_on(device)
    scalars = []
    for row in rows:
        found = row.found_inf if row.found_inf is not None else zero
        scalars += [row.g_raw, row.g_applied, row.loss if row.loss is not None else nan,
                    row.loss_scale if row.loss_scale is not None else nan, found]
    scalars = [s if s.device == device else s.to(device) for s in scalars]
    per = torch.stack([r.per_tensor.to(device) for r in rows])  # (N, P)
    flat = torch.cat([per.reshape(-1), torch.stack(scalars)]).cpu()  # the flush's one host sync
    n, p = per.shape
    return flat[: n * p].numpy().reshape(n, p), flat[n * p :].numpy().reshape(n, 5).astype(np.float64)


def _columns(rows: list[Row]) -> tuple[dict[str, Any], dict[str, Any]]:
    per, scal = _device_values(rows)
    g_raw, g_applied, loss, loss_scale, found_inf = scal.T
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.where(g_raw > 0, g_applied / g_raw, 1.0)
    skipped = np.array([r.skipped for r in rows]) | (found_inf > 0)
    slot = rows[0].slot
    steps = {
        "step": [r.step for r in rows],
        "optimizer": [slot.index] * len(rows),
        "grad_norm": g_raw,
        "applied_norm": g_applied,
        "max_norm": [r.max_norm for r in rows],
        "clip_source": [r.clip_source for r in rows],
        "clip_coef": coef,
        "loss": [None if math.isnan(v) else float(v) for v in loss],
        "n_backward": [r.n_backward for r in rows],
        "lr": [_host_float(r.lr) for r in rows],
        "loss_scale": [None if math.isnan(v) else float(v) for v in loss_scale],
        "skipped": skipped,
        "nonfinite": ~np.isfinite(g_raw),
        "time_s": [r.time_s for r in rows],
    }
    n, p = per.shape
    layers = {
        "step": np.repeat(np.asarray(steps["step"], dtype=np.int64), p),
        "optimizer": np.full(n * p, slot.index, dtype=np.int16),
        "layer": np.tile(np.asarray(slot.names, dtype=object), n),
        "norm": per.reshape(-1),
    }
    return steps, layers
