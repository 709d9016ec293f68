"""``gradscope merge OUT RUN...``: one job run from the run directories the nodes of a job wrote.

A job across nodes, recorded without a shared filesystem (or with ``gradscope profile --nproc-per-node``
on each node, which makes one job directory per node), leaves one job directory per node, each
holding that node's ranks. Merging puts every rank's sub-run under ``OUT/ranks/`` and writes OUT's
job meta.json; the rank sub-runs are taken as they are (each rank wrote its own, with no collective).

The inputs are never modified: files are hard-linked when OUT is on their filesystem (every run file
is written once and replaced by rename, never rewritten in place, so a link shares nothing that
changes), else copied. OUT is built under a temporary name next to it and renamed at the end: a
failed merge leaves no half-made run. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gradscope.errors import GradscopeError, UsageError
from gradscope.store.job import STATUS_SEVERITY, RankRun, live_status, load_ranks, read_meta
from gradscope.store.meta import RunMeta
from gradscope.store.runs import META_NAME, RANKS_DIR, atomic_write_text


@dataclass(frozen=True)
class NodeJob:
    """One input: a job run directory, its own meta.json and its ranks."""

    path: Path
    meta: RunMeta
    ranks: tuple[RankRun, ...]


@dataclass(frozen=True)
class Merged:
    """What :func:`merge_jobs` made."""

    path: Path
    n_ranks: int
    n_runs: int
    linked: bool  # every file was hard-linked (False: at least one was copied)
    world_size: int | None  # the ranks' own WORLD_SIZE (None: not recorded): more than n_ranks when nodes are missing

    def summary(self) -> str:
        """One line for the person who merged: how many ranks, from how many runs, where, and how."""
        missing = f" (of the {self.world_size} the job had)" if (self.world_size or 0) > self.n_ranks else ""
        ranks, runs = _count(self.n_ranks, "rank"), _count(self.n_runs, "run")
        return (f"merged {ranks}{missing} of {runs} into {self.path} "
                f"({'hard links' if self.linked else 'copies'})")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def read_node_job(path: Path) -> NodeJob:
    """Read one input of a merge.

    Raises:
        GradscopeError: it is not a distributed job, or one of its ranks is still recording (exit 1).
    """
    meta = read_meta(path)
    ranks = load_ranks(path)
    if not ranks:
        raise GradscopeError(f"{path} is not a distributed job (no {RANKS_DIR}/rank-* sub-run): merge joins the "
                             "job directories of several nodes")
    alive = [r.rank for r in ranks if live_status(r.meta) == "running"]
    if alive:
        raise GradscopeError(f"{path}: rank {alive[0]} is still recording; merge the job once it has ended")
    return NodeJob(path, meta, ranks)


def check_ranks(jobs: Sequence[NodeJob]) -> None:
    """Every rank (and rank directory name) once over all inputs.

    Raises:
        GradscopeError: two inputs hold the same rank (exit 1).
    """
    paths = [job.path.resolve() for job in jobs]
    twice = next((p for p in paths if paths.count(p) > 1), None)
    if twice is not None:
        raise GradscopeError(f"{twice} is given twice: a merged job holds each rank once; give each node's run once")
    seen: dict[tuple[str, object], Path] = {}
    for job in jobs:
        for rank in job.ranks:
            for key in (("rank", rank.rank), ("directory", rank.path.name)):
                if key in seen:
                    raise GradscopeError(f"{key[0]} {key[1]} is in both {seen[key]} and {job.path}: a merged job "
                                         "holds each rank once; give each node's run once")
                seen[key] = job.path


def check_scripts(jobs: Sequence[NodeJob], force: bool) -> None:
    """The inputs ran the same script (their recorded sha256), unless ``force``.

    Raises:
        GradscopeError: two inputs ran different scripts and ``force`` is False (exit 1).
    """
    first = jobs[0]
    digest = _script_sha(first.meta)
    for job in jobs[1:]:
        other = _script_sha(job.meta)
        if other != digest and not force:
            raise GradscopeError(f"{first.path} and {job.path} ran different scripts (sha256 {str(digest)[:12]} and "
                                 f"{str(other)[:12]}): they are not nodes of one job; --force merges them anyway")


def _script_sha(meta: RunMeta) -> str | None:
    return meta.provenance.script_sha256 if meta.provenance is not None else None


def merged_meta(name: str, jobs: Sequence[NodeJob]) -> RunMeta:
    """OUT's job meta.json: the first input's (provenance, launch, seed...) under OUT's id, with
    ``world_size`` the number of ranks merged and the worst launcher status of the inputs."""
    metas = [job.meta for job in jobs]
    ended = [m.status for m in metas if m.status != "running"]  # a rank-claimed job meta stays "running"
    status = max(ended, key=STATUS_SEVERITY.index) if len(ended) == len(metas) else "running"
    codes = [m.exit_code for m in metas if m.exit_code]
    ranks = [r for job in jobs for r in job.ranks]
    return dataclasses.replace(
        metas[0], run_id=name, status=status, exit_code=codes[0] if codes else metas[0].exit_code,
        world_size=len(ranks), n_steps=sum(r.meta.n_steps or 0 for r in ranks), pid=None,
        start_time=min((m.start_time for m in metas if m.start_time), default=None),
        end_time=max((m.end_time for m in metas if m.end_time), default=None))


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Put ``src``'s files under ``dst`` (made here); True when every file was hard-linked.

    Temporary files (dot-prefixed: a write that never finished) are left out.
    """
    linked = True
    for folder, _dirs, files in os.walk(src):
        target = dst / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.startswith("."):
                continue
            try:
                os.link(Path(folder) / name, target / name)
            except OSError:  # another filesystem (EXDEV), or links refused: copy
                shutil.copy2(Path(folder) / name, target / name)
                linked = False
    return linked


def merge_jobs(out: Path, sources: Sequence[Path], force: bool = False) -> Merged:
    """Make the job run ``out`` from the job runs ``sources`` (one per node); the sources are not modified.

    Raises:
        UsageError: ``out`` exists (exit 2).
        GradscopeError: an input is not a finished job, two inputs hold the same rank, or (without
            ``force``) they ran different scripts; ``out`` cannot be written (exit 1).
    """
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} exists: merge writes a new run directory; give a path that does not exist")
    jobs = [read_node_job(Path(path)) for path in sources]
    check_ranks(jobs)
    check_scripts(jobs, force)
    tmp = out.with_name(f".{out.name}.merging-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        linked = True
        for job in jobs:
            for rank in job.ranks:
                linked = _link_or_copy(rank.path, tmp / RANKS_DIR / rank.path.name) and linked
        meta = merged_meta(out.name, jobs)
        atomic_write_text(tmp / META_NAME, json.dumps(meta.to_json(), indent=2) + "\n")
        os.rename(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GradscopeError(f"cannot write {out}: {exc.strerror or exc}: {exc.filename or out}") from None
    world = max((r.meta.world_size or 0 for job in jobs for r in job.ranks), default=0) or None
    return Merged(out, sum(len(job.ranks) for job in jobs), len(jobs), linked, world)
