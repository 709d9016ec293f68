"""Reading a distributed job: its ranks' sub-runs, their joint status, and their tables joined.

A job is a run directory whose ``ranks/`` holds one sub-run per rank (each laid out like a
single-process run: meta.json, parts/, then steps.parquet and layers.parquet). Each rank wrote and
compacted its own files, with no collective and no file shared between ranks; only the reader puts
them together (:mod:`gradscope.store.combine`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from gradscope.errors import RunFormatError
from gradscope.store import combine, tables
from gradscope.store.meta import FORMAT_NAME, MetaFieldError, RunMeta, check_version
from gradscope.store.runs import META_NAME, PARTS_DIR, list_rank_dirs
from gradscope.store.tables import TABLES

#: A run's statuses from best to worst: a job is as bad as its worst rank.
STATUS_SEVERITY = ("complete", "interrupted", "failed", "killed", "running")


def read_meta(run_dir: Path) -> RunMeta:
    """Read and check ``run_dir``'s meta.json.

    Raises:
        RunFormatError: not JSON, not a gradscope run, written by a newer schema, or a field is
            missing or has the wrong type.
    """
    path = run_dir / META_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFormatError(f"{path} is not a gradscope run file: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise RunFormatError(f"{path} is not a gradscope run file (no \"format\": \"{FORMAT_NAME}\")")
    check_version(path, data.get("schema_version"), str(data.get("gradscope_version", "unknown")))
    try:
        return RunMeta.from_json(data)
    except MetaFieldError as exc:
        raise RunFormatError(f"{run_dir} is not a gradscope run: {exc}") from None


def live_status(meta: RunMeta) -> str:
    """meta.json's status, except that a ``running`` run whose process is gone reads ``killed``
    (kill -9, OOM, power loss): its data ends at its last flush."""
    if meta.status != "running":
        return meta.status
    pid = meta.pid
    if meta.host == socket.gethostname() and pid is not None and _pid_alive(pid):
        return "running"
    return "killed"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class RankRun:
    """One rank's sub-run of a job: where it is, what it says, and its files."""

    rank: int
    path: Path
    meta: RunMeta
    compacted: bool
    parts: dict[str, list[Path]] = field(default_factory=dict, repr=False)

    def files(self, kind: str) -> list[Path]:
        """The files holding ``kind``: the compacted parquet file, else the surviving parts."""
        return [self.path / f"{kind}.parquet"] if self.compacted else self.parts.get(kind, [])

    def read_table(self, kind: str, columns: Sequence[str] | None = None) -> pa.Table:
        """This rank's ``kind`` table as recorded (no ``rank`` column)."""
        if self.compacted:
            return tables.read_final(self.path / f"{kind}.parquet", kind, columns)
        return tables.read_parts(self.files(kind), kind, columns)


def load_ranks(run_dir: Path) -> tuple[RankRun, ...]:
    """The ranks of the job in ``run_dir`` (empty for a single-process run), in rank order.

    A rank without a rank number (a recorded child process outside any process group) is numbered after
    the others, in directory order.
    """
    found = []
    for path in list_rank_dirs(run_dir):
        meta = read_meta(path)
        compacted = all((path / f"{kind}.parquet").is_file() for kind in TABLES)
        parts = {} if compacted else {kind: tables.list_parts(path / PARTS_DIR, kind) for kind in TABLES}
        found.append((meta, path, compacted, parts))
    numbered = {m.rank for m, *_ in found if m.rank is not None}
    spare = iter(n for n in range(len(found) + max(numbered, default=-1) + 1) if n not in numbered)
    ranks = [RankRun(meta.rank if meta.rank is not None else next(spare), path, meta, compacted, parts)
             for meta, path, compacted, parts in found]
    return tuple(sorted(ranks, key=lambda r: r.rank))


def job_status(job_meta: RunMeta, ranks: Sequence[RankRun]) -> str:
    """A job's status: its worst rank's, or the launcher's when that is worse (a rank that died before it
    wrote anything leaves only torchrun's exit code, which the launcher wrote)."""
    statuses = [live_status(r.meta) for r in ranks]
    if not ranks or job_meta.status != "running":  # a job meta left "running" by a rank that claimed it says nothing
        statuses.append(live_status(job_meta))
    return max(statuses, key=STATUS_SEVERITY.index)


def job_meta(job: RunMeta, ranks: Sequence[RankRun]) -> RunMeta:
    """The job as one run: the lowest rank's optimizers, clipping and seeds under the job's own id,
    provenance and launch; ``n_steps`` over all ranks; the first ``incomplete`` of any rank."""
    first = ranks[0].meta
    lost = next((r.meta.incomplete for r in ranks if r.meta.incomplete), job.incomplete)
    return dataclasses.replace(
        first, run_id=job.run_id, label=job.label, provenance=job.provenance or first.provenance,
        launch=job.launch, world_size=job.world_size or first.world_size or len(ranks), rank=None, local_rank=None,
        n_steps=sum(r.meta.n_steps or 0 for r in ranks), start_time=job.start_time or first.start_time,
        end_time=max((r.meta.end_time or "" for r in ranks), default="") or job.end_time, incomplete=lost,
        exit_code=job.exit_code if job.exit_code is not None else first.exit_code, host=job.host, pid=job.pid)


def read_job_table(ranks: Sequence[RankRun], kind: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Every rank's ``kind`` rows joined (``rank`` column, sharded norms combined); only ``columns`` (and
    ``rank``) when given."""
    per_rank = [(r.rank, r.meta, r.read_table(kind)) for r in ranks]
    joined = combine.join_ranks(kind, per_rank) if per_rank else _empty(kind)
    if columns is None:
        return joined
    # a job's table always has ``rank`` (readers tell a job by it); select keeps the scopes' schema metadata
    return joined.select([*columns, *([] if "rank" in columns else ["rank"])])


def _empty(kind: str) -> pa.Table:
    return combine.with_rank(TABLES[kind].empty_table(), 0)
