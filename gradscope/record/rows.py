"""Step rows on device: what one recorded optimizer step costs until the next flush.

A step costs one small device vector (its norms and its loss, written by the read itself into a
preallocated row) and a few Python fields here. Nothing here reads a device value: the rows wait in
the :class:`StepBuffer` until a flush hands them to :mod:`gradscope.record.columns`, which copies
them to the host in one transfer (the only host synchronisation the recorder makes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from gradscope.record.layouts import Slot

# The rare per-step device scalars a row may carry (Row.more), and their value when absent.
MORE_DEFAULTS: dict[str, float] = {
    "grad_scale": 1.0,  # fused optimizer under GradScaler: the norms read are this many times too large
    "script_coef": 1.0,  # the script's clip_grad_norm_ scaled the grads by this before they were read
    "applied_coef": 1.0,  # the update used g_raw times this (an injected clip, a hand-written loop's clip)
    "g_applied": math.nan,  # the applied global norm, when no single factor gives it (value or partial clips)
    "loss_scale": math.nan,
    "found_inf": 0.0,  # fused optimizer under GradScaler: > 0 when the kernel skipped the step
}


PART_CHUNK = 64  # rows whose part views RowBlocks makes at once


class RowBlocks:
    """Preallocated float32 device rows of one width: each step writes its values into the next row.

    Why: a step that allocates a small tensor and keeps it until the flush costs the tiny-MLP workload
    ~40 µs more than writing the same values into a row allocated in advance (bench/run.py, workload
    "mlp"; the allocator cannot reuse memory that is held). Blocks are never reused: a full block is
    left to the rows that point into it and freed with them after the flush, so a row measured before
    a flush and committed after it can never be overwritten.
    """

    def __init__(self, sizes: list[int], device: torch.device, rows_per_block: int = 1024) -> None:
        self.sizes = list(sizes)  # the widths of a row's parts (NormPlan.part_sizes)
        self.width = sum(self.sizes)
        self.device = device
        self.rows_per_block = rows_per_block
        self._block: torch.Tensor | None = None
        self._rows: tuple[torch.Tensor, ...] = ()
        self._parts: list[tuple[torch.Tensor, ...]] = []  # the part views of the current chunk of rows
        self._next = 0

    def claim(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, int]:
        """The next free row: (the row's view, the views of its parts, its block, its index in the block)."""
        if self._next == len(self._rows):
            self._block = torch.empty((self.rows_per_block, self.width), dtype=torch.float32, device=self.device)
            self._rows = self._block.unbind(0)  # one C++ call for all the row views of the block
            self._next = 0
        i = self._next
        self._next += 1
        row = self._rows[i]
        if len(self.sizes) == 1:  # one part (no stacked groups): the row itself
            return row, (row,), self._block, i  # type: ignore[return-value]
        if i % PART_CHUNK == 0:
            # The part views of the next PART_CHUNK rows in two C++ calls per part (split, unbind): half the
            # cost of a split per step (8.7 vs 17 µs a step with three parts). A chunk, not a block: with
            # 30 groups a block's views would hold 20 MB.
            chunk = self._block[i:i + PART_CHUNK]  # type: ignore[index]
            self._parts = list(zip(*(part.unbind(0) for part in chunk.split(self.sizes, dim=1)), strict=True))
        return row, self._parts[i % PART_CHUNK], self._block, i  # type: ignore[return-value]


@dataclass(slots=True)
class Row:
    """One optimizer step being recorded; its device values stay on device until the flush."""

    slot: Slot  # the optimizer index, its names and its step counter
    values: torch.Tensor  # 1-D float: the gradient norms read this step and the loss, in `cols` order
    cols: np.ndarray  # the column of each value: a parameter index 0..P-1, or P for the loss
    block: torch.Tensor | None = None  # the RowBlocks block `values` is a row of, if any
    pos: int = 0  # that row's index in the block
    more: dict[str, torch.Tensor] | None = None  # 0-dim device scalars keyed as MORE_DEFAULTS
    max_abs: tuple[torch.Tensor, np.ndarray] | None = None  # value clipping: pre-clip max |g|, and their params
    skipped: bool = False
    n_backward: int = 0
    lr: Any = None  # float, or a tensor for capturable optimizers
    max_norm: float | None = None
    clip_source: str = "none"
    step: int = 0
    time_s: float = 0.0

    def attach(self, key: str, value: torch.Tensor) -> None:
        """Keep a 0-dim device scalar (a key of MORE_DEFAULTS) with this row (a DTensor's local value: the
        flush concatenates plain tensors)."""
        local = getattr(value, "_local_tensor", None)
        if isinstance(local, torch.Tensor):
            value = local
        if self.more is None:
            self.more = {}
        self.more[key] = value


class StepBuffer:
    """Rows committed and not yet written, oldest first."""

    def __init__(self) -> None:
        self._rows: list[Row] = []
        #: Queue one committed step: the list's own append, bound once (the recorder calls it every step).
        self.append = self._rows.append

    @property
    def pending(self) -> int:
        """Number of rows not yet written."""
        return len(self._rows)

    def take(self) -> list[Row]:
        """Every pending row, oldest first; the buffer is empty afterwards (the same list, so ``append`` stays bound)."""
        rows = self._rows.copy()
        self._rows.clear()
        return rows
