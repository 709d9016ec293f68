"""``gradscope profile --nproc-per-node N ... train.py``: one run for a whole torchrun job.

gradscope does not launch ranks itself: it runs torch's own launcher (``python -m
torch.distributed.run``, what ``torchrun`` is) with every option as given, and makes each worker
``python -m gradscope profile`` recording into the job's run directory (named by ``GRADSCOPE_JOB``), so
each rank writes its own sub-run with no collective and no shared file. ``gradscope profile -m
torch.distributed.run ...`` and ``gradscope profile torchrun ...`` come here too.

This process waits for torchrun and ends as it ends: torchrun prints a failed rank's error summary and
gives its exit code, and gradscope passes both on untouched, then finishes the job's meta.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gradscope import __version__, store
from gradscope.errors import EXIT_INTERRUPTED, EXIT_OK, UsageError
from gradscope.record import runner
from gradscope.record.config import TORCHRUN_MODULE, ProfileOptions
from gradscope.record.job import JOB_ENV, JobEnv
from gradscope.record.provenance import provenance, shown


def is_torchrun(options: ProfileOptions) -> bool:
    """True when the target is torch's launcher: ``-m torch.distributed.run`` or a ``torchrun`` script."""
    if options.as_module:
        return options.target == TORCHRUN_MODULE
    return Path(options.target).name == "torchrun"


@dataclass(frozen=True)
class TorchrunCommand:
    """A torchrun command line taken apart: the launcher's options, and the training script with its arguments."""

    launcher_args: tuple[str, ...]  # every torchrun option, as given, without -m/--module
    script: str
    script_args: tuple[str, ...]
    as_module: bool
    nproc_per_node: int | None  # None for torchrun's words ("auto", "cpu", "gpu")


def parse_torchrun(argv: list[str]) -> TorchrunCommand:
    """Read ``argv`` with torchrun's own parser (every option torchrun has, no copy of them here).

    Raises:
        UsageError: torchrun would refuse the command line, or it runs no Python script (--no-python).
    """
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "torchrun"

    def refuse(message: str) -> Any:
        raise UsageError(f"torchrun's options: {message}")

    parser.error = refuse  # type: ignore[method-assign]  # one line, not argparse's usage block
    try:
        parsed = parser.parse_args(argv)
    except argparse.ArgumentError as exc:
        raise UsageError(f"torchrun's options: {exc}") from None
    if parsed.no_python:
        raise UsageError("--no-python runs a program that is not Python: gradscope records Python scripts")
    head = argv[: len(argv) - 1 - len(parsed.training_script_args)]
    launcher_args = tuple(a for a in head if a not in ("-m", "--module"))
    nproc = str(parsed.nproc_per_node)
    return TorchrunCommand(launcher_args, parsed.training_script, tuple(parsed.training_script_args),
                           bool(parsed.module), int(nproc) if nproc.isdigit() else None)


def run_job(options: ProfileOptions, say: Any) -> int:
    """Run the torchrun job ``options`` names, recording every rank into one run; returns torchrun's exit code."""
    command = parse_torchrun(list(options.args))
    target = runner.prepare(command.script, list(command.script_args), command.as_module)  # fails fast on a typo
    root = store.runs_root(options.runs_dir)
    label = options.label or Path(command.script).stem.replace(".", "_")
    run_dir = store.create_run_dir(root, label)
    (run_dir / store.PARTS_DIR).rmdir()  # a job's data lives in its ranks' sub-runs
    meta = _job_meta(options, command, target, run_dir, label)
    store.write_meta(run_dir, meta)
    rank_options = ProfileOptions(target=command.script, args=list(command.script_args),
                                  as_module=command.as_module, quiet=True, recording=options.recording)
    argv = [sys.executable, "-m", TORCHRUN_MODULE, *command.launcher_args, *rank_options.command()[1:]]
    env = {**os.environ, JOB_ENV: JobEnv(run_dir, options.recording, quiet=True).to_env()}
    say(f"recording the torchrun job {command.script} to {shown(run_dir)}")
    exit_code = _wait(subprocess.Popen(argv, env=env))
    _finish(run_dir, meta, exit_code, root, say, options)
    return exit_code


def _job_meta(options: ProfileOptions, command: TorchrunCommand, target: runner.Target, run_dir: Path,
              label: str) -> store.RunMeta:
    import torch

    recorded_by = ("gradscope", "profile", *command.launcher_args, *(["-m"] if command.as_module else []),
                   command.script, *command.script_args)
    return store.RunMeta(
        status="running", gradscope_version=__version__, torch_version=torch.__version__, run_id=run_dir.name,
        label=label, provenance=provenance(target, command.script, command.as_module, command.script_args,
                                           recorded_by, None),
        seed=options.recording.seed,
        launch=store.Launch("gradscope", command.nproc_per_node, command.launcher_args),
        start_time=datetime.now(timezone.utc).isoformat(timespec="seconds"), host=socket.gethostname(),
        pid=os.getpid())


def _wait(process: subprocess.Popen[bytes]) -> int:
    """Wait for torchrun. Ctrl-C reaches it through the terminal's process group (it stops its workers
    itself), so it is not acted on here; SIGTERM to gradscope is passed on to torchrun."""
    def forward(signum: int, _frame: Any) -> None:
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, previous_int)


def _finish(run_dir: Path, meta: store.RunMeta, exit_code: int, root: Path, say: Any,
            options: ProfileOptions) -> None:
    """The job's meta.json as torchrun ended it, ``latest``, and the summary line."""
    status = "complete" if exit_code == EXIT_OK else (
        "interrupted" if exit_code in (EXIT_INTERRUPTED, -signal.SIGINT, -signal.SIGTERM) else "failed")
    meta = store.finish_job_meta(run_dir, meta, status, exit_code)
    steps, ranks = meta.n_steps or 0, meta.world_size or 0
    if steps:
        store.point_latest(root, run_dir)
    say(f"{status}: {steps} steps recorded by {ranks} ranks in {shown(run_dir)}")
    if steps and exit_code == EXIT_OK:
        runs_flag = f" --runs-dir {options.runs_dir}" if options.runs_dir else ""
        say(f"next: gradscope recommend{runs_flag}")
