"""The clip ledger: the script's own clipping calls since the last step, and what they say about the run.

The recorded ``grad_norm`` is the *pre-clip* norm. When the script clipped with one
``clip_grad_norm_`` over every parameter, the norms read after it are divided by its one factor at
flush time (a device scalar attached to the row, never read per step). When several calls (or value
clipping) acted on parts of the parameters, each tensor's pre-clip norm is recovered call by call.
A ``clip_grad_value_`` call also reads each tensor's pre-clip max |g| (the layers' ``max_abs``).
Compare's arms disable the script's clipping (clip functions measure, never scale); what they inject
instead is :mod:`gradscope.record.inject`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradscope import store
from gradscope.record.config import RecorderConfig
from gradscope.record.measure import clip_coefficient, max_abs, tensor_norms

if TYPE_CHECKING:
    from gradscope.record.layouts import Layout


@dataclass
class ClipCall:
    """One call of the script's clipping function since the last step."""

    param_ids: list[int]  # params that had a grad, in call order
    function: str
    threshold: float | None  # max_norm of a norm clipping call, clip_value of clip_grad_value_
    coef: torch.Tensor | None = None  # norm clipping: the factor grads were multiplied by
    raw: list[torch.Tensor] | None = None  # value clipping: pre-clip norms, aligned with param_ids
    max_abs: torch.Tensor | None = None  # value clipping: pre-clip max |g|, aligned with param_ids

    @property
    def by_value(self) -> bool:
        """True for clip_grad_value_ (no factor to divide out; the clip value is no norm threshold)."""
        return self.function == "clip_grad_value_"


def one_clip_over_all(calls: list[ClipCall], n_present: int) -> bool:
    """The common case: one clip_grad_norm_ call over every param with a grad, undone by one factor."""
    return len(calls) == 1 and calls[0].coef is not None and len(calls[0].param_ids) == n_present


class ClipLedger:
    """The script's clip calls not yet matched to a step, the clipping of the next row, and the run's summary."""

    def __init__(self, config: RecorderConfig) -> None:
        self._config = config
        self.calls: list[ClipCall] = []  # since the last step (the step reader matches them to its params)
        self.row_clip: tuple[str, float | None] | None = None  # (clip_source, max_norm) for the next row
        self._summary: dict[str, Any] = {"script_max_norm": None, "script_clip_function": None, "script_clip_calls": 0,
                                         "script_clip_value": None}

    def describe(self, injected: dict[str, Any]) -> store.Clipping:
        """meta.json's ``clipping``: the script's last clip calls, their count, and what compare changed
        (``injected``: the injector's keys, see :meth:`gradscope.record.inject.Injector.describe`)."""
        return store.Clipping(**self._summary, **injected, script_clip_disabled=self._config.disable_script_clip)

    def effective_max_norm(self, max_norm: float) -> float:
        """The max_norm the script's norm clipping really uses: its own, or inf (measure only) when it is
        disabled or replaced by an injected clip."""
        if self._config.disable_script_clip or self._config.injecting:
            return math.inf  # clip_grad_norm_ with inf scales by exactly 1.0 and returns the same norm
        return float(max_norm)

    def value_clip_scales(self) -> bool:
        """False in compare's arms and under --no-clip: the script's clip_grad_value_ measures only."""
        return not self._config.disable_script_clip and not self._config.injecting

    def add_norm_call(self, params: list[torch.Tensor], function: str, max_norm: Any, total: torch.Tensor,
                      effective: float) -> torch.Tensor | None:
        """Note a norm clipping call that returned (or was given) ``total``; returns its factor (None: no scaling)."""
        coef = clip_coefficient(total, effective) if math.isfinite(effective) else None
        self.calls.append(ClipCall([id(p) for p in params if p.grad is not None], function, float(max_norm), coef=coef))
        return coef

    def measure_value_call(self, params: list[torch.Tensor], clip_value: Any) -> ClipCall:
        """The pre-clip norms of a clip_grad_value_ call, read before it acts (it has no factor to divide out)."""
        with_grad = [p for p in params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        raw = tensor_norms(grads)  # type: ignore[arg-type]
        peak = max_abs(grads) if grads else None  # type: ignore[arg-type]
        return ClipCall([id(p) for p in with_grad], "clip_grad_value_", float(clip_value), raw=raw, max_abs=peak)

    def add(self, call: ClipCall) -> None:
        """Note a call measured by :meth:`measure_value_call`, once the clip function returned."""
        self.calls.append(call)

    def forget(self) -> None:
        """Drop the calls not matched to a step (a new loss window, or a hand-written update recorded)."""
        self.calls = []

    def claim_last_call(self) -> tuple[str, float | None, ClipCall]:
        """A hand-written loop's clip call: note it and return the (clip_source, max_norm) of its update, and the call."""
        call = self.calls[-1]
        self.note([call])
        self.calls = []
        row_clip, self.row_clip = self.row_clip, None
        assert row_clip is not None  # note() set it
        return (*row_clip, call)

    def calls_for(self, layout: Layout) -> list[ClipCall]:
        """The calls since the last step that touched ``layout``'s params (noted, then forgotten)."""
        calls = [c for c in self.calls if any(pid in layout.position for pid in c.param_ids)]
        if calls:
            self.calls = [c for c in self.calls if c not in calls]
            self.note(calls)
        return calls

    def note(self, calls: list[ClipCall]) -> None:
        """Count ``calls`` in the run's summary and set the clipping of the next row."""
        for call in calls:  # a clip value is no norm threshold: it has its own key
            self._summary["script_clip_value" if call.by_value else "script_max_norm"] = call.threshold
        last = calls[-1]
        self._summary["script_clip_function"] = last.function
        self._summary["script_clip_calls"] += len(calls)
        # The max_norm column holds norm thresholds (recommend offers it as one): a clip value is not.
        max_norm = None if last.by_value else last.threshold
        self.row_clip = ("script-disabled", None) if self._config.disable_script_clip else ("script", max_norm)

    @staticmethod
    def max_abs_of(layout: Layout, calls: list[ClipCall]) -> tuple[torch.Tensor, np.ndarray] | None:
        """The pre-clip max |g| that ``calls``' value clipping read, as a row's ``max_abs`` (None: no value call).

        A param in several calls keeps the first call's value (read before any of them acted): at the
        flush the vectors are placed in order, so the calls go in last to first; a param outside the
        layout gets column -1 (dropped there).
        """
        value_calls = [c for c in reversed(calls) if c.max_abs is not None]
        if not value_calls:
            return None
        cols = np.array([layout.position.get(pid, -1) for c in value_calls for pid in c.param_ids], dtype=np.int64)
        first = value_calls[0].max_abs
        assert first is not None
        values = first if len(value_calls) == 1 else torch.cat([c.max_abs.to(first.device) for c in value_calls])  # type: ignore[union-attr]
        return values, cols

    def take_row_clip(self) -> tuple[str, float | None] | None:
        """The clipping of the row being filled, if a clip call set one; cleared for the next row."""
        row_clip, self.row_clip = self.row_clip, None
        return row_clip

    @staticmethod
    def undo(layout: Layout, present: tuple[int, ...], applied: list[torch.Tensor],
             calls: list[ClipCall]) -> list[torch.Tensor]:
        """Pre-clip per-tensor norms when several clip calls (or value clipping) acted on parts of the params."""
        slot_of = {id(layout.params[i]): q for q, i in enumerate(present)}
        parts = list(applied)
        for call in calls:
            for j, pid in enumerate(call.param_ids):
                q = slot_of.get(pid)
                if q is not None:
                    parts[q] = call.raw[j] if call.raw is not None else parts[q] / call.coef.to(parts[q].device)  # type: ignore[union-attr]
        return parts
