"""Which distributed job this process belongs to, and which rank it is: read from the environment.

A distributed job is recorded as one run directory with one sub-run per rank (see
:mod:`gradscope.store.job`). A process learns its job in one of two ways:

- ``GRADSCOPE_JOB`` (JSON: the run directory, the recording config, quiet) is set by a gradscope
  process for the processes it starts: ``gradscope profile --nproc-per-node`` for its torchrun ranks,
  and ``gradscope profile`` for children its script starts (``torch.multiprocessing.spawn``, a launcher
  that re-executes the script);
- a torchrun worker running ``-m gradscope profile`` with no gradscope parent computes a key from
  torchrun's environment (the same on every rank of one job on one host) and claims the job's run
  directory through a claim file (:func:`gradscope.store.claim_job_dir`).

The rank itself is read when the process records its first step: ``torch.distributed.get_rank()``
once a process group exists (a local call, never a collective), else torchrun's ``RANK``, else the
``NODE_RANK``/``LOCAL_RANK`` pair a re-executing launcher sets. Torch-free at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradscope.record.config import RecorderConfig

JOB_ENV = "GRADSCOPE_JOB"
#: torchrun sets these in every worker it starts.
_TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class JobEnv:
    """What a gradscope process hands the processes it starts: where the job's run is and how to record."""

    run_dir: Path
    config: RecorderConfig
    quiet: bool = False

    def to_env(self) -> str:
        """The value of ``GRADSCOPE_JOB``."""
        return json.dumps({"run_dir": str(self.run_dir), "config": self.config.to_json(), "quiet": self.quiet})

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> JobEnv | None:
        """The job named by ``GRADSCOPE_JOB``, or None when unset or unreadable (then nothing is recorded)."""
        text = environ.get(JOB_ENV)
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(Path(data["run_dir"]), RecorderConfig.from_json(data.get("config") or {}),
                       bool(data.get("quiet", False)))
        except (ValueError, KeyError, TypeError) as exc:
            print(f"gradscope: warning: ignoring {JOB_ENV} ({type(exc).__name__}: {exc})", file=sys.stderr)
            return None


@dataclass(frozen=True)
class RankIdentity:
    """A process's place in its job; ``rank`` None for a recorded process outside any process group."""

    rank: int | None
    local_rank: int | None
    world_size: int | None


def is_torchrun_worker(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a process torchrun started as a worker of a job of more than one process."""
    if not all(name in environ for name in _TORCHRUN_VARS):
        return False
    return _int(environ.get("WORLD_SIZE")) not in (None, 1)


def job_key(environ: Mapping[str, str] = os.environ) -> str:
    """The name of a torchrun job's claim file: equal on the ranks of one job on this host, different for
    the next job (the elastic agent's pid) and for a restart of the workers (restart count)."""
    parts = [environ.get(name, "") for name in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
                                                  "TORCHELASTIC_RESTART_COUNT")]
    parts += [str(os.getppid()), socket.gethostname()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def env_identity(environ: Mapping[str, str] = os.environ) -> RankIdentity:
    """The rank the environment gives (torchrun's, or a re-executing launcher's), before any process group."""
    world = _int(environ.get("WORLD_SIZE"))
    local = _int(environ.get("LOCAL_RANK"))
    rank = _int(environ.get("RANK"))
    if rank is None and local is not None and "NODE_RANK" in environ:
        per_node = _int(environ.get("LOCAL_WORLD_SIZE")) or (world or 0)
        rank = local + (_int(environ.get("NODE_RANK")) or 0) * per_node if per_node else local
    return RankIdentity(rank, local, world)


def current_identity(environ: Mapping[str, str] = os.environ) -> RankIdentity:
    """This process's rank now: the default process group's when one exists, else the environment's.

    Call it while the process trains (a script may destroy its process group before exit).
    """
    from_env = env_identity(environ)
    dist = sys.modules.get("torch.distributed")  # imported by the script when it has a process group
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return RankIdentity(dist.get_rank(), from_env.local_rank, dist.get_world_size())  # local calls
    except (RuntimeError, ValueError):
        pass
    return from_env


def becomes_rank(run_dir: Path | None, identity: RankIdentity) -> bool:
    """True when the single run ``run_dir`` turns out to be one rank of a job: it hands itself to its children
    as their job (``GRADSCOPE_JOB``, exported by ``gradscope profile``) and trains inside a process group of
    several ranks, as rank 0 of Lightning's DDP launcher does (it re-executes the script for the other
    ranks). The run then records into its ranks/rank-R like every other rank."""
    handed = JobEnv.from_environ()
    return (identity.world_size or 1) > 1 and handed is not None and handed.run_dir == run_dir


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def describe(identity: RankIdentity) -> dict[str, Any]:
    """The rank fields of a rank's meta.json."""
    return {"rank": identity.rank, "local_rank": identity.local_rank, "world_size": identity.world_size}


class ChildRecorder:
    """A child interpreter of a job (a rank the script started itself): waits for the process's first
    ``torch.optim.Optimizer``, then records it as one rank of the job.

    Until then nothing is patched but ``Optimizer.__init__``: a process that makes no optimizer (a
    DataLoader worker, a tool that imports torch) installs no hook and writes nothing.
    """

    def __init__(self, job: JobEnv) -> None:
        self.job = job
        self.recorder: Any = None  # the Recorder, once started
        self._pid = os.getpid()

    def arm(self) -> ChildRecorder:
        """Patch ``Optimizer.__init__`` to start recording at the first optimizer made in this process."""
        import torch

        optimizer_class = torch.optim.Optimizer
        original = optimizer_class.__init__
        child = self

        def __init__(optimizer: Any, *args: Any, **kwargs: Any) -> None:
            # a forked child inherits the patch: only the process that armed it starts recording
            if os.getpid() == child._pid and optimizer_class.__init__ is __init__:
                optimizer_class.__init__ = original  # type: ignore[method-assign]  # once, then out of the way
                child.start()
            original(optimizer, *args, **kwargs)

        optimizer_class.__init__ = __init__  # type: ignore[method-assign]
        return self

    def start(self) -> None:
        """Start a Recorder for this process as a rank of the job (its sub-run is made at its first step,
        under the rank the process has then; the optimizer being made is seen by the recorder's scan)."""
        from gradscope.record.recorder import Recorder

        recorder = Recorder(job_dir=self.job.run_dir, label=self.job.run_dir.name, config=self.job.config)
        try:
            recorder.start()
        except RuntimeError:  # a Recorder of its own is active here (`gradscope profile` run by the script)
            return
        self.recorder = recorder


def start_child_recorder(job: JobEnv) -> ChildRecorder:
    """Record this child interpreter into ``job`` (read from ``GRADSCOPE_JOB``) from its first optimizer.

    Called by :mod:`gradscope.record.bootstrap` once torch is imported. Returns the object that records; it
    flushes and compacts at interpreter exit (the Recorder's atexit).
    """
    return ChildRecorder(job).arm()
