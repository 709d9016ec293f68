"""Where runs live: the runs root, run directory names, the ``latest`` link, and finding a run by reference.

The file names of a run directory are here; :mod:`gradscope.store` re-exports everything the rest of
gradscope needs, and nothing outside the store imports this module.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from gradscope.errors import GradscopeError, RunFormatError, RunNotFoundError
from gradscope.store import tables

RUNS_DIR_ENV = "GRADSCOPE_DIR"
DEFAULT_RUNS_DIR = ".gradscope"
LATEST_NAME = "latest"
META_NAME = "meta.json"
PARTS_DIR = "parts"
RANKS_DIR = "ranks"  # a distributed job's run directory: one sub-run per rank, ranks/rank-00000 ...
JOBS_DIR = ".jobs"  # under the runs root: claim files by which the ranks of one torchrun job share a run


# --------------------------------------------------------------------------------------------------
# Locating runs
# --------------------------------------------------------------------------------------------------


def runs_root(runs_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory that holds the runs: the argument, else ``$GRADSCOPE_DIR``, else ``./.gradscope``.

    Always absolute, resolved *before* the user's script runs (the script may ``chdir``).
    """
    chosen = runs_dir or os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR
    return Path(chosen).expanduser().absolute()


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"


def create_run_dir(root: Path, label: str) -> Path:
    """Make a new, empty run directory named ``<label>-<YYYYmmdd-HHMMSS>`` under ``root``.

    Raises:
        GradscopeError: the runs directory cannot be created or written.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{_safe_stem(label)}-{stamp}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            run_dir = root / (base if attempt == 0 else f"{base}-{attempt + 1}")
            try:
                run_dir.mkdir()
            except FileExistsError:
                continue
            (run_dir / PARTS_DIR).mkdir()
            return run_dir
    except OSError as exc:
        raise GradscopeError(f"cannot write runs directory {root}: {exc.strerror or exc}") from None
    raise GradscopeError(f"cannot find a free run name for {base} in {root}")


def rank_dir_name(rank: int | None, pid: int) -> str:
    """A rank's directory name inside its job's ``ranks/``: ``rank-00003``, or ``pid-<pid>`` for a recorded
    child process that belongs to no distributed group."""
    return f"rank-{rank:05d}" if rank is not None else f"pid-{pid}"


def create_rank_dir(run_dir: Path, name: str) -> Path:
    """Make ``<run_dir>/ranks/<name>`` with its parts directory (a rank's sub-run); it may exist already
    (a restarted rank of an elastic job appends parts to it)."""
    path = run_dir / RANKS_DIR / name
    (path / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    return path


def list_rank_dirs(run_dir: Path) -> list[Path]:
    """The rank sub-runs of a job that have written meta.json, in name order (empty for a single process)."""
    ranks = run_dir / RANKS_DIR
    if not ranks.is_dir():
        return []
    return sorted(p for p in ranks.iterdir() if p.is_dir() and (p / META_NAME).is_file())


def claim_job_dir(root: Path, label: str, key: str, create: Callable[[Path], None]) -> tuple[Path, bool]:
    """The run directory of the job named by ``key``, shared by every rank that asks, without collectives.

    The first rank to ask creates the run (and ``create`` writes its meta.json) and links a claim file
    ``<root>/.jobs/<key>`` naming it: ``os.link`` fails if the claim exists, so exactly one rank wins and
    the others read the winner's (the claim is complete before it is linked).

    Returns:
        The run directory, and whether this caller created it.
    """
    claims = root / JOBS_DIR
    claims.mkdir(parents=True, exist_ok=True)
    claim = claims / key
    if not claim.exists():
        run_dir = create_run_dir(root, label)
        create(run_dir)
        tmp = claims / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(run_dir.name + "\n", encoding="utf-8")
        try:
            os.link(tmp, claim)
            return run_dir, True
        except FileExistsError:  # another rank won between our look and our link: use its run
            shutil.rmtree(run_dir, ignore_errors=True)
        finally:
            tables.remove_quietly(tmp)
    return root / claim.read_text(encoding="utf-8").strip(), False


def point_latest(root: Path, run_dir: Path) -> None:
    """Point ``<root>/latest`` at ``run_dir``: a relative symlink swapped in atomically.

    Raises:
        GradscopeError: ``latest`` is a real directory (not gradscope's link or file); it is left alone.
    """
    link = root / LATEST_NAME
    if link.is_dir() and not link.is_symlink():
        raise GradscopeError(f"{link} is a directory, not gradscope's link to the latest run: left as it is")
    tmp = root / f".{LATEST_NAME}.{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, root / LATEST_NAME)
    except OSError:
        # No symlinks (some network file systems): a text file naming the run works as well.
        atomic_write_text(root / LATEST_NAME, run_dir.name + "\n")


def list_runs(root: Path) -> list[Path]:
    """Run directories under ``root``, oldest first (by their directory's modification time)."""
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir()
            if p.is_dir() and not p.is_symlink() and p.name != JOBS_DIR and (p / META_NAME).is_file()]
    return sorted(runs, key=lambda p: (p.stat().st_mtime, p.name))


def resolve_run(ref: str | os.PathLike[str] | None = None, runs_dir: str | os.PathLike[str] | None = None) -> Path:
    """Turn a run reference into a run directory.

    Args:
        ref: ``None`` for the latest run, a run id (a directory name under the runs root), or a path
            to a run directory (or to one of its files).
        runs_dir: the runs root; see :func:`runs_root`.

    Raises:
        RunNotFoundError: nothing matches, or no run was ever recorded.
        RunFormatError: the path exists but is not a gradscope run.
    """
    root = runs_root(runs_dir)
    if ref is None:
        return _latest(root)
    path = Path(ref).expanduser()
    if path.is_file() and path.parent.joinpath(META_NAME).is_file():
        path = path.parent  # e.g. .gradscope/<id>/steps.parquet
    if not path.exists() and (root / str(ref)).exists():
        path = root / str(ref)
    if not path.exists():
        raise RunNotFoundError(f"no run named {ref!s}: not a path, and not a run id under {root}")
    if path.is_file():
        raise RunFormatError(f"{path} is not a gradscope run directory (expected a directory with {META_NAME})")
    if not (path / META_NAME).is_file():
        raise RunFormatError(f"{path} is not a gradscope run: it has no {META_NAME}")
    return path.resolve()


def _latest(root: Path) -> Path:
    link = root / LATEST_NAME
    if link.is_symlink() or link.is_dir():
        target = link.resolve()
    elif link.is_file():
        target = root / link.read_text().strip()
    else:
        runs = list_runs(root)
        if not runs:
            raise RunNotFoundError(f"no runs yet in {root}; record one with: gradscope profile train.py")
        target = runs[-1]
    if not (target / META_NAME).is_file():
        raise RunNotFoundError(f"the latest run {target} is gone; name a run id or path instead")
    return target


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` durably and atomically: a temp file, fsynced, renamed over it, the directory fsynced."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        tables.durable_replace(tmp, path)
    except BaseException:
        tables.remove_quietly(tmp)
        raise
