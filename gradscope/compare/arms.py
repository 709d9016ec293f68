"""Running ``gradscope compare``: the arms as subprocesses, then the metrics and the plots.

    plan = plan_compare(CompareOptions(max_norm="auto,1", seeds=3))  # gradscope.compare.plan
    result = run_compare(plan, observer)                             # arms, metrics, plots

Each arm is a fresh ``python -m gradscope profile`` subprocess with the recorded argv, working
directory and seed, so it is recorded like any run (a rerun inside this interpreter would not be a
rerun: ``sys.modules``, seeds and global flags survive). Arms run one at a time, so their wall times
are comparable on a shared machine, each with its output in a log file. An arm ends whenever compare
ends: Ctrl-C, SIGTERM and SIGHUP stop it (SIGINT, then SIGTERM, then SIGKILL), any other exception
too, and on Linux the kernel sends it SIGTERM when compare's process dies (``PR_SET_PDEATHSIG``).

This module prints nothing and never imports torch: :mod:`gradscope.compare.view` draws the
progress and the table, :mod:`gradscope.compare.metrics` computes the metrics.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Protocol

from gradscope import store
from gradscope.compare.metrics import Comparison, SeedRun, compare_arms
from gradscope.compare.plan import ArmSpec, Plan
from gradscope.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, GradscopeError
from gradscope.record.config import ProfileOptions, RecorderConfig
from gradscope.record.job import JOB_ENV

POLL_SECONDS = 0.5  # how often the running arm's step count is read
ARM_FLUSH_EVERY = 20  # arms write a part every 20 steps (and >= 2 s apart) so progress moves
STOP_GRACE_SECONDS = (10.0, 5.0)  # Ctrl-C: wait this long after SIGINT, then after SIGTERM, then kill
PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies


class Ended(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached compare: handled like Ctrl-C (the running arm is stopped), then exit 128+N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_ended(signum: int, frame: FrameType | None) -> None:
    raise Ended(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While the arms run, SIGTERM and SIGHUP stop the running arm as Ctrl-C does (then restored)."""
    wanted = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {signum: signal.signal(signum, _raise_ended) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the arm get SIGTERM when compare dies (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # compare died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


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
    signum: int | None = None  # SIGTERM/SIGHUP that ended compare while this arm ran (None: Ctrl-C or none)


@dataclass
class CompareResult:
    """The finished comparison: the plan, each arm's outcome, the metrics and where the files are."""

    plan: Plan
    out_dir: Path
    outcomes: list[ArmOutcome]
    comparison: Comparison
    plots: dict[str, Path]
    interrupted: bool
    exit_code: int
    error: str | None = None  # one line when exit_code is not 0


class ArmObserver(Protocol):
    """Told about each arm as it runs (``compare.view.ArmProgress`` implements it)."""

    def arm_started(self, spec: ArmSpec, index: int, total: int, log_path: Path) -> None: ...

    def arm_progress(self, spec: ArmSpec, steps: int, elapsed: float) -> None: ...

    def arm_finished(self, spec: ArmSpec, outcome: ArmOutcome) -> None: ...


def arm_argv(plan: Plan, spec: ArmSpec) -> list[str]:
    """The ``PYTHON -m gradscope profile ...`` command line of one arm (PYTHON: ``plan.python``); a
    distributed job's arm is ``... profile FLAGS -m torch.distributed.run TORCHRUN_OPTIONS script ARGS``,
    one job started as the recorded one was (torch's launcher reads PYTHON's own torch)."""
    prov = plan.provenance
    recording = RecorderConfig(flush_every=ARM_FLUSH_EVERY, inject_max_norm=spec.clip.max_norm,
                               inject_clip_value=spec.clip.clip_value, disable_script_clip=True, seed=spec.seed,
                               max_steps=plan.step_cap or None, max_time=plan.max_time)
    options = ProfileOptions(target=prov.target, args=list(prov.script_args),
                             as_module=prov.as_module, runs_dir=plan.root, label=spec.label,
                             quiet=True, recording=recording, launcher_args=plan.launcher_args)
    return [plan.python, *options.command()[1:]]  # command() names this interpreter; the arm runs plan.python


def arm_env() -> dict[str, str]:
    """The environment every arm gets: compare's own, minus ``GRADSCOPE_PROFILING`` and ``GRADSCOPE_JOB``."""
    env = dict(os.environ)
    env.pop("GRADSCOPE_PROFILING", None)  # set only inside a profiled script; the arm sets its own
    env.pop(JOB_ENV, None)  # an arm is a run of its own, never a rank of a job compare itself runs in
    return env


class _StepWatcher:
    """Finds an arm's run directory (by the pid in its meta.json) and counts the steps written so far."""

    def __init__(self, root: Path, before: set[str], pid: int) -> None:
        self.root, self.before, self.pid = root, before, pid
        self.run_dir: Path | None = None
        self._counter: store.StepCounter | None = None
        self.steps = 0

    def find(self) -> Path | None:
        """The arm's run directory, once its meta.json exists."""
        if self.run_dir is None and self.root.is_dir():
            for path in self.root.iterdir():
                if path.name not in self.before and path.is_dir() and self._is_ours(path):
                    self.run_dir = path
                    self._counter = store.StepCounter(path)
        return self.run_dir

    def _is_ours(self, path: Path) -> bool:
        try:
            return store.read_meta(path).pid == self.pid
        except GradscopeError:
            return False  # meta.json not written yet, or another tool's directory

    def poll(self) -> int:
        """Steps written so far (the last count when the files cannot be read right now); a job's rows over
        its ranks that have started, so that each rank's own steps are counted once."""
        run_dir = self.find()
        if self._counter is not None and run_dir is not None:
            try:
                self.steps = self._counter.count() // max(1, len(store.list_rank_dirs(run_dir)))
            except GradscopeError:
                pass  # progress is a display: keep the last count, read again next poll
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
        # It dies with compare too (SIGTERM when compare's process ends, however it ends).
        proc = subprocess.Popen(arm_argv(plan, spec), cwd=plan.cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=arm_env(), start_new_session=True,
                                preexec_fn=_die_with_parent(os.getpid()))
    watcher = _StepWatcher(plan.root, before, proc.pid)
    interrupted, signum = False, None
    try:
        while proc.poll() is None:
            time.sleep(POLL_SECONDS)
            observer.arm_progress(spec, watcher.poll(), time.monotonic() - start)
    except KeyboardInterrupt as exc:
        interrupted, signum = True, getattr(exc, "signum", None)
        _stop(proc)
    finally:
        if proc.poll() is None:  # anything else ended compare here: the arm ends with it
            _stop(proc)
    watcher.poll()
    outcome = _outcome(spec, proc.wait(), watcher.find(), time.monotonic() - start, log_path, interrupted)
    outcome.signum = signum
    return outcome


def _outcome(spec: ArmSpec, code: int, run_dir: Path | None, wall: float, log_path: Path,
             interrupted: bool) -> ArmOutcome:
    if run_dir is None:
        status = "interrupted" if interrupted else "failed"
        return ArmOutcome(spec, None, status, _last_line(log_path), code, wall, log_path)
    run = store.load_run(run_dir)
    status = "interrupted" if interrupted else run.status
    error = run.meta.error or (None if status == "complete" else _last_line(log_path))
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
    try:
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
    except OSError as exc:
        raise GradscopeError(f"cannot create the comparison's directory: {exc.strerror}: {exc.filename}") from None
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
        except KeyboardInterrupt as exc:  # between two arms: nothing is running
            outcome = ArmOutcome(spec, None, "not run", None, None, 0.0, None, getattr(exc, "signum", None))
        interrupted = interrupted or outcome.status in ("interrupted", "not run")
        observer.arm_finished(spec, outcome)
        outcomes.append(outcome)
    return outcomes, interrupted


def _seed_runs(plan: Plan, outcomes: list[ArmOutcome]) -> list[SeedRun]:
    by_spec = {id(o.spec): o for o in outcomes}
    seed_runs = []
    for spec in plan.arms:
        if spec.reuse:
            seed_runs.append(SeedRun(spec.clip, spec.seed, plan.run, plan.run.status, None, plan.step_cap, True))
            continue
        outcome = by_spec[id(spec)]
        run = store.load_run(outcome.run_path) if outcome.run_path is not None else None
        seed_runs.append(SeedRun(spec.clip, spec.seed, run, outcome.status, outcome.error, log=outcome.log_path))
    return seed_runs


def run_compare(plan: Plan, observer: ArmObserver) -> CompareResult:
    """Run the arms of ``plan``, measure every run, draw the plots and decide the exit code.

    Ctrl-C stops the running arm (its run is saved) and skips the rest; what finished is analysed
    and reported, and the exit code is 130. The ``latest`` pointer is put back on the recorded run,
    so ``gradscope recommend`` and ``compare`` keep meaning the user's run, not the last arm.
    """
    out_dir = make_out_dir(plan)
    with stop_signals():
        outcomes, interrupted = run_arms(plan, out_dir, observer)
    signum = next((o.signum for o in outcomes if o.signum), None)
    store.point_latest(plan.root, plan.run.path)
    comparison = compare_arms(_seed_runs(plan, outcomes), plan.optimizers or None)
    plots = _draw(comparison, out_dir)
    ran = [s for a in comparison.arms for s in a.seeds if not s.reused]
    if interrupted:
        code = EXIT_INTERRUPTED if signum is None else 128 + signum
        error = "interrupted: the arms that finished are reported above"
    elif ran and all(s.status == "crashed" for s in ran):  # not injected or diverged: ran, and reported
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
    with plots.quiet():
        plots.plot_compare_loss(comparison, paths["loss"])
        plots.plot_compare_grad_norm(comparison, paths["grad_norm"])
    return paths
