"""Names for an optimizer's parameter tensors, by module path, found without touching the script.

The optimizer holds bare tensors. To name them we scan the live ``nn.Module`` objects once (a gc
scan, done lazily at the optimizer's first step and again when its parameter layout changes), take
the root modules (those that are nobody's child), and walk them, dropping the attribute that a known
wrapper adds (``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``...). Wrappers are recognised by
class name, never by attribute name alone: users do name their submodules ``module``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

#: Wrapper class name -> the attribute under which it keeps the wrapped module.
WRAPPER_ATTRS: dict[str, str] = {
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "OptimizedModule": "_orig_mod",
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
    "CheckpointWrapper": "_checkpoint_wrapped_module",
    "OffloadWrapper": "_checkpoint_wrapped_module",
    "ActivationWrapper": "_checkpoint_wrapped_module",
    "_LightningModuleWrapperBase": "_forward_module",
    "_FabricModule": "_forward_module",
}


#: Wrappers whose presence above a parameter says how its gradient is shared across ranks (record/shards.py).
DISTRIBUTED_WRAPPERS = frozenset({"DistributedDataParallel", "FullyShardedDataParallel"})


@dataclass
class ParamNames:
    """Canonical name per parameter (in optimizer order), the other names of tied weights, and per parameter
    the distributed wrappers (DDP, FSDP) above it on its canonical path, outermost first."""

    names: list[str]
    aliases: dict[str, list[str]] = field(default_factory=dict)
    owners: list[tuple[nn.Module, ...]] = field(default_factory=list)


def _wrapped_attr(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        attr = WRAPPER_ATTRS.get(cls.__name__)
        if attr is not None:
            return attr
    return None


def _is_distributed(module: nn.Module) -> bool:
    return any(cls.__name__ in DISTRIBUTED_WRAPPERS for cls in type(module).__mro__)


def _walk(module: nn.Module, prefix: str, seen: set[int],
          owners: tuple[nn.Module, ...] = ()) -> Iterator[tuple[str, torch.Tensor, tuple[nn.Module, ...]]]:
    """Yield (clean name, parameter, distributed wrappers above it) for every parameter under ``module``,
    duplicates included."""
    if id(module) in seen:  # a module reachable twice (shared submodule): names from the first path
        return
    seen.add(id(module))
    if _is_distributed(module):
        owners = (*owners, module)
    for name, param in module._parameters.items():
        if param is not None:
            yield prefix + name, param, owners
    skip = _wrapped_attr(module)
    for name, child in module._modules.items():
        if child is None:
            continue
        child_prefix = prefix if name == skip else f"{prefix}{name}."
        yield from _walk(child, child_prefix, seen, owners)


def _root_modules() -> list[nn.Module]:
    # type() not isinstance(): isinstance on gc objects hits lazy deprecated-module proxies, which warn.
    modules = [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module)]
    children = {id(child) for m in modules for child in m._modules.values() if child is not None}
    return [m for m in modules if id(m) not in children]


def resolve_names(params: Sequence[torch.Tensor], group_of: Sequence[tuple[int, int]]) -> ParamNames:
    """Name ``params`` by module path.

    Args:
        params: the optimizer's parameters, in ``param_groups`` order.
        group_of: for each parameter, its (param group index, index within the group); used for the
            fallback name ``param_groups.{g}.{i}`` of a tensor that belongs to no module.

    Returns:
        Canonical names (the first path found from the root that covers most of the optimizer's
        parameters) and aliases for tensors reachable under several names (tied embeddings).
    """
    wanted = {id(p) for p in params}
    by_root: list[tuple[int, dict[int, list[str]], dict[int, tuple[nn.Module, ...]]]] = []
    for root in _root_modules():
        found: dict[int, list[str]] = {}
        above: dict[int, tuple[nn.Module, ...]] = {}
        for name, param, owners in _walk(root, "", set()):
            if id(param) in wanted:
                found.setdefault(id(param), []).append(name)
                above.setdefault(id(param), owners)
        if found:
            by_root.append((len(found), found, above))
    by_root.sort(key=lambda item: -item[0])  # stable: equal cover keeps gc order
    result = ParamNames(names=[])
    for param, (group, index) in zip(params, group_of, strict=True):
        names, owners = next(((found[id(param)], above[id(param)]) for _, found, above in by_root
                              if id(param) in found), (None, ()))
        result.owners.append(owners)
        if names is None:
            result.names.append(f"param_groups.{group}.{index}")
            continue
        unique = list(dict.fromkeys(names))
        result.names.append(unique[0])
        if len(unique) > 1:
            result.aliases[unique[0]] = unique[1:]
    return _dedupe(result)


def _dedupe(result: ParamNames) -> ParamNames:
    # Two distinct tensors can end up with one name (two unrelated roots with the same layout);
    # the layers table needs unique names per optimizer, so suffix the repeats.
    seen: dict[str, int] = {}
    for i, name in enumerate(result.names):
        count = seen.get(name, 0)
        seen[name] = count + 1
        if count:
            result.names[i] = f"{name}#{count}"
    return result
