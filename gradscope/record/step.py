"""The step reader: one optimizer step's gradient norms, loss and lr, read into a device row.

Two routes, one after the other:

- :meth:`StepReader.fast` is the fast path, tried first on every step: the usual step of a
  single-group optimizer seen before, with nothing to account for, read by its layout's plan in
  the fewest Python calls. After a backward pass the caches are cold and each Python call costs a
  few µs; on the tiny MLP the general path's calls cost as much as reading the norms (bench/run.py,
  workload "mlp"). It returns None for any step that is not the usual one.
- :meth:`StepReader.general` reads any step: a new or changed layout, the script's clip calls,
  GradScaler, fused optimizers' scaled grads, closures, compare's injected clip. It still reads by
  the plan when the plan covers the step, and otherwise norm by norm (:func:`tensor_norms`).

A plan covers dense grads on one device that need no graph. A param without a grad sends its step
to the per-tensor read (and from then on the plan checks for a None first, rather than read in
vain); sparse grads, grads on another device or grads that require grad turn the layout's plan off
for the rest of the run. Any other failure of the planned read warns once, then does the same.

Hazards: nothing here calls ``.item()`` or branches on a device value (a host sync on CUDA).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch

from gradscope.record.clipping import ClipCall, ClipLedger, one_clip_over_all
from gradscope.record.config import RecorderConfig
from gradscope.record.guard import Guard
from gradscope.record.inject import Injector
from gradscope.record.layouts import Layout, LayoutRegistry
from gradscope.record.loss import LossWindow
from gradscope.record.measure import NormPlan, global_norm, stack_on, tensor_norms, write_norms
from gradscope.record.rows import Row, RowBlocks

_IS_NONE = functools.partial(operator.is_, None)
_GRAD = operator.attrgetter("grad")  # list(map(_GRAD, params)): the grads without a comprehension's frame


class StepReader:
    """Reads a step into a :class:`Row`: :meth:`fast` for the usual step, :meth:`general` for any step."""

    def __init__(self, config: RecorderConfig, loss: LossWindow, layouts: LayoutRegistry, clips: ClipLedger,
                 injector: Injector, guard: Guard) -> None:
        self._config = config
        self._injector = injector
        self._injecting = config.injecting  # read on the fast path: one attribute, not a property
        self._loss = loss
        self._layouts = layouts
        self._layout_get = layouts.by_owner.get  # bound once: the fast path's one lookup
        self._clips = clips
        self._guard = guard
        self.general_reads = 0  # steps read norm by norm (no plan, or the plan did not cover them)
        self.planned_failures = 0  # planned reads that raised and fell back
        self.plans_dropped = 0  # layouts whose plan was turned off for the rest of the run

    def fast(self, optimizer: Any) -> Row | None:
        """The fast path: the usual step read in one call, or None when it is not the usual step.

        Usual: an optimizer whose layout exists, with the same single parameter list, no param seen
        without a grad, and no clip call, injected clip or fused-optimizer scale to account for (the
        caller checks that no GradScaler step is running). Runs every step: keep it to the fewest
        Python calls, attribute reads rather than properties.
        """
        groups = optimizer.param_groups
        clips = self._clips
        if (len(groups) != 1 or clips.calls or clips.row_clip is not None
                or self._injecting or hasattr(optimizer, "found_inf")):
            return None
        layout = self._layout_get(optimizer)  # per optimizer: a GAN's two alternate and both stay here
        params = groups[0]["params"]
        # saw_none: a param without a grad (often a frozen one, every step) sends the step to the general
        # path, which reads the grads once; trying here first would read them and look for the None twice.
        if (layout is None or params is not layout.sole or len(params) != len(layout.params) or layout.saw_none
                or layout.columns is not None):  # DTensor or flat params: the general path maps them to columns
            return None
        loss = self._loss
        # layout.params, as the general path reads: the same tensors unless an entry was swapped in place
        row = self.read_planned(layout, list(map(_GRAD, layout.params)), loss.total if loss.ok else None)
        if row is not None:  # what fill() does, inlined: no clip to note on this path
            row.n_backward = loss.n_backward
            lr = groups[0].get("lr")
            if lr.__class__ is not float and isinstance(lr, torch.Tensor):  # schedulers fill_ a Tensor lr in place
                lr = lr.detach().clone()  # this step's value
            row.lr = lr
        return row

    def read_planned(self, layout: Layout, grads: list[torch.Tensor | None], loss: torch.Tensor | None) -> Row | None:
        """The norms (and loss) read by the layout's plan into its next preallocated row; None when the plan
        does not cover these grads (a param without one, sparse grads, or a loss on another device)."""
        plan = layout.plan
        if plan is None or (loss is not None and loss.get_device() != plan.device_index):  # no torch.device made
            return None
        # No type check per step: a None grad makes the stack raise. Once one was seen (a frozen or unused
        # param the optimizer holds, often None every step), check first rather than read in vain.
        if layout.saw_none and any(map(_IS_NONE, grads)):  # C-level, stops at the first None
            return None
        found = layout.blocks.get(loss is not None)
        if found is None:
            found = layout.blocks[loss is not None] = (plan.cols(loss is not None),
                                                       RowBlocks(plan.part_sizes(loss is not None), plan.device))
        out, parts, block, pos = found[1].claim()
        try:
            write_norms(plan, grads, loss, parts)  # type: ignore[arg-type]
        except Exception as exc:
            self._plan_failed(layout, grads, exc)
            return None
        return Row(layout.slot, out, found[0], block, pos)

    def _plan_failed(self, layout: Layout, grads: list[torch.Tensor | None], exc: Exception) -> None:
        """A planned read raised: a missing grad costs this step only; anything else turns the plan off."""
        self.planned_failures += 1
        if any(map(_IS_NONE, grads)):
            layout.saw_none = True  # a param without a grad: the per-tensor read, this step
            return
        plan = layout.plan
        assert plan is not None
        layout.plan = None  # the per-tensor read, from now on
        layout.blocks.clear()
        self.plans_dropped += 1
        if not _known_uncovered(plan, grads):  # not a case plans are known not to cover: say so
            self._guard.warn("plan", f"the planned norm read of optimizer {layout.slot.index} failed "
                                     f"({type(exc).__name__}: {exc}); its steps are read norm by norm from now on")

    def general(self, optimizer: Any, closure_result: Any = None, scaler: Any = None, skipped: bool = False) -> Row:
        """Read any step of ``optimizer`` (see the module docstring); ``scaler`` is the GradScaler whose
        step() is running, ``skipped`` a step it skipped (inf/NaN found)."""
        layout = self._layouts.layout_of(optimizer)
        row = self.read_layout(layout, self._loss.step_loss(closure_result))
        self.fill(row, optimizer.param_groups)
        if scaler is not None or skipped or self._injecting or hasattr(optimizer, "found_inf"):
            self._rare(row, optimizer, layout, scaler, skipped)
        return row

    def inject_step(self, optimizer: Any) -> None:
        """Clip ``optimizer``'s grads as compare's injection asks, with no row (a closure's later evaluations)."""
        layout = self._layouts.layout_of(optimizer)
        self._injector.clip(layout.params, layout.slot.index)

    def count_evaluation(self, optimizer: Any) -> None:
        """One more evaluation of a step's closure by ``optimizer`` (meta.json's ``n_evaluations``)."""
        self._layouts.layout_of(optimizer).slot.evaluations += 1

    def read_layout(self, layout: Layout, loss: torch.Tensor | None) -> Row:
        """Every gradient's norm of ``layout``, with the loss in the same vector, net of the script's clipping."""
        grads = [p.grad for p in layout.params]
        clips = self._clips
        calls = clips.calls_for(layout) if clips.calls else []
        peaks = clips.max_abs_of(layout, calls) if calls else None  # the script clipped by value
        if calls and self._config.disable_script_clip:
            calls = []  # the calls measured but did not scale: nothing to undo
        if layout.columns is not None:  # DTensor or FSDP1 flat params: local shards, per-parameter views
            n_present = sum(g is not None for g in grads)
            grads = layout.columns.expand(grads)
            calls = _column_calls(calls, n_present, grads, layout.columns.one_to_one)
        row = self._read_with_calls(layout, grads, loss, calls)
        if peaks is not None:
            row.max_abs = peaks
        return row

    def _read_with_calls(self, layout: Layout, grads: list[torch.Tensor | None], loss: torch.Tensor | None,
                         calls: list[ClipCall]) -> Row:
        """By the plan when it covers the grads and the calls are one clip over all, else norm by norm."""
        plan = layout.plan
        if plan is not None and (not calls or one_clip_over_all(calls, len(grads))):
            if loss is not None and loss.get_device() != plan.device_index:  # get_device: no torch.device made
                loss = loss.to(plan.device, non_blocking=True)
            row = self.read_planned(layout, grads, loss)
            if row is not None:
                if calls:
                    row.attach("script_coef", calls[0].coef)  # type: ignore[arg-type]  # the grads read were scaled by it
                return row
        return self._read_each(layout, grads, loss, calls)

    def _read_each(self, layout: Layout, grads: list[torch.Tensor | None], loss: torch.Tensor | None,
                   calls: list[ClipCall]) -> Row:
        """Norm by norm: params without a grad, sparse or DTensor grads, several devices, partial clip calls."""
        self.general_reads += 1
        present = tuple(i for i, g in enumerate(grads) if g is not None)
        loss_list = [loss] if loss is not None else []
        cols = layout.present_cols(present, loss is not None)
        if not present:
            values = stack_on(loss_list, loss.device) if loss is not None else torch.empty(0)
            return Row(layout.slot, values, cols)
        applied = tensor_norms([grads[i] for i in present])  # type: ignore[misc]
        device = applied[0].device
        if not calls or one_clip_over_all(calls, len(present)):
            row = Row(layout.slot, stack_on(applied + loss_list, device), cols)
            if calls:
                row.attach("script_coef", calls[0].coef)  # type: ignore[arg-type]
            return row
        raw = self._clips.undo(layout, present, applied, calls)
        row = Row(layout.slot, stack_on(raw + loss_list, device), cols)
        row.attach("g_applied", global_norm(stack_on(applied, device)))
        return row

    def fill(self, row: Row, groups: list[dict[str, Any]] | tuple[()] = ()) -> None:
        """The backward count, the lr of the first param group (none for a hand-written loop) and the
        script's clipping (noted by the last clip call) go on ``row``."""
        row.n_backward = self._loss.n_backward
        lr = groups[0].get("lr") if groups else None
        if lr.__class__ is not float and isinstance(lr, torch.Tensor):  # schedulers fill_ a Tensor lr in place
            lr = lr.detach().clone()  # this step's value
        row.lr = lr
        row_clip = self._clips.take_row_clip()
        if row_clip is not None:
            row.clip_source, row.max_norm = row_clip

    def _rare(self, row: Row, optimizer: Any, layout: Layout, scaler: Any, skipped: bool) -> None:
        """GradScaler's scale and skipped steps, fused optimizers' scaled grads, compare's injected clip."""
        grad_scale = getattr(optimizer, "grad_scale", None)
        if isinstance(grad_scale, torch.Tensor):  # fused optimizer under GradScaler: the grads read were scaled
            row.attach("grad_scale", grad_scale.detach().reshape(()).float().clone())  # update() changes it in place
        if scaler is not None:
            scale = getattr(scaler, "_scale", None) if getattr(scaler, "_enabled", False) else None
            if isinstance(scale, torch.Tensor):  # clone: update() changes _scale in place
                row.attach("loss_scale", scale.detach().reshape(()).float().clone())
        found_inf = getattr(optimizer, "found_inf", None)
        if skipped:
            row.skipped = True
        elif isinstance(found_inf, torch.Tensor):
            row.attach("found_inf", found_inf.reshape(()).float())
        if self._injecting and not skipped:
            self._injector.clip(layout.params, row.slot.index, row, layout)


def _column_calls(calls: list[ClipCall], n_present: int, columns: list[torch.Tensor | None],
                  one_to_one: bool) -> list[ClipCall]:
    """The clip calls as the column grads see them: one clip over every param is one factor over every column;
    partial calls map param by param when each param is one column. Partial calls over FSDP1 flat params are
    not undone (the rows then hold the clipped norms; docs/distributed.md)."""
    if not calls or one_to_one:
        return calls
    if one_clip_over_all(calls, n_present):
        call = calls[0]
        ids = list(range(sum(c is not None for c in columns)))  # only their count is read on this path
        return [ClipCall(ids, call.function, call.threshold, coef=call.coef)]
    return []


def _known_uncovered(plan: NormPlan, grads: list[torch.Tensor | None]) -> bool:
    """True when ``grads`` are a case plans are known not to cover (the per-tensor read handles them)."""
    for grad in grads:
        if grad is None:
            continue
        if (grad.layout is not torch.strided  # sparse
                or grad.requires_grad  # backward(create_graph=True): out= refuses them
                or grad.device != plan.device
                or type(grad) is not torch.Tensor  # a tensor subclass
                or (plan.dtype is not None and grad.dtype is torch.float64)):  # vector_norm will not narrow
            return True
    return False
