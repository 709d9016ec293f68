"""What each hook means for the run: the events the hooks call, dispatched to the recorder's collaborators.

:class:`StepEvents` implements :class:`~gradscope.record.hooks.RecorderEvents`. It owns the state of
the step in progress (the nesting of optimizer steps, a closure being evaluated, the GradScaler whose
step is running, the row read in the pre hook) and the seeds the script asked for; the loss window,
the clip ledger, the injector, the step reader and the hand-written-loop tracker own the rest.

Hazards: ``on_backward``, ``on_step_pre`` and ``on_step_post`` run every step, in the cold caches that
follow a backward pass: collaborators' methods are bound once, here, and nothing reads a device value.
No method raises into the user's loop but ``StopRun`` (``--max-steps``), raised by ``commit``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradscope.record.clipping import ClipLedger
from gradscope.record.config import RecorderConfig
from gradscope.record.guard import Guard
from gradscope.record.inject import Injector
from gradscope.record.loss import LossWindow
from gradscope.record.manual import ManualTracker
from gradscope.record.rows import Row
from gradscope.record.step import StepReader


class StepEvents:
    """The recorder's side of every hook (see :class:`~gradscope.record.hooks.RecorderEvents`).

    ``commit`` records a finished row (and may raise StopRun); ``n_commits`` counts those recorded.
    """

    def __init__(self, config: RecorderConfig, loss: LossWindow, clips: ClipLedger, injector: Injector,
                 manual: ManualTracker, reader: StepReader, guard: Guard, commit: Callable[[Row], None],
                 n_commits: Callable[[], int]) -> None:
        self._config = config
        self._loss = loss
        self._add_loss = loss.add
        self._clips = clips
        self._injector = injector
        self._manual = manual
        self._reader = reader
        self._fast = reader.fast
        self._general = reader.general
        self._guard = guard
        self._commit = commit
        self._n_commits = n_commits
        self.seeds: list[int] = []  # the script's torch.manual_seed arguments (after any override)
        self._depth = 0  # nesting of optimizer steps: wrappers and super().step() record once
        self._in_closure = 0
        self._draft: Row | None = None  # the row read by the pre hook, committed by the post hook
        self._scaler: Any = None  # the GradScaler whose step() is running

    def on_backward(self, tensors: Any) -> Callable[[Any], None] | None:
        """Add this backward's roots to the loss window, opening a new window after a recorded step.

        Returns what to call when the backward has returned: None but in a hand-written loop under
        ``--max-norm`` with no clip call of its own, whose injection point is there.
        """
        try:
            if self._depth and not self._in_closure:
                self._depth = 0  # the last step raised before its post hook: start clean
            manual = self._manual
            if self._loss.closed:  # the first backward of a new window: what the last one left is over
                if manual.draft is not None:
                    manual.commit()  # a hand-written update loop: the previous update
                if self._clips.calls:
                    self._clips.forget()  # clip calls no step matched
            after = manual.clips_after_backward  # False but in a hand-written loop under --max-norm
            if after:
                manual.before_backward()
            self._add_loss(tensors)  # opens the new window
            return self._after_backward if after else None
        except Exception as exc:  # Guard.call, inlined: this runs every backward
            self._guard.failed("backward", exc)
            return None

    def _after_backward(self, tensors: Any) -> None:
        self._guard.call("inject", self._manual.after_backward, tensors)

    def on_step_pre(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Read the step now (its grads are final), or wrap its closure to read after the first evaluation."""
        self._depth += 1
        if self._depth > 1:
            return None  # the inner step of a wrapper optimizer or of super().step(): one record only
        manual = self._manual
        if manual.draft is not None or not manual.optimizer_seen:
            manual.on_optimizer_step()  # a clip call before this step was not a hand-written update
        closure, where = _closure_of(args, kwargs) if len(args) > 1 or kwargs else (None, "")
        if closure is None:
            try:  # Guard.call, inlined: this runs every step
                scaler = self._scaler
                self._draft = (self._fast(optimizer) if scaler is None else None) or self._general(optimizer, None, scaler)
            except Exception as exc:
                self._draft = None
                self._guard.failed("measure", exc)
            return None
        self._draft = None  # read after the closure's first call, when its grads exist
        wrapped = self._wrap_closure(optimizer, closure)
        if where == "closure":
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    def on_step_post(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Commit the outermost step's row (read now if the pre hook could not)."""
        self._depth -= 1
        if self._depth > 0:
            return
        self._depth = 0
        draft = self._draft
        if draft is None:
            draft = self._guard.call("measure", self._general, optimizer, None, self._scaler)
        self._draft = None
        if draft is not None:
            self._commit(draft)

    def _wrap_closure(self, optimizer: Any, closure: Callable[..., Any]) -> Callable[..., Any]:
        calls = [0]  # completed evaluations of this step's closure
        evaluate = self._evaluate

        def closure_wrapper(*args: Any, **kwargs: Any) -> Any:
            return evaluate(optimizer, closure, calls, args, kwargs)

        return closure_wrapper

    def _evaluate(self, optimizer: Any, closure: Callable[..., Any], calls: list[int], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
        """One call of a step's closure: the first one's grads and loss are the step's."""
        self._in_closure += 1
        try:
            result = closure(*args, **kwargs)
        finally:
            self._in_closure -= 1
        calls[0] += 1
        if calls[0] == 1:  # LBFGS re-evaluates in its line search: the first call is the step's
            self._draft = self._guard.call("measure", self._general, optimizer, result, self._scaler)
        elif self._injector.active:  # clip after every evaluation: its line search must see clipped grads
            self._guard.call("inject", self._reader.inject_step, optimizer)
        self._guard.call("evaluations", self._reader.count_evaluation, optimizer)
        return result

    def on_scale(self, scaler: Any, outputs: Any, result: Any) -> None:
        """GradScaler.scale: the loss window learns the unscaled loss."""
        self._guard.call("scale", self._loss.on_scale, scaler, outputs, result)

    def on_scaler_step(self, original: Callable[..., Any], scaler: Any, optimizer: Any, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
        """GradScaler.step: the step is read with its loss scale; a step it skips (inf/NaN) is recorded too."""
        enabled = bool(getattr(scaler, "_enabled", False))
        if enabled and self._injector.active:
            # Clip unscaled grads, as the documented AMP recipe does; fused optimizers would see scaled ones.
            self._guard.call("unscale", _unscale_if_ready, scaler, optimizer)
        before, previous = self._n_commits(), self._scaler
        self._scaler = scaler
        try:
            result = original(scaler, optimizer, *args, **kwargs)
        finally:
            self._scaler = previous
        if enabled and self._n_commits() == before and self._depth == 0:
            # inf/NaN found: GradScaler skipped optimizer.step(), so no hook ran. Record it anyway.
            draft = self._guard.call("measure", self._general, optimizer, None, scaler, True)
            if draft is not None:
                self._commit(draft)
        return result

    def clip_grad_norm(self, original: Callable[..., Any], params: list[torch.Tensor], max_norm: float,
                       args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The script's clip_grad_norm_: run with the max_norm in effect, note its factor."""
        self._guard.call("manual", self._manual.before_clip, params)
        effective = self._clips.effective_max_norm(max_norm)
        total = original(params, effective, *args, **kwargs)
        self._guard.call("clip", self._clipped_by_norm, params, "clip_grad_norm_", max_norm, total, effective)
        return total

    def clip_grads_with_norm(self, original: Callable[..., Any], params: list[torch.Tensor], max_norm: float,
                             total_norm: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The script's clip_grads_with_norm_ (after its own get_total_norm): as clip_grad_norm_."""
        self._guard.call("manual", self._manual.before_clip, params)
        effective = self._clips.effective_max_norm(max_norm)
        if math.isfinite(effective):
            original(params, effective, total_norm, *args, **kwargs)
        self._guard.call("clip", self._clipped_by_norm, params, "clip_grads_with_norm_", max_norm, total_norm,
                         effective)

    def _clipped_by_norm(self, params: list[torch.Tensor], function: str, max_norm: Any, total: torch.Tensor,
                         effective: float) -> None:
        coef = self._clips.add_norm_call(params, function, max_norm, total, effective)
        self._manual.on_clip(params, coef)  # a hand-written update loop: this call is the update's clipping

    def clip_grad_value(self, original: Callable[..., Any], params: list[torch.Tensor], clip_value: float,
                        args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The script's clip_grad_value_: its pre-clip norms are read before it acts."""
        self._guard.call("manual", self._manual.before_clip, params)
        call = self._guard.call("clip", self._clips.measure_value_call, params, clip_value)
        if self._clips.value_clip_scales():
            original(params, clip_value, *args, **kwargs)
        if call is not None:
            self._clips.add(call)
            self._guard.call("manual", self._manual.on_clip, params, None)  # a hand-written loop's clipping

    def on_seed(self, seed: Any) -> Any:
        """torch.manual_seed(seed): note it; compare's arms replace it with the arm's seed."""
        if self._config.seed is not None:
            seed = self._config.seed
        self._guard.call("seed", self.seeds.append, int(seed))
        return seed

    def on_optimizer_made(self) -> None:
        """An optimizer exists: a clip call before its first step is not a hand-written update."""
        self._manual.on_optimizer_made()

    def on_zero_grad(self, module: nn.Module) -> None:
        """``module.zero_grad()``: in a hand-written loop, the end of an update."""
        manual = self._manual
        if not manual.optimizer_seen and not self._loss.closed:  # a hand-written loop, an update made
            self._guard.call("manual", manual.on_zero_grad, module)


def _closure_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Callable[[], Any] | None, str | int]:
    """The closure passed to ``optimizer.step`` and where: the ``closure`` keyword or the first argument."""
    if kwargs.get("closure") is not None:
        return kwargs["closure"], "closure"
    if len(args) > 1 and callable(args[1]):
        return args[1], 1
    return None, ""


def _unscale_if_ready(scaler: Any, optimizer: Any) -> None:
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
