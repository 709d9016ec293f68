"""Hand-written update loops: scripts that update weights themselves (``p.data.add_(p.grad, alpha=-lr)``).

With no ``torch.optim`` optimizer there is no step hook. An update is recognised by what surrounds it:
the script's ``clip_grad_norm_`` call just before it, or ``model.zero_grad()`` between two updates,
or the next backward pass. Each update is read into a *draft* row at that moment and committed when
the next one starts (or at exit). Once any optimizer exists (made, or stepped), its hooks record
every update and nothing here acts again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradscope.record.clipping import ClipLedger
from gradscope.record.config import RecorderConfig
from gradscope.record.layouts import LayoutRegistry
from gradscope.record.loss import LossWindow
from gradscope.record.rows import Row
from gradscope.record.step import StepReader


class ManualTracker:
    """The hand-written loop's pending update (``draft``) and whether an optimizer exists (``optimizer_seen``)."""

    def __init__(self, config: RecorderConfig, loss: LossWindow, layouts: LayoutRegistry, clips: ClipLedger,
                 reader: StepReader, commit: Callable[[Row], None]) -> None:
        self._config = config
        self._loss = loss
        self._layouts = layouts
        self._clips = clips
        self._reader = reader
        self._commit = commit
        self.optimizer_seen = False  # run state: a torch.optim optimizer was made or stepped
        self.draft: Row | None = None  # the last update, read and not yet committed

    @property
    def hand_written(self) -> bool:
        """True while no torch.optim optimizer exists: updates are written by hand."""
        return not self.optimizer_seen

    def on_optimizer_made(self) -> None:
        """An optimizer exists: its hooks will record every update, even one clipped before its first step."""
        self.optimizer_seen = True

    def on_optimizer_step(self) -> None:
        """An optimizer stepped: its hooks record from now on; a draft read before was no update."""
        self.optimizer_seen = True
        self.draft = None

    def before_clip(self, params: list[torch.Tensor]) -> None:
        """The script clips ``params``: in a hand-written loop, the update that follows starts here."""
        if self.optimizer_seen:
            return  # an optimizer will step: its hook records this update
        self.commit()
        self.draft = self._measure(params)

    def on_clip(self, coef: torch.Tensor | None) -> None:
        """The clip call of the pending update returned: its clipping goes on the draft."""
        draft = self.draft
        if draft is None:
            return
        draft.clip_source, draft.max_norm = self._clips.claim_last_call()
        if self._config.inject_max_norm is not None:
            draft.clip_source, draft.max_norm = "injected", self._config.inject_max_norm
        if coef is not None:
            draft.attach("applied_coef", coef)

    def on_zero_grad(self, module: nn.Module) -> None:
        """``module.zero_grad()`` between two updates: record the update just made."""
        if self.draft is None:
            self.draft = self._measure([p for p in module.parameters() if p.requires_grad])
        self.commit()
        self._loss.close()

    def finish(self) -> None:
        """At exit. A loop that zeroes grads at the top of each iteration: its last update has no zero_grad
        after it. Read it on the params of the loop's earlier updates (the layout holds them, and so their
        grads, even when the script's model went out of scope with its main())."""
        layout = self._layouts.by_owner.get(self)
        if self.hand_written and not self._loss.closed and self.draft is None and layout is not None:
            self.draft = self._measure(layout.params)

    def commit(self) -> None:
        """Commit the pending update, if any (and only while the loop is hand-written)."""
        draft, self.draft = self.draft, None
        if draft is not None and self.hand_written:
            self._clips.forget()
            self._commit(draft)

    def _measure(self, params: list[torch.Tensor]) -> Row | None:
        if not params or all(p.grad is None for p in params):
            return None
        layout = self._layouts.manual_layout(self, params)  # this tracker keys the hand-written loop's layout
        row = self._reader.read_layout(layout, self._loss.step_loss())
        self._reader.fill(row)
        if self._config.inject_max_norm is not None:
            row.clip_source, row.max_norm = "injected", self._config.inject_max_norm
        return row
