"""Recording a child process of a job: a rank the script starts itself (see :mod:`gradscope.record.bootstrap`).

:func:`start_child_recorder` is the one entry point the bootstrap calls, once torch is imported in a child
interpreter that found ``GRADSCOPE_JOB``. This version records the child into
``<run_dir>/ranks/rank-RRRRR`` (or ``ranks/pid-PID`` when the rank is unknown) with the ordinary
:class:`~gradscope.record.recorder.Recorder`, started at the process's first optimizer: a process that
makes no optimizer (a DataLoader worker, a tool that imports torch) writes nothing and installs no hook.
The rank is read then: ``torch.distributed.get_rank()`` once initialised (a local call, no collective),
else ``RANK``, else ``LOCAL_RANK`` on node 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gradscope.record.config import config_from_json

RANKS_DIR = "ranks"


class ChildRecorder:
    """Waits for this process's first ``torch.optim.Optimizer``, then records the process into its rank directory."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.recorder: Any = None  # the Recorder, once started
        self._pid = os.getpid()

    def arm(self) -> ChildRecorder:
        """Patch ``Optimizer.__init__`` to start recording at the first optimizer made in this process."""
        optimizer_class = torch.optim.Optimizer
        original = optimizer_class.__init__
        child = self

        def __init__(optimizer: Any, *args: Any, **kwargs: Any) -> None:
            if os.getpid() == child._pid and optimizer_class.__init__ is __init__:
                optimizer_class.__init__ = original  # type: ignore[method-assign]  # once, then out of the way
                child.start()
            original(optimizer, *args, **kwargs)

        optimizer_class.__init__ = __init__  # type: ignore[method-assign]
        return self

    def start(self) -> None:
        """Start the Recorder in this process's rank directory (the optimizer being made is seen by its scan)."""
        from gradscope.record.recorder import Recorder

        run_dir = Path(self.job["run_dir"])
        rank_dir = _claim(run_dir / RANKS_DIR, rank_name())
        recorder = Recorder(rank_dir, label=run_dir.name, config=config_from_json(self.job.get("config") or {}))
        try:
            recorder.start()
        except RuntimeError:  # a Recorder of its own is active here (`gradscope profile` run by the script)
            _remove_empty(rank_dir)
            return
        self.recorder = recorder


def start_child_recorder(job: dict[str, Any]) -> object:
    """Record this child interpreter into the job ``job`` (``GRADSCOPE_JOB``, decoded) from its first optimizer.

    Returns the object that records it; it flushes and compacts at interpreter exit (the Recorder's atexit).
    """
    return ChildRecorder(job).arm()


def rank_dirs(run_dir: Path) -> list[Path]:
    """The directories of the ranks recorded into the job ``run_dir`` so far."""
    ranks = run_dir / RANKS_DIR
    return sorted(p for p in ranks.iterdir() if p.is_dir()) if ranks.is_dir() else []


def rank_name() -> str:
    """``rank-RRRRR`` from torch.distributed (when initialised), ``RANK`` or ``LOCAL_RANK``; else ``pid-PID``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return f"rank-{dist.get_rank():05d}"
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit() and (name == "RANK" or os.environ.get("NODE_RANK", "0") == "0"):
            return f"rank-{int(value):05d}"
    return f"pid-{os.getpid()}"


def _claim(ranks: Path, name: str) -> Path:
    """Create ``ranks/name``; ``name-pidPID`` when another process has it."""
    ranks.mkdir(parents=True, exist_ok=True)
    for candidate in (name, f"{name}-pid{os.getpid()}"):
        try:
            (ranks / candidate).mkdir()
        except FileExistsError:
            continue
        return ranks / candidate
    raise FileExistsError(f"{ranks / name} exists")


def _remove_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
