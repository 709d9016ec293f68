"""The layout registry: each optimizer's parameter list, named once, with its read plan and its series.

A *layout* is an optimizer's parameter list at one moment (``add_param_group`` makes a new one). A
*slot* is a series in the store (an ``optimizer`` index in meta.json and the tables): slots are keyed
by the optimizer class and the parameter names, so an optimizer re-created every epoch with the same
parameters joins its old series, while two live optimizers with the same names (a GAN's D and G as
two ``nn.Sequential``) get one series each. Names are resolved (a gc scan) only when a layout is new.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from gradscope import store
from gradscope.record.measure import NormPlan, plan_norms
from gradscope.record.naming import resolve_names
from gradscope.record.rows import RowBlocks
from gradscope.record.shards import Columns, columns_of


@dataclass
class Slot:
    """One optimizer as the store sees it: re-created optimizers with the same params share a slot."""

    index: int
    cls: str
    names: list[str]
    aliases: dict[str, list[str]]
    shapes: list[list[int]]
    steps: int = 0  # records committed so far: the next record's step index
    evaluations: int = 0  # closure calls over the run (closure optimizers such as LBFGS)
    params: list[weakref.ref[torch.Tensor]] = field(default_factory=list, repr=False)  # its latest optimizer's
    norm_scope: str | None = None  # a rank of a distributed job: how its norms combine (record/shards.py)
    shard_weights: tuple[int | None, ...] | None = None  # per column, for a sharded optimizer

    def held_by_others(self, params: list[torch.Tensor]) -> bool:
        """True while tensors this slot recorded are alive and differ from ``params``: another live
        optimizer with the same class and names (GAN D and G as two nn.Sequential), not a re-created one."""
        return any(ref() is not None and ref() is not p for ref, p in zip(self.params, params, strict=True))

    def describe(self) -> store.OptimizerMeta:
        """This slot's entry in meta.json's ``optimizers``."""
        return store.OptimizerMeta(self.index, self.cls, tuple(self.names), tuple(tuple(s) for s in self.shapes),
                                   {name: tuple(other) for name, other in self.aliases.items()}, self.evaluations,
                                   self.norm_scope, self.shard_weights)


@dataclass
class Layout:
    """An optimizer's parameter list at one moment, with its slot, its read plan and column maps.

    ``plan``, ``blocks`` and ``saw_none`` are the step reader's (gradscope.record.step): it reads
    them every step and turns the plan off when a step shows the plan cannot cover these params.
    """

    signature: tuple[Any, ...]
    params: list[torch.Tensor]
    slot: Slot
    position: dict[int, int]  # id(param) -> index in params
    plan: NormPlan | None  # None: params on several devices or of a tensor subclass, always the general path
    sole: list[torch.Tensor] | None = None  # a single-group optimizer's param list itself (the fast path's check)
    cols: dict[Any, np.ndarray] = field(default_factory=dict)  # column maps of the general path, made once
    blocks: dict[bool, tuple[np.ndarray, RowBlocks]] = field(default_factory=dict)  # with_loss -> planned rows
    saw_none: bool = False  # a step of this layout had a param without a grad (checked first from then on)
    # DTensor or FSDP1 flat params: maps the params' grads to the columns (local shards, flat views); None: as they are
    columns: Columns | None = None

    def present_cols(self, present: tuple[int, ...], with_loss: bool) -> np.ndarray:
        """Columns of the general path's values: the params that had a grad, in order, then the loss."""
        key = (present, with_loss)
        found = self.cols.get(key)
        if found is None:
            found = self.cols[key] = np.array([*present, *([len(self.slot.names)] if with_loss else [])], dtype=np.int64)
        return found


class LayoutRegistry:
    """Layouts by owner (an optimizer, or the hand-written-loop tracker) and slots by class and names."""

    def __init__(self) -> None:
        # Weak keys: an optimizer the script drops takes its layout with it. The fast path binds .get once.
        self.by_owner: weakref.WeakKeyDictionary[Any, Layout] = weakref.WeakKeyDictionary()
        self.dirty = False  # a slot was added since meta.json was last written
        self._slots: dict[tuple[Any, ...], Slot] = {}
        self._last: tuple[weakref.ref[Any], Layout] | None = None  # the last optimizer's: skips the lookup

    def layout_of(self, optimizer: Any) -> Layout:
        """The layout of ``optimizer``'s current parameter list, made (and named) when it is new."""
        groups = optimizer.param_groups
        last = self._last
        if last is not None and last[0]() is optimizer and len(groups) == 1 and last[1].signature == (
                (id(groups[0]["params"]), len(groups[0]["params"])),):
            return last[1]  # the usual step: the same single-group optimizer as last time
        signature = tuple([(id(g["params"]), len(g["params"])) for g in groups])
        if last is not None and last[1].signature == signature and last[0]() is optimizer:
            return last[1]
        layout = self.by_owner.get(optimizer)
        if layout is not None and layout.signature == signature:
            self._last = (weakref.ref(optimizer), layout)
            return layout
        params = [p for g in groups for p in g["params"]]
        group_of = [(gi, pi) for gi, g in enumerate(groups) for pi in range(len(g["params"]))]
        new = self._new_layout(signature, params, group_of, type(optimizer).__name__)
        new.sole = groups[0]["params"] if len(groups) == 1 else None
        if layout is not None:  # add_param_group mid-run: a new series, whose step index goes on from the old one's
            new.slot.steps = max(new.slot.steps, layout.slot.steps)
        self.by_owner[optimizer] = new
        self._last = (weakref.ref(optimizer), new)
        return new

    def manual_layout(self, owner: Any, params: list[torch.Tensor]) -> Layout:
        """The layout of a hand-written update loop's ``params`` (class "manual"), kept under ``owner``."""
        signature = ("manual", tuple(id(p) for p in params))
        layout = self.by_owner.get(owner)
        if layout is None or layout.signature != signature:
            layout = self._new_layout(signature, params, [(0, i) for i in range(len(params))], "manual")
            self.by_owner[owner] = layout
        return layout

    @property
    def n_slots(self) -> int:
        """Optimizer slots so far (the next new slot's index)."""
        return len(self._slots)

    def describe(self) -> tuple[store.OptimizerMeta, ...]:
        """meta.json's ``optimizers``: every slot, by index."""
        return tuple(slot.describe() for slot in sorted(self._slots.values(), key=lambda s: s.index))

    def _new_layout(self, signature: tuple[Any, ...], params: list[torch.Tensor], group_of: list[tuple[int, int]],
                    cls: str) -> Layout:
        named = resolve_names(params, group_of)
        columns = columns_of(params, named.names, named.owners)
        # The scope and weights are part of the series: a DDP model after an FSDP one with the same names is another
        key = base = (cls, tuple(columns.names), columns.scope, columns.shard_weights())
        slot, n = self._slots.get(key), 0
        while slot is not None and slot.held_by_others(params):  # same names, other live tensors: its own series
            n += 1
            key = (*base, n)
            slot = self._slots.get(key)
        if slot is None:  # an optimizer re-created with the same params joins the same series
            slot = Slot(len(self._slots), cls, columns.names, named.aliases, columns.shapes,
                        norm_scope=columns.scope, shard_weights=columns.shard_weights())
            self._slots[key] = slot
            self.dirty = True
        slot.params = [weakref.ref(p) for p in params]
        if columns.identity:
            return Layout(signature, params, slot, {id(p): i for i, p in enumerate(params)}, _plan(params))
        local: list[torch.Tensor] = columns.expand(params)  # type: ignore[assignment]  # the column grads' shapes
        return Layout(signature, params, slot, {id(p): i for i, p in enumerate(params)}, _plan(local), columns=columns)


def _plan(params: list[torch.Tensor]) -> NormPlan | None:
    """The read plan of ``params``, or None when the general path must read them every step."""
    devices = {p.device for p in params}
    # A tensor subclass that is not a Parameter (a DTensor param: FSDP2, tensor parallel) has subclass grads,
    # which the general path reads shard by shard; Parameter subclasses (FSDP1's FlatParameter) have plain ones.
    if len(devices) != 1 or not all(type(p) is torch.Tensor or issubclass(type(p), nn.Parameter) for p in params):
        return None
    return plan_norms([p.shape for p in params], devices.pop(), {p.dtype for p in params})
