"""``gradscope compare``: rerun a recorded script with clipping injected, and measure what it changed.

    plan = plan_compare(CompareOptions(max_norm="auto,1", seeds=3))  # validates; runs nothing
    result = run_compare(plan, observer)                             # arms, analysis, plots

Each arm is a fresh ``python -m gradscope profile`` subprocess with the recorded argv, working
directory and seed, so it is recorded like any run (a rerun inside this interpreter would not be a
rerun: ``sys.modules``, seeds and global flags survive). Arms run one at a time, so their wall times
are comparable on a shared machine, each with its output in a log file. The unclipped baseline is
the recorded run itself when it can stand in for one (seeded, unclipped, unchanged script);
otherwise a ``--no-clip`` baseline arm runs too.

This module prints nothing and never imports torch: :mod:`gradscope.compare.view` draws the
progress and the table, :mod:`gradscope.compare.metrics` computes the metrics.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gradscope import store
from gradscope.compare.metrics import BASELINE, Comparison, SeedRun, analyse, step_frame
from gradscope.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, GradscopeError, NoDataError, UsageError
from gradscope.record.config import ProfileOptions, RecorderConfig

AUTO = "auto"
POLL_SECONDS = 0.5  # how often the running arm's step count is read
ARM_FLUSH_EVERY = 20  # arms write a part every 20 steps (and >= 2 s apart) so progress moves
STOP_GRACE_SECONDS = (10.0, 5.0)  # Ctrl-C: wait this long after SIGINT, then after SIGTERM, then kill


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
    root: Path  # runs root of the recorded run; the arms' runs go next to it
    cwd: Path
    target: list[str]  # [-m] TARGET ARGS..., as recorded
    thresholds: list[float]
    seeds: list[int]
    arms: list[ArmSpec]
    step_cap: int | None
    max_time: float | None
    out_dir: Path | None
    auto_max_norm: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ArmOutcome:
    """How one arm's subprocess ended."""

    spec: ArmSpec
    run_path: Path | None  # None: no run directory was made (or the arm never ran)
    status: str  # complete | failed | interrupted | killed | not run | the reused run's status
    error: str | None
    exit_code: int | None
    wall_s: float  # the subprocess's wall time, interpreter start-up included
    log_path: Path | None


@dataclass
class CompareResult:
    """The finished comparison: the plan, each arm's outcome, the analysis and where the files are."""

    plan: Plan
    out_dir: Path
    outcomes: list[ArmOutcome]
    comparison: Comparison
    plots: dict[str, Path]
    interrupted: bool
    exit_code: int
    error: str | None = None  # one line when exit_code is not 0


class ArmObserver(Protocol):
    """Told about each arm as it runs (compare_view's progress display implements it)."""

    def arm_started(self, spec: ArmSpec, index: int, total: int, log_path: Path) -> None: ...

    def arm_progress(self, spec: ArmSpec, steps: int, elapsed: float) -> None: ...

    def arm_finished(self, spec: ArmSpec, outcome: ArmOutcome) -> None: ...


# --------------------------------------------------------------------------------------------------
# Planning: validate everything before the first arm starts
# --------------------------------------------------------------------------------------------------


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
    script_changed = _check_script(run, notes)
    n_steps = len(step_frame(run))
    if n_steps == 0 and AUTO in requested:
        raise NoDataError(f"run {run.id} recorded no optimizer step, so there is no norm to recommend a max_norm from")
    auto = _auto_max_norm(run) if AUTO in requested else None
    thresholds = _distinct(sorted(auto if v == AUTO and auto is not None else float(v) for v in requested))
    seeds = _seeds(run, options.seeds, notes)
    cap = options.steps or (n_steps if run.status == "complete" and n_steps else None)
    reuse = _can_reuse_baseline(run, options, cap, n_steps, script_changed, notes)
    plan = Plan(run, run.path.parent, Path(run.meta["cwd"]), _target(run), thresholds, seeds, [], cap,
                options.max_time, options.out_dir, auto, notes)
    plan.arms = _arm_specs(plan, reuse)
    return plan


def _distinct(values: list[float]) -> list[float]:
    """Drop thresholds that print the same (``%g``): arms are named, and keyed, by that text."""
    seen: dict[str, float] = {}
    for value in values:
        seen.setdefault(f"{value:g}", value)
    return list(seen.values())


def _check_script(run: store.Run, notes: list[str]) -> bool:
    """Raise when the script or its working directory is gone; note (and return True) when it changed."""
    meta = run.meta
    if not meta.get("target") or not meta.get("script_path"):
        raise GradscopeError(f"run {run.id} was not recorded by gradscope profile (its meta.json names no script), "
                             "so there is nothing to rerun; profile the script with gradscope profile first")
    path, recorded = Path(meta["script_path"]), meta.get("script_sha256") or "unknown"
    if not path.is_file():
        raise GradscopeError(f"the script {path} of run {run.id} no longer exists (recorded sha256 {recorded[:12]}); "
                             "restore it or profile the script again")
    if not Path(meta.get("cwd", "")).is_dir():
        raise GradscopeError(f"the working directory {meta.get('cwd')} of run {run.id} no longer exists")
    current = hashlib.sha256(path.read_bytes()).hexdigest()
    if recorded != "unknown" and current != recorded:
        notes.append(f"warning: {path} changed since run {run.id} was recorded (sha256 {recorded[:12]} then, "
                     f"{current[:12]} now): the arms run the current file")
        return True
    return False


def _auto_max_norm(run: store.Run) -> float:
    """The max_norm ``gradscope recommend`` gives by its default rule, for the first optimizer."""
    from gradscope import recommend

    value = recommend.analyse(run)[0].max_norm  # one Recommendation per optimizer, in optimizer order
    if not math.isfinite(value) or value <= 0:
        raise NoDataError(f"gradscope recommend found no finite gradient norm in run {run.id} to choose a max_norm "
                          "from; give thresholds with --max-norm 0.5,1")
    return float(value)


def _seeds(run: store.Run, n: int, notes: list[str]) -> list[int]:
    base = run.meta.get("seed")
    if not isinstance(base, int):
        notes.append("script not seeded: gradscope seeded torch (arm seeds 0.."
                     f"{n - 1}); the recorded run cannot serve as the baseline")
        base = 0
    return [base + k for k in range(n)]


def _can_reuse_baseline(run: store.Run, options: CompareOptions, cap: int | None, n_steps: int,
                        script_changed: bool, notes: list[str]) -> bool:
    """The recorded run is the baseline's first seed when it is exactly what that arm would record."""
    clipping = run.meta.get("clipping") or {}
    script_clipped = clipping.get("script_clip_calls", 0) and not clipping.get("script_clip_disabled")
    reasons = [
        (not isinstance(run.meta.get("seed"), int), None),  # already noted by _seeds
        (run.status != "complete" or not run.compacted, f"it is {run.status}"),
        (clipping.get("injected_max_norm") is not None, "gradscope injected clipping into it"),
        (bool(script_clipped), f"the script clips ({clipping.get('script_clip_function')}, "
                               f"max_norm={clipping.get('script_max_norm')})"),
        (script_changed, "its script changed"),
        (options.max_time is not None, "--max-time makes arm lengths differ from it"),
        (cap is not None and cap > n_steps, f"it has {n_steps} steps, fewer than --steps {cap}"),
    ]
    why = [reason for failed, reason in reasons if failed and reason]
    if why:
        notes.append(f"a --no-clip baseline arm runs, since the recorded run cannot be the baseline: {'; '.join(why)}")
    return not any(failed for failed, _ in reasons)


def _target(run: store.Run) -> list[str]:
    meta = run.meta
    return [*(["-m"] if meta.get("as_module") else []), meta["target"], *meta.get("script_args", [])]


def _arm_specs(plan: Plan, reuse_baseline: bool) -> list[ArmSpec]:
    """Seed-major order (every arm of seed 0, then of seed 1...): after Ctrl-C, what finished is a
    fair comparison of whole seeds rather than all seeds of one arm and none of another."""
    stem = Path(plan.run.meta["target"]).stem.replace(".", "_") or "script"
    specs = []
    for k, seed in enumerate(plan.seeds):
        for max_norm in [None, *plan.thresholds]:
            arm = BASELINE if max_norm is None else f"max_norm={max_norm:g}"
            tag = "base" if max_norm is None else f"clip{max_norm:g}"
            reuse = reuse_baseline and max_norm is None and k == 0
            specs.append(ArmSpec(arm, max_norm, seed, f"{stem}-compare-{tag}-s{seed}", reuse))
    return specs


# --------------------------------------------------------------------------------------------------
# Running the arms
# --------------------------------------------------------------------------------------------------


def arm_argv(plan: Plan, spec: ArmSpec) -> list[str]:
    """The ``python -m gradscope profile ...`` command line of one arm."""
    meta = plan.run.meta
    recording = RecorderConfig(flush_every=ARM_FLUSH_EVERY, inject_max_norm=spec.max_norm,
                               disable_script_clip=True, seed=spec.seed, max_steps=plan.step_cap or None,
                               max_time=plan.max_time)
    options = ProfileOptions(target=meta["target"], args=list(meta.get("script_args", [])),
                             as_module=bool(meta.get("as_module")), runs_dir=plan.root, label=spec.label,
                             quiet=True, recording=recording)
    return options.command()


def _arm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GRADSCOPE_PROFILING", None)  # set only inside a profiled script; the arm sets its own
    return env


class _StepWatcher:
    """Finds an arm's run directory (by the pid in its meta.json) and counts the steps written so far."""

    def __init__(self, root: Path, before: set[str], pid: int) -> None:
        self.root, self.before, self.pid = root, before, pid
        self.run_dir: Path | None = None
        self._rows: dict[Path, int] = {}
        self.steps = 0

    def find(self) -> Path | None:
        """The arm's run directory, once its meta.json exists."""
        if self.run_dir is None and self.root.is_dir():
            for path in self.root.iterdir():
                if path.name not in self.before and path.is_dir() and self._is_ours(path):
                    self.run_dir = path
        return self.run_dir

    def _is_ours(self, path: Path) -> bool:
        try:
            return store.read_meta(path).get("pid") == self.pid
        except GradscopeError:
            return False  # meta.json not written yet, or another tool's directory

    def poll(self) -> int:
        """Steps written so far (rows of the part files; the whole table once compacted)."""
        import pyarrow.parquet as pq

        run_dir = self.find()
        if run_dir is None:
            return self.steps
        final = run_dir / "steps.parquet"
        try:
            files = [final] if final.is_file() else sorted((run_dir / store.PARTS_DIR).glob("steps-*.parquet"))
            for path in files:
                if path not in self._rows:
                    self._rows[path] = pq.read_metadata(path).num_rows
            self.steps = self._rows[final] if final.is_file() else sum(self._rows[p] for p in files)
        except Exception:  # a part deleted mid-compaction: keep the last count, read again next poll
            pass
        return self.steps


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop an arm the way a terminal would: SIGINT (it saves its run), then SIGTERM, then SIGKILL."""
    for signum, grace in zip((signal.SIGINT, signal.SIGTERM), STOP_GRACE_SECONDS, strict=True):
        if proc.poll() is not None:
            return
        proc.send_signal(signum)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            break  # Ctrl-C again: stop waiting politely
    proc.kill()
    proc.wait()


def run_arm(plan: Plan, spec: ArmSpec, log_path: Path, observer: ArmObserver) -> ArmOutcome:
    """Run one arm to the end (or until Ctrl-C, which stops it and sets status ``interrupted``)."""
    plan.root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in plan.root.iterdir()}  # before the arm starts: its run directory is new
    start = time.monotonic()
    with open(log_path, "wb") as log:
        # Own session: a terminal's Ctrl-C reaches compare only, which then stops the arm exactly once.
        proc = subprocess.Popen(arm_argv(plan, spec), cwd=plan.cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=_arm_env(), start_new_session=True)
    watcher = _StepWatcher(plan.root, before, proc.pid)
    interrupted = False
    try:
        while proc.poll() is None:
            time.sleep(POLL_SECONDS)
            observer.arm_progress(spec, watcher.poll(), time.monotonic() - start)
    except KeyboardInterrupt:
        interrupted = True
        _stop(proc)
    watcher.poll()
    return _outcome(spec, proc.wait(), watcher.find(), time.monotonic() - start, log_path, interrupted)


def _outcome(spec: ArmSpec, code: int, run_dir: Path | None, wall: float, log_path: Path,
             interrupted: bool) -> ArmOutcome:
    if run_dir is None:
        status = "interrupted" if interrupted else "failed"
        return ArmOutcome(spec, None, status, _last_line(log_path), code, wall, log_path)
    run = store.load_run(run_dir)
    status = "interrupted" if interrupted else run.status
    error = run.meta.get("error") or (None if status == "complete" else _last_line(log_path))
    return ArmOutcome(spec, run_dir, status, error, code, wall, log_path)


def _last_line(path: Path) -> str | None:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


# --------------------------------------------------------------------------------------------------
# The whole comparison
# --------------------------------------------------------------------------------------------------


def make_out_dir(plan: Plan) -> Path:
    """The comparison's own directory: ``--out`` or a new ``<runs root>/compare-<time>/``."""
    if plan.out_dir is not None:
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        return plan.out_dir.resolve()
    base = plan.root / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1000):
        path = base if attempt == 0 else base.with_name(f"{base.name}-{attempt + 1}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise GradscopeError(f"cannot find a free directory name for {base}")


def run_arms(plan: Plan, out_dir: Path, observer: ArmObserver) -> tuple[list[ArmOutcome], bool]:
    """Run every arm in order; after Ctrl-C the rest are marked ``not run``. Returns (outcomes, interrupted)."""
    to_run = [spec for spec in plan.arms if not spec.reuse]
    outcomes, interrupted = [], False
    for index, spec in enumerate(to_run):
        log_path = out_dir / f"arm-{index + 1:02d}-{spec.label}.log"
        if interrupted:
            outcomes.append(ArmOutcome(spec, None, "not run", None, None, 0.0, None))
            continue
        try:
            observer.arm_started(spec, index, len(to_run), log_path)
            outcome = run_arm(plan, spec, log_path, observer)
        except KeyboardInterrupt:  # between two arms: nothing is running
            outcome = ArmOutcome(spec, None, "not run", None, None, 0.0, None)
        interrupted = interrupted or outcome.status in ("interrupted", "not run")
        observer.arm_finished(spec, outcome)
        outcomes.append(outcome)
    return outcomes, interrupted


def _seed_runs(plan: Plan, outcomes: list[ArmOutcome]) -> list[SeedRun]:
    by_spec = {id(o.spec): o for o in outcomes}
    seed_runs = []
    for spec in plan.arms:
        if spec.reuse:
            seed_runs.append(SeedRun(spec.arm, None, spec.seed, plan.run, plan.run.status, None, plan.step_cap, True))
            continue
        outcome = by_spec[id(spec)]
        run = store.load_run(outcome.run_path) if outcome.run_path is not None else None
        seed_runs.append(SeedRun(spec.arm, spec.max_norm, spec.seed, run, outcome.status, outcome.error))
    return seed_runs


def run_compare(plan: Plan, observer: ArmObserver) -> CompareResult:
    """Run the arms of ``plan``, analyse every run, draw the plots and decide the exit code.

    Ctrl-C stops the running arm (its run is saved) and skips the rest; what finished is analysed
    and reported, and the exit code is 130. The ``latest`` pointer is put back on the recorded run,
    so ``gradscope recommend`` and ``compare`` keep meaning the user's run, not the last arm.
    """
    out_dir = make_out_dir(plan)
    outcomes, interrupted = run_arms(plan, out_dir, observer)
    store.point_latest(plan.root, plan.run.path)
    comparison = analyse(_seed_runs(plan, outcomes))
    plots = _draw(comparison, out_dir)
    ran = [s for a in comparison.arms for s in a.seeds if not s.reused]
    if interrupted:
        code, error = EXIT_INTERRUPTED, "interrupted: the arms that finished are reported above"
    elif ran and not any(s.counts for s in ran):
        code, error = EXIT_ERROR, f"every arm failed; their output is in {out_dir}/arm-*.log"
    else:
        code, error = EXIT_OK, None
    return CompareResult(plan, out_dir, outcomes, comparison, plots, interrupted, code, error)


def _draw(comparison: Comparison, out_dir: Path) -> dict[str, Path]:
    """Write loss.png and grad_norm.png when any arm recorded a step."""
    if not any(s.n_steps for a in comparison.arms for s in a.seeds):
        return {}
    from gradscope import plots  # matplotlib is imported only here, never in profile

    paths = {"loss": out_dir / "loss.png", "grad_norm": out_dir / "grad_norm.png"}
    plots.plot_compare_loss(comparison, paths["loss"])
    plots.plot_compare_grad_norm(comparison, paths["grad_norm"])
    return paths


def describe(plan: Plan) -> dict[str, Any]:
    """What the plan will do, for the JSON report and the first line on screen."""
    return {"run": plan.run.id, "run_path": str(plan.run.path), "script": plan.run.meta.get("script_path"),
            "cwd": str(plan.cwd), "target": plan.target, "thresholds": plan.thresholds, "seeds": plan.seeds,
            "auto_max_norm": plan.auto_max_norm, "step_cap": plan.step_cap, "max_time": plan.max_time,
            "baseline_reused": any(s.reuse for s in plan.arms)}
