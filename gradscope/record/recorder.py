"""The recorder: records every optimizer step of the code run inside it to a gradscope run directory.

Who does what (each owns its state; data flows down the list):

- :mod:`~gradscope.record.hooks` patches torch; every hook calls the events interface, implemented by
  :class:`~gradscope.record.events.StepEvents`, which tracks the step in progress and dispatches to
- :mod:`~gradscope.record.loss` (the loss since the last record), :mod:`~gradscope.record.step` (a
  step's norms into a device row, by the per-optimizer layouts and read plans of
  :mod:`~gradscope.record.layouts`), :mod:`~gradscope.record.clipping` (the script's own clipping and
  compare's injected clip) and :mod:`~gradscope.record.manual` (loops with no torch.optim optimizer);
- finished rows come back here (``_commit``) and wait on device in a :class:`~gradscope.record.rows.StepBuffer`;
  each flush, :mod:`~gradscope.record.columns` copies them to the host once and ``store.RunWriter``
  writes them as part files.

This module: the lifecycle (start, stop, context manager, atexit, forked children), commit, flush,
``--max-steps`` / ``--max-time``, and meta.json.

Hazards named once: nothing calls ``.item()`` or branches on a device value per step (each is a host
sync on CUDA); values stay on device until a flush. Nothing may raise into the user's loop: every
hook body is guarded and warns once. The only exception raised on purpose is :class:`StopRun`.
A forked child (a DataLoader worker) inherits the recorder: it must never flush or finish the run.
"""

from __future__ import annotations

import atexit
import os
import platform
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from gradscope import __version__, store
from gradscope.errors import StopRun
from gradscope.record.clipping import ClipLedger
from gradscope.record.columns import encode
from gradscope.record.config import RecorderConfig
from gradscope.record.events import StepEvents
from gradscope.record.guard import Guard
from gradscope.record.hooks import Hooks
from gradscope.record.inject import Injector
from gradscope.record.job import RankIdentity, becomes_rank, current_identity, describe
from gradscope.record.layouts import LayoutRegistry
from gradscope.record.loss import LossWindow
from gradscope.record.manual import ManualTracker
from gradscope.record.rows import Row, StepBuffer
from gradscope.record.step import StepReader

__all__ = ["Recorder", "RecorderConfig", "RecorderStats"]


@dataclass(frozen=True)
class RecorderStats:
    """A snapshot of a recorder's counters (:attr:`Recorder.stats`)."""

    n_steps: int  # records committed, written or pending
    pending: int  # records not yet written to a part file
    general_reads: int  # steps read norm by norm, not by a read plan
    planned_failures: int  # planned reads that raised and fell back (a missing grad; a plan turned off)
    plans_dropped: int  # layouts whose read plan was turned off for the rest of the run


class Recorder:
    """Record every optimizer step of the code run inside it to a gradscope run directory.

    Example::

        with gradscope.Recorder(label="notebook") as rec:
            train()
        print(rec.run_dir)

    Args:
        run_dir: the run directory to write; a new one under ``runs_dir`` when omitted.
        runs_dir: the runs root (default ``$GRADSCOPE_DIR`` or ``./.gradscope``).
        label: the run name's prefix when a new run directory is made.
        config: see :class:`RecorderConfig`.
        provenance: what ran, for meta.json (``gradscope profile`` gives it; None from the Python API).
        latest_root: the runs root whose ``latest`` link moves to this run once it has written a step
            (``gradscope profile`` gives it; a new run directory made here sets it to its runs root).
        job_dir: record as one rank of the distributed job in this run directory: the rank's sub-run
            (``run_dir``) is made only once the process records a step, so a process that never steps
            an optimizer (a DataLoader worker) writes nothing; ``latest`` then moves to the job.
    """

    _active: Recorder | None = None

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, *, runs_dir: str | os.PathLike[str] | None = None,
                 label: str = "python", config: RecorderConfig | None = None, provenance: store.Provenance | None = None,
                 latest_root: Path | None = None, job_dir: str | os.PathLike[str] | None = None) -> None:
        self.config = config or RecorderConfig()
        self.run_dir: Path | None = Path(run_dir) if run_dir is not None else None
        # A rank of a distributed job: its sub-run ranks/rank-R is made when it records its first step.
        self._job_dir = Path(job_dir) if job_dir is not None else None
        self._identity: RankIdentity | None = None
        self._label = label
        self._runs_dir = runs_dir
        self._provenance = provenance
        self._latest_root = latest_root
        self._incomplete: str | None = None  # why recorded data was lost (a failed write), for meta.json
        self._guard = Guard()
        self._buffer = StepBuffer()
        self._writer: store.RunWriter | None = None
        self._started = False
        self._stopped = False
        self._pid = os.getpid()
        self._start_time: str | None = None
        self._commits = 0
        self._flushed = 0  # self._commits at the last flush: the rows pending are the difference
        self._t0 = time.perf_counter()
        self._flush_due = 0.0  # run time (s) from which the next flush may happen; set at start and each flush
        self._assemble()

    def _assemble(self) -> None:
        """Fresh collaborators on ``self.config`` (again at start: the config may have been replaced since)."""
        cfg = self.config
        self._loss = LossWindow()
        self._layouts = LayoutRegistry()
        self._clips = ClipLedger(cfg)
        self._injector = Injector(cfg)
        self._reader = StepReader(cfg, self._loss, self._layouts, self._clips, self._injector, self._guard)
        self._manual = ManualTracker(cfg, self._loss, self._layouts, self._clips, self._injector, self._reader,
                                     self._commit)
        self._events = StepEvents(cfg, self._loss, self._clips, self._injector, self._manual, self._reader,
                                  self._guard, self._commit, lambda: self._commits)
        self._hooks = Hooks(self._events)

    # ----------------------------------------------------------------------------------------------
    # Lifecycle
    # ----------------------------------------------------------------------------------------------

    def start(self) -> Recorder:
        """Create the run directory, write meta.json and install the hooks."""
        if Recorder._active is not None:
            raise RuntimeError("a gradscope Recorder is already active in this process")
        self._assemble()
        self._start_time = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if self._job_dir is None:
            if self.run_dir is None:
                root = store.runs_root(self._runs_dir)
                self.run_dir = store.create_run_dir(root, self._label)
                self._latest_root = root
            self._writer = store.RunWriter(self.run_dir)
            self._write_meta(status="running")
        Recorder._active = self
        originals = self._hooks.install()
        self._injector.original_norm, self._injector.original_value = originals.clip_grad_norm, originals.clip_grad_value
        self._started = True
        self._t0 = time.perf_counter()
        self._flush_due = self.config.flush_seconds
        atexit.register(self._atexit)
        if self.config.seed is not None:
            originals.manual_seed(self.config.seed)
        return self

    def stop(self, status: str = "complete", exit_code: int | None = 0, error: str | None = None) -> None:
        """Remove the hooks, flush what is pending, compact the parts and finish meta.json.

        Never raises: a failure of gradscope's own writing (disk full, a file-size limit, any bug of
        ours) becomes one warning and meta.json's ``incomplete``; what was written is kept, temp
        files are removed, and the script's outcome is untouched.
        """
        if not self._started or self._stopped or os.getpid() != self._pid:
            return  # a forked child (DataLoader worker) must not finish the parent's run
        self._stopped = True
        self._hooks.remove()
        Recorder._active = None
        self._guard.call("manual", self._manual.finish)
        try:
            self._manual.commit()
        except StopRun:
            pass  # the loop's last update reached --max-steps: the run is ending anyway
        try:
            if not self._open_rank():
                return  # a rank that recorded nothing leaves nothing behind
        except Exception as exc:
            return self._lost(f"could not create this rank's run directory ({_reason(exc)})")
        self._finish_files()
        end_time = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            self._write_meta(status=status, exit_code=exit_code, error=error, end_time=end_time)
        except Exception as exc:  # meta.json stays as last written (a reader then sees the run killed)
            self._lost(f"could not finish meta.json ({_reason(exc)})")
        finally:
            assert self._writer is not None
            self._writer.remove_temp_files()

    def _finish_files(self) -> None:
        """The last flush, then compaction; a failure of either is recorded, never raised."""
        assert self._writer is not None
        pending = self._buffer.pending
        try:
            self._flush()
        except Exception as exc:
            self._lost(f"could not write the last {pending} recorded steps ({_reason(exc)})")
        try:
            self._writer.compact()
        except Exception as exc:  # the parts stay readable; say so rather than lose the run
            if self._incomplete is None:  # one warning per run: a failed flush already said why
                self._guard.warn("compact", f"could not compact the part files ({_reason(exc)}); the parts are kept")
        self._guard.call("latest", self._point_latest)

    def _lost(self, reason: str) -> None:
        """Recorded data was lost: warn (the first time only), and say so in meta.json's ``incomplete``."""
        if self._incomplete is None:
            self._incomplete = reason
            self._guard.warn("lost", f"{reason}; the run is marked incomplete and the script goes on as it would")

    def _point_latest(self) -> None:
        """Move ``latest`` to this run (a rank: to its job), once, when it has written at least one step."""
        if self._latest_root is None or self._commits == 0 or self.run_dir is None:
            return
        root, self._latest_root = self._latest_root, None
        try:
            store.point_latest(root, self._job_dir or self.run_dir)
        except store.GradscopeError as exc:
            self._guard.warn("latest", exc.message)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, StopRun):
            self.stop("complete", 0)
        elif isinstance(exc, KeyboardInterrupt):
            self.stop("interrupted", 130, "KeyboardInterrupt")
        else:
            self.stop("failed", 1, f"{type(exc).__name__}: {exc}")

    def _atexit(self) -> None:
        if self._started and not self._stopped:
            self.stop("complete", None)

    # ----------------------------------------------------------------------------------------------
    # What it has recorded
    # ----------------------------------------------------------------------------------------------

    @property
    def n_steps(self) -> int:
        """Records written or pending so far, over all optimizers."""
        return self._commits

    @property
    def incomplete(self) -> str | None:
        """Why recorded data was lost (a failed write of gradscope's own), or None."""
        return self._incomplete

    @property
    def seeds(self) -> list[int]:
        """Arguments of the script's ``torch.manual_seed`` calls, in order (after any override)."""
        return list(self._events.seeds)

    @property
    def stats(self) -> RecorderStats:
        """A snapshot of the recorder's counters."""
        reader = self._reader
        return RecorderStats(self._commits, self._buffer.pending, reader.general_reads, reader.planned_failures,
                             reader.plans_dropped)

    @property
    def buffer(self) -> StepBuffer:
        """The rows recorded and not yet written (device values; the next flush writes what it holds)."""
        return self._buffer

    def flush(self) -> None:
        """Write the pending rows as part files now; the run goes on. A no-op unless the recorder is running."""
        if self._started and not self._stopped:
            self._flush()

    # ----------------------------------------------------------------------------------------------
    # Committing rows, flushing, meta
    # ----------------------------------------------------------------------------------------------

    def _commit(self, row: Row) -> None:
        """Record a finished step: every step, after its optimizer's post hook (may raise StopRun).

        The usual step's last call: a handful of attribute updates and one clock read, no Python call
        (the buffer's append is the list's own; when the next flush is due was worked out at the last one).
        """
        slot, cfg = row.slot, self.config
        row.step = slot.steps
        slot.steps += 1
        row.time_s = now = time.perf_counter() - self._t0
        self._buffer.append(row)
        if self._commits == 0:  # a comparison, not a call, on the usual step
            self._first_step()
        self._commits += 1
        self._loss.closed = True  # LossWindow.close(), inlined: every step
        if self._commits - self._flushed >= cfg.flush_every:
            if now >= self._flush_due or self._commits - self._flushed >= 100 * cfg.flush_every:
                self._flush_guarded()
        if cfg.max_steps is not None or cfg.max_time is not None:
            self._check_stop(row)

    def _check_stop(self, row: Row) -> None:
        cfg = self.config
        if cfg.max_steps is not None and row.slot.index == 0 and row.slot.steps >= cfg.max_steps:
            raise StopRun(f"--max-steps {cfg.max_steps} reached")
        if cfg.max_time is not None and row.time_s >= cfg.max_time:
            raise StopRun(f"--max-time {cfg.max_time:g}s reached")

    def _flush_guarded(self) -> None:
        """A flush while the script runs: a failure is warned once and marks the run incomplete."""
        try:
            self._flush()
        except StopRun:
            raise
        except Exception as exc:
            self._lost(f"could not write recorded steps ({_reason(exc)})")

    def _first_step(self) -> None:
        """A rank takes its rank at its first step, while its process group exists (see :func:`becomes_rank`)."""
        identity = current_identity()
        if self._job_dir is None and becomes_rank(self.run_dir, identity):
            self._job_dir, self.run_dir, self._writer = self.run_dir, None, None  # nothing written yet
        if self._job_dir is not None:
            self._identity = identity

    def _open_rank(self) -> bool:
        """A rank's sub-run, made at its first write; False while there is nothing to write (or never will be)."""
        if self._writer is not None:
            return True
        if self._job_dir is None or self._commits == 0:
            return False
        identity = self._identity = self._identity or current_identity()
        self.run_dir = store.create_rank_dir(self._job_dir, store.rank_dir_name(identity.rank, self._pid))
        self._writer = store.RunWriter(self.run_dir)
        self._write_meta(status="running")
        return True

    def _flush(self) -> None:
        if os.getpid() != self._pid or not self._open_rank():
            return  # forked child: the parent owns the run
        now = time.perf_counter() - self._t0
        self._flush_due = now + max(self.config.flush_seconds, 0.002 * now)  # fewer parts as a long run ages
        self._flushed = self._commits
        for kind, columns in encode(self._buffer.take()):  # the flush's one device-to-host copy
            self._writer.write_part(kind, columns)
        if self._latest_root is not None:
            self._guard.call("latest", self._point_latest)  # the first part with a step: the run is worth showing
        if self._layouts.dirty:
            self._write_meta(status="running")

    def _write_meta(self, status: str, exit_code: int | None = None, error: str | None = None,
                    end_time: str | None = None) -> None:
        """meta.json as of now: provenance, seeds, clipping, the optimizers seen, status."""
        assert self.run_dir is not None
        self._layouts.dirty = False
        seeds = self._events.seeds
        meta = store.RunMeta(
            status=status, gradscope_version=__version__, torch_version=torch.__version__,
            python_version=platform.python_version(), run_id=self.run_dir.name, label=self._label,
            provenance=self._provenance, seed=seeds[0] if seeds else self.config.seed, seeds_seen=tuple(seeds[:20]),
            norm_type=2.0, clipping=self._clips.describe(self._injector.describe(self._layouts.n_slots)),
            optimizers=self._layouts.describe(),
            flush_every=self.config.flush_every, start_time=self._start_time, end_time=end_time,
            exit_code=exit_code, error=error, n_steps=self._commits, host=socket.gethostname(), pid=self._pid,
            incomplete=self._incomplete, **(describe(self._identity) if self._identity is not None else {}))
        store.write_meta(self.run_dir, meta)


def _reason(exc: Exception) -> str:
    """One line for a failure of ours: ``OSError: [Errno 27] File too large``."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
