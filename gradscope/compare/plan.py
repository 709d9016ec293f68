"""Planning ``gradscope compare``: validate everything before the first arm starts.

    plan = plan_compare(CompareOptions(max_norm="auto,1", seeds=3))  # validates; runs nothing

A plan names the recorded run, the thresholds and seeds, and one :class:`ArmSpec` per subprocess
to run. The unclipped baseline is the recorded run itself when it can stand in for one (seeded,
unclipped, unchanged script); otherwise a ``--no-clip`` baseline arm runs too. Never imports torch.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradscope import store
from gradscope.compare.metrics import arm_key, step_frame
from gradscope.errors import GradscopeError, NoDataError, UsageError

AUTO = "auto"


@dataclass(frozen=True)
class CompareOptions:
    """Everything ``gradscope compare`` was asked to do (one field per CLI option)."""

    run: str | None = None  # run id or path; None = the latest run
    runs_dir: str | os.PathLike[str] | None = None
    max_norm: str = AUTO  # "auto" or comma-separated positive numbers ("auto" may be one of them)
    seeds: int = 1
    steps: int | None = None  # cap each arm at N optimizer steps
    max_time: float | None = None  # cap each arm at S seconds
    out_dir: Path | None = None  # where logs, plots and compare.json go


@dataclass(frozen=True)
class ArmSpec:
    """One subprocess to run (or the recorded run standing in for it)."""

    arm: str  # "baseline" or "max_norm=<x>": the key the seeds of one arm share
    max_norm: float | None  # None: no clipping at all (the script's own clipping disabled too)
    seed: int
    label: str  # the arm run's label: its run id is LABEL-<time>
    reuse: bool = False  # the recorded run is this arm's result; nothing runs


@dataclass
class Plan:
    """A validated comparison, ready to run: what runs, where, and what the user should know first."""

    run: store.Run
    provenance: store.Provenance  # how the recorded run was started: what every arm reruns
    root: Path  # runs root of the recorded run; the arms' runs go next to it
    thresholds: list[float]
    seeds: list[int]
    step_cap: int | None
    max_time: float | None
    out_dir: Path | None
    auto_max_norm: float | None = None
    arms: list[ArmSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cwd(self) -> Path:
        """The working directory the recorded run started in, and every arm starts in."""
        return Path(self.provenance.cwd)

    @property
    def target(self) -> list[str]:
        """``[-m] TARGET ARGS...``, as recorded."""
        prov = self.provenance
        return [*(["-m"] if prov.as_module else []), prov.target, *prov.script_args]


def parse_max_norms(text: str) -> list[float | str]:
    """Parse ``--max-norm``: ``auto`` and/or positive finite numbers separated by commas.

    Raises:
        UsageError: an item is empty, not a number, not finite or not positive (exit code 2).
    """
    values: list[float | str] = []
    for item in (part.strip() for part in text.split(",")):
        if item.lower() == AUTO:
            value: float | str = AUTO
        else:
            try:
                value = float(item)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"--max-norm takes 'auto' or positive numbers separated by commas "
                                 f"(e.g. 0.5,1,2); {item!r} is not a positive number")
        if value not in values:
            values.append(value)
    return values


def plan_compare(options: CompareOptions) -> Plan:
    """Load the run, check its script, resolve thresholds and seeds, and lay out the arms.

    Raises:
        UsageError: a bad ``--max-norm`` (exit 2).
        GradscopeError: the run is missing, was not recorded by ``gradscope profile``, or its
            script or working directory is gone (exit 1); NoDataError when it has no steps (3).
    """
    requested = parse_max_norms(options.max_norm)
    run = store.load_run(options.run, options.runs_dir)
    notes: list[str] = []
    provenance = _provenance(run)
    script_changed = _script_changed(run, provenance, notes)
    n_steps = len(step_frame(run))
    if n_steps == 0 and AUTO in requested:
        raise NoDataError(f"run {run.id} recorded no optimizer step, so there is no norm to recommend a max_norm from")
    auto = _auto_max_norm(run) if AUTO in requested else None
    thresholds = _distinct(sorted(auto if v == AUTO and auto is not None else float(v) for v in requested))
    seeds = _seeds(run, options.seeds, notes)
    cap = options.steps or (n_steps if run.status == "complete" and n_steps else None)
    reuse = _can_reuse_baseline(run, options, cap, n_steps, script_changed, notes)
    plan = Plan(run=run, provenance=provenance, root=run.path.parent, thresholds=thresholds, seeds=seeds,
                step_cap=cap, max_time=options.max_time, out_dir=options.out_dir, auto_max_norm=auto, notes=notes)
    plan.arms = _arm_specs(plan, reuse)
    return plan


def _distinct(values: list[float]) -> list[float]:
    """Drop thresholds that print the same (``%g``): arms are named, and keyed, by that text."""
    seen: dict[str, float] = {}
    for value in values:
        seen.setdefault(f"{value:g}", value)
    return list(seen.values())


def _provenance(run: store.Run) -> store.Provenance:
    """What started the run; raise when it names no script or its working directory is gone."""
    prov = run.meta.provenance
    if prov is None or not prov.target or not prov.script_path:
        raise GradscopeError(f"run {run.id} was not recorded by gradscope profile (its meta.json names no script), "
                             "so there is nothing to rerun; profile the script with gradscope profile first")
    path, recorded = Path(prov.script_path), prov.script_sha256 or "unknown"
    if not path.is_file():
        raise GradscopeError(f"the script {path} of run {run.id} no longer exists (recorded sha256 {recorded[:12]}); "
                             "restore it or profile the script again")
    if not Path(prov.cwd).is_dir():
        raise GradscopeError(f"the working directory {prov.cwd} of run {run.id} no longer exists")
    return prov


def _script_changed(run: store.Run, prov: store.Provenance, notes: list[str]) -> bool:
    """Note (and return True) when the script's content differs from the one recorded."""
    path, recorded = Path(prov.script_path), prov.script_sha256
    current = hashlib.sha256(path.read_bytes()).hexdigest()
    if recorded is not None and current != recorded:
        notes.append(f"warning: {path} changed since run {run.id} was recorded (sha256 {recorded[:12]} then, "
                     f"{current[:12]} now): the arms run the current file")
        return True
    return False


def _auto_max_norm(run: store.Run) -> float:
    """The max_norm ``gradscope recommend`` gives by its default rule, for the first optimizer."""
    from gradscope.recommend import recommend

    value = recommend(run)[0].max_norm  # one Recommendation per optimizer, in optimizer order
    if not math.isfinite(value) or value <= 0:
        raise NoDataError(f"gradscope recommend found no finite gradient norm in run {run.id} to choose a max_norm "
                          "from; give thresholds with --max-norm 0.5,1")
    return float(value)


def _seeds(run: store.Run, n: int, notes: list[str]) -> list[int]:
    base = run.meta.seed
    if base is None:
        notes.append("script not seeded: gradscope seeded torch (arm seeds 0.."
                     f"{n - 1}); the recorded run cannot serve as the baseline")
        base = 0
    return [base + k for k in range(n)]


def _can_reuse_baseline(run: store.Run, options: CompareOptions, cap: int | None, n_steps: int,
                        script_changed: bool, notes: list[str]) -> bool:
    """The recorded run is the baseline's first seed when it is exactly what that arm would record."""
    clipping = run.meta.clipping
    script_clipped = clipping.script_clip_calls and not clipping.script_clip_disabled
    reasons = [
        (run.meta.seed is None, None),  # already noted by _seeds
        (run.status != "complete" or not run.compacted, f"it is {run.status}"),
        (clipping.injected_max_norm is not None, "gradscope injected clipping into it"),
        (bool(script_clipped), f"the script clips ({clipping.script_clip_function}, "
                               f"max_norm={clipping.script_max_norm})"),
        (script_changed, "its script changed"),
        (options.max_time is not None, "--max-time makes arm lengths differ from it"),
        (cap is not None and cap > n_steps, f"it has {n_steps} steps, fewer than --steps {cap}"),
    ]
    why = [reason for failed, reason in reasons if failed and reason]
    if why:
        notes.append(f"a --no-clip baseline arm runs, since the recorded run cannot be the baseline: {'; '.join(why)}")
    return not any(failed for failed, _ in reasons)


def _arm_specs(plan: Plan, reuse_baseline: bool) -> list[ArmSpec]:
    """Seed-major order (every arm of seed 0, then of seed 1...): after Ctrl-C, what finished is a
    fair comparison of whole seeds rather than all seeds of one arm and none of another."""
    stem = Path(plan.provenance.target).stem.replace(".", "_") or "script"
    specs = []
    for k, seed in enumerate(plan.seeds):
        for max_norm in [None, *plan.thresholds]:
            tag = "base" if max_norm is None else f"clip{max_norm:g}"
            reuse = reuse_baseline and max_norm is None and k == 0
            specs.append(ArmSpec(arm_key(max_norm), max_norm, seed, f"{stem}-compare-{tag}-s{seed}", reuse))
    return specs


def describe(plan: Plan) -> dict[str, Any]:
    """What the plan will do, for the JSON report and the first line on screen."""
    return {"run": plan.run.id, "run_path": str(plan.run.path), "script": plan.provenance.script_path,
            "cwd": str(plan.cwd), "target": plan.target, "thresholds": plan.thresholds, "seeds": plan.seeds,
            "auto_max_norm": plan.auto_max_norm, "step_cap": plan.step_cap, "max_time": plan.max_time,
            "baseline_reused": any(s.reuse for s in plan.arms)}
