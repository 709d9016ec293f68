"""Gradient norms on device, in one pass, with no host synchronisation.

Every function here returns device tensors and never calls ``.item()``, ``.tolist()`` or branches in
Python on a device value: on CUDA each of those blocks the Python thread until the GPU queue drains.
The definition matches ``torch.nn.utils.get_total_norm``: the global L2 norm is the L2 norm of the
per-tensor L2 norms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_NAN: dict[torch.device, torch.Tensor] = {}
_ONE: dict[torch.device, torch.Tensor] = {}
_ZERO: dict[torch.device, torch.Tensor] = {}


def _cached(table: dict[torch.device, torch.Tensor], device: torch.device, value: float) -> torch.Tensor:
    # Constants are made once per device: torch.tensor(x, device=cuda) per step would be an H2D copy.
    tensor = table.get(device)
    if tensor is None:
        tensor = table[device] = torch.full((), value, dtype=torch.float32, device=device)
    return tensor


def nan_on(device: torch.device) -> torch.Tensor:
    """A cached float32 NaN scalar on ``device`` (a placeholder for "no value")."""
    return _cached(_NAN, device, float("nan"))


def one_on(device: torch.device) -> torch.Tensor:
    """A cached float32 1.0 scalar on ``device``."""
    return _cached(_ONE, device, 1.0)


def zero_on(device: torch.device) -> torch.Tensor:
    """A cached float32 0.0 scalar on ``device``."""
    return _cached(_ZERO, device, 0.0)


def _local(grad: torch.Tensor) -> torch.Tensor:
    # DTensor (FSDP2) grads: measure the local shard; profile mode issues no collectives.
    local = getattr(grad, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else grad


def tensor_norms(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each gradient as a float32 0-dim tensor on the gradient's device.

    One ``torch._foreach_norm`` pass per device for dense gradients (accumulated in float32, so bf16
    gradients are not rounded to bf16); sparse gradients are coalesced first, because
    ``_foreach_norm`` and ``vector_norm`` reject them.
    """
    out: list[torch.Tensor | None] = [None] * len(grads)
    dense_by_device: dict[torch.device, list[int]] = {}
    for i, grad in enumerate(grads):
        grad = _local(grad)
        if grad.is_sparse:
            out[i] = torch.linalg.vector_norm(grad.coalesce()._values(), dtype=torch.float32)
        else:
            dense_by_device.setdefault(grad.device, []).append(i)
    for indices in dense_by_device.values():
        norms = torch._foreach_norm([_local(grads[i]) for i in indices], 2, dtype=torch.float32)
        for i, norm in zip(indices, norms, strict=True):
            out[i] = norm
    return out  # type: ignore[return-value]


def stack_on(values: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack 0-dim tensors into a vector on ``device`` (moving only those that live elsewhere)."""
    return torch.stack([v if v.device == device else v.to(device, non_blocking=True) for v in values])


_TENSOR = torch.Tensor
_STRIDED = torch.strided


def stacked_norms(grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``stack_on(tensor_norms(grads), device)``: the per-tensor L2 norms as one float32 vector on ``device``.

    The usual step (plain dense gradients, all on ``device``) is one ``_foreach_norm`` and one
    ``stack``, the same two ops and the same values as the general path, without its per-tensor
    Python work (DTensor and sparse checks, grouping by device, moving). Anything else (DTensor,
    sparse, several devices) takes the general path.
    """
    if all(type(g) is _TENSOR and g.layout is _STRIDED and g.device == device for g in grads):
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
    return stack_on(tensor_norms(grads), device)


def dense_norms(grads: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """``stacked_norms(grads, grads[0].device)`` when every entry is a plain dense tensor on one device, else None.

    One pass checks presence, type, layout and device together (None fails the type check): the
    recorder's usual step, where every parameter has a gradient.
    """
    if not grads or type(grads[0]) is not _TENSOR:
        return None
    device = grads[0].device
    if all(type(g) is _TENSOR and g.layout is _STRIDED and g.device == device for g in grads):
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
    return None


def global_norm(per_tensor: torch.Tensor) -> torch.Tensor:
    """The L2 norm of a vector of per-tensor norms: ``get_total_norm``'s definition."""
    return torch.linalg.vector_norm(per_tensor)


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor ``clip_grad_norm_`` multiplies gradients by: ``min(1, max_norm / (total + 1e-6))``.

    Written exactly as torch writes it, so that dividing a clipped norm by it recovers the pre-clip norm.
    """
    return torch.clamp(max_norm / (total_norm.float() + 1e-6), max=1.0)
