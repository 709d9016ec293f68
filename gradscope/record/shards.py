"""What a rank's gradients are a piece of: the columns an optimizer's norms are read into, and their weights.

On a rank of a distributed job a gradient is either *whole* (plain tensors all-reduced by DDP, FSDP's
NO_SHARD, a DTensor replicated on every mesh dimension) or a *piece* of a sharded tensor (FSDP2 and
tensor-parallel DTensors, FSDP1's flat parameters). The recorder never issues a collective: it reads
each piece's local norm and records, per column, the weight that the reader uses to combine the
ranks (docs/distributed.md): 1 = this rank's piece counts, 0 = a copy of a piece another rank counts
(the rank's coordinate on a Replicate mesh dimension is not 0), None = whole. A DTensor with a Partial
placement (unreduced) cannot be combined from norms: its optimizer is ``rank-local``.

FSDP1 with ``use_orig_params=False`` hands the optimizer flat parameters, one per wrapped module: each
flat gradient is split into views of the original parameters by the flat parameter's shard layout
(padding skipped), so the layers table keeps one row per original parameter.

Everything here runs when a layout is new (rarely); :meth:`Columns.expand` runs every step: a list of
slices and attribute reads, no device op and no host sync.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

LOCAL = "local"  # a column whose pieces cannot be combined (a Partial placement, FSDP1's hybrid sharding)
# FSDP1 FQNs are relative to the wrapped module; wrapper segments may remain inside them.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class Columns:
    """An optimizer's columns: names, full shapes, weights, and how its grads map onto them."""

    names: list[str]
    shapes: list[list[int]]
    weights: list[Any]  # per column: 1, 0, None (whole) or LOCAL
    scope: str | None  # None: a single process (its norms are global as they are)
    # per param: None (its grad as it is), "local" (a DTensor: its local shard), or [(offset, numel)] views of a flat grad
    ops: list[Any] = field(default_factory=list)

    @property
    def identity(self) -> bool:
        """True when the grads are the columns as they are (no DTensor, no flat parameter)."""
        return all(op is None for op in self.ops)

    @property
    def one_to_one(self) -> bool:
        """True when each parameter is one column (DTensors read locally, but no flat parameter split)."""
        return all(not isinstance(op, list) for op in self.ops)

    def shard_weights(self) -> tuple[int | None, ...] | None:
        """meta.json's ``shard_weights``: only for a sharded optimizer."""
        if self.scope != "sharded":
            return None
        return tuple(w if w in (0, 1) else None for w in self.weights)

    def expand(self, tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The column tensors of ``tensors`` (the params' grads, or the params): local shards, flat views."""
        out: list[torch.Tensor | None] = []
        for tensor, op in zip(tensors, self.ops, strict=True):
            if op is None:
                out.append(tensor)
            elif op == "local":
                out.append(None if tensor is None else tensor._local_tensor)  # type: ignore[attr-defined]
            elif tensor is None:
                out.extend([None] * len(op))
            else:
                out.extend([tensor[start:start + numel] for start, numel in op])
        return out


def world_size() -> int:
    """This process's world size, read locally (no collective): the process group's, else torchrun's env."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def columns_of(params: Sequence[torch.Tensor], names: Sequence[str], owners: Sequence[tuple[nn.Module, ...]]) -> Columns:
    """The columns of an optimizer's ``params`` (named ``names``, under the distributed wrappers ``owners``)."""
    cols = Columns([], [], [], None)
    covered: list[bool] = []  # per column: whole because something all-reduces it (DDP, NO_SHARD, Replicate)
    for param, name, above in zip(params, names, owners, strict=True):
        handle = _fsdp1_handle(param, above)
        if _is_dtensor(param):
            weight = dtensor_weight(param)
            _add(cols, name, list(param.shape), weight, "local")
            covered.append(weight is None)
        elif handle is not None and getattr(param, "_shard_param_infos", None) is not None and param is handle.flat_param:
            _add_flat(cols, param, name, handle, covered)
        else:
            orig = _orig_param_of(param, handle)
            weight = _fsdp1_weight(handle) if orig is not None else None
            shape = list(handle.flat_param._shapes[orig]) if orig is not None else list(param.shape)
            _add(cols, name, shape, weight, None)
            covered.append(orig is not None or any(_named(m, "DistributedDataParallel") for m in above))
    cols.scope = _scope(cols.weights, covered) if world_size() > 1 else None
    return cols


def dtensor_weight(tensor: Any) -> Any:
    """The weight of a DTensor's local piece: LOCAL with a Partial placement, None when replicated on every
    mesh dimension, else 1 when the rank's coordinate is 0 on every Replicate dimension (0 otherwise)."""
    placements = tuple(tensor.placements)
    if any(p.is_partial() for p in placements):
        return LOCAL
    if all(p.is_replicate() for p in placements):
        return None
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()  # local: the mesh knows this rank's place
    if coordinate is None:
        return 0  # the rank is not in the mesh: it holds no piece
    first = all(coordinate[d] == 0 for d, p in enumerate(placements) if p.is_replicate())
    return int(first and _first_across_other_dims(mesh))


def _first_across_other_dims(mesh: Any) -> bool:
    """True unless ``mesh`` was sliced from a larger mesh along whose other dimensions the rank's coordinate is
    not 0: those dimensions hold the same pieces (FSDP2 on the "dp" slice of a (dp, tp) mesh shards a plain
    layer across dp, and every tp rank holds the same dp piece)."""
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    names, root_names = mesh.mesh_dim_names, root.mesh_dim_names
    if root is mesh or not names or not root_names or not set(names) <= set(root_names):
        return True  # not a slice, or a flattened one whose dimensions cannot be told apart: as placed
    coordinate = root.get_coordinate()
    return coordinate is not None and all(c == 0 for c, name in zip(coordinate, root_names, strict=True)
                                          if name not in names)


def _scope(weights: list[Any], covered: list[bool]) -> str:
    if any(w == LOCAL for w in weights):
        return "rank-local"
    if any(w in (0, 1) for w in weights):
        return "sharded"  # whole tensors beside the pieces count once, from each rank's own row (TP replicates them)
    return "global" if all(covered) else "rank-local"


def _add(cols: Columns, name: str, shape: list[int], weight: Any, op: Any) -> None:
    cols.names.append(name)
    cols.shapes.append(shape)
    cols.weights.append(weight)
    cols.ops.append(op)


def _add_flat(cols: Columns, param: Any, name: str, handle: Any, covered: list[bool]) -> None:
    """FSDP1's flat parameter: one column per original parameter, a view of this rank's shard (empty when
    the parameter lies outside it)."""
    prefix = name[: -len("_flat_param")] if name.endswith("_flat_param") else ""
    weight = _fsdp1_weight(handle)
    views = []
    for fqn, shape, info in zip(param._fqns, param._shapes, param._shard_param_infos, strict=True):
        views.append((info.offset_in_shard, info.numel_in_shard) if info.in_shard else (0, 0))
        cols.names.append(prefix + _clean(fqn))
        cols.shapes.append(list(shape))
        cols.weights.append(weight)
        covered.append(True)
    cols.ops.append(views)


def _clean(fqn: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        fqn = fqn.replace(segment, "")
    return fqn


def _fsdp1_handle(param: torch.Tensor, owners: tuple[nn.Module, ...]) -> Any:
    """The FSDP1 flat-parameter handle that manages ``param`` (its flat parameter or one of its original
    parameters), looked up in the wrappers above it, innermost first."""
    for module in reversed(owners):
        handle = getattr(module, "_handle", None) if _named(module, "FullyShardedDataParallel") else None
        if handle is None:
            continue
        flat = handle.flat_param
        if flat is param or any(p is param for p in getattr(flat, "_params", None) or ()):
            return handle
    return None


def _orig_param_of(param: torch.Tensor, handle: Any) -> int | None:
    """The index of ``param`` among its handle's original parameters (``use_orig_params=True``)."""
    if handle is None:
        return None
    return next((i for i, p in enumerate(handle.flat_param._params or ()) if p is param), None)


def _fsdp1_weight(handle: Any) -> Any:
    """FSDP1: NO_SHARD holds whole (all-reduced) gradients; hybrid strategies replicate shards across nodes,
    which the weights do not say (LOCAL); the others shard across all ranks (1)."""
    strategy = getattr(getattr(handle, "_sharding_strategy", None), "name", "")
    if strategy == "NO_SHARD":
        return None
    return LOCAL if "HYBRID" in strategy else 1


def _is_dtensor(tensor: Any) -> bool:
    return any(cls.__name__ == "DTensor" for cls in type(tensor).__mro__)


def _named(module: nn.Module, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(module).__mro__)
