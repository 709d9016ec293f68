"""The run directory: the one module that knows how a run is laid out on disk.

A run directory holds::

    meta.json        provenance and status, rewritten atomically (temp file + os.replace)
    steps.parquet    one row per optimizer step per optimizer        (after compaction)
    layers.parquet   one row per parameter tensor per step (long)    (after compaction)
    parts/           closed part files written while the run is alive

While a run is alive the writer appends *closed, self-contained* part files (written under a
dot-prefixed temp name, then ``os.replace``d), because a file killed before its footer is written
cannot be read at all. Parts are Arrow IPC files (``.arrow``), the ``layer`` column kept as the
dictionary it is built as: writing one costs a memory copy, where a parquet part cost the training
loop ~110 µs per step on a 400-tensor model (encoding 51k rows per flush). At exit the parts are
streamed into the two final parquet files. A reader falls back to the parts (``.arrow``, or
``.parquet`` from gradscope 0.1.0) when compaction never happened (``kill -9``, OOM) and says the run
is incomplete. Nothing in a run directory is ever executed: no pickle, only JSON, Arrow and parquet.

This module imports pyarrow and pandas, never torch: reporters read runs without paying for torch.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gradscope.errors import GradscopeError, RunFormatError, RunNotFoundError

#: Bump on any change to the columns or to meta.json's keys, and say what changed here.
#: 1: first release.
SCHEMA_VERSION = 1
FORMAT_NAME = "gradscope-run"
RUNS_DIR_ENV = "GRADSCOPE_DIR"
DEFAULT_RUNS_DIR = ".gradscope"
LATEST_NAME = "latest"
META_NAME = "meta.json"
PARTS_DIR = "parts"

#: One row per optimizer step per optimizer. See README "The run directory" for each column.
STEPS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),  # per-optimizer update index, AMP-skipped steps included
        ("optimizer", pa.int16()),  # index into meta["optimizers"]
        ("grad_norm", pa.float64()),  # global L2 norm before any clipping (what clip_grad_norm_ returns)
        ("applied_norm", pa.float64()),  # global L2 norm the optimizer consumed, after clipping
        ("max_norm", pa.float64()),  # clipping threshold in effect at this step, null when none
        ("clip_source", pa.string()),  # "none" | "script" | "injected" | "script-disabled"
        ("clip_coef", pa.float64()),  # applied_norm / grad_norm as clipping set it (1.0 = untouched)
        ("loss", pa.float64()),  # sum of the unscaled scalar losses backward'ed for this step
        ("n_backward", pa.int32()),  # backward calls that fed this step
        ("lr", pa.float64()),  # learning rate of param group 0, as used by this update
        ("loss_scale", pa.float64()),  # GradScaler scale at this step, null without a scaler
        ("skipped", pa.bool_()),  # GradScaler found inf/NaN and skipped the update
        ("nonfinite", pa.bool_()),  # grad_norm is inf or NaN
        ("time_s", pa.float64()),  # seconds since the run started, at the end of the step
    ]
)

#: Long/tidy per-layer table: runs have thousands of tensors, so never one column per layer.
LAYERS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("optimizer", pa.int16()),
        ("layer", pa.string()),  # module path, wrapper prefixes stripped; dictionary-encoded on disk
        ("norm", pa.float32()),  # pre-clip L2 norm of this tensor's gradient; NaN when it had no grad
    ]
)

TABLES = {"steps": STEPS_SCHEMA, "layers": LAYERS_SCHEMA}
#: The part files' schemas: the final ones, with ``layer`` as the dictionary the recorder builds
#: (what a reader asking for ``layer`` gets from the final file too: see ``_dict_cols``).
_LAYER_DICT = pa.dictionary(pa.int32(), pa.string())
PART_TABLES = {"steps": STEPS_SCHEMA,
               "layers": LAYERS_SCHEMA.set(LAYERS_SCHEMA.get_field_index("layer"), pa.field("layer", _LAYER_DICT))}
PART_SUFFIX = ".arrow"
_PART_SUFFIXES = (PART_SUFFIX, ".parquet")  # .parquet: parts written by gradscope 0.1.0
_FILE_META = {b"gradscope.schema_version": str(SCHEMA_VERSION).encode(), b"gradscope.format": FORMAT_NAME.encode()}


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


def point_latest(root: Path, run_dir: Path) -> None:
    """Point ``<root>/latest`` at ``run_dir``: a relative symlink swapped in atomically."""
    tmp = root / f".{LATEST_NAME}.{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, root / LATEST_NAME)
    except OSError:
        # No symlinks (some network file systems): a text file naming the run works as well.
        _atomic_write_text(root / LATEST_NAME, run_dir.name + "\n")


def list_runs(root: Path) -> list[Path]:
    """Run directories under ``root``, oldest first (by start time in their meta.json)."""
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / META_NAME).is_file()]
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
            raise RunNotFoundError(
                f"no runs yet in {root}; record one with: gradscope profile train.py"
            )
        target = runs[-1]
    if not (target / META_NAME).is_file():
        raise RunNotFoundError(f"the latest run {target} is gone; name a run id or path instead")
    return target


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    """Write meta.json atomically, stamped with the format name and schema version."""
    stamped = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, **meta}
    _atomic_write_text(run_dir / META_NAME, json.dumps(stamped, indent=2, sort_keys=False, default=str) + "\n")


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
        self._next_part = {name: 0 for name in TABLES}

    def _owned(self) -> bool:
        return os.getpid() == self._pid  # False in a forked child: look, don't touch

    def write_part(self, kind: str, columns: dict[str, Any]) -> None:
        """Write one closed part file of ``kind`` ("steps" or "layers") from column arrays."""
        if not self._owned():
            return
        schema = PART_TABLES[kind].with_metadata(_FILE_META)
        table = pa.Table.from_pydict(columns, schema=schema)
        index = self._next_part[kind]
        self._next_part[kind] += 1
        final = self.parts_dir / f"{kind}-{index:06d}{PART_SUFFIX}"
        tmp = self.parts_dir / f".{final.name}.tmp"  # dot prefix: readers never list it
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table)
        os.replace(tmp, final)

    def compact(self) -> None:
        """Stream the parts into ``steps.parquet`` and ``layers.parquet``, then delete the parts.

        The final files are complete before any part is removed, so a crash here loses nothing:
        the reader prefers a final file and ignores leftover parts next to it.
        """
        if not self._owned():
            return
        for kind, schema in TABLES.items():
            _stream_parts_into(_part_files(self.parts_dir, kind), schema, self.run_dir / f"{kind}.parquet")
        for part in self.parts_dir.iterdir():
            part.unlink()
        self.parts_dir.rmdir()


def _part_files(parts_dir: Path, kind: str) -> list[Path]:
    """The closed part files of ``kind`` in write order (never the dot-prefixed ones being written)."""
    if not parts_dir.is_dir():
        return []
    return sorted(p for suffix in _PART_SUFFIXES for p in parts_dir.glob(f"{kind}-*{suffix}"))


def _read_part(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """One part file as a Table. ParquetFile.read, not pq.read_table: the latter imports
    pyarrow.dataset and pandas (~50 MB) into the training process at exit."""
    if path.suffix == PART_SUFFIX:
        with pa.OSFile(str(path), "rb") as source:
            table = pa.ipc.open_file(source).read_all()
        return table.select(list(columns)) if columns is not None else table
    return pq.ParquetFile(path).read(columns=list(columns) if columns is not None else None)


def _stream_parts_into(parts: Sequence[Path], schema: pa.Schema, final: Path) -> None:
    # One part in memory at a time: a million-step run must compact without loading it whole.
    tmp = final.with_name(f".{final.name}.tmp")
    with pq.ParquetWriter(tmp, schema.with_metadata(_FILE_META), compression="zstd") as writer:
        batch: list[pa.Table] = []
        rows = 0
        for part in parts:
            table = _read_part(part).cast(schema.with_metadata(_FILE_META))  # the layer dictionary as strings
            batch.append(table)
            rows += table.num_rows
            if rows >= 1_000_000:  # row groups of ~1M rows read fast and stay small in memory
                writer.write_table(pa.concat_tables(batch))
                batch, rows = [], 0
        if batch:
            writer.write_table(pa.concat_tables(batch))
    os.replace(tmp, final)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_meta(run_dir: Path) -> dict[str, Any]:
    """Read and check meta.json.

    Raises:
        RunFormatError: not JSON, not a gradscope run, or written by a newer schema.
    """
    path = run_dir / META_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFormatError(f"{path} is not a gradscope run file: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise RunFormatError(f"{path} is not a gradscope run file (no \"format\": \"{FORMAT_NAME}\")")
    _check_version(path, meta.get("schema_version"), meta.get("gradscope_version", "unknown"))
    return meta


def _check_version(path: Path, version: Any, writer: str) -> None:
    if not isinstance(version, int):
        raise RunFormatError(f"{path} has no valid schema version; it was not written by gradscope")
    if version > SCHEMA_VERSION:
        raise RunFormatError(
            f"{path} was written by gradscope {writer} (schema {version}); "
            f"this gradscope reads schema {SCHEMA_VERSION} and older: upgrade gradscope to read it"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Run:
    """A recorded run, as the reporters see it. Build one with :func:`load_run`.

    Attributes:
        path: the run directory.
        meta: the parsed meta.json (see README, "The run directory").
        compacted: True when the final parquet files exist; False when only parts survived.
    """

    path: Path
    meta: dict[str, Any]
    compacted: bool
    _parts: dict[str, list[Path]] = field(default_factory=dict, repr=False)

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
        status = self.meta.get("status", "running")
        if status != "running":
            return status
        same_host = self.meta.get("host") == socket.gethostname()
        pid = self.meta.get("pid")
        if same_host and isinstance(pid, int) and _pid_alive(pid):
            return "running"
        return "killed"

    @property
    def complete(self) -> bool:
        """True when the run finished (even by an exception in the script) and was compacted."""
        return self.compacted and self.status in ("complete", "failed", "interrupted")

    def read_table(self, kind: str, columns: Sequence[str] | None = None) -> pa.Table:
        """Read ``steps`` or ``layers`` as a pyarrow Table (only ``columns`` when given)."""
        cols = list(columns) if columns is not None else None
        if self.compacted:
            path = self.path / f"{kind}.parquet"
            _check_file_version(path)
            return pq.read_table(path, columns=cols, read_dictionary=_dict_cols(kind, cols))
        parts = self._parts.get(kind, [])
        # The same types as the final file read above: `layer` as a dictionary, the rest as in TABLES.
        part_schema = PART_TABLES[kind]
        selected = part_schema if cols is None else pa.schema([part_schema.field(c) for c in cols])
        if not parts:
            return selected.empty_table()
        return pa.concat_tables(_read_part(p, cols).cast(selected) for p in parts)

    def iter_batches(self, kind: str, columns: Sequence[str] | None = None, batch_size: int = 1 << 20) -> Iterator[pa.RecordBatch]:
        """Stream ``steps`` or ``layers`` in record batches, for runs too large to hold whole."""
        cols = list(columns) if columns is not None else None
        paths = [self.path / f"{kind}.parquet"] if self.compacted else self._parts.get(kind, [])
        for path in paths:
            if path.suffix == PART_SUFFIX:  # a part: one flush's rows, small
                yield from _read_part(path, cols).to_batches(max_chunksize=batch_size)
                continue
            # pre_buffer=False: pyarrow would otherwise load every requested column of the file up front.
            handle = pq.ParquetFile(path, read_dictionary=_dict_cols(kind, cols), pre_buffer=False)
            yield from handle.iter_batches(batch_size=batch_size, columns=cols)

    @cached_property
    def steps(self) -> Any:
        """``steps`` as a pandas DataFrame, sorted by optimizer and step."""
        frame = self.read_table("steps").to_pandas()
        return frame.sort_values(["optimizer", "step"], kind="stable").reset_index(drop=True)

    @cached_property
    def layers(self) -> Any:
        """``layers`` as a pandas DataFrame (``layer`` is categorical). Large: prefer read_table."""
        return self.read_table("layers").to_pandas()

    def optimizer_label(self, index: int) -> str:
        """A short human label for optimizer ``index``: ``"0 (Adam)"``."""
        for entry in self.meta.get("optimizers", []):
            if entry.get("index") == index:
                return f"{index} ({entry.get('class', '?')})"
        return str(index)


def _dict_cols(kind: str, cols: list[str] | None) -> list[str] | None:
    if kind == "layers" and (cols is None or "layer" in cols):
        return ["layer"]
    return None


def _check_file_version(path: Path) -> None:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunFormatError(f"{path} is not a readable parquet file: {exc}") from None
    if metadata.get(b"gradscope.format") != FORMAT_NAME.encode():
        raise RunFormatError(f"{path} is not a gradscope file (no gradscope schema metadata)")
    raw = metadata.get(b"gradscope.schema_version", b"")
    _check_version(path, int(raw) if raw.isdigit() else None, "a newer version")


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
    compacted = all((path / f"{kind}.parquet").is_file() for kind in TABLES)
    parts: dict[str, list[Path]] = {}
    if not compacted:
        for kind in TABLES:
            parts[kind] = _part_files(path / PARTS_DIR, kind)
    return Run(path=path, meta=meta, compacted=compacted, _parts=parts)


__all__ = [
    "GradscopeError",
    "LAYERS_SCHEMA",
    "Run",
    "RunWriter",
    "SCHEMA_VERSION",
    "STEPS_SCHEMA",
    "create_run_dir",
    "list_runs",
    "load_run",
    "point_latest",
    "read_meta",
    "resolve_run",
    "runs_root",
    "write_meta",
]
