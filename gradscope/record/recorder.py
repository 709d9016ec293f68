"""The recorder: torch hooks that measure every optimizer step and hand rows to the store.

What it installs (all undone by :meth:`Recorder.stop`):

- global optimizer step pre/post hooks (every ``torch.optim.Optimizer``, even one created before),
  wrapped by :func:`_eager` (a leaner ``torch.compiler.disable``) so that ``torch.compile(opt.step)``
  runs them eagerly;
- ``torch.autograd.backward`` (``Tensor.backward`` calls it) for the loss of each step;
- ``clip_grad_norm_`` / ``clip_grads_with_norm_`` / ``clip_grad_value_`` for the script's own
  clipping, so the recorded norm is the *pre-clip* one;
- ``GradScaler.scale`` / ``GradScaler.step`` for unscaled losses, the loss scale and skipped steps;
- ``torch.manual_seed`` to learn (and, for ``compare``, replace) the script's seed;
- ``nn.Module.zero_grad`` for scripts that update weights by hand, with no ``torch.optim`` optimizer.

Hazards named once: nothing here calls ``.item()`` or branches on a device value per step (each is a
host sync on CUDA); values stay on device until a flush. Nothing here may raise into the user's
loop: every hook body is guarded and warns once. The only exception raised on purpose is
:class:`StopRun` (``--max-steps``).
"""

from __future__ import annotations

import atexit
import functools
import math
import operator
import os
import platform
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradscope import __version__, store
from gradscope.errors import StopRun
from gradscope.record.config import RecorderConfig
from gradscope.record.measure import (
    NormPlan,
    clip_coefficient,
    global_norm,
    plan_norms,
    stack_on,
    tensor_norms,
    write_norms,
)
from gradscope.record.naming import resolve_names
from gradscope.record.patches import Patcher
from gradscope.record.rows import Row, RowBlocks, StepBuffer

_IS_NONE = functools.partial(operator.is_, None)


@dataclass
class _Slot:
    """One optimizer as the store sees it: re-created optimizers with the same params share a slot."""

    index: int
    cls: str
    names: list[str]
    aliases: dict[str, list[str]]
    shapes: list[list[int]]
    steps: int = 0
    params: list[weakref.ref[torch.Tensor]] = field(default_factory=list, repr=False)  # its latest optimizer's

    def held_by_others(self, params: list[torch.Tensor]) -> bool:
        """True while tensors this slot recorded are alive and differ from ``params``: another live
        optimizer with the same class and names (GAN D and G as two nn.Sequential), not a re-created one."""
        return any(ref() is not None and ref() is not p for ref, p in zip(self.params, params, strict=True))

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "class": self.cls, "n_tensors": len(self.names), "names": self.names,
                "shapes": self.shapes, "aliases": self.aliases}


@dataclass
class _Layout:
    """An optimizer's parameter list at one moment, with its slot, its read plan and column maps."""

    signature: tuple[Any, ...]
    params: list[torch.Tensor]
    slot: _Slot
    position: dict[int, int]  # id(param) -> index in params
    plan: NormPlan | None  # None: params on several devices, always the general path
    sole: list[torch.Tensor] | None = None  # a single-group optimizer's param list itself (Recorder._usual_row)
    cols: dict[Any, np.ndarray] = field(default_factory=dict)  # column maps, made once (see Row.cols)
    blocks: dict[bool, tuple[np.ndarray, RowBlocks]] = field(default_factory=dict)  # with_loss -> planned rows
    saw_none: bool = False  # a step of this layout had a param without a grad (read_row checks from then on)

    def read_row(self, grads: list[torch.Tensor | None], loss: torch.Tensor | None) -> Row | None:
        """The norms (and loss) read by the plan into its next preallocated row; None when the plan does
        not cover these grads (a param without one, sparse grads, or a loss on another device)."""
        plan = self.plan
        if plan is None or (loss is not None and loss.get_device() != plan.device_index):  # no torch.device made
            return None
        # No type check per step: a None grad makes the stack raise. Once one was seen (a frozen or unused
        # param the optimizer holds, often None every step), check first rather than read in vain.
        if self.saw_none and any(map(_IS_NONE, grads)):  # C-level, stops at the first None
            return None
        found = self.blocks.get(loss is not None)
        if found is None:
            found = self.blocks[loss is not None] = (plan.cols(loss is not None),
                                                     RowBlocks(plan.part_sizes(loss is not None), plan.device))
        out, parts, block, pos = found[1].claim()
        try:
            write_norms(plan, grads, loss, parts)  # type: ignore[arg-type]
        except Exception:
            if any(map(_IS_NONE, grads)):
                self.saw_none = True  # a param without a grad: the general path, this step
            else:  # sparse grads, grads on another device: the general path, from now on
                self.plan = None
                self.blocks.clear()
            return None
        return Row(self.slot, out, found[0], block, pos)

    def present_cols(self, present: tuple[int, ...], with_loss: bool) -> np.ndarray:
        """Columns of the general path's values: the params that had a grad, in order, then the loss."""
        key = (present, with_loss)
        found = self.cols.get(key)
        if found is None:
            found = self.cols[key] = np.array([*present, *([len(self.params)] if with_loss else [])], dtype=np.int64)
        return found


@dataclass
class _ClipCall:
    """One call of the script's clipping function since the last step."""

    param_ids: list[int]  # params that had a grad, in call order
    function: str
    max_norm: float | None
    coef: torch.Tensor | None = None  # norm clipping: the factor grads were multiplied by
    raw: list[torch.Tensor] | None = None  # value clipping: pre-clip norms, aligned with param_ids


def _eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)`` for a hook that runs every step, at a fifth of its cost per call.

    What disable does, kept: a compiled ``opt.step`` calls the hook eagerly (a graph break) instead of
    tracing it, and dynamo's frame callback is off while it runs, so nothing inside is compiled. What is
    left out: its stance and export bookkeeping, six Python calls that cost ~5 µs a step in the cold
    caches after a backward (bench/run.py, "mlp"). Falls back to ``torch.compiler.disable`` where torch
    lacks the private ``set_eval_frame`` or ``torch._dynamo.skip``.
    """
    try:
        from torch._C._dynamo.eval_frame import set_eval_frame
        from torch._dynamo.decorators import skip
    except ImportError:  # pragma: no cover - a torch without dynamo's private frame hooks
        return getattr(torch.compiler, "disable", lambda f: f)(fn)

    def hook(*args: Any) -> Any:
        prior = set_eval_frame(None)
        try:
            return fn(*args)
        finally:
            set_eval_frame(prior)

    # skip: the mark (a compiled caller breaks its graph and calls the hook) and the hook's own frame left
    # alone by the frame callback that is still on when the caller resumes eagerly.
    return skip(hook)


def _closure_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Callable[[], Any] | None, str | int]:
    if kwargs.get("closure") is not None:
        return kwargs["closure"], "closure"
    if len(args) > 1 and callable(args[1]):
        return args[1], 1
    return None, ""


def _params_list(parameters: Any) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return list(parameters)


class Recorder:
    """Record every optimizer step of the code run inside it to a gradscope run directory.

    Example::

        with gradscope.Recorder(label="notebook") as rec:
            train()
        print(rec.run_dir)

    Args:
        run_dir: the run directory to write; a new one under ``runs_dir`` when omitted.
        runs_dir: the runs root (default ``$GRADSCOPE_DIR`` or ``./.gradscope``).
        label: the run name's prefix when a new run directory is made.
        config: see :class:`RecorderConfig`.
        meta: extra provenance for meta.json (argv, script path...), written as given.
    """

    _active: Recorder | None = None

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, *, runs_dir: str | os.PathLike[str] | None = None,
                 label: str = "python", config: RecorderConfig | None = None, meta: dict[str, Any] | None = None) -> None:
        self.config = config or RecorderConfig()
        self._label = label
        self._runs_dir = runs_dir
        self.run_dir: Path | None = Path(run_dir) if run_dir is not None else None
        self._meta_extra = dict(meta or {})
        self._patcher = Patcher()
        self._handles: list[Any] = []
        self._buffer = StepBuffer()
        self._writer: store.RunWriter | None = None
        self._layouts: weakref.WeakKeyDictionary[Any, _Layout] = weakref.WeakKeyDictionary()
        self._last_layout: tuple[weakref.ref[Any], _Layout] | None = None  # the last optimizer's: skips the lookup
        self._slots: dict[tuple[Any, ...], _Slot] = {}
        self._started = False
        self._stopped = False
        self._pid = os.getpid()
        self._warned: set[str] = set()
        self._seeds: list[int] = []
        self._script_clip: dict[str, Any] = {"script_max_norm": None, "script_clip_function": None, "script_clip_calls": 0}
        self._reset_step_state()

    def _reset_step_state(self) -> None:
        self._depth = 0  # nesting of optimizer steps: wrappers and super().step() record once
        self._in_closure = 0
        self._draft: Row | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_ok = True
        self._n_backward = 0
        self._window_closed = True  # the next backward starts a new loss window
        self._pending_scale: torch.Tensor | None = None
        self._scaler_seen = getattr(self, "_scaler_seen", False)
        self._active_scaler: Any = None
        self._clip_calls: list[_ClipCall] = []
        self._row_clip: tuple[str, float | None] | None = None
        self._meta_dirty = False
        self._manual_draft: Row | None = None
        self._optimizer_steps = 0  # torch.optim steps seen
        self._optimizer_made = getattr(self, "_optimizer_made", False)
        self._commits = 0
        self._t0 = time.perf_counter()
        self._last_flush = self._t0

    # ----------------------------------------------------------------------------------------------
    # Lifecycle
    # ----------------------------------------------------------------------------------------------

    def start(self) -> Recorder:
        """Create the run directory, write meta.json and install the hooks."""
        if Recorder._active is not None:
            raise RuntimeError("a gradscope Recorder is already active in this process")
        if self.run_dir is None:
            root = store.runs_root(self._runs_dir)
            self.run_dir = store.create_run_dir(root, self._label)
            store.point_latest(root, self.run_dir)
        self._writer = store.RunWriter(self.run_dir)
        self._start_time = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._write_meta(status="running")
        Recorder._active = self
        self._install()
        self._started = True
        self._reset_step_state()
        atexit.register(self._atexit)
        if self.config.seed is not None:
            self._original_manual_seed(self.config.seed)
        return self

    def stop(self, status: str = "complete", exit_code: int | None = 0, error: str | None = None) -> None:
        """Remove the hooks, flush what is pending, compact the parts and finish meta.json."""
        if not self._started or self._stopped or os.getpid() != self._pid:
            return  # a forked child (DataLoader worker) must not finish the parent's run
        self._stopped = True
        self._uninstall()
        Recorder._active = None
        self._guard("manual", self._finish_manual)
        self._commit_manual()
        self._flush()
        try:
            assert self._writer is not None
            self._writer.compact()
        except Exception as exc:  # the parts stay readable; say so rather than lose the run
            self._warn("compact", f"could not compact the part files ({exc}); the parts are kept")
        self._write_meta(status=status, exit_code=exit_code, error=error,
                         end_time=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, StopRun):
            self.stop("complete", 0)
        elif isinstance(exc, KeyboardInterrupt):
            self.stop("interrupted", 130, "KeyboardInterrupt")
        else:
            self.stop("failed", 1, f"{type(exc).__name__}: {exc}")

    def _atexit(self) -> None:
        if self._started and not self._stopped:
            self.stop("complete", None)

    @property
    def _hand_written(self) -> bool:
        """True while no torch.optim optimizer exists: updates are written by hand (p.data.add_)."""
        return self._optimizer_steps == 0 and not self._optimizer_made

    @property
    def n_steps(self) -> int:
        """Records written or pending so far, over all optimizers."""
        return self._commits

    @property
    def seeds(self) -> list[int]:
        """Arguments of the script's ``torch.manual_seed`` calls, in order (after any override)."""
        return list(self._seeds)

    # ----------------------------------------------------------------------------------------------
    # Installing and removing hooks
    # ----------------------------------------------------------------------------------------------

    def _install(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        # Dynamo must not trace into the hooks (compile(opt.step) crashes otherwise).
        disable = getattr(torch.compiler, "disable", lambda fn: fn)
        self._handles = [register_optimizer_step_pre_hook(_eager(self._on_step_pre)),
                         register_optimizer_step_post_hook(_eager(self._on_step_post))]
        self._patch_backward()
        self._patch_clipping(disable)
        self._patch_grad_scaler()
        self._patch_seed()
        self._patch_zero_grad()
        self._patch_optimizer_init()

    def _uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._patcher.restore()

    def _patch_backward(self) -> None:
        original = torch.autograd.backward
        recorder = self

        current_node = torch._C._current_autograd_node

        def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(tensors, (torch.Tensor, tuple, list)):
                tensors = tuple(tensors)  # a generator: read it once, for the loss and for torch alike
            # Reentrant checkpointing calls backward from inside the engine: not a new loss.
            if current_node() is None:
                try:
                    recorder._on_backward(tensors)
                except Exception as exc:  # _guard, inlined: this runs every backward
                    recorder._warn_failed("backward", exc)
            return original(tensors, *args, **kwargs)

        self._patcher.replace(torch.autograd, "backward", backward)

    def _patch_clipping(self, disable: Callable[[Any], Any]) -> None:
        from torch.nn.utils import clip_grad

        utils = torch.nn.utils
        # Keep the unpatched function for _inject: read after the loop below, it would be our own wrapper,
        # which scales by 1.0 in compare arms (the script's clipping is disabled there).
        self._original_clip_norm = clip_grad.clip_grad_norm_
        norm = disable(self._wrap_clip_norm(clip_grad.clip_grad_norm_))
        value = disable(self._wrap_clip_value(clip_grad.clip_grad_value_))
        # Patch both homes: `from torch.nn.utils import clip_grad_norm_` and the module global that the
        # deprecated clip_grad_norm calls (so it is counted once, not twice).
        for owner in (utils, clip_grad):
            self._patcher.replace(owner, "clip_grad_norm_", norm)
            self._patcher.replace(owner, "clip_grad_value_", value)
        with_norm = getattr(utils, "clip_grads_with_norm_", None)
        if with_norm is not None:
            self._patcher.replace(utils, "clip_grads_with_norm_", disable(self._wrap_clip_with_norm(with_norm)))

    def _patch_grad_scaler(self) -> None:
        try:
            from torch.amp import GradScaler
        except ImportError:  # pragma: no cover - torch < 2.3
            return
        recorder = self
        original_scale, original_step = GradScaler.scale, GradScaler.step

        def scale(scaler: Any, outputs: Any) -> Any:
            result = original_scale(scaler, outputs)
            recorder._guard("scale", recorder._on_scale, scaler, outputs, result)
            return result

        def step(scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            return recorder._scaler_step(original_step, scaler, optimizer, args, kwargs)

        self._patcher.replace(GradScaler, "scale", scale)
        self._patcher.replace(GradScaler, "step", step)

    def _patch_seed(self) -> None:
        original = torch.manual_seed
        self._original_manual_seed = original
        recorder = self

        def manual_seed(seed: Any) -> Any:
            if recorder.config.seed is not None:
                seed = recorder.config.seed  # compare arms: the arm's seed replaces the script's
            recorder._guard("seed", recorder._seeds.append, int(seed))
            return original(seed)

        self._patcher.replace(torch, "manual_seed", manual_seed)
        self._patcher.replace(torch.random, "manual_seed", manual_seed)

    def _patch_optimizer_init(self) -> None:
        import gc

        # An optimizer made before the recorder started (API use) counts too: one gc scan, at start.
        self._optimizer_made = any(issubclass(type(o), torch.optim.Optimizer) for o in gc.get_objects())
        original = torch.optim.Optimizer.__init__
        recorder = self

        def __init__(optimizer: Any, *args: Any, **kwargs: Any) -> None:
            recorder._optimizer_made = True  # a clip call before its first step is not a hand-written update
            original(optimizer, *args, **kwargs)

        self._patcher.replace(torch.optim.Optimizer, "__init__", __init__)

    def _patch_zero_grad(self) -> None:
        original = nn.Module.zero_grad
        recorder = self

        def zero_grad(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if recorder._hand_written and not recorder._window_closed:
                recorder._guard("manual", recorder._on_manual_zero_grad, module)
            return original(module, *args, **kwargs)

        self._patcher.replace(nn.Module, "zero_grad", zero_grad)

    # ----------------------------------------------------------------------------------------------
    # Safety: nothing reaches the user's loop but StopRun
    # ----------------------------------------------------------------------------------------------

    def _guard(self, site: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except StopRun:
            raise
        except Exception as exc:
            self._warn_failed(site, exc)
            return None

    def _warn_failed(self, site: str, exc: Exception) -> None:
        self._warn(site, f"recording failed in {site} ({type(exc).__name__}: {exc}); training goes on")

    def _warn(self, site: str, message: str) -> None:
        if site not in self._warned:
            self._warned.add(site)
            print(f"gradscope: warning: {message}", file=sys.stderr)

    # ----------------------------------------------------------------------------------------------
    # Loss capture
    # ----------------------------------------------------------------------------------------------

    def _on_backward(self, tensors: Any) -> None:
        if self._depth and not self._in_closure:
            self._depth = 0  # the last step raised before its post hook: start clean
        if self._window_closed:
            if self._manual_draft is not None:
                self._commit_manual()  # a hand-written update loop: the previous update is over
            self._loss_sum, self._loss_ok, self._n_backward = None, True, 0
            self._clip_calls = []
            self._window_closed = False
        self._n_backward += 1
        for root in (tensors,) if isinstance(tensors, torch.Tensor) else tensors:
            if root.dim() and root.numel() != 1:  # dim() first: the usual loss is 0-dim
                self._loss_ok = False  # out.backward(gradient) on a non-scalar: no loss to report
                continue
            value = self._unscaled(root) if self._scaler_seen else root.detach()
            if value.dim():
                value = value.reshape(())
            # A view, not a copy: the step's read stacks it with the norms (that stack is the copy). No row
            # may keep the view itself: a loss can share a step-sized buffer (mse_loss's result keeps its
            # (B, T) workspace as storage), and rows holding those until the flush grew memory ~0.5 MB/step.
            if value.dtype is not torch.float32:
                value = value.float()
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value.to(self._loss_sum.device)
        self._pending_scale = None

    def _unscaled(self, root: torch.Tensor) -> torch.Tensor:
        """The loss before GradScaler scaled it (only called once a scale() call was seen)."""
        unscaled = getattr(root, "_gradscope_unscaled", None)
        if unscaled is not None:
            return unscaled
        if self._pending_scale is not None:  # (scaler.scale(loss) / k).backward(): divide the scale back out
            return root.detach() / self._pending_scale.to(root.device)
        return root.detach()

    def _on_scale(self, scaler: Any, outputs: Any, result: Any) -> None:
        if isinstance(outputs, torch.Tensor) and isinstance(result, torch.Tensor) and result is not outputs:
            result._gradscope_unscaled = outputs.detach()
            self._pending_scale = scaler._scale
            self._scaler_seen = True

    # ----------------------------------------------------------------------------------------------
    # Optimizer steps
    # ----------------------------------------------------------------------------------------------

    def _on_step_pre(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._depth += 1
        if self._depth > 1:
            return None  # the inner step of a wrapper optimizer or of super().step(): one record only
        self._optimizer_steps += 1
        self._manual_draft = None  # a clip call before this step was not a hand-written update
        closure, where = _closure_of(args, kwargs) if len(args) > 1 or kwargs else (None, "")
        if closure is None:
            try:  # _guard, inlined: this runs every step
                self._draft = self._usual_row(optimizer) or self._measure(optimizer)
            except Exception as exc:
                self._draft = None
                self._warn_failed("measure", exc)
            return None
        self._draft = None  # measured after the closure's first call, when its grads exist
        wrapped = self._wrap_closure(optimizer, closure)
        if where == "closure":
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    def _on_step_post(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        self._depth = 0
        draft = self._draft
        if draft is None:
            draft = self._guard("measure", self._measure, optimizer)
        self._draft = None
        if draft is not None:
            self._commit(draft)

    def _wrap_closure(self, optimizer: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
        recorder = self
        calls = [0]

        def closure_wrapper(*args: Any, **kwargs: Any) -> Any:
            recorder._in_closure += 1
            try:
                result = closure(*args, **kwargs)
            finally:
                recorder._in_closure -= 1
            calls[0] += 1
            if calls[0] == 1:  # LBFGS re-evaluates in its line search: the first call is the step's
                recorder._draft = recorder._guard("measure", recorder._measure, optimizer, result)
            elif recorder.config.inject_max_norm is not None:
                recorder._guard("inject", recorder._inject, optimizer)  # clip after every evaluation
            return result

        return closure_wrapper

    def _scaler_step(self, original: Callable[..., Any], scaler: Any, optimizer: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
        enabled = bool(getattr(scaler, "_enabled", False))
        if enabled and self.config.inject_max_norm is not None:
            # Clip unscaled grads, as the documented AMP recipe does; fused optimizers would see scaled ones.
            self._guard("unscale", self._unscale_if_ready, scaler, optimizer)
        before, previous = self._commits, self._active_scaler
        self._active_scaler = scaler
        try:
            result = original(scaler, optimizer, *args, **kwargs)
        finally:
            self._active_scaler = previous
        if enabled and self._commits == before and self._depth == 0:
            # inf/NaN found: GradScaler skipped optimizer.step(), so no hook ran. Record it anyway.
            draft = self._guard("measure", self._measure, optimizer, None, scaler, True)
            if draft is not None:
                self._commit(draft)
        return result

    @staticmethod
    def _unscale_if_ready(scaler: Any, optimizer: Any) -> None:
        from torch.amp.grad_scaler import OptState

        if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
            scaler.unscale_(optimizer)

    # ----------------------------------------------------------------------------------------------
    # Measuring one step
    # ----------------------------------------------------------------------------------------------

    def _layout(self, optimizer: Any) -> _Layout:
        groups = optimizer.param_groups
        last = self._last_layout
        if last is not None and last[0]() is optimizer and len(groups) == 1 and last[1].signature == (
                (id(groups[0]["params"]), len(groups[0]["params"])),):
            return last[1]  # the usual step: the same single-group optimizer as last time
        # Names are resolved again only when the parameter layout changes.
        signature = tuple([(id(g["params"]), len(g["params"])) for g in groups])
        if last is not None and last[1].signature == signature and last[0]() is optimizer:
            return last[1]
        layout = self._layouts.get(optimizer)
        if layout is not None and layout.signature == signature:
            self._last_layout = (weakref.ref(optimizer), layout)
            return layout
        params = [p for g in groups for p in g["params"]]
        group_of = [(gi, pi) for gi, g in enumerate(groups) for pi in range(len(g["params"]))]
        new = self._new_layout(signature, params, group_of, type(optimizer).__name__)
        new.sole = groups[0]["params"] if len(groups) == 1 else None
        if layout is not None:  # add_param_group mid-run: a new series, whose step index goes on from the old one's
            new.slot.steps = max(new.slot.steps, layout.slot.steps)
        self._layouts[optimizer] = new
        self._last_layout = (weakref.ref(optimizer), new)
        return new

    def _new_layout(self, signature: tuple[Any, ...], params: list[torch.Tensor], group_of: list[tuple[int, int]],
                    cls: str) -> _Layout:
        named = resolve_names(params, group_of)
        key = base = (cls, tuple(named.names))
        slot, n = self._slots.get(key), 0
        while slot is not None and slot.held_by_others(params):  # same names, other live tensors: its own series
            n += 1
            key = (*base, n)
            slot = self._slots.get(key)
        if slot is None:  # an optimizer re-created with the same params joins the same series
            slot = _Slot(len(self._slots), cls, named.names, named.aliases, [list(p.shape) for p in params])
            self._slots[key] = slot
            self._meta_dirty = True
        slot.params = [weakref.ref(p) for p in params]
        devices = {p.device for p in params}
        # A tensor subclass that is not a Parameter (a DTensor param: FSDP2, tensor parallel) has subclass grads,
        # which the general path reads shard by shard; Parameter subclasses (FSDP1's FlatParameter) have plain ones.
        plannable = len(devices) == 1 and all(type(p) is torch.Tensor or issubclass(type(p), nn.Parameter) for p in params)
        plan = plan_norms([p.shape for p in params], devices.pop(), {p.dtype for p in params}) if plannable else None
        return _Layout(signature, params, slot, {id(p): i for i, p in enumerate(params)}, plan)

    def _usual_row(self, optimizer: Any) -> Row | None:
        """The usual step, measured in one call; None when it is not the usual step (see :meth:`_measure`).

        Usual: an optimizer seen before, with the same single parameter list, dense grads on one device,
        and no clip call, GradScaler, fused-optimizer scale or injected clip to account for. Why a second
        route: after a backward pass the caches are cold and each Python call costs a few µs; on the tiny
        MLP the general route's calls cost as much as reading the norms (bench/run.py, workload "mlp").
        """
        groups = optimizer.param_groups
        if (len(groups) != 1 or self._clip_calls or self._active_scaler is not None or self._row_clip is not None
                or self.config.inject_max_norm is not None or hasattr(optimizer, "found_inf")):
            return None
        layout = self._layouts.get(optimizer)  # per optimizer: a GAN's two alternate and both stay here
        params = groups[0]["params"]
        # saw_none: a param without a grad (often a frozen one, every step) sends the step to _measure, which
        # reads the grads once; trying here first would read them and look for the None twice a step.
        if layout is None or params is not layout.sole or len(params) != len(layout.params) or layout.saw_none:
            return None
        # layout.params, as _measure reads: the same tensors unless an entry of the list was swapped in place
        row = layout.read_row([p.grad for p in layout.params], self._loss_sum if self._loss_ok else None)
        if row is not None:
            self._fill_step(row, groups)
        return row

    def _measure(self, optimizer: Any, closure_result: Any = None, scaler: Any = None, skipped: bool = False) -> Row:
        # Runs every step: kept to the fewest Python calls (each costs several µs in the cold caches that
        # follow a backward pass). The rare cases (GradScaler, closures, compare's injection) branch off.
        layout = self._layout(optimizer)
        row = self._measure_params(layout, self._step_loss(closure_result))
        self._fill_step(row, optimizer.param_groups)
        scaler = scaler or self._active_scaler
        if scaler is not None or skipped or self.config.inject_max_norm is not None or hasattr(optimizer, "found_inf"):
            self._measure_rare(row, optimizer, scaler, skipped)
        return row

    def _measure_rare(self, row: Row, optimizer: Any, scaler: Any, skipped: bool) -> None:
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
        if self.config.inject_max_norm is not None and not skipped:
            self._inject(optimizer, row)

    def _fill_step(self, row: Row, groups: list[dict[str, Any]] | tuple[()] = ()) -> None:
        """The backward count, the lr of the first param group (none for a hand-written loop) and the
        script's clipping (noted by the last clip call) go on ``row``."""
        row.n_backward = self._n_backward
        lr = groups[0].get("lr") if groups else None
        if lr.__class__ is not float and isinstance(lr, torch.Tensor):  # schedulers fill_ a Tensor lr in place
            lr = lr.detach().clone()  # this step's value
        row.lr = lr
        if self._row_clip is not None:
            row.clip_source, row.max_norm = self._row_clip
            self._row_clip = None

    def _step_loss(self, closure_result: Any) -> torch.Tensor | None:
        """This step's loss (0-dim, float32, on its own device), or None when there is none to report."""
        loss = self._loss_sum
        if (loss is None or not self._loss_ok) and isinstance(closure_result, torch.Tensor) and closure_result.numel() == 1:
            return closure_result.detach().reshape(()).float()  # a closure that never called backward
        return loss if self._loss_ok else None

    def _measure_params(self, layout: _Layout, loss: torch.Tensor | None) -> Row:
        """Read every gradient's norm, with the loss in the same vector: usually one or two device ops."""
        grads = [p.grad for p in layout.params]
        plan = layout.plan
        calls = self._script_clip_calls(layout) if self._clip_calls else ()
        if calls and self.config.disable_script_clip:
            calls = ()  # the calls measured but did not scale: nothing to undo
        if plan is not None and (not calls or self._one_clip_over_all(calls, len(grads))):
            if loss is not None and loss.get_device() != plan.device_index:  # get_device: no torch.device made
                loss = loss.to(plan.device, non_blocking=True)
            row = layout.read_row(grads, loss)
            if row is not None:
                if calls:
                    row.attach("script_coef", calls[0].coef)  # type: ignore[arg-type]  # the grads read were scaled by it
                return row
        return self._measure_general(layout, grads, loss, list(calls))

    def _measure_general(self, layout: _Layout, grads: list[torch.Tensor | None], loss: torch.Tensor | None,
                         calls: list[_ClipCall]) -> Row:
        """Params without a grad, sparse or DTensor grads, several devices, or clip calls over some params."""
        present = tuple(i for i, g in enumerate(grads) if g is not None)
        loss_list = [loss] if loss is not None else []
        cols = layout.present_cols(present, loss is not None)
        if not present:
            values = stack_on(loss_list, loss.device) if loss is not None else torch.empty(0)
            return Row(layout.slot, values, cols)
        applied = tensor_norms([grads[i] for i in present])
        device = applied[0].device
        if not calls or self._one_clip_over_all(calls, len(present)):
            row = Row(layout.slot, stack_on(applied + loss_list, device), cols)
            if calls:
                row.attach("script_coef", calls[0].coef)  # type: ignore[arg-type]
            return row
        raw = self._undo_script_clip(layout, present, applied, calls)
        row = Row(layout.slot, stack_on(raw + loss_list, device), cols)
        row.attach("g_applied", global_norm(stack_on(applied, device)))
        return row

    @staticmethod
    def _one_clip_over_all(calls: list[_ClipCall], n_present: int) -> bool:
        """The common case: one clip_grad_norm_ call over every param with a grad, undone by one factor."""
        return len(calls) == 1 and calls[0].coef is not None and len(calls[0].param_ids) == n_present

    def _script_clip_calls(self, layout: _Layout) -> list[_ClipCall]:
        """The script's clip calls since the last step that touched ``layout``'s params (noted, then forgotten)."""
        calls = [c for c in self._clip_calls if any(pid in layout.position for pid in c.param_ids)]
        if calls:
            self._clip_calls = [c for c in self._clip_calls if c not in calls]
            self._note_script_clip(calls)
        return calls

    def _undo_script_clip(self, layout: _Layout, present: tuple[int, ...], applied: list[torch.Tensor],
                          calls: list[_ClipCall]) -> list[torch.Tensor]:
        """Pre-clip per-tensor norms when several clip calls (or value clipping) acted on parts of the params."""
        slot_of = {id(layout.params[i]): q for q, i in enumerate(present)}
        parts = list(applied)
        for call in calls:
            for j, pid in enumerate(call.param_ids):
                q = slot_of.get(pid)
                if q is not None:
                    parts[q] = call.raw[j] if call.raw is not None else parts[q] / call.coef.to(parts[q].device)
        return parts

    def _note_script_clip(self, calls: list[_ClipCall]) -> None:
        last = calls[-1]
        self._script_clip.update(script_max_norm=last.max_norm, script_clip_function=last.function)
        self._script_clip["script_clip_calls"] += len(calls)
        disabled = self.config.disable_script_clip
        # The max_norm column holds norm thresholds (recommend offers it as one): a clip value is not.
        max_norm = None if last.function == "clip_grad_value_" else last.max_norm
        self._row_clip = ("script-disabled", None) if disabled else ("script", max_norm)

    def _inject(self, optimizer: Any, row: Row | None = None) -> None:
        """Compare arms: clip exactly as ``clip_grad_norm_(params, max_norm)`` in the script would."""
        max_norm = self.config.inject_max_norm
        assert max_norm is not None
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        total = self._original_clip_norm(params, max_norm)
        if row is not None:
            row.attach("applied_coef", clip_coefficient(total, max_norm))
            row.clip_source, row.max_norm = "injected", max_norm

    # ----------------------------------------------------------------------------------------------
    # The script's own clipping
    # ----------------------------------------------------------------------------------------------

    def _wrap_clip_norm(self, original: Callable[..., Any]) -> Callable[..., Any]:
        recorder = self

        def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
            params = _params_list(parameters)
            recorder._guard("manual", recorder._maybe_manual_update, params)
            effective = recorder._effective_max_norm(max_norm)
            total = original(params, effective, *args, **kwargs)
            recorder._guard("clip", recorder._on_clip, params, "clip_grad_norm_", max_norm,
                            clip_coefficient(total, effective) if math.isfinite(effective) else None)
            return total

        return clip_grad_norm_

    def _wrap_clip_with_norm(self, original: Callable[..., Any]) -> Callable[..., Any]:
        recorder = self

        def clip_grads_with_norm_(parameters: Any, max_norm: float, total_norm: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            params = _params_list(parameters)
            recorder._guard("manual", recorder._maybe_manual_update, params)
            effective = recorder._effective_max_norm(max_norm)
            if math.isfinite(effective):
                original(params, effective, total_norm, *args, **kwargs)
            recorder._guard("clip", recorder._on_clip, params, "clip_grads_with_norm_", max_norm,
                            clip_coefficient(total_norm, effective) if math.isfinite(effective) else None)

        return clip_grads_with_norm_

    def _wrap_clip_value(self, original: Callable[..., Any]) -> Callable[..., Any]:
        recorder = self

        def clip_grad_value_(parameters: Any, clip_value: float, *args: Any, **kwargs: Any) -> Any:
            params = _params_list(parameters)
            recorder._guard("manual", recorder._maybe_manual_update, params)
            with_grad = [p for p in params if p.grad is not None]
            # Value clipping has no single factor to divide out: measure before it acts (one pass).
            raw = recorder._guard("clip", tensor_norms, [p.grad for p in with_grad])
            if not recorder.config.disable_script_clip and recorder.config.inject_max_norm is None:
                original(params, clip_value, *args, **kwargs)
            if raw is not None:
                recorder._clip_calls.append(_ClipCall([id(p) for p in with_grad], "clip_grad_value_", float(clip_value), raw=raw))

        return clip_grad_value_

    def _effective_max_norm(self, max_norm: float) -> float:
        if self.config.inject_max_norm is not None and self._hand_written:
            return self.config.inject_max_norm  # a hand-written update loop: inject at the script's own call
        if self.config.disable_script_clip or self.config.inject_max_norm is not None:
            return math.inf  # clip_grad_norm_ with inf scales by exactly 1.0 and returns the same norm
        return float(max_norm)

    def _on_clip(self, params: list[torch.Tensor], function: str, max_norm: Any, coef: torch.Tensor | None) -> None:
        with_grad = [id(p) for p in params if p.grad is not None]
        self._clip_calls.append(_ClipCall(with_grad, function, float(max_norm), coef=coef))
        draft = self._manual_draft
        if draft is not None:  # a hand-written update loop: this call is the update's clipping
            self._note_script_clip(self._clip_calls[-1:])
            self._clip_calls = []
            draft.clip_source, draft.max_norm = self._row_clip
            self._row_clip = None
            if self.config.inject_max_norm is not None:
                draft.clip_source, draft.max_norm = "injected", self.config.inject_max_norm
            if coef is not None:
                draft.attach("applied_coef", coef)

    # ----------------------------------------------------------------------------------------------
    # Hand-written update loops (no torch.optim optimizer): one record per clip call or zero_grad
    # ----------------------------------------------------------------------------------------------

    def _maybe_manual_update(self, params: list[torch.Tensor]) -> None:
        if not self._hand_written:
            return  # an optimizer will step: its hook records this update
        self._commit_manual()
        self._manual_draft = self._measure_manual(params)

    def _on_manual_zero_grad(self, module: nn.Module) -> None:
        if self._manual_draft is None:
            self._manual_draft = self._measure_manual([p for p in module.parameters() if p.requires_grad])
        self._commit_manual()
        self._window_closed = True

    def _finish_manual(self) -> None:
        """A loop that zeroes grads at the top of each iteration: its last update has no zero_grad after it.
        Measure it at exit on the params of the loop's earlier updates (the layout holds them, and so their
        grads, even when the script's model went out of scope with its main())."""
        layout = self._layouts.get(self)
        if self._hand_written and not self._window_closed and self._manual_draft is None and layout is not None:
            self._manual_draft = self._measure_manual(layout.params)

    def _measure_manual(self, params: list[torch.Tensor]) -> Row | None:
        if not params or all(p.grad is None for p in params):
            return None
        signature = ("manual", tuple(id(p) for p in params))
        layout = self._layouts.get(self)  # the recorder itself keys the hand-written loop's layout
        if layout is None or layout.signature != signature:
            layout = self._new_layout(signature, params, [(0, i) for i in range(len(params))], "manual")
            self._layouts[self] = layout
        row = self._measure_params(layout, self._step_loss(None))
        self._fill_step(row)
        if self.config.inject_max_norm is not None:
            row.clip_source, row.max_norm = "injected", self.config.inject_max_norm
        return row

    def _commit_manual(self) -> None:
        draft, self._manual_draft = self._manual_draft, None
        if draft is not None and self._hand_written:
            self._clip_calls = []
            self._commit(draft)

    # ----------------------------------------------------------------------------------------------
    # Committing rows, flushing, meta
    # ----------------------------------------------------------------------------------------------

    def _commit(self, row: Row) -> None:
        slot, buffer, cfg = row.slot, self._buffer, self.config
        row.step = slot.steps
        slot.steps += 1
        row.time_s = time.perf_counter() - self._t0
        pending = buffer.add(row)
        self._commits += 1
        self._window_closed = True
        if pending >= cfg.flush_every:
            interval = max(cfg.flush_seconds, 0.002 * row.time_s)  # fewer parts as a long run ages
            if time.perf_counter() - self._last_flush >= interval or pending >= 100 * cfg.flush_every:
                self._guard("flush", self._flush)
        if cfg.max_steps is not None or cfg.max_time is not None:
            self._check_stop(row)

    def _check_stop(self, row: Row) -> None:
        cfg = self.config
        if cfg.max_steps is not None and row.slot.index == 0 and row.slot.steps >= cfg.max_steps:
            raise StopRun(f"--max-steps {cfg.max_steps} reached")
        if cfg.max_time is not None and row.time_s >= cfg.max_time:
            raise StopRun(f"--max-time {cfg.max_time:g}s reached")

    def _flush(self) -> None:
        if os.getpid() != self._pid or self._writer is None:
            return  # forked child: the parent owns the run
        self._last_flush = time.perf_counter()
        for kind, columns in self._buffer.drain():
            self._writer.write_part(kind, columns)
        if self._meta_dirty:
            self._write_meta(status="running")

    def _write_meta(self, status: str, **extra: Any) -> None:
        assert self.run_dir is not None
        self._meta_dirty = False
        meta = {
            "gradscope_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "run_id": self.run_dir.name,
            "label": self._label,
            **self._meta_extra,
            "seed": self._seeds[0] if self._seeds else self.config.seed,
            "seeds_seen": self._seeds[:20],
            "norm_type": 2.0,
            "clipping": {**self._script_clip, "injected_max_norm": self.config.inject_max_norm,
                         "script_clip_disabled": self.config.disable_script_clip},
            "optimizers": [slot.describe() for slot in sorted(self._slots.values(), key=lambda s: s.index)],
            "flush_every": self.config.flush_every,
            "start_time": getattr(self, "_start_time", None),
            "end_time": None,
            "status": status,
            "exit_code": None,
            "error": None,
            "n_steps": self._commits,
            "host": socket.gethostname(),
            "pid": self._pid,
            **extra,
        }
        store.write_meta(self.run_dir, meta)


def iter_param_names(optimizer: Any) -> Iterable[str]:  # pragma: no cover - convenience for notebooks
    """The names gradscope gives to ``optimizer``'s parameters, in order."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    group_of = [(gi, pi) for gi, g in enumerate(optimizer.param_groups) for pi in range(len(g["params"]))]
    return resolve_names(params, group_of).names
