"""Per-step overhead: every variant against the plain step, interleaved in one process.

Method (the same for every workload):

- All variants run in one process on the same model and optimizer, ``block`` steps at a time.
- One *round* runs one block of every variant, in list order on even rounds and reversed on odd
  rounds, so that a slow drift of the machine favours no variant.
- Before the first round every variant runs one untimed warm-up block (allocator, lazy imports,
  the first parquet write).
- On CPU a block's per-step time is the median of its steps, each timed alone: a step during which
  the shared machine took the core away is an outlier, not a shift. On CUDA it is the block's mean
  between two synchronisations (a per-step sync would hide the recorder's host work behind the GPU).
- Per round, a variant's per-step time is divided by (and subtracted from) the plain step's in the
  same round. The table reports the median of those per-round ratios and added microseconds, with
  their min–max, never absolute times.
- "Inside" times are measured in the same rounds: the time spent in the added code itself (a
  snippet's call; the recorder's hooks and loss capture, bracketed by :class:`_Inside`, in one
  extra instrumented block per round). They exclude indirect costs but not the added work, and
  are what resolves a 1% overhead on a machine whose rounds differ by 20%. They are net of what
  the timers read around nothing, measured in every round (:class:`_EmptyBrackets`).
- "After backward" times (CPU) are each step's time from the end of its last backward to the end of
  ``opt.step()``, in the same blocks as the whole step, minus the plain step's in the same round
  (gradscope's with its loss capture, taken from the instrumented block, and its flush share). Unlike
  "inside" they count work the added code moves rather than adds: the first ``p.grad`` read after a
  backward makes each gradient's Python object, which ``opt.step()`` otherwise makes itself. Unlike the
  whole step they leave out the forward and backward passes, identical in every variant and noisy.

The ``gradscope`` variant is the recorder ``gradscope profile`` installs: a ``Recorder`` with the
default ``RecorderConfig`` started around the loop, in the same process, through the same global
hooks and patches. Each of its blocks starts a fresh recorder and runs two untimed steps first (the
first recorded step names the parameters, once per run; it is reported as a fixed cost).

The writes count. A real run writes one part file per ``flush_every`` (100) steps and at least
``flush_seconds`` (2 s) apart, so one part holds ``K = max(100, 2 s / step)`` rows (at most 10,000).
After each timed block the block's rows are repeated up to K rows and flushed through the
recorder's own ``flush()`` (the one device-to-host copy, the columns, two parquet parts, meta.json
when it changed); that time divided by K is added to the block's per-step time. ``stop()``
(compaction, the final meta.json) happens once per run and is reported apart, as are start-up and
the first step.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from workloads import Workload


@dataclass
class Variant:
    """One way of running a step: the per-step snippet run before ``opt.step()``, or the recorder."""

    name: str
    label: str
    make_extra: Callable[[Workload], Callable[[], object] | None] = lambda w: None
    recorder: bool = False


def _floor(w: Workload) -> Callable[[], object]:
    params = [p for g in w.optimizer.param_groups for p in g["params"]]
    kept: list[torch.Tensor | None] = [None]

    def floor() -> None:  # read every gradient once; the result stays on device
        grads = [p.grad for p in params if p.grad is not None]
        kept[0] = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))

    return floor


def _plan_read(w: Workload) -> Callable[[], object]:
    """gradscope's norm read alone: its plan's stacks and norms written into a preallocated row, as the
    recorder's usual step does, without its hooks, loss capture, bookkeeping or writes. What any
    recorder that reads every gradient this way pays at least (the bound under the .item() target)."""
    from gradscope.record.measure import plan_norms, write_norms
    from gradscope.record.rows import RowBlocks

    params = [p for g in w.optimizer.param_groups for p in g["params"]]
    plan = plan_norms([p.shape for p in params], params[0].device, {p.dtype for p in params})
    rows = RowBlocks(plan.part_sizes(False), plan.device)

    def read() -> None:
        write_norms(plan, [p.grad for p in params], None, rows.claim()[1])

    return read


def _item_loop(w: Workload) -> Callable[[], object]:
    model = w.model

    def item_loop() -> list[float]:  # Cockpit's GradNorm, and most hand-written monitors
        return [p.grad.norm(2).item() for p in model.parameters() if p.grad is not None]

    return item_loop


def _clip_inf(w: Workload) -> Callable[[], object]:
    model = w.model

    def clip_inf() -> float:  # "log the grad norm" as users write it: a no-op clip, one sync
        return torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item()

    return clip_inf


class _Inside:
    """Time spent inside the added code of each step: a snippet's call, or gradscope's hooks.

    For gradscope it brackets the recorder with public mechanisms only: a global optimizer pre/post
    hook registered before ``Recorder.start()`` runs just before the recorder's (global hooks run in
    registration order) and one registered after it runs just after; ``torch.autograd.backward`` is
    wrapped once inside the recorder's patch and once outside it, so outer minus inner is the
    recorder's loss capture. Pre hook + post hook + loss capture (+ the flush share, added by
    ``measure``) is what the recorder adds to a step, without the noise of the step around it.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.current = 0.0  # seconds inside, this step
        self.capture = 0.0  # of which in the recorder's loss capture (its torch.autograd.backward wrapper)
        self.marks: dict[str, float] = {}
        self.handles: list[Any] = []
        self.saved_backward: Any = None

    def wrap(self, extra: Callable[[], object] | None) -> Callable[[], object] | None:
        if extra is None:
            return None
        clock = self.clock

        def timed() -> object:
            t0 = clock()
            try:
                return extra()
            finally:
                self.current += clock() - t0

        return timed

    def _mark(self, name: str) -> Callable[..., None]:
        clock, marks = self.clock, self.marks

        def hook(*args: Any) -> None:
            marks[name] = clock()
            if name == "pre_out":
                self.current += marks["pre_out"] - marks["pre_in"]
            elif name == "post_out":
                self.current += marks["post_out"] - marks["post_in"]

        return hook

    def _backward(self, inner: Callable[..., Any], sign: float) -> Callable[..., Any]:
        clock = self.clock

        def backward(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                dt = sign * (clock() - t0)
                self.current += dt
                self.capture += dt

        return backward

    def before_start(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.handles = [register_optimizer_step_pre_hook(self._mark("pre_in")),
                        register_optimizer_step_post_hook(self._mark("post_in"))]
        self.saved_backward = torch.autograd.backward
        torch.autograd.backward = self._backward(self.saved_backward, -1.0)  # the recorder wraps this one

    def after_start(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.handles += [register_optimizer_step_pre_hook(self._mark("pre_out")),
                         register_optimizer_step_post_hook(self._mark("post_out"))]
        torch.autograd.backward = self._backward(torch.autograd.backward, +1.0)

    def remove(self) -> None:  # after Recorder.stop(), which put back our inner wrapper
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.saved_backward is not None:
            torch.autograd.backward = self.saved_backward
            self.saved_backward = None


VARIANTS: list[Variant] = [
    Variant("plain", "plain step"),
    Variant("gradscope", "gradscope Recorder", recorder=True),
    Variant("read", "its norm read alone", _plan_read),
    Variant("floor", "floor: _foreach_norm + stack", _floor),
    Variant("item_loop", "[p.grad.norm(2).item() ...]", _item_loop),
    Variant("clip_inf", "clip_grad_norm_(inf).item()", _clip_inf),
]


@dataclass
class Result:
    """Per-round per-step times of every variant of one workload."""

    workload: str
    title: str
    n_params: int
    n_tensors: int
    block: int
    rounds: int
    device: str
    seconds: dict[str, list[float]] = field(default_factory=dict)  # variant -> per-step time, one per round
    flush_seconds: list[float] = field(default_factory=list)  # gradscope: the flush share per step, per round
    inside_seconds: dict[str, list[float]] = field(default_factory=dict)  # variant -> time inside its code, per round
    # variant -> per-step time after the last backward (CPU only; gradscope's with its loss capture and
    # flush share added), per round: see _Block.tail
    tail_seconds: dict[str, list[float]] = field(default_factory=dict)
    recorder_fixed: dict[str, list[float]] = field(default_factory=dict)  # start / first step / stop, seconds
    # what the inside timers read with nothing inside them, per round (subtracted from inside_seconds):
    # "hooks" for the recorder's brackets, "call" for a snippet's timed call
    timer_seconds: dict[str, list[float]] = field(default_factory=dict)
    part_rows: int = 0  # K: rows per part file under the default flush policy at this step time

    def ratios(self, variant: str) -> list[float]:
        return [v / p for v, p in zip(self.seconds[variant], self.seconds["plain"], strict=True)]

    def added_us(self, variant: str) -> list[float]:
        return [(v - p) * 1e6 for v, p in zip(self.seconds[variant], self.seconds["plain"], strict=True)]

    def summary(self) -> dict[str, Any]:
        """Medians and min–max of the per-round ratios and added microseconds, JSON-ready."""
        out: dict[str, Any] = {
            "workload": self.workload, "title": self.title, "n_params": self.n_params, "n_tensors": self.n_tensors,
            "device": self.device, "block": self.block, "rounds": self.rounds,
            "plain_step_ms": statistics.median(self.seconds["plain"]) * 1e3, "part_rows": self.part_rows,
            "flush_us_per_step": statistics.median(self.flush_seconds) * 1e6 if self.flush_seconds else None,
            "recorder_fixed_ms": {k: statistics.median(v) * 1e3 for k, v in self.recorder_fixed.items()},
            "variants": {},
        }
        for name in self.seconds:
            r, a = self.ratios(name), self.added_us(name)
            out["variants"][name] = {"ratio_median": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r),
                                     "added_us_median": statistics.median(a), "added_us_min": min(a),
                                     "added_us_max": max(a)}
        out["timer_us"] = {k: statistics.median(v) * 1e6 for k, v in self.timer_seconds.items()}
        for name, inside in self.inside_seconds.items():
            us = [x * 1e6 for x in inside]
            out["variants"][name].update(inside_us_median=statistics.median(us), inside_us_min=min(us),
                                         inside_us_max=max(us))
        for name, tails in self.tail_seconds.items():
            if name != "plain":
                us = [(t - p) * 1e6 for t, p in zip(tails, self.tail_seconds["plain"], strict=True)]
                out["variants"][name].update(after_us_median=statistics.median(us), after_us_min=min(us),
                                             after_us_max=max(us))
        floor = out["variants"].get("floor", {})
        for name, v in out["variants"].items():
            if name == "plain":
                continue
            f = floor.get("added_us_median")
            v["vs_floor"] = v["added_us_median"] / f if f and f > 0 else None
            f = floor.get("inside_us_median")
            v["inside_vs_floor"] = v["inside_us_median"] / f if f and "inside_us_median" in v else None
            f = floor.get("after_us_median")
            v["after_vs_floor"] = v["after_us_median"] / f if f and f > 0 and "after_us_median" in v else None
        return out


def part_rows(step_seconds: float) -> int:
    """K: rows per part file under the default policy (every ``flush_every`` steps, ``flush_seconds`` apart)."""
    from gradscope.record.config import RecorderConfig

    cfg = RecorderConfig()
    k = max(cfg.flush_every, math.ceil(cfg.flush_seconds / max(step_seconds, 1e-9)))
    return int(min(100 * cfg.flush_every, k))


class _RecorderBlock:
    """A fresh default ``Recorder`` per block, as ``gradscope profile`` starts one around the script."""

    def __init__(self, runs_dir: Path, fixed: dict[str, list[float]], clock: Callable[[], float],
                 rows_per_part: int, inside: _Inside | None = None) -> None:
        self.runs_dir = runs_dir
        self.fixed = fixed
        self.clock = clock
        self.rows_per_part = rows_per_part
        self.inside = inside
        self.recorder: Any = None

    def before(self, w: Workload) -> None:
        """Untimed: start the recorder, then the first recorded step (naming) and one more."""
        from gradscope.record.config import RecorderConfig
        from gradscope.record.recorder import Recorder

        if self.inside is not None:
            self.inside.before_start()
        t0 = time.perf_counter()
        self.recorder = Recorder(runs_dir=self.runs_dir, label=f"bench-{w.name}", config=RecorderConfig())
        self.recorder.start()
        t1 = time.perf_counter()
        if self.inside is not None:
            self.inside.after_start()
        w.step(None)
        t2 = time.perf_counter()
        w.step(None)
        t3 = time.perf_counter()
        if self.inside is None:
            self.fixed.setdefault("start", []).append(t1 - t0)
            self.fixed.setdefault("first_step_extra", []).append((t2 - t1) - (t3 - t2))

    def flush_per_step(self) -> float:
        """Seconds per row of writing one part of K rows through the recorder's own flush."""
        rec = self.recorder
        buffer = rec.buffer  # the rows the block recorded, still on device
        rows = buffer.take()
        if not rows:
            raise RuntimeError("the gradscope variant recorded no step: the benchmark would measure nothing")
        k = max(self.rows_per_part, len(rows))
        for i in range(k):
            buffer.append(dataclasses.replace(rows[i % len(rows)], step=i))
        t0 = self.clock()
        rec.flush()
        return (self.clock() - t0) / k

    def after(self) -> None:
        """Untimed: stop (compaction and the final meta.json, once per run)."""
        t0 = time.perf_counter()
        try:
            self.recorder.stop()
        finally:
            if self.inside is not None:
                self.inside.remove()
        if self.inside is None:
            self.fixed.setdefault("stop", []).append(time.perf_counter() - t0)
        self.recorder = None


class _EmptyBrackets:
    """The recorder's inside brackets with no recorder between them: what the brackets themselves read.

    Subtracted from gradscope's inside time in the same round (calibration, like a timer's own cost):
    with nothing between them and the process-CPU clock, the hook and backward brackets read 9–53 µs per
    step on a 2-core CPU (more after a longer backward), while a snippet's timer reads 1–4 µs
    (calibrated the same way, with a call of an empty function).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.inside = _Inside(clock)

    def before(self, w: Workload) -> None:
        self.inside.before_start()
        self.inside.after_start()

    def flush_per_step(self) -> float:
        return 0.0

    def after(self) -> None:
        self.inside.remove()


@dataclass
class _Block:
    step: float  # per-step time: median of the steps (CPU) or mean between two syncs (CUDA)
    flush: float = 0.0  # gradscope: the flush share per step
    inside: float | None = None  # median per-step time inside the added code, when timed
    capture: float = 0.0  # of which the recorder's loss capture (median per step), when timed
    # CPU: median per-step time from the end of the last backward to the end of opt.step(). It holds the
    # snippet or the recorder's hooks and the optimizer step, and so what they move as well as what they
    # add: the first read of p.grad after a backward makes the tensor's Python object (~0.6 µs each),
    # which opt.step() then finds made. A recorder's loss capture runs before it (added from `capture`).
    tail: float | None = None


def _run_block(w: Workload, extra: Callable[[], object] | None, rec: _RecorderBlock | _EmptyBrackets | None,
               inside: _Inside | None, cuda: bool, clock: Callable[[], float]) -> _Block:
    """One block of ``w.block`` steps."""
    if rec is not None:
        rec.before(w)
    try:
        inside_times: list[float] = []
        if cuda:  # inside times are host time here: the GPU work they queue is not waited for
            torch.cuda.synchronize()
            t0 = clock()
            for _ in range(w.block):
                if inside is not None:
                    inside.current = 0.0
                w.step(extra)
                if inside is not None:
                    inside_times.append(inside.current)
            torch.cuda.synchronize()
            step = (clock() - t0) / w.block
        else:
            times, tails, captures = [], [], []
            w.tail.clock = clock
            try:
                for _ in range(w.block):
                    if inside is not None:
                        inside.current = inside.capture = 0.0
                    t0 = clock()
                    w.step(extra)
                    times.append(clock() - t0)
                    tails.append(w.tail.last)
                    if inside is not None:
                        inside_times.append(inside.current)
                        captures.append(inside.capture)
            finally:
                w.tail.clock = None
            step = statistics.median(times)
        block = _Block(step, inside=statistics.median(inside_times) if inside_times else None)
        if not cuda:
            block.tail = statistics.median(tails)
            block.capture = statistics.median(captures) if captures else 0.0
        if rec is not None:
            block.flush = rec.flush_per_step()
            if block.inside is not None:
                block.inside += block.flush
            if block.tail is not None:
                block.tail += block.flush
    finally:
        if rec is not None:
            rec.after()
    return block


def _subtract_timer_cost(w: Workload, result: Result, recorders: dict[str, Any], timers: dict[str, _Inside],
                         cuda: bool, clock: Callable[[], float]) -> None:
    """Measure this round what each inside timer reads around nothing, and take it off this round's inside
    times: the recorder's brackets (hook and backward wrappers around no recorder) and a snippet's timed
    call (of an empty function)."""
    empty = _EmptyBrackets(clock)
    block = _run_block(w, None, empty, empty.inside, cuda, clock)
    hooks = block.inside or 0.0
    call_timer = _Inside(clock)
    call = _run_block(w, call_timer.wrap(lambda: None), None, call_timer, cuda, clock).inside or 0.0
    result.timer_seconds.setdefault("hooks", []).append(hooks)
    result.timer_seconds.setdefault("call", []).append(call)
    for name in recorders:
        result.inside_seconds[name][-1] -= hooks
        if name in result.tail_seconds:  # the loss capture added to it was read through the backward brackets
            result.tail_seconds[name][-1] -= block.capture
    for name in timers:
        result.inside_seconds[name][-1] -= call


def measure(w: Workload, rounds: int, variants: list[Variant] | None = None,
            clock: Callable[[], float] = time.perf_counter, log: Callable[[str], None] = lambda s: None) -> Result:
    """Interleaved rounds of every variant on workload ``w``; the first variant must be the plain step.

    Each round also runs one instrumented block of every recorder variant (its hooks bracketed, see
    :class:`_Inside`); only its inside time is kept, its step time would include the brackets.
    """
    variants = variants or VARIANTS
    if variants[0].name != "plain":
        raise ValueError("the first variant must be the plain step")
    device = next(w.model.parameters()).device
    cuda = device.type == "cuda"
    result = Result(w.name, w.title, w.n_params, w.n_tensors, w.block, rounds, str(device))
    timers = {v.name: _Inside(clock) for v in variants if not v.recorder and v.name != "plain"}
    extras = {v.name: (timers[v.name].wrap(v.make_extra(w)) if v.name in timers else v.make_extra(w)) for v in variants}
    with tempfile.TemporaryDirectory(prefix="gradscope-bench-") as tmp:
        warm_fixed: dict[str, list[float]] = {}
        plain_warm = 0.0
        for v in variants:  # warm-up: one untimed block of each
            warm = _RecorderBlock(Path(tmp), warm_fixed, clock, 1) if v.recorder else None
            b = _run_block(w, extras[v.name], warm, timers.get(v.name), cuda, clock)
            if v.name == "plain":
                plain_warm = b.step
        result.part_rows = part_rows(plain_warm)
        recs = {v.name: _RecorderBlock(Path(tmp), result.recorder_fixed, clock, result.part_rows)
                for v in variants if v.recorder}
        timed_recs = {v.name: _RecorderBlock(Path(tmp), warm_fixed, clock, result.part_rows, _Inside(clock))
                      for v in variants if v.recorder}
        for r in range(rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                b = _run_block(w, extras[v.name], recs.get(v.name), timers.get(v.name), cuda, clock)
                result.seconds.setdefault(v.name, []).append(b.step + b.flush)
                if v.recorder:
                    result.flush_seconds.append(b.flush)
                if b.inside is not None:
                    result.inside_seconds.setdefault(v.name, []).append(b.inside)
                if b.tail is not None:
                    result.tail_seconds.setdefault(v.name, []).append(b.tail)
            for name, rec in timed_recs.items():
                b = _run_block(w, None, rec, rec.inside, cuda, clock)
                result.inside_seconds.setdefault(name, []).append(b.inside)
                if name in result.tail_seconds:  # the loss capture ran before the tail: add this round's
                    result.tail_seconds[name][-1] += b.capture
            _subtract_timer_cost(w, result, timed_recs, timers, cuda, clock)
            log(f"  {w.name} round {r + 1}/{rounds}: "
                + ", ".join(f"{v.name} {result.seconds[v.name][-1] / result.seconds['plain'][-1]:.3f}x"
                            f"/{result.inside_seconds[v.name][-1] * 1e6:.0f}us" for v in variants[1:]))
    result.seconds = {v.name: result.seconds[v.name] for v in variants}  # table order
    return result
