"""Patching torch: every hook the recorder installs, each a thin call into a small events interface.

What :meth:`Hooks.install` installs (all undone by :meth:`Hooks.remove`):

- global optimizer step pre/post hooks (every ``torch.optim.Optimizer``, even one created before),
  wrapped by :func:`eager` (a leaner ``torch.compiler.disable``) so that ``torch.compile(opt.step)``
  runs them eagerly; the clip wrappers below are wrapped the same way;
- ``torch.autograd.backward`` (``Tensor.backward`` calls it) for the loss of each step;
- ``clip_grad_norm_`` / ``clip_grads_with_norm_`` / ``clip_grad_value_`` for the script's own
  clipping, so the recorded norm is the *pre-clip* one;
- ``GradScaler.scale`` / ``GradScaler.step`` for unscaled losses, the loss scale and skipped steps;
- ``torch.manual_seed`` to learn (and, for ``compare``, replace) the script's seed;
- ``Optimizer.__init__`` and ``nn.Module.zero_grad`` for scripts that update weights by hand, with
  no ``torch.optim`` optimizer;
- ``torch.distributed.destroy_process_group``, which first lets the gloo workers take the GIL once
  (:func:`_let_gloo_workers_finish`: a teardown deadlock the hooks' per-step work makes likely);
- ``torch.compile``, only to mark the wrapped hooks for dynamo first (:meth:`Hooks.mark`): gradscope
  never imports ``torch._dynamo`` itself, so a script that does not use it does not pay for it.

The hooks know nothing of the recorder's state: each calls one method of :class:`RecorderEvents`,
whose methods never raise into the user's loop (but ``StopRun``).
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


class RecorderEvents(Protocol):
    """What the hooks tell the recorder. Each method is safe to call from the user's loop: failures warn
    once and training goes on; only ``StopRun`` (``--max-steps``) is raised on purpose."""

    def on_backward(self, tensors: Any) -> Callable[[Any], None] | None:
        """A backward pass from ``tensors`` (the loss) is about to run; returns None, or what to call with
        ``tensors`` once it has returned."""

    def on_step_pre(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Before ``optimizer.step``; may return new (args, kwargs) (a wrapped closure)."""

    def on_step_post(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """After ``optimizer.step``."""

    def on_scale(self, scaler: Any, outputs: Any, result: Any) -> None:
        """``GradScaler.scale(outputs)`` returned ``result``."""

    def on_scaler_step(self, original: Callable[..., Any], scaler: Any, optimizer: Any, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
        """Run ``GradScaler.step`` (``original``), recording the step it skips."""

    def clip_grad_norm(self, original: Callable[..., Any], params: list[torch.Tensor], max_norm: float,
                       args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the script's ``clip_grad_norm_`` (``original``) and note it."""

    def clip_grads_with_norm(self, original: Callable[..., Any], params: list[torch.Tensor], max_norm: float,
                             total_norm: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run the script's ``clip_grads_with_norm_`` (``original``) and note it."""

    def clip_grad_value(self, original: Callable[..., Any], params: list[torch.Tensor], clip_value: float,
                        args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run the script's ``clip_grad_value_`` (``original``) and note it."""

    def on_seed(self, seed: Any) -> Any:
        """The script called ``torch.manual_seed(seed)``; returns the seed to use."""

    def on_optimizer_made(self) -> None:
        """A ``torch.optim.Optimizer`` exists (made now, or before the hooks were installed)."""

    def on_zero_grad(self, module: nn.Module) -> None:
        """``module.zero_grad()`` is about to run."""


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` wrapped so that dynamo runs it eagerly: a leaner ``torch.compiler.disable``, marked lazily.

    What disable does, kept: a compiled caller (``torch.compile(opt.step)``) calls the hook eagerly (a
    graph break) instead of tracing it, and dynamo's frame callback is off while it runs, so nothing
    inside is compiled. What is left out: its stance and export bookkeeping, six Python calls that cost
    ~5 µs a step in the cold caches after a backward (bench/run.py, "mlp").

    The mark that makes dynamo break its graph (``torch._dynamo.decorators.skip``) needs
    ``torch._dynamo``, whose import costs ~1.5 s and ~70 MB: it is set here only when dynamo is already
    loaded, and otherwise by :func:`mark_eager` once it is (see :meth:`Hooks.install`).
    """
    try:
        from torch._C._dynamo.eval_frame import set_eval_frame  # part of torch._C: no torch._dynamo import
    except ImportError:  # pragma: no cover - a torch without dynamo's frame hooks
        return fn

    def hook(*args: Any, **kwargs: Any) -> Any:
        prior = set_eval_frame(None)
        try:
            return fn(*args, **kwargs)
        finally:
            set_eval_frame(prior)

    mark_eager([hook])
    return hook


def mark_eager(hooks: list[Callable[..., Any]]) -> bool:
    """Mark ``hooks`` (made by :func:`eager`) for dynamo, in place, when ``torch._dynamo`` is loaded; True
    when they are marked. In place: a script holding one (``from torch.nn.utils import clip_grad_norm_``)
    holds the marked function. The hook's frame is skipped too, so the frame callback still on when a
    compiled caller resumes eagerly leaves it alone."""
    if "torch._dynamo" not in sys.modules:
        return False
    try:
        from torch._dynamo.decorators import skip
    except ImportError:  # pragma: no cover - a torch without dynamo
        return True
    for hook in hooks:
        skip(hook)
    return True


def params_list(parameters: Any) -> list[torch.Tensor]:
    """The parameters a clip function was given, as a list (a tensor, or any iterable of them)."""
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return list(parameters)


class Patcher:
    """Replaces attributes on modules or classes and restores them in reverse order."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def replace(self, owner: Any, name: str, new: Any) -> Any:
        """Set ``owner.name = new`` and return the original (``None`` if it did not exist)."""
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        self._saved.append((owner, name, original))
        setattr(owner, name, new)
        return original

    def restore(self) -> None:
        """Put every replaced attribute back, newest first."""
        while self._saved:
            owner, name, original = self._saved.pop()
            if original is None:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, original)


@dataclass(frozen=True)
class Originals:
    """The torch functions as they were before :meth:`Hooks.install` replaced them."""

    clip_grad_norm: Callable[..., Any]  # compare's injected clip must not go through the script's wrapper
    clip_grad_value: Callable[..., Any]
    manual_seed: Callable[..., Any]  # the --seed given at start is not one of the script's calls


class Hooks:
    """Installs every hook and patch, each calling ``events``; :meth:`remove` undoes them all."""

    def __init__(self, events: RecorderEvents) -> None:
        self._events = events
        self._patcher = Patcher()
        self._handles: list[Any] = []
        self._eager: list[Callable[..., Any]] = []  # every hook made by eager(), for mark_eager
        self._marked = False

    def _eager_hook(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        hook = eager(fn)
        self._eager.append(hook)
        return hook

    def mark(self) -> None:
        """Mark the hooks for dynamo once ``torch._dynamo`` is loaded (cheap when done or not yet due).

        Called at install (a model compiled before the recorder started), when an optimizer is made
        (torch's Optimizer loads dynamo itself) and by ``torch.compile``: dynamo traces nothing before
        one of these. A script that only imports torch never loads it.
        """
        if not self._marked:
            self._marked = mark_eager(self._eager)

    def install(self) -> Originals:
        """Install everything (before the script runs) and return the functions that were replaced."""
        from torch.nn.utils import clip_grad
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        events = self._events
        # Bound methods, made once: the hooks run every step. Dynamo must not trace into them.
        self._handles = [register_optimizer_step_pre_hook(self._eager_hook(events.on_step_pre)),
                         register_optimizer_step_post_hook(self._eager_hook(events.on_step_post))]
        # Read before the patches below: afterwards it would be our own wrapper, which scales by 1.0 in
        # compare arms (the script's clipping is disabled there).
        originals = Originals(clip_grad.clip_grad_norm_, clip_grad.clip_grad_value_, torch.manual_seed)
        self._patch_backward()
        self._patch_clipping()
        self._patch_fsdp1_clipping()
        self._patch_grad_scaler()
        self._patch_seed()
        self._patch_zero_grad()
        self._patch_optimizer_init()
        self._patch_process_group_teardown()
        self._patch_compile()
        self.mark()
        return originals

    def remove(self) -> None:
        """Remove the step hooks and restore every patched function."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._patcher.restore()

    def _patch_backward(self) -> None:
        original = torch.autograd.backward
        on_backward = self._events.on_backward
        current_node = torch._C._current_autograd_node

        def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(tensors, (torch.Tensor, tuple, list)):
                tensors = tuple(tensors)  # a generator: read it once, for the loss and for torch alike
            # Reentrant checkpointing calls backward from inside the engine: not a new loss.
            after = on_backward(tensors) if current_node() is None else None
            result = original(tensors, *args, **kwargs)
            if after is not None:  # a hand-written loop under --max-norm: its injection point
                after(tensors)
            return result

        self._patcher.replace(torch.autograd, "backward", backward)

    def _patch_clipping(self) -> None:
        from torch.nn.utils import clip_grad

        utils, events = torch.nn.utils, self._events
        disable = self._eager_hook  # dynamo must not trace the wrappers
        original_norm, original_value = clip_grad.clip_grad_norm_, clip_grad.clip_grad_value_

        def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
            return events.clip_grad_norm(original_norm, params_list(parameters), max_norm, args, kwargs)

        def clip_grad_value_(parameters: Any, clip_value: float, *args: Any, **kwargs: Any) -> None:
            events.clip_grad_value(original_value, params_list(parameters), clip_value, args, kwargs)

        norm, value = disable(clip_grad_norm_), disable(clip_grad_value_)
        # Patch both homes: `from torch.nn.utils import clip_grad_norm_` and the module global that the
        # deprecated clip_grad_norm calls (so it is counted once, not twice).
        for owner in (utils, clip_grad):
            self._patcher.replace(owner, "clip_grad_norm_", norm)
            self._patcher.replace(owner, "clip_grad_value_", value)
        original_with_norm = getattr(utils, "clip_grads_with_norm_", None)
        if original_with_norm is None:  # pragma: no cover - torch < 2.6
            return

        def clip_grads_with_norm_(parameters: Any, max_norm: float, total_norm: torch.Tensor, *args: Any,
                                  **kwargs: Any) -> None:
            events.clip_grads_with_norm(original_with_norm, params_list(parameters), max_norm, total_norm, args, kwargs)

        self._patcher.replace(utils, "clip_grads_with_norm_", disable(clip_grads_with_norm_))

    def _patch_fsdp1_clipping(self) -> None:
        """FSDP1's ``model.clip_grad_norm_`` method clips without torch's function: noted as the same call.

        Only in a process of a distributed job (torchrun's WORLD_SIZE) or when FSDP is already imported:
        importing it costs a fraction of a second that a single-process script must not pay.
        """
        if "torch.distributed.fsdp" not in sys.modules and os.environ.get("WORLD_SIZE", "1") in ("", "1"):
            return
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
        except Exception:  # a torch built without distributed support
            return
        events, original = self._events, FullyShardedDataParallel.clip_grad_norm_
        disable = getattr(torch.compiler, "disable", lambda fn: fn)

        def clip_grad_norm_(module: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
            def run(params: list[torch.Tensor], effective: float, *a: Any, **k: Any) -> Any:
                return original(module, effective, *a, **k)  # FSDP's own all-reduce: every rank calls it

            return events.clip_grad_norm(run, list(module.parameters()), max_norm, args, kwargs)

        self._patcher.replace(FullyShardedDataParallel, "clip_grad_norm_", disable(clip_grad_norm_))

    def _patch_grad_scaler(self) -> None:
        try:
            from torch.amp import GradScaler
        except ImportError:  # pragma: no cover - torch < 2.3
            return
        events = self._events
        original_scale, original_step = GradScaler.scale, GradScaler.step

        def scale(scaler: Any, outputs: Any) -> Any:
            result = original_scale(scaler, outputs)
            events.on_scale(scaler, outputs, result)
            return result

        def step(scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            return events.on_scaler_step(original_step, scaler, optimizer, args, kwargs)

        self._patcher.replace(GradScaler, "scale", scale)
        self._patcher.replace(GradScaler, "step", step)

    def _patch_seed(self) -> None:
        original, on_seed = torch.manual_seed, self._events.on_seed

        def manual_seed(seed: Any) -> Any:
            return original(on_seed(seed))

        self._patcher.replace(torch, "manual_seed", manual_seed)
        self._patcher.replace(torch.random, "manual_seed", manual_seed)

    def _patch_optimizer_init(self) -> None:
        events, mark = self._events, self.mark
        # An optimizer made before the hooks (API use) counts too: one gc scan, at install.
        # type() not isinstance(): isinstance on gc objects hits lazy deprecated-module proxies, which warn.
        if any(issubclass(type(o), torch.optim.Optimizer) for o in gc.get_objects()):
            events.on_optimizer_made()
        original = torch.optim.Optimizer.__init__

        def __init__(optimizer: Any, *args: Any, **kwargs: Any) -> None:
            events.on_optimizer_made()  # a clip call before its first step is not a hand-written update
            original(optimizer, *args, **kwargs)
            mark()  # torch's Optimizer has loaded dynamo by now

        self._patcher.replace(torch.optim.Optimizer, "__init__", __init__)

    def _patch_compile(self) -> None:
        original = getattr(torch, "compile", None)
        if original is None:  # pragma: no cover - torch < 2.0
            return
        mark = self.mark

        @functools.wraps(original)
        def compile(*args: Any, **kwargs: Any) -> Any:
            import torch._dynamo  # noqa: F401  (torch.compile imports it too: loaded now, the hooks marked first)

            mark()
            return original(*args, **kwargs)

        self._patcher.replace(torch, "compile", compile)

    def _patch_zero_grad(self) -> None:
        original, on_zero_grad = nn.Module.zero_grad, self._events.on_zero_grad

        def zero_grad(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            on_zero_grad(module)
            return original(module, *args, **kwargs)

        self._patcher.replace(nn.Module, "zero_grad", zero_grad)

    def _patch_process_group_teardown(self) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            return
        from torch.distributed import distributed_c10d

        original = distributed_c10d.destroy_process_group

        def destroy_process_group(*args: Any, **kwargs: Any) -> Any:
            _let_gloo_workers_finish()
            return original(*args, **kwargs)

        # Both homes: `dist.destroy_process_group` and `from torch.distributed import destroy_process_group`
        # (a script imports it after install) resolve to the package attribute; Lightning and others use c10d's.
        self._patcher.replace(dist, "destroy_process_group", destroy_process_group)
        self._patcher.replace(distributed_c10d, "destroy_process_group", destroy_process_group)


#: How long the main thread leaves the GIL to the gloo workers before a process group is torn down.
GLOO_RELEASE_S = 0.05


def _let_gloo_workers_finish() -> None:
    """Give up the GIL for a moment so the gloo worker threads can free their last ``Work``.

    Hazard (a deadlock in torch that gradscope's hooks make likely): every collective DDP launches inside
    a backward is an ``AsyncWork`` that captured the thread-local state, which holds a Python object (the
    ``contextvars`` context ``torch.autograd`` stashes for the length of each backward). Its last owner
    is the gloo worker thread that ran it, so freeing it takes the GIL. ``destroy_process_group`` only
    shuts the group down; ``~ProcessGroupGloo`` joins the workers later, when the group's last owner
    goes, holding the GIL: in the usual script that is the DDP model's reducer, freed when the function
    that made it returns right after ``destroy_process_group``. A worker still waiting for the GIL to
    free its last Work then never returns, and the rank hangs past its last step. Without gradscope the
    worker has had the GIL by then; with its step hooks or its backward wrapper in place (either one is
    enough) it often has not, on a busy machine. A sleep gives up the GIL outright, and the waiting
    worker takes it: the job's ranks then end every time.
    """
    time.sleep(GLOO_RELEASE_S)
