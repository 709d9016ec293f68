"""Planning ``gradscope compare``: validate everything before the first arm starts.

    plan = plan_compare(CompareOptions(max_norm="auto,1", seeds=3))  # validates; runs nothing

A plan names the recorded run, the thresholds and seeds, and one :class:`ArmSpec` per subprocess
to run. The unclipped baseline is the recorded run itself when it can stand in for one (seeded,
unclipped, unchanged script); otherwise a ``--no-clip`` baseline arm runs too. Never imports torch.
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradscope import store
from gradscope.compare import trust
from gradscope.compare.metrics import Clip, optimizer_name, optimizers_of, step_frame
from gradscope.errors import GradscopeError, NoDataError, UsageError
from gradscope.record.config import Thresholds, parse_clip_value, parse_thresholds

AUTO = "auto"
DEFAULT_SEEDS = 3  # the fewest paired seeds with which the verdict may claim an effect


@dataclass(frozen=True)
class CompareOptions:
    """Everything ``gradscope compare`` was asked to do (one field per CLI option)."""

    run: str | None = None  # run id or path; None = the latest run
    runs_dir: str | os.PathLike[str] | None = None
    max_norm: str | None = AUTO  # "auto", "X" or "X/Y" (per optimizer), comma-separated; None: no norm arms
    clip_value: str | None = None  # "auto" or numbers, comma-separated: clip_grad_value_ arms
    seeds: int = DEFAULT_SEEDS
    steps: int | None = None  # cap each arm at N optimizer steps
    max_time: float | None = None  # cap each arm at S seconds
    out_dir: Path | None = None  # where logs, plots and compare.json go
    python: str | None = None  # the interpreter the arms run with; default: the recorded one
    trust_run: bool = False  # run a script, command or interpreter that does not match the record


@dataclass(frozen=True)
class ArmSpec:
    """One subprocess to run (or the recorded run standing in for it)."""

    clip: Clip  # what the arm clips; Clip() is the baseline (the script's own clipping disabled too)
    seed: int
    label: str  # the arm run's label: its run id is LABEL-<time>
    reuse: bool = False  # the recorded run is this arm's result; nothing runs

    @property
    def arm(self) -> str:
        """The key the seeds of one arm share: ``baseline`` or the arm's title."""
        return self.clip.key


@dataclass
class Plan:
    """A validated comparison, ready to run: what runs, where, and what the user should know first."""

    run: store.Run
    provenance: store.Provenance  # how the recorded run was started: what every arm reruns
    root: Path  # runs root of the recorded run; the arms' runs go next to it
    clips: list[Clip]  # the clipped arms, in run order (the baseline comes first, implicitly)
    seeds: list[int]
    step_cap: int | None
    max_time: float | None
    out_dir: Path | None
    python: str  # the interpreter every arm runs with
    optimizers: dict[int, str] = field(default_factory=dict)  # index -> "optimizer 1 (Adam, G.*)"
    launcher_args: tuple[str, ...] | None = None  # torchrun's options for a distributed job; None: one process
    auto_max_norm: Thresholds | None = None
    auto_clip_value: float | None = None
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


MAX_NORM_USAGE = ("--max-norm takes 'auto' or positive numbers separated by commas, each one number for every "
                  "optimizer or one per optimizer separated by '/' (e.g. auto,0.5,1/5)")


def parse_max_norms(text: str) -> list[Thresholds | str]:
    """Parse ``--max-norm``: ``auto`` and/or ``X`` / ``X/Y/...`` items separated by commas.

    Raises:
        UsageError: an item is empty, not a number, not finite or not positive (exit code 2).
    """
    values: list[Thresholds | str] = []
    for item in (part.strip() for part in text.split(",")):
        if item.lower() == AUTO:
            value: Thresholds | str = AUTO
        else:
            try:
                value = parse_thresholds(item, "--max-norm")
            except ValueError:
                raise UsageError(f"{MAX_NORM_USAGE}; {item!r} is not a positive number") from None
        if value not in values:
            values.append(value)
    return values


def parse_clip_values(text: str) -> list[float | str]:
    """Parse ``--clip-value``: ``auto`` and/or positive numbers separated by commas.

    Raises:
        UsageError: an item is not ``auto`` or a positive finite number (exit code 2).
    """
    values: list[float | str] = []
    for item in (part.strip() for part in text.split(",")):
        try:
            value: float | str = AUTO if item.lower() == AUTO else parse_clip_value(item)
        except ValueError:
            raise UsageError(f"--clip-value takes 'auto' or positive numbers separated by commas (e.g. 0.1,1); "
                             f"{item!r} is not a positive number") from None
        if value not in values:
            values.append(value)
    return values


def plan_compare(options: CompareOptions) -> Plan:
    """Load the run, check its script and interpreter, resolve thresholds and seeds, and lay out the arms.

    Raises:
        UsageError: a bad ``--max-norm``, ``--clip-value`` or ``--python`` (exit 2).
        GradscopeError: the run is missing, was not recorded by ``gradscope profile``, or its
            script, working directory or interpreter is gone (exit 1); NoDataError when ``auto``
            has no steps to recommend from (3).
    """
    norms = parse_max_norms(options.max_norm) if options.max_norm else []
    values = parse_clip_values(options.clip_value) if options.clip_value else []
    if not norms and not values:
        raise UsageError("nothing to compare: give --max-norm or --clip-value")
    if options.out_dir is not None and options.out_dir.exists() and not options.out_dir.is_dir():
        raise UsageError(f"--out {options.out_dir}: a file is there; give a directory")
    run = store.load_run(options.run, options.runs_dir)
    notes: list[str] = []
    provenance = _provenance(run)
    python = trust.interpreter(run, provenance, options.python, options.trust_run, notes)
    launcher_args = relaunch_args(run, notes)
    trust.check_command(run, provenance, options.trust_run, notes)
    script_changed = trust.check_script(run, provenance, options.trust_run, notes)
    n_steps = len(step_frame(run))
    optimizers = {k: optimizer_name(_meta_of(run, k), k) for k in optimizers_of(run)}
    if n_steps == 0:
        raise NoDataError(f"run {run.id} recorded no optimizer step, so there is nothing to compare against; "
                          "profile a run that trains first")
    auto = _auto_max_norm(run, optimizers) if AUTO in norms else None
    auto_value = _auto_clip_value(run) if AUTO in values else None
    clips = _clips(norms, auto, values, auto_value, optimizers, notes)
    seeds = _seeds(run, options.seeds, notes)
    cap = options.steps or (n_steps if run.status == "complete" and n_steps else None)
    reuse = _can_reuse_baseline(run, options, cap, n_steps, script_changed, notes)
    plan = Plan(run=run, provenance=provenance, root=run.path.parent, clips=clips, seeds=seeds, step_cap=cap,
                max_time=options.max_time, out_dir=options.out_dir, python=python, optimizers=optimizers,
                auto_max_norm=auto, auto_clip_value=auto_value, notes=notes, launcher_args=launcher_args)
    plan.arms = _arm_specs(plan, reuse)
    check_writable(plan.root)
    return plan


def relaunch_args(run: store.Run, notes: list[str]) -> tuple[str, ...] | None:
    """torchrun's options that start each arm of a distributed job as the job was started; None for a
    single process (or a script that starts its own ranks, ``mp.spawn``: rerunning it starts them again).

    Raises:
        GradscopeError: the job ran across several nodes (the arms run on this machine only), or how many
            processes it ran is not recorded.
    """
    launch = run.meta.launch
    if not run.ranks or launch is None or launch.via == "script":
        return None
    per_node = launch.nproc_per_node
    # The ranks' own WORLD_SIZE counts the ranks of other nodes too, when only this node's were recorded.
    world = max([run.meta.world_size or 0, run.world_size, *(r.meta.world_size or 0 for r in run.ranks)])
    if launch.via == "torchrun" and per_node is None:
        per_node = world  # LOCAL_WORLD_SIZE was not set: one node is all compare can rerun anyway
    if per_node is not None and world > per_node:
        raise GradscopeError(f"run {run.id} is a job of {world} ranks across nodes ({per_node} per node); compare "
                             "reruns its arms on this machine only: record a one-node job of the script to compare")
    if launch.via == "gradscope":
        return tuple(launch.launcher_args)
    notes.append(f"run {run.id} was started by torchrun itself, which records only its process count: the arms "
                 f"run torchrun --nproc-per-node {per_node} --standalone (its other options, such as "
                 "--master-port or --rdzv-*, were not recorded)")
    return ("--nproc-per-node", str(per_node), "--standalone")


def check_writable(root: Path) -> None:
    """The arms write their runs next to the recorded one: refuse a runs directory nobody can write to."""
    if not os.access(root, os.W_OK | os.X_OK):
        raise GradscopeError(f"the runs directory {root} is not writable, and every arm writes its run there; "
                             "use a writable --runs-dir (copy the run there)")


def _meta_of(run: store.Run, index: int) -> store.OptimizerMeta | None:
    return next((o for o in run.meta.optimizers if o.index == index), None)


def _clips(norms: list[Thresholds | str], auto: Thresholds | None, values: list[float | str],
           auto_value: float | None, optimizers: dict[int, str], notes: list[str]) -> list[Clip]:
    """The clipped arms: norm thresholds (ascending), then value thresholds; one arm per distinct title."""
    chosen = [auto if v == AUTO else v for v in norms]
    by_norm = sorted((t for t in chosen if isinstance(t, Thresholds)), key=lambda t: t.values)
    clips = [Clip(max_norm=t) for t in by_norm]
    clips += [Clip(clip_value=auto_value if v == AUTO else float(v)) for v in sorted(
        values, key=lambda v: auto_value if v == AUTO else float(v))]
    for t in by_norm:
        if not t.for_all and len(t.values) > len(optimizers):
            raise UsageError(f"--max-norm {t.text()} gives {len(t.values)} thresholds, but the run has "
                             f"{len(optimizers)} optimizer(s): {'; '.join(optimizers.values())}")
        unclipped = [name for k, name in optimizers.items() if t.of(k) is None]
        if unclipped:
            notes.append(f"max_norm={'/'.join(f'{v:g}' for v in t.values)} clips no gradient of "
                         f"{', '.join(unclipped)} (no threshold given for it)")
    distinct: dict[str, Clip] = {}
    for clip in clips:
        distinct.setdefault(clip.title, clip)  # arms are named, and keyed, by their %g text
    return list(distinct.values())


def _provenance(run: store.Run) -> store.Provenance:
    """What started the run; raise when it names no script or its working directory is gone."""
    prov = run.meta.provenance
    if prov is None or not prov.target or not prov.script_path:
        raise GradscopeError(f"run {run.id} was not recorded by gradscope profile (its meta.json names no script), "
                             "so there is nothing to rerun; profile the script with gradscope profile first")
    if not Path(prov.cwd).is_dir():
        raise GradscopeError(f"the working directory {prov.cwd} of run {run.id} no longer exists")
    return prov


def _auto_max_norm(run: store.Run, optimizers: dict[int, str]) -> Thresholds:
    """Each optimizer's own max_norm, as ``gradscope recommend`` gives it by its default rule."""
    from gradscope.recommend import recommend

    by_index = {rec.optimizer: rec.max_norm for rec in recommend(run)}
    values = []
    for index, name in optimizers.items():
        value = by_index.get(index, math.nan)
        if not math.isfinite(value) or value <= 0:
            raise NoDataError(f"gradscope recommend found no finite gradient norm for {name} in run {run.id} to "
                              "choose a max_norm from; give thresholds with --max-norm 0.5,1 (or X/Y per optimizer)")
        values.append(float(value))
    return Thresholds.every(values[0]) if len(values) == 1 else Thresholds.per_optimizer(values)


def _auto_clip_value(run: store.Run) -> float:
    """``gradscope recommend``'s clip_grad_value_ threshold, when it gives one (the same for every optimizer)."""
    from gradscope.recommend import recommend

    found = {rec.clip_value for rec in recommend(run)} - {None}
    if len(found) != 1:
        why = ("gives no value-clipping threshold for this run" if not found
               else "gives a different one per optimizer, and clip_grad_value_ is injected as one value")
        raise UsageError(f"--clip-value auto: gradscope recommend {why}; give numbers, e.g. --clip-value 0.1")
    value = float(found.pop())
    if not math.isfinite(value) or value <= 0:
        raise NoDataError(f"gradscope recommend found no finite value-clipping threshold in run {run.id}")
    return value


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
    injected = (clipping.injected_max_norm is not None or any(v is not None for v in clipping.injected_max_norms)
                or clipping.injected_clip_value is not None)
    recorded_python = run.meta.provenance.executable if run.meta.provenance else None
    reasons = [
        (run.meta.seed is None, None),  # already noted by _seeds
        (run.status != "complete" or not run.compacted, f"it is {run.status}"),
        (injected, "gradscope injected clipping into it"),
        (bool(script_clipped), f"the script clips ({clipping.script_clip_function}, "
                               f"threshold {clipping.script_clip_value or clipping.script_max_norm})"),
        (script_changed, "its script changed"),
        (options.max_time is not None, "--max-time makes arm lengths differ from it"),
        (cap is not None and cap > n_steps, f"it has {n_steps} steps, fewer than --steps {cap}"),
        (options.python is not None and options.python != recorded_python, "--python names another interpreter"),
    ]
    why = [reason for failed, reason in reasons if failed and reason]
    if why:
        notes.append(f"a --no-clip baseline arm runs, since the recorded run cannot be the baseline: {'; '.join(why)}")
    return not any(failed for failed, _ in reasons)


def _tag(clip: Clip) -> str:
    """The arm's part of its run label: file-name safe (no '/')."""
    if clip.clip_value is not None:
        return f"value{clip.clip_value:g}"
    if clip.max_norm is not None:
        return "clip" + "-".join(f"{v:g}" for v in clip.max_norm.values)
    return "base"


def _arm_specs(plan: Plan, reuse_baseline: bool) -> list[ArmSpec]:
    """Seed-major order (every arm of seed 0, then of seed 1...): after Ctrl-C, what finished is a
    fair comparison of whole seeds rather than all seeds of one arm and none of another. Seed k is
    the same for every arm: the verdict pairs arms by seed."""
    stem = Path(plan.provenance.target).stem.replace(".", "_") or "script"
    specs = []
    for k, seed in enumerate(plan.seeds):
        for clip in [Clip(), *plan.clips]:
            reuse = reuse_baseline and clip.is_baseline and k == 0
            specs.append(ArmSpec(clip, seed, f"{stem}-compare-{_tag(clip)}-s{seed}", reuse))
    return specs


def per_optimizer(plan: Plan, thresholds: Thresholds | None) -> list[float | None] | None:
    """``thresholds`` as one value (or None) per optimizer of the run, for JSON."""
    return None if thresholds is None else [thresholds.of(k) for k in plan.optimizers]


def describe(plan: Plan) -> dict[str, Any]:
    """What the plan will do, for the JSON report and the first lines on screen."""
    return {"run": plan.run.id, "run_path": str(plan.run.path), "script": plan.provenance.script_path,
            "cwd": str(plan.cwd), "target": plan.target, "python": plan.python,
            "launcher_args": None if plan.launcher_args is None else list(plan.launcher_args),
            "optimizers": [{"index": k, "name": name} for k, name in plan.optimizers.items()],
            "arms_planned": [c.title for c in plan.clips],
            "auto_max_norm": per_optimizer(plan, plan.auto_max_norm), "auto_clip_value": plan.auto_clip_value,
            "seeds": plan.seeds, "step_cap": plan.step_cap, "max_time": plan.max_time,
            "baseline_reused": any(s.reuse for s in plan.arms)}


def shell_line(argv: list[str]) -> str:
    """A command line as a person would paste it into a POSIX shell."""
    return shlex.join(argv)
