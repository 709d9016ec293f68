"""Hand-written update loops: scripts that update weights themselves (``p.data.add_(p.grad, alpha=-lr)``).

With no ``torch.optim`` optimizer there is no step hook. An update is recognised by what surrounds it:
the script's clip call just before it, or ``model.zero_grad()`` between two updates, or the next
backward pass. Each update is read into a *draft* row at that moment and committed when the next one
starts (or at exit). Once any optimizer exists (made, or stepped), its hooks record every update and
nothing here acts again.

Injection (``--max-norm`` / ``--clip-value``) needs a point after the update's gradients are final and
before the script applies them:

- the script's own clip call, when it has one: gradscope clips there instead of the script;
- otherwise, for ``--max-norm``, right after each backward returns, which is correct while each update
  has one backward. A second backward in the same update (accumulation) shows it was not: that clip is
  divided back out, nothing more is clipped after a backward, and the run says ``not injected``. A clip
  call that turns up after such a clip (the loop's first update) takes over the same way.

The draft of an update clipped after its backward is read from the clipped grads; the factor goes on
the row and is divided back out at the flush, as for the script's own clip_grad_norm_.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradscope.record.clipping import ClipLedger
from gradscope.record.config import RecorderConfig
from gradscope.record.inject import Injector, graph_leaves, undo_clip
from gradscope.record.layouts import LayoutRegistry
from gradscope.record.loss import LossWindow
from gradscope.record.measure import clip_coefficient, global_norm, stack_on, tensor_norms
from gradscope.record.rows import Row
from gradscope.record.step import StepReader


class ManualTracker:
    """The hand-written loop's pending update (``draft``), whether an optimizer exists (``optimizer_seen``),
    and whether gradscope clips after each backward (``clips_after_backward``)."""

    def __init__(self, config: RecorderConfig, loss: LossWindow, layouts: LayoutRegistry, clips: ClipLedger,
                 injector: Injector, reader: StepReader, commit: Callable[[Row], None]) -> None:
        self._loss = loss
        self._layouts = layouts
        self._clips = clips
        self._injector = injector
        self._reader = reader
        self._commit = commit
        self.optimizer_seen = False  # run state: a torch.optim optimizer was made or stepped
        self.draft: Row | None = None  # the last update, read and not yet committed
        # Clip after each backward: --max-norm alone (a value clip cannot be divided back out), until the
        # loop shows a clip call of its own, an optimizer, or a second backward per update.
        self.clips_after_backward = config.inject_max_norm is not None and config.inject_clip_value is None
        self._clipped: tuple[list[torch.Tensor], torch.Tensor, float] | None = None  # this update's: params, factor, max_norm

    @property
    def hand_written(self) -> bool:
        """True while no torch.optim optimizer exists: updates are written by hand."""
        return not self.optimizer_seen

    def on_optimizer_made(self) -> None:
        """An optimizer exists: its hooks will record every update, even one clipped before its first step."""
        self.optimizer_seen = True
        self._stop_clipping_after_backward()

    def on_optimizer_step(self) -> None:
        """An optimizer stepped: its hooks record from now on; a draft read before was no update."""
        self.optimizer_seen = True
        self.draft = None
        self._stop_clipping_after_backward()

    def before_backward(self) -> None:
        """A backward is about to run. A second one in the update the last clip followed: accumulation."""
        if self._clipped is not None and not self._loss.closed:
            self._stop_clipping_after_backward()

    def after_backward(self, roots: Any) -> None:
        """The backward from ``roots`` returned: clip now, the update's grads being final (one backward each)."""
        if not self.clips_after_backward or self._clipped is not None:
            return
        layout = self._layouts.by_owner.get(self)
        params = layout.params if layout is not None else graph_leaves(roots)  # the first update: from its graph
        max_norm = self._injector.max_norm_of(layout.slot.index if layout is not None else self._layouts.n_slots)
        assert self._injector.original_norm is not None
        if max_norm is None or all(p.grad is None for p in params):
            return
        total = self._injector.original_norm([p for p in params if p.grad is not None], max_norm)
        self._clipped = (params, clip_coefficient(total, max_norm), max_norm)

    def _stop_clipping_after_backward(self) -> None:
        """Clip after a backward no more; a clip made after this update's backward is divided back out."""
        self.clips_after_backward = False
        clipped, self._clipped = self._clipped, None
        if clipped is not None:
            undo_clip(clipped[0], clipped[1])

    def before_clip(self, params: list[torch.Tensor]) -> None:
        """The script clips ``params``: in a hand-written loop, the update that follows starts here."""
        if self.optimizer_seen:
            return  # an optimizer will step: its hook records this update
        self._stop_clipping_after_backward()  # the loop's own clip call is the injection point
        self.commit()
        self.draft = self._measure(params)

    def on_clip(self, params: list[torch.Tensor], coef: torch.Tensor | None) -> None:
        """The clip call of the pending update returned (``coef``: the factor it scaled by, if it did)."""
        draft = self.draft
        if draft is None:
            return
        source, max_norm, call = self._clips.claim_last_call()
        draft.clip_source, draft.max_norm = source, max_norm
        layout = self._layouts.by_owner.get(self)
        if call.by_value and layout is not None:
            draft.max_abs = self._clips.max_abs_of(layout, [call])
        if self._injector.wanted(draft.slot.index):  # compare's arm: clip here, as asked, not as the script did
            self._injector.clip(params, draft.slot.index, draft, layout)
        elif coef is not None:
            draft.attach("applied_coef", coef)
        elif call.by_value and self._clips.value_clip_scales():  # no single factor: read what the update gets
            norms = tensor_norms([p.grad for p in params if p.grad is not None])  # type: ignore[misc]
            if norms:
                draft.attach("g_applied", global_norm(stack_on(norms, norms[0].device)).float())

    def on_zero_grad(self, module: nn.Module) -> None:
        """``module.zero_grad()`` between two updates: record the update just made (on the loop's earlier
        params when this module has no grads: a new model's first zero_grad after the last loop's update)."""
        if self.draft is None:
            self.draft = self._measure([p for p in module.parameters() if p.requires_grad])
        layout = self._layouts.by_owner.get(self)
        if self.draft is None and layout is not None:
            self.draft = self._measure(layout.params)
        self.commit()
        self._loss.close()

    def finish(self) -> None:
        """At exit. A loop that zeroes grads at the top of each iteration: its last update has no zero_grad
        after it. Read it on the params of the loop's earlier updates (the layout holds them, and so their
        grads, even when the script's model went out of scope with its main()), or on those clipped after
        its backward."""
        layout = self._layouts.by_owner.get(self)
        params = layout.params if layout is not None else self._clipped[0] if self._clipped is not None else None
        if self.hand_written and not self._loss.closed and self.draft is None and params is not None:
            self.draft = self._measure(params)

    def commit(self) -> None:
        """Commit the pending update, if any (and only while the loop is hand-written)."""
        draft, self.draft = self.draft, None
        if draft is not None and self.hand_written:
            self._clips.forget()
            if draft.clip_source != "injected" and self._injector.wanted(draft.slot.index):
                self._injector.not_injected(self._why_not(draft))
            self._commit(draft)

    def _why_not(self, draft: Row) -> str:
        """Why an update of this loop went without the injected clip."""
        if draft.n_backward > 1:
            return f"a hand-written update loop with {draft.n_backward} backward calls per update and no clip call"
        if self._injector.clip_value is not None:
            return ("a hand-written update loop with no clip call: --clip-value is injected there only at the "
                    "script's own clip call")
        return f"update {draft.slot.steps} of a hand-written update loop had no clip call to inject at"

    def _measure(self, params: list[torch.Tensor]) -> Row | None:
        if not params or all(p.grad is None for p in params):
            return None
        layout = self._layouts.manual_layout(self, params)  # this tracker keys the hand-written loop's layout
        row = self._reader.read_layout(layout, self._loss.step_loss())
        self._reader.fill(row)
        clipped, self._clipped = self._clipped, None
        if clipped is not None:  # read after the clip that followed its backward: divided out at the flush
            row.attach("script_coef", clipped[1])
            row.clip_source, row.max_norm = "injected", clipped[2]
        return row
