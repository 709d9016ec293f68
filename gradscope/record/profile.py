"""``gradscope profile``: validate the script, open a run, install the recorder, run, summarise.

The order matters and is the point of this module:

1. validate and compile the script (no torch yet: a typo'd path fails in milliseconds);
2. create the run directory (an unwritable runs directory fails before the script runs);
3. import torch and install the recorder, *before* the script imports anything;
4. run the script as ``python`` would, then flush, compact and finish meta.json whatever happened.

gradscope prints one line before the script and a summary after it, both on stderr: nothing is
drawn over the script's own output.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from gradscope import __version__, store
from gradscope.errors import EXIT_OK
from gradscope.record import bootstrap, job, launch, runner
from gradscope.record.config import ProfileOptions
from gradscope.record.provenance import launcher, provenance, shown


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt saving the run
    raise runner.Terminated()


def _say(options: ProfileOptions, message: str) -> None:
    if not options.quiet:
        sys.stdout.flush()  # keep the script's buffered output before ours
        print(f"gradscope: {message}", file=sys.stderr, flush=True)


def _provenance(options: ProfileOptions, target: runner.Target) -> store.Provenance:
    command = ("gradscope", "profile", *(["-m"] if options.as_module else []), options.target, *options.args)
    return provenance(target, options.target, options.as_module, options.args, command,
                      launcher(sys.argv[0] if sys.argv else ""))


def run_profile(options: ProfileOptions) -> int:
    """Profile one run of the target; returns the exit code ``python`` would have given."""
    if launch.is_torchrun(options):
        return launch.run_job(options, lambda message: _say(options, message))
    target = runner.prepare(options.target, options.args, options.as_module)
    recorder, run_dir = _open(options, target)
    recorder.start()
    os.environ["GRADSCOPE_PROFILING"] = "1"  # lets a script skip expensive evaluation while profiled
    # After our own start-up: the Python processes the script starts record into this job (bootstrap.py).
    os.environ.update(bootstrap.child_env(job.JobEnv(run_dir, options.recording, options.quiet), os.environ))
    _say(options, f"recording {options.target} to {shown(run_dir)}")
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    outcome = runner.run(target)
    terminated = isinstance(outcome.exception, runner.Terminated)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # saving the run is not interrupted; we die by it below
    try:  # the script's outcome is sacred: nothing of ours may change its exit code or add a traceback
        recorder.stop(outcome.status, outcome.exit_code, outcome.error)
        _summarise(options, recorder, run_dir, outcome)
    except Exception as exc:
        print(f"gradscope: warning: could not finish the run ({type(exc).__name__}: {exc})", file=sys.stderr)
    if previous is signal.SIG_DFL and not terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if terminated:
        _die_by(signal.SIGTERM)
    if isinstance(outcome.exception, KeyboardInterrupt):
        _die_by(signal.SIGINT)  # python itself dies by SIGINT on an uncaught KeyboardInterrupt
    return outcome.exit_code


def _open(options: ProfileOptions, target: runner.Target) -> tuple[Any, Path]:
    """The recorder for this process and the run directory it records into.

    A torchrun worker records as one rank of its job: into the run named by ``GRADSCOPE_JOB`` (a
    ``gradscope profile --nproc-per-node`` launcher made it), else into the run its ranks claim together.
    """
    root = store.runs_root(options.runs_dir)
    label = options.label or Path(options.target).stem.replace(".", "_")
    recorded = _provenance(options, target)
    if not job.is_torchrun_worker():
        run_dir = store.create_run_dir(root, label)  # an unwritable runs directory fails here, before torch

        from gradscope.record.recorder import Recorder  # torch is imported here, after validation

        # latest moves to this run at its first written step (an empty run, e.g. `train.py --help`, never takes it)
        return Recorder(run_dir, label=label, config=options.recording, provenance=recorded,
                        latest_root=root), run_dir

    from gradscope.record.recorder import Recorder

    given = job.JobEnv.from_environ()
    if given is not None:
        return Recorder(job_dir=given.run_dir, label=label, config=options.recording), given.run_dir
    rank0 = os.environ.get("RANK") == "0"
    options.quiet = options.quiet or not rank0  # one rank speaks for the job
    run_dir, _ = store.claim_job_dir(root, label, job.job_key(), lambda d: _write_job_meta(d, label, recorded))
    return Recorder(job_dir=run_dir, label=label, config=options.recording,
                    latest_root=root if rank0 else None), run_dir


def _finish_job_meta(run_dir: Path, outcome: runner.Outcome) -> None:
    """The job's own meta.json, as the script ended, when the script started the ranks (its steps and
    those of its children are in ranks/)."""
    meta = store.read_meta(run_dir)
    if meta.status == "running" and meta.pid == os.getpid():
        meta = dataclasses.replace(meta, launch=meta.launch or store.Launch("script"))
        store.finish_job_meta(run_dir, meta, outcome.status, outcome.exit_code, outcome.error)


def _write_job_meta(run_dir: Path, label: str, recorded: store.Provenance) -> None:
    """meta.json of a job its torchrun ranks claimed: what ran and how torchrun started it (from its environment)."""
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "")
    (run_dir / store.PARTS_DIR).rmdir()  # a job's data lives in its ranks' sub-runs
    store.write_meta(run_dir, store.RunMeta(
        status="running", gradscope_version=__version__, run_id=run_dir.name, label=label, provenance=recorded,
        launch=store.Launch("torchrun", int(per_node) if per_node.isdigit() else None, ()),
        world_size=int(os.environ.get("WORLD_SIZE", "0")) or None, host=socket.gethostname()))


def _die_by(signum: signal.Signals) -> None:
    """End the process by ``signum`` with its default action, so the parent sees what python gives."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _summarise(options: ProfileOptions, recorder: Any, run_dir: Path, outcome: runner.Outcome) -> None:
    ranks = store.list_rank_dirs(run_dir)
    if ranks and recorder.run_dir != run_dir:  # a job: this process (if it trained) and the ranks it started
        _finish_job_meta(run_dir, outcome)
    if ranks and not job.is_torchrun_worker():  # the processes the script started recorded themselves
        _say(options, f"{outcome.status}: {store.count_steps(run_dir)} steps recorded by {len(ranks)} ranks "
                      f"in {shown(run_dir)}")
        return
    steps = recorder.n_steps
    if steps == 0:
        _say(options, "warning: no optimizer step was recorded. gradscope sees torch.optim optimizers and "
                      "clip_grad_norm_ calls in this process; training in a subprocess the script starts "
                      "(torch.multiprocessing.spawn, torchrun), an optimizer that is not a torch.optim.Optimizer "
                      "(DeepSpeed, a custom class that skips Optimizer.__init__), or a run that stopped before its "
                      "first step is invisible to it")
    status = outcome.status if outcome.exit_code != EXIT_OK or outcome.status != "complete" else "complete"
    lost = " (incomplete: some could not be written, see the warning above)" if recorder.incomplete else ""
    _say(options, f"{status}: {steps} steps recorded in {shown(run_dir)}{lost}")
    if steps and outcome.exit_code == EXIT_OK:
        runs_flag = f" --runs-dir {shlex.quote(str(options.runs_dir))}" if options.runs_dir else ""
        _say(options, f"next: gradscope recommend{runs_flag}")
        _say(options, f"then: gradscope report{runs_flag}   (one HTML page with the charts; docs/report.md)")
