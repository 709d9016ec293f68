"""The run directory: the one package that knows how a run is laid out on disk.

A run directory holds::

    meta.json        provenance and status (a RunMeta), rewritten atomically (temp file + os.replace)
    steps.parquet    one row per optimizer step per optimizer        (after compaction)
    layers.parquet   one row per parameter tensor per step (long)    (after compaction)
    parts/           closed part files written while the run is alive

The columns and part files are :mod:`gradscope.store.tables`, meta.json's keys
:mod:`gradscope.store.meta`, where runs live and the ``latest`` link :mod:`gradscope.store.runs`;
every other module imports this one only, which re-exports what they
need. A reader falls back to the parts when compaction never happened (``kill -9``, OOM) and says
the run is incomplete; a part that does not read (0 bytes, truncated, garbage) is skipped with one
warning and the rest is read. Every file counts only once fsynced (file, then directory). Nothing in a run directory is ever executed: no pickle, only JSON, Arrow and
parquet. No torch here: reporters read runs without paying for torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa

from gradscope.errors import GradscopeError, RunFormatError, RunNotFoundError
from gradscope.store import combine, tables
from gradscope.store.combine import AGREEMENT_TOLERANCE, SCOPES_KEY, job_scopes, join_ranks, rank_disagreement
from gradscope.store.job import (
    RankRun,
    job_meta,
    job_status,
    live_status,
    load_ranks,
    read_job_table,
    read_meta,
)
from gradscope.store.merge import Merged, merge_jobs
from gradscope.store.meta import (
    SCHEMA_VERSION,
    Clipping,
    Launch,
    OptimizerMeta,
    Provenance,
    RunMeta,
)
from gradscope.store.runs import (
    DEFAULT_RUNS_DIR,
    LATEST_NAME,
    META_NAME,
    PARTS_DIR,
    RUNS_DIR_ENV,
    atomic_write_text,
    claim_job_dir,
    create_rank_dir,
    create_run_dir,
    list_rank_dirs,
    list_runs,
    point_latest,
    rank_dir_name,
    resolve_run,
    runs_root,
)
from gradscope.store.tables import LAYERS_SCHEMA, STEPS_SCHEMA, TABLES

# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def write_meta(run_dir: Path, meta: RunMeta) -> None:
    """Write meta.json atomically (temp file + ``os.replace``): a reader sees the old file or the new one."""
    if not isinstance(meta, RunMeta):
        raise TypeError(f"write_meta takes a RunMeta, not {type(meta).__name__}")
    text = json.dumps(meta.to_json(), indent=2) + "\n"
    RunMeta.from_json(json.loads(text))  # what is written must read back: a MetaFieldError here is our bug
    atomic_write_text(run_dir / META_NAME, text)


def finish_job_meta(run_dir: Path, meta: RunMeta, status: str, exit_code: int | None,
                    error: str | None = None) -> RunMeta:
    """Write a distributed job's own meta.json as the job ended: ``meta`` with its status, exit code and error,
    the end time, and the number of ranks and steps its ``ranks/`` holds. Returns what was written."""
    final = dataclasses.replace(
        meta, status=status, exit_code=exit_code, error=error, n_steps=count_steps(run_dir),
        world_size=len(list_rank_dirs(run_dir)) or None, end_time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_meta(run_dir, final)
    return final


class RunWriter:
    """Appends closed Arrow part files to a run directory and compacts them into parquet at the end.

    Every method is a no-op in a process other than the one that created the writer: a forked
    child (a DataLoader worker) inherits this object, and must never write or delete the parent's
    files. Write errors are the caller's to catch: the recorder never lets them reach the user's loop.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.parts_dir = run_dir / PARTS_DIR
        self.parts_dir.mkdir(exist_ok=True)
        self._pid = os.getpid()
        self._next_part = dict.fromkeys(TABLES, 0)

    def _owned(self) -> bool:
        return os.getpid() == self._pid  # False in a forked child: look, don't touch

    def write_part(self, kind: str, columns: dict[str, Any]) -> None:
        """Write one closed part file of ``kind`` ("steps" or "layers") from column arrays."""
        if not self._owned():
            return
        tables.write_part(self.parts_dir, kind, self._next_part[kind], columns)
        self._next_part[kind] += 1

    def compact(self) -> None:
        """Stream the parts into ``steps.parquet`` and ``layers.parquet``, then delete the parts.

        The final files are complete and durable (fsynced, file and directory) before any part is
        removed, so a crash here loses nothing: the reader prefers a final file and ignores leftover
        parts next to it. A failure leaves no final file half-made and keeps every part.
        """
        if not self._owned():
            return
        for kind in TABLES:
            tables.compact(tables.list_parts(self.parts_dir, kind), kind, self.run_dir / f"{kind}.parquet")
        for part in self.parts_dir.iterdir():
            part.unlink()
        self.parts_dir.rmdir()

    def remove_temp_files(self) -> None:
        """Delete the temp files a failed write may have left (dot-prefixed ``.tmp``); closed files stay."""
        if not self._owned():
            return
        for folder in (self.parts_dir, self.run_dir):
            if folder.is_dir():
                for path in folder.glob(".*.tmp"):
                    tables.remove_quietly(path)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A recorded run, as the reporters see it. Build one with :func:`load_run`.

    Attributes:
        path: the run directory.
        meta: meta.json, typed (see :class:`RunMeta`).
        compacted: True when the final parquet files exist; False when only parts survived.
    """

    path: Path
    meta: RunMeta
    compacted: bool
    parts: dict[str, list[Path]] = field(default_factory=dict, repr=False)  # kind -> part files, when not compacted
    #: A distributed job's ranks (empty for a single process): ``meta`` is then the job seen as one run.
    ranks: tuple[RankRun, ...] = ()
    job: RunMeta | None = field(default=None, repr=False)  # a job's own meta.json, as written

    @property
    def id(self) -> str:
        """The run id: the run directory's name."""
        return self.path.name

    @property
    def status(self) -> str:
        """``complete``, ``failed``, ``interrupted``, ``running`` (still alive), or ``killed``.

        ``killed`` is a run whose meta.json still says running but whose process is gone (kill -9,
        OOM, power loss): its data ends at the last flush.
        """
        if self.ranks and self.job is not None:
            return job_status(self.job, self.ranks)
        return live_status(self.meta)

    @property
    def incomplete(self) -> str | None:
        """Why the recording is missing data although the script ran (a failed write), or None."""
        return self.meta.incomplete

    @property
    def complete(self) -> bool:
        """True when the run finished (even by an exception in the script) and was compacted."""
        return self.compacted and self.status in ("complete", "failed", "interrupted")

    @property
    def world_size(self) -> int:
        """How many ranks recorded (1 for a single process)."""
        return max(len(self.ranks), 1)

    def _files(self, kind: str) -> list[Path]:
        return [self.path / f"{kind}.parquet"] if self.compacted else self.parts.get(kind, [])

    def read_table(self, kind: str, columns: Sequence[str] | None = None) -> pa.Table:
        """Read ``steps`` or ``layers`` as a pyarrow Table (only ``columns`` when given).

        The table has a ``rank`` column (0 for a single process); a job's rows are every rank's, with
        sharded norms combined across ranks (see :mod:`gradscope.store.combine`).
        """
        if self.ranks:
            return read_job_table(self.ranks, kind, columns)
        wanted = None if columns is None else [c for c in columns if c != "rank"]
        if self.compacted:
            table = tables.read_final(self.path / f"{kind}.parquet", kind, wanted)
        else:
            table = tables.read_parts(self._files(kind), kind, wanted)
        table = combine.with_rank(table, 0) if columns is None or "rank" in columns else table
        return table if columns is None else table.select(list(columns))

    def iter_batches(self, kind: str, columns: Sequence[str] | None = None,
                     batch_size: int = 1 << 20) -> Iterator[pa.RecordBatch]:
        """Stream ``steps`` or ``layers`` in record batches, for runs too large to hold whole. A single
        process's batches have no ``rank`` column; a job's are :meth:`read_table`'s (joined, with ``rank``)."""
        if self.ranks:
            return read_job_table(self.ranks, kind, columns).to_batches(max_chunksize=batch_size)
        return tables.iter_batches(self._files(kind), kind, columns, batch_size)

    @cached_property
    def steps(self) -> Any:
        """``steps`` as a pandas DataFrame, sorted by optimizer and step."""
        frame = self.read_table("steps").to_pandas()
        return frame.sort_values(["optimizer", "step", "rank"], kind="stable").reset_index(drop=True)

    @cached_property
    def layers(self) -> Any:
        """``layers`` as a pandas DataFrame (``layer`` is categorical). Large: prefer read_table."""
        return self.read_table("layers").to_pandas()

    def report(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Write this run's HTML report (``gradscope report``) to ``path`` (default: report.html in the run).

        Returns a :class:`gradscope.report.Report`: its ``path``, and the page inline in Jupyter.
        """
        # Imported here: the report imports the store, and matplotlib is paid for only when a report is asked for.
        from gradscope.report import write_report

        return write_report(self, path)

    def optimizer_label(self, index: int) -> str:
        """A short human label for optimizer ``index``: ``"0 (Adam)"``."""
        for entry in self.meta.optimizers:
            if entry.index == index:
                return f"{index} ({entry.class_name})"
        return str(index)


def load_run(ref: str | os.PathLike[str] | None = None, runs_dir: str | os.PathLike[str] | None = None) -> Run:
    """Open a recorded run for reading.

    Args:
        ref: ``None`` for the latest run, a run id, or a run directory path.
        runs_dir: the runs root (default ``$GRADSCOPE_DIR`` or ``./.gradscope``).

    Returns:
        A :class:`Run`; ``run.steps`` and ``run.layers`` are pandas DataFrames, ``run.meta`` the
        metadata, ``run.complete`` whether it finished and was compacted.

    Raises:
        RunNotFoundError, RunFormatError: see :func:`resolve_run` and :func:`read_meta`.
    """
    path = resolve_run(ref, runs_dir)
    meta = read_meta(path)
    ranks = load_ranks(path)
    if ranks:  # a distributed job: the launcher's own files (no steps) are not read
        return Run(path=path, meta=job_meta(meta, ranks), compacted=all(r.compacted for r in ranks),
                   ranks=ranks, job=meta)
    compacted = all((path / f"{kind}.parquet").is_file() for kind in TABLES)
    parts = {} if compacted else {kind: tables.list_parts(path / PARTS_DIR, kind) for kind in TABLES}
    return Run(path=path, meta=meta, compacted=compacted, parts=parts)


class StepCounter:
    """Counts the ``steps`` rows a run directory holds so far, while the run writes it.

    Cheap enough to poll: each closed part's row count is read once, from its footer; files being
    written (dot-prefixed temp names) are never listed.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._rows: dict[Path, int] = {}

    def count(self) -> int:
        """Rows written so far, over all optimizers (and all ranks of a distributed job): the whole table
        once the run is compacted.

        Raises:
            RunFormatError: a file cannot be read even after looking again (not a gradscope file).
        """
        return sum(self._count_dir(d) for d in (self.run_dir, *list_rank_dirs(self.run_dir)))

    def _count_dir(self, run_dir: Path) -> int:
        final = run_dir / "steps.parquet"
        for _ in range(2):  # compaction may delete a part between listing and reading it: look again
            try:
                if final.is_file():
                    return tables.final_rows(final)
                parts = tables.list_parts(run_dir / PARTS_DIR, "steps")
                return sum(self._part_rows(part) for part in parts)
            except (OSError, pa.ArrowInvalid):
                continue
        raise RunFormatError(f"cannot count the steps of {run_dir}: its step files are not readable")

    def _part_rows(self, part: Path) -> int:
        if part not in self._rows:
            try:
                self._rows[part] = tables.part_rows(part)
            except pa.ArrowInvalid:  # a closed part that does not read (a crash): it holds no readable row
                if not part.exists():
                    raise
                self._rows[part] = 0
        return self._rows[part]


def count_steps(run_dir: Path) -> int:
    """``steps`` rows written so far in ``run_dir`` (see :class:`StepCounter`, for polling)."""
    return StepCounter(run_dir).count()


__all__ = [
    "AGREEMENT_TOLERANCE", "SCOPES_KEY", "job_scopes", "join_ranks", "rank_disagreement",
    "LAYERS_SCHEMA", "SCHEMA_VERSION", "STEPS_SCHEMA", "TABLES", "Clipping", "GradscopeError", "OptimizerMeta",
    "Launch", "Merged", "Provenance", "RankRun", "Run", "RunMeta", "RunWriter", "StepCounter", "claim_job_dir", "count_steps",
    "create_rank_dir", "create_run_dir", "finish_job_meta", "list_rank_dirs", "list_runs", "rank_dir_name",
    "load_run", "merge_jobs", "point_latest", "read_meta", "resolve_run", "runs_root", "write_meta",
    "DEFAULT_RUNS_DIR", "LATEST_NAME", "META_NAME", "PARTS_DIR", "RUNS_DIR_ENV", "RunNotFoundError",
]
