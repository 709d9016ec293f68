"""Compare's injected clipping: ``clip_grad_value_`` and ``clip_grad_norm_`` before every update, and
whether every recorded update really got it.

``--max-norm`` gives each optimizer slot its own threshold (:class:`~gradscope.record.config.Thresholds`:
one for all, or one per slot index; a slot without one is not clipped); ``--clip-value`` one value for
every slot. Both clip exactly as the torch functions would in the script (the unpatched functions,
value first when both are asked), at the point where the update takes its gradients: an optimizer's
pre-step hook, after every evaluation of a step's closure, or a hand-written loop's own clip call or
the end of its one backward pass (:mod:`gradscope.record.manual` decides which).

Where no correct point exists the update is recorded as it happened and the run says
``not injected: <reason>`` (meta.json's ``clipping.injection``): never a silent no-op.

Hazards: runs only when injection was asked (never on the usual step); no host sync, the applied norm
stays a device scalar on the row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradscope.record.config import RecorderConfig, Thresholds
from gradscope.record.measure import clip_coefficient, global_norm, max_abs, stack_on, tensor_norms

if TYPE_CHECKING:
    from gradscope.record.layouts import Layout
    from gradscope.record.rows import Row


class Injector:
    """What ``--max-norm`` / ``--clip-value`` inject, the clipping itself, and the run's injection status."""

    def __init__(self, config: RecorderConfig) -> None:
        thresholds = config.inject_max_norm
        if isinstance(thresholds, int | float):  # a number set on the config after it was made: one for all
            thresholds = Thresholds.every(float(thresholds))
        self._thresholds = thresholds
        self.clip_value = config.inject_clip_value
        self.active = config.injecting
        self.original_norm: Callable[..., Any] | None = None  # the unpatched clip functions (set at install):
        self.original_value: Callable[..., Any] | None = None  # the script's wrappers measure only in arms
        self._failure: str | None = None  # the first reason an update went without its injected clip

    def max_norm_of(self, slot: int) -> float | None:
        """The max_norm injected into optimizer slot ``slot`` (None: its norm is not clipped)."""
        return self._thresholds.of(slot) if self._thresholds is not None else None

    def wanted(self, slot: int) -> bool:
        """True when something is to be injected into slot ``slot``'s updates."""
        return self.clip_value is not None or self.max_norm_of(slot) is not None

    def not_injected(self, reason: str) -> None:
        """An update went without the injected clip: the run says so (the first reason is kept)."""
        if self._failure is None:
            self._failure = f"not injected: {reason}"

    def describe(self, n_slots: int) -> dict[str, Any]:
        """The injection keys of meta.json's ``clipping``, for a run with ``n_slots`` optimizer slots."""
        thresholds = self._thresholds
        for_all = thresholds.values[0] if thresholds is not None and thresholds.for_all else None
        status = None if not self.active else self._failure or "applied"
        per_slot = tuple(self.max_norm_of(i) for i in range(n_slots)) if thresholds is not None else ()
        return {"injected_max_norm": for_all, "injected_max_norms": per_slot,
                "injected_clip_value": self.clip_value, "injection": status}

    def clip(self, params: list[torch.Tensor], slot: int, row: Row | None = None, layout: Layout | None = None) -> None:
        """Clip ``params``' grads as ``clip_grad_value_`` then ``clip_grad_norm_`` in the script would.

        With a ``row`` (read before this, so its norms are the pre-clip ones) the row learns what the
        update consumed (the applied norm), its clipping, and, under value clipping, each tensor's
        pre-clip max |g| (``layout`` maps the params to the row's columns).
        """
        max_norm, value = self.max_norm_of(slot), self.clip_value
        with_grad = [p for p in params if p.grad is not None]
        if (max_norm is None and value is None) or not with_grad:
            return
        try:
            applied = self._clip(with_grad, max_norm, value, row, layout)
        except Exception as exc:  # the update goes on unclipped: the run must not claim otherwise
            self.not_injected(f"clipping failed ({type(exc).__name__}: {exc})")
            raise
        if row is not None:
            if applied is not None:
                row.attach("g_applied", applied)
            row.clip_source, row.max_norm = "injected", max_norm

    def _clip(self, params: list[torch.Tensor], max_norm: float | None, value: float | None, row: Row | None,
              layout: Layout | None) -> torch.Tensor | None:
        """Clip; returns the applied global norm when no single factor gives it (value clipping)."""
        assert self.original_norm is not None and self.original_value is not None
        applied = None
        if value is not None:
            if row is not None and layout is not None:
                cols = np.array([layout.position.get(id(p), -1) for p in params], dtype=np.int64)
                row.max_abs = (max_abs([p.grad for p in params]), cols)  # type: ignore[misc]
            self.original_value(params, value)
            if max_norm is None:  # the applied norm, after the value clip (one more read: injection only)
                norms = tensor_norms([p.grad for p in params])  # type: ignore[misc]
                applied = global_norm(stack_on(norms, norms[0].device)).float()
        if max_norm is not None:
            total = self.original_norm(params, max_norm)  # the norm it clipped from
            coef = clip_coefficient(total, max_norm)
            if value is None and row is not None:
                row.attach("applied_coef", coef)  # the row read the very grads it scaled
            elif value is not None:
                applied = (total.float() * coef).reshape(())
        return applied


def graph_leaves(roots: Any) -> list[torch.Tensor]:
    """The leaf tensors a backward from ``roots`` accumulates into (its AccumulateGrad nodes' variables).

    For a hand-written loop's first update, whose parameters gradscope has not seen yet. One walk of
    the graph, once; a root that is itself a leaf counts.
    """
    stack = []
    leaves: list[torch.Tensor] = []
    for root in (roots,) if isinstance(roots, torch.Tensor) else roots:
        if root.grad_fn is not None:
            stack.append(root.grad_fn)
        elif root.requires_grad:
            leaves.append(root)
    seen: dict[int, Any] = {}  # holds the nodes too: an id is only unique while its object lives
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        stack.extend(child for child, _ in node.next_functions)
    unique = {id(t): t for t in leaves}
    return list(unique.values())


def undo_clip(params: list[torch.Tensor], coef: torch.Tensor) -> None:
    """Divide a norm clip's factor back out of ``params``' grads (to within one rounding: only where the
    clip turned out to be at the wrong point, a run then marked as not injected or clipped again)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_div_(grads, coef.to(grads[0].device))  # type: ignore[arg-type]

