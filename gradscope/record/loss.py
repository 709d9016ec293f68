"""The loss window: what was backward'ed since the last recorded step, summed and unscaled, on device.

A window opens at the first backward after a record (or at the start) and closes when a step is
recorded; gradient accumulation (k backward calls per update) sums k losses into one. Nothing here
reads a device value: the sum stays a 0-dim device tensor until the flush copies it to the host.
"""

from __future__ import annotations

from typing import Any

import torch


class LossWindow:
    """The loss of the step being recorded (``total`` while ``ok``), its backward count and GradScaler's scale."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None  # 0-dim float32: the sum of the roots backward'ed in this window
        self.ok = True  # False once a root was not a scalar (out.backward(gradient)): no loss to report
        self.n_backward = 0
        self.closed = True  # the next backward opens a new window
        self.scaler_seen = False  # run state: a GradScaler.scale call was seen, losses may be scaled
        self._pending_scale: torch.Tensor | None = None  # the scale of the last scale() result, until a backward

    def close(self) -> None:
        """End the window: the next backward opens a new one."""
        self.closed = True

    def add(self, tensors: Any) -> None:
        """Add the roots of one backward call (a tensor, or a tuple/list of them) to the window's loss; the
        first backward after :meth:`close` opens a new window (inline: this runs every backward)."""
        if self.closed:
            self.total, self.ok, self.n_backward, self.closed = None, True, 0, False
        self.n_backward += 1
        for root in (tensors,) if isinstance(tensors, torch.Tensor) else tensors:
            if root.dim() and root.numel() != 1:  # dim() first: the usual loss is 0-dim
                self.ok = False  # out.backward(gradient) on a non-scalar: no loss to report
                continue
            value = self._unscaled(root) if self.scaler_seen else root.detach()
            if value.dim():
                value = value.reshape(())
            # A view, not a copy: the step's read stacks it with the norms (that stack is the copy). No row
            # may keep the view itself: a loss can share a step-sized buffer (mse_loss's result keeps its
            # (B, T) workspace as storage), and rows holding those until the flush grew memory ~0.5 MB/step.
            if value.dtype is not torch.float32:
                value = value.float()
            total = self.total
            self.total = value if total is None else total + value.to(total.device)
        self._pending_scale = None

    def _unscaled(self, root: torch.Tensor) -> torch.Tensor:
        """The loss before GradScaler scaled it (only called once a scale() call was seen)."""
        unscaled = getattr(root, "_gradscope_unscaled", None)
        if unscaled is not None:
            return unscaled
        if self._pending_scale is not None:  # (scaler.scale(loss) / k).backward(): divide the scale back out
            return root.detach() / self._pending_scale.to(root.device)
        return root.detach()

    def on_scale(self, scaler: Any, outputs: Any, result: Any) -> None:
        """``GradScaler.scale(outputs)`` returned ``result``: remember the unscaled loss on the result."""
        if isinstance(outputs, torch.Tensor) and isinstance(result, torch.Tensor) and result is not outputs:
            result._gradscope_unscaled = outputs.detach()
            self._pending_scale = scaler._scale
            self.scaler_seen = True

    def step_loss(self, closure_result: Any = None) -> torch.Tensor | None:
        """This step's loss (0-dim, float32, on its own device), or None when there is none to report.

        A closure that never called backward still returned its loss: that one is used.
        """
        loss = self.total
        if (loss is None or not self.ok) and isinstance(closure_result, torch.Tensor) and closure_result.numel() == 1:
            return closure_result.detach().reshape(()).float()
        return loss if self.ok else None
