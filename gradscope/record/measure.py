"""Gradient norms on device, in as few ops as the device allows, with no host synchronisation.

Every function here returns device tensors and never calls ``.item()``, ``.tolist()`` or branches in
Python on a device value: on CUDA each of those blocks the Python thread until the GPU queue drains.
The definition matches ``torch.nn.utils.get_total_norm``: the global L2 norm is the L2 norm of the
per-tensor L2 norms (the recorder takes that last norm on the host, at flush time).

How a step's norms are read (:class:`NormPlan`, made once per parameter layout): ``_foreach_norm``
costs a fixed amount of host work per tensor whatever its size. On CPU it is a loop of one full
reduction per tensor, about 2 µs each, so a model with 400 small tensors paid ~0.8 ms for the read
alone; on CUDA the fused kernel still makes one output tensor per input (2.3 ms of host time for the
same 400 tensors on an H200). Small tensors of one shape, eight or more of them, are therefore stacked
(one batched copy) and reduced along their trailing dims (one op per shape); large or one-of-a-kind
tensors go through one ``_foreach_norm``, or one ``vector_norm`` each when only a few sit beside the
groups. Every result is written with ``out=`` into its part of a preallocated row (no concatenation),
in the plan's order; ``NormPlan.cols`` says which parameter each value belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np
import torch

# Stacking copies the gradient once; below this many elements per tensor the copy costs less than the
# ~2 µs fixed cost of one more reduction op on CPU (measured: bench/run.py, workload "many").
STACK_MAX_NUMEL = 4096
# A stacked group costs three ops (stack, reduce, and its share of one cat) where _foreach_norm costs one
# reduction per tensor: a pair of (64,) biases read by stacking made the tiny-MLP step 13 µs slower.
STACK_MIN_TENSORS = 8
# Up to this many one-of-a-kind tensors beside stacked groups are read by one vector_norm each, not by a
# _foreach_norm: after a backward pass the first call of an op kind costs 20-50 us on CPU and a further
# call of a warm one ~4 us (measured on bench/run.py's workload "many": 2 singles beside 398 stacked).
FEW_SINGLES = 8

def reduce_dtype(dtypes: set[torch.dtype] | frozenset[torch.dtype]) -> torch.dtype | None:
    """The ``dtype=`` of the norm ops for gradients of ``dtypes``: float32, so that 16-bit gradients are
    accumulated in float32 rather than rounded to 16 bits; None (each tensor's own) when any is float64,
    which ``vector_norm`` refuses to narrow to float32."""
    return None if torch.float64 in dtypes else torch.float32


@dataclass(frozen=True)
class NormPlan:
    """How to read the L2 norm of each of P gradients, all dense and on one device, in few ops.

    ``singles`` go through one ``_foreach_norm``; each entry of ``groups`` is stacked and reduced over
    ``dims``. The values come out as ``[singles..., loss?, group 0..., group 1...]`` (``part_sizes`` wide
    each); ``cols(with_loss)`` maps each value to its column: a parameter index, or P for the loss.
    """

    n: int
    device: torch.device
    device_index: int  # Tensor.get_device() of a tensor on `device` (-1 on CPU)
    dtype: torch.dtype | None  # see reduce_dtype
    singles: tuple[int, ...]
    groups: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (parameter indices, dims to reduce)
    all_single: bool  # singles is range(n): the gradient list is passed as it is
    # per group: its grads picked in C (itemgetter), not by a list comprehension per step
    pickers: tuple[Callable[[list[torch.Tensor]], tuple[torch.Tensor, ...]], ...] = field(default=(), compare=False, repr=False)

    def cols(self, with_loss: bool) -> np.ndarray:
        """Column of each value a row holds: a parameter index, or ``n`` for the loss."""
        loss = [self.n] if with_loss else []
        return np.array([*self.singles, *loss, *(i for idx, _ in self.groups for i in idx)], dtype=np.int64)

    def part_sizes(self, with_loss: bool) -> list[int]:
        """Widths of a row's parts, in ``cols`` order: the singles and the loss, then each group."""
        return [len(self.singles) + with_loss, *(len(idx) for idx, _ in self.groups)]


def plan_norms(shapes: Sequence[Sequence[int]], device: torch.device,
               dtypes: set[torch.dtype] | frozenset[torch.dtype] = frozenset()) -> NormPlan:
    """The read plan for gradients of ``shapes`` and ``dtypes`` on ``device`` (see the module docstring)."""
    n = len(shapes)
    index = -1 if device.type == "cpu" else device.index if device.index is not None else 0
    dtype = reduce_dtype(dtypes)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(i)
    singles: list[int] = []
    groups: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for shape, indices in by_shape.items():
        if len(indices) >= STACK_MIN_TENSORS and shape and math.prod(shape) <= STACK_MAX_NUMEL:
            groups.append((tuple(indices), tuple(range(1, len(shape) + 1))))
        else:
            singles.extend(indices)
    singles.sort()
    pickers = tuple(itemgetter(*indices) for indices, _ in groups)  # >= STACK_MIN_TENSORS each: a tuple back
    return NormPlan(n, device, index, dtype, tuple(singles), tuple(groups), not groups, pickers)


def write_norms(plan: NormPlan, grads: list[torch.Tensor], loss: torch.Tensor | None,
                parts: Sequence[torch.Tensor]) -> None:
    """Write the norms of ``grads`` (and ``loss``, a 0-dim tensor on the plan's device) into ``parts``:
    float32 views of one row, of the widths ``plan.part_sizes`` gives (a preallocated row, split once).

    Raises on anything the plan does not cover (a gradient that is None, sparse or on another device):
    the caller falls back to :func:`tensor_norms`. Nothing is allocated but the stacks and the norms.
    """
    dtype = plan.dtype
    for (_, dims), pick, dest in zip(plan.groups, plan.pickers, parts[1:], strict=True):
        # The groups first: after a backward pass the first call of each op kind is the costly one
        # (cold caches, 20-50 us on CPU), so the singles' vector_norm below then runs warm.
        stacked = torch.stack(pick(grads))
        if dtype is None:  # float64 grads: vector_norm's out= must have its float64 dtype
            dest.copy_(torch.linalg.vector_norm(stacked, 2, dim=dims))
        else:
            torch.linalg.vector_norm(stacked, 2, dim=dims, dtype=dtype, out=dest)
    if plan.all_single:  # the gradient list as it is
        head: list[torch.Tensor] = list(torch._foreach_norm(grads, 2, dtype=dtype))
    elif len(plan.singles) > FEW_SINGLES:
        head = list(torch._foreach_norm([grads[i] for i in plan.singles], 2, dtype=dtype))
    else:  # one warm vector_norm each costs less than a cold _foreach_norm
        head = [torch.linalg.vector_norm(grads[i], 2, dtype=dtype) for i in plan.singles]
    if loss is not None:
        head.append(loss)
    if head:
        torch.stack(head, out=parts[0])


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local piece (FSDP2, tensor parallel), any other tensor as it is. Never ``full_tensor()``:
    that is a collective, and the recorder issues none (a rank waiting on it alone would hang the job)."""
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor



@torch.no_grad()  # grads of backward(create_graph=True) require grad: keep no graph to the flush
def tensor_norms(grads: Sequence[torch.Tensor], ord: float = 2.0) -> list[torch.Tensor]:
    """The L2 norm (``ord=math.inf``: the max |g|) of each gradient as a 0-dim tensor on the gradient's
    device (float64 for float64 gradients, float32 for the others).

    The general path: one ``torch._foreach_norm`` pass per device and precision for dense gradients
    (accumulated in float32, so bf16 gradients are not rounded to bf16); sparse gradients are coalesced
    first, because ``_foreach_norm`` and ``vector_norm`` reject them; DTensor gradients are read on the
    local shard.
    """
    out: list[torch.Tensor | None] = [None] * len(grads)
    dense_by_kind: dict[tuple[torch.device, torch.dtype | None], list[int]] = {}
    for i, grad in enumerate(grads):
        grad = local_tensor(grad)
        dtype = reduce_dtype({grad.dtype})
        if grad.is_sparse:
            out[i] = torch.linalg.vector_norm(grad.coalesce()._values(), ord, dtype=dtype)
        else:
            dense_by_kind.setdefault((grad.device, dtype), []).append(i)
    for (_, dtype), indices in dense_by_kind.items():
        norms = torch._foreach_norm([local_tensor(grads[i]) for i in indices], ord, dtype=dtype)
        for i, norm in zip(indices, norms, strict=True):
            out[i] = norm
    return out  # type: ignore[return-value]


def max_abs(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The max |g| of each gradient, stacked on the first one's device: one ``_foreach_norm(ord=inf)`` pass
    (the max of the absolute values, with no copy of them), no host sync. Value clipping only."""
    values = tensor_norms(grads, math.inf)
    return stack_on([v.float() for v in values], values[0].device)


def stack_on(values: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack 0-dim tensors into a vector on ``device`` (moving only those that live elsewhere)."""
    return torch.stack([v if v.device == device else v.to(device, non_blocking=True) for v in values])


def global_norm(per_tensor: torch.Tensor) -> torch.Tensor:
    """The L2 norm of a vector of per-tensor norms: ``get_total_norm``'s definition."""
    return torch.linalg.vector_norm(per_tensor)


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor ``clip_grad_norm_`` multiplies gradients by: ``min(1, max_norm / (total + 1e-6))``.

    Written exactly as torch writes it, so that dividing a clipped norm by it recovers the pre-clip norm.
    A DTensor total (FSDP2's clip_grad_norm_ returns a replicated one, the same on every rank) is read
    locally: the factor then divides every rank's local norms back to their pre-clip values.
    """
    return torch.clamp(max_norm / (local_tensor(total_norm).float() + 1e-6), max=1.0)
