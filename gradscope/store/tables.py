"""The two tables of a run, ``steps`` and ``layers``: their columns and the files that hold them.

While a run is alive its rows go into closed, self-contained part files (``<kind>-NNNNNN.arrow``
in the run's parts directory), each written under a dot-prefixed temp name and then
``os.replace``d, because a file killed before its footer is written cannot be read at all. Parts
are Arrow IPC files with the ``layer`` column kept as the dictionary it is built as: writing one
costs a memory copy, where a parquet part cost the training loop ~110 µs per step on a
400-tensor model (encoding 51k rows per flush). At the end they are streamed into one parquet
file per table. gradscope 0.1.0 wrote its parts as parquet; they are still read.

:mod:`gradscope.store` decides where these files live; this module reads and writes them. It
imports pyarrow, never pandas or torch (the training process pays for neither at exit).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradscope.errors import RunFormatError
from gradscope.store.meta import FORMAT_NAME, SCHEMA_VERSION, check_version

#: One row per optimizer step per optimizer.
STEPS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),  # per-optimizer update index, AMP-skipped steps included
        ("optimizer", pa.int16()),  # index into meta.json's optimizers
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
        # A rank of a sharded optimizer (docs/distributed.md): the sum over this rank's pieces of sharded tensors
        # of weight * norm^2, and the sum over whole tensors of norm^2; null otherwise. Added after the first
        # release: older files read them as null.
        ("shard_sq", pa.float64()),
        ("whole_sq", pa.float64()),
    ]
)

#: Long/tidy per-layer table: runs have thousands of tensors, so never one column per layer.
LAYERS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("optimizer", pa.int16()),
        ("layer", pa.string()),  # module path, wrapper prefixes stripped; dictionary-encoded on disk
        ("norm", pa.float32()),  # pre-clip L2 norm of this tensor's gradient; NaN when it had no grad
        # pre-clip max |g| of this tensor's gradient, on steps clipped by value (the script's clip_grad_value_
        # or --clip-value); null otherwise. Added after the first release: older files read it as null.
        ("max_abs", pa.float32()),
    ]
)

TABLES = {"steps": STEPS_SCHEMA, "layers": LAYERS_SCHEMA}
#: Columns added since the first release: a writer may leave them out, a reader of an older file gets nulls.
OPTIONAL_COLUMNS = frozenset({"max_abs", "shard_sq", "whole_sq"})
#: The part files' schemas: the final ones, with ``layer`` as the dictionary the recorder builds
#: (what a reader asking for ``layer`` gets from the final file too: see :func:`read_final`).
LAYER_DICT = pa.dictionary(pa.int32(), pa.string())
PART_TABLES = {"steps": STEPS_SCHEMA,
               "layers": LAYERS_SCHEMA.set(LAYERS_SCHEMA.get_field_index("layer"), pa.field("layer", LAYER_DICT))}
PART_SUFFIX = ".arrow"
PART_SUFFIXES = (PART_SUFFIX, ".parquet")  # .parquet: parts written by gradscope 0.1.0
FILE_METADATA = {b"gradscope.schema_version": str(SCHEMA_VERSION).encode(), b"gradscope.format": FORMAT_NAME.encode()}
#: Rows per record batch of a part: compaction and the readers hold one batch of a part at a time, so a
#: part of a large model (a flush of 10,000 steps x 1,000 tensors) never has to fit in memory whole.
PART_BATCH_ROWS = 65_536
#: Rows per row group of a compacted file: compaction holds about one row group (as strings) and the
#: parquet writer's encoded copy of it; 128k rows keep that to a few MB and still read fast.
COMPACT_ROWS = 131_072


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` as ``schema`` (its columns, order and types): a column added to the schema after ``table``
    was written (an older run's file) comes back as nulls."""
    n = table.num_rows
    arrays = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


@contextlib.contextmanager
def system_pool() -> Iterator[None]:
    """Arrow allocations in this block from the C allocator, not pyarrow's default mimalloc pool: in the
    training process a flush's and compaction's buffers are then returned when freed, where mimalloc keeps
    ~15 MB more resident for the rest of the run (bench/edges.py). The script's own pyarrow use, before and
    after, keeps its default pool."""
    prior = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(prior)


def write_part(parts_dir: Path, kind: str, index: int, columns: dict[str, Any]) -> Path:
    """Write part ``index`` of ``kind`` from column arrays; it appears under its name only when closed."""
    with system_pool():
        return _write_part(parts_dir, kind, index, columns)


def _write_part(parts_dir: Path, kind: str, index: int, columns: dict[str, Any]) -> Path:
    schema = PART_TABLES[kind].with_metadata(FILE_METADATA)
    n = len(next(iter(columns.values()))) if columns else 0
    missing = {f.name: pa.nulls(n, f.type) for f in schema if f.name in OPTIONAL_COLUMNS and f.name not in columns}
    table = pa.Table.from_pydict({**columns, **missing}, schema=schema)
    final = parts_dir / f"{kind}-{index:06d}{PART_SUFFIX}"
    tmp = parts_dir / f".{final.name}.tmp"  # dot prefix: list_parts never lists it
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table, max_chunksize=PART_BATCH_ROWS)  # read back a batch at a time
        durable_replace(tmp, final)
    except BaseException:
        remove_quietly(tmp)  # a failed write (disk full, a file-size limit) leaves no temp file behind
        raise
    return final


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(tmp: Path, final: Path) -> None:
    """Rename the closed file ``tmp`` to ``final`` so that after a crash ``final`` is either absent or
    complete: the file is fsynced before the rename, its directory after it."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def remove_quietly(path: Path) -> None:
    """Delete ``path`` if it exists; an error deleting it is not worth another one."""
    try:
        path.unlink()
    except OSError:
        pass


def list_parts(parts_dir: Path, kind: str) -> list[Path]:
    """The closed part files of ``kind`` in write order (never the dot-prefixed ones being written)."""
    if not parts_dir.is_dir():
        return []
    return sorted(p for suffix in PART_SUFFIXES for p in parts_dir.glob(f"{kind}-*{suffix}"))


def read_part(path: Path, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
    """One part file's record batches (only ``columns`` when given), one batch in memory at a time: an
    Arrow part is read batch by batch from its footer, a parquet part (0.1.0) in batches of
    :data:`PART_BATCH_ROWS`. ParquetFile, not pq.read_table: the latter imports pyarrow.dataset and
    pandas (~50 MB) into the training process at exit. A column an older part lacks (added to the
    schema since) is left out here and made of nulls by the caller's :func:`conform`."""
    if path.suffix == PART_SUFFIX:
        with pa.OSFile(str(path), "rb") as source:
            reader = pa.ipc.open_file(source)
            keep = None if columns is None else [c for c in columns if c in reader.schema.names]
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                yield batch if keep is None else batch.select(keep)
        return
    handle = pq.ParquetFile(path)
    present = set(handle.schema_arrow.names)
    keep = [c for c in columns if c in present] if columns is not None else None
    yield from handle.iter_batches(batch_size=PART_BATCH_ROWS, columns=keep)


def part_rows(path: Path) -> int:
    """Rows in one part file, from its footer and record batch headers (the data is memory-mapped, not read)."""
    if path.suffix != PART_SUFFIX:
        return pq.read_metadata(path).num_rows
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def compact(parts: Sequence[Path], kind: str, final: Path) -> None:
    """Stream ``parts`` into the parquet file ``final``, a record batch at a time: memory stays at about
    one row group however long the run (bench/edges.py measures it); ``final`` appears only when complete."""
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        with system_pool():
            _stream(parts, kind, tmp)
        durable_replace(tmp, final)
    except BaseException:
        remove_quietly(tmp)
        raise


def _stream(parts: Sequence[Path], kind: str, path: Path) -> None:
    schema = TABLES[kind].with_metadata(FILE_METADATA)
    # Dictionary pages for the string columns only: for the float and step columns parquet would build a
    # dictionary of every distinct value per row group, then drop it (most of compaction's memory).
    strings = [f.name for f in schema if f.type == pa.string()]
    with pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=strings) as writer:
        pending: list[pa.RecordBatch] = []
        rows = 0
        for table in _readable(parts, kind, None, schema):  # the layer dictionary as strings; new columns as nulls
            pending += table.to_batches()
            rows += table.num_rows
            if rows >= COMPACT_ROWS:
                writer.write_table(pa.Table.from_batches(pending, schema))  # one row group, no concatenated copy
                pending, rows = [], 0
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema))


def final_rows(path: Path) -> int:
    """Rows in a compacted table, from its parquet footer."""
    return pq.read_metadata(path).num_rows


def _dict_cols(kind: str, cols: list[str] | None) -> list[str] | None:
    if kind == "layers" and (cols is None or "layer" in cols):
        return ["layer"]
    return None


def read_final(path: Path, kind: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A compacted table (only ``columns`` when given), ``layer`` as a dictionary as in the parts."""
    check_file_version(path)
    cols = list(columns) if columns is not None else None
    present = set(pq.read_schema(path).names)
    missing = [c for c in cols or TABLES[kind].names if c not in present]
    if missing:  # an older run's file: read what it has, the columns added since as nulls
        cols = [c for c in cols or TABLES[kind].names if c in present]
    table = pq.read_table(path, columns=cols, read_dictionary=_dict_cols(kind, cols))
    return _with_nulls(table, kind, columns) if missing else table


def _with_nulls(table: pa.Table, kind: str, columns: Sequence[str] | None) -> pa.Table:
    """``table`` with the columns of ``kind`` it lacks added as nulls, in the order asked (or the schema's);
    the columns it has keep their types (``layer`` stays a dictionary)."""
    schema = TABLES[kind]
    names = list(columns) if columns is not None else schema.names
    n = table.num_rows
    arrays = [table.column(c) if c in table.column_names else pa.nulls(n, schema.field(c).type) for c in names]
    return pa.Table.from_arrays(arrays, names=names)


def _selected(kind: str, columns: Sequence[str] | None) -> pa.Schema:
    schema = PART_TABLES[kind]
    return schema if columns is None else pa.schema([schema.field(c) for c in columns])


def read_parts(parts: Sequence[Path], kind: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The part files of ``kind`` as one Table, with the types :func:`read_final` gives."""
    selected = _selected(kind, columns)
    tables = list(_readable(parts, kind, columns, selected))
    return pa.concat_tables(tables) if tables else selected.empty_table()


_WARNED: set[Path] = set()  # unreadable parts already named on stderr by this process


def _readable(parts: Sequence[Path], kind: str, columns: Sequence[str] | None,
              schema: pa.Schema) -> Iterator[pa.Table]:
    """The record batches of each part of ``kind`` that reads, each as a Table conformed to ``schema``; an
    unreadable part (0 bytes, truncated, garbage: a crash or a power cut) is skipped with one warning
    naming it and the steps it held (from the first batch that does not read, in a part damaged inside)."""
    last_step: int | None = None
    for path in parts:
        try:
            for batch in read_part(path, columns):
                table = conform(pa.Table.from_batches([batch]), schema)
                if "step" in table.column_names and table.num_rows:
                    last_step = max(_max_step(table.column("step")), last_step if last_step is not None else -1)
                yield table
        except (OSError, pa.ArrowException, ValueError, KeyError) as exc:
            _warn_unreadable(path, kind, last_step, exc)


def _max_step(column: pa.ChunkedArray) -> int:
    """The largest value of an int64 column, from its buffers: ``to_numpy`` (of an Array or a ChunkedArray)
    imports pandas, ~35 MB that the training process would hold from compaction on."""
    return max(int(np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset:chunk.offset + len(chunk)].max())
               for chunk in column.chunks if len(chunk))


def _warn_unreadable(path: Path, kind: str, last_step: int | None, exc: Exception) -> None:
    if path in _WARNED:
        return
    _WARNED.add(path)
    held = f"the {kind} rows recorded after step {last_step}" if last_step is not None else f"its {kind} rows"
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"gradscope: warning: skipped the unreadable part file {path} ({reason}); the run lacks {held} "
          "up to the next readable part", file=sys.stderr)


def iter_batches(paths: Sequence[Path], kind: str, columns: Sequence[str] | None,
                 batch_size: int) -> Iterator[pa.RecordBatch]:
    """Record batches of a compacted table or of part files, without holding the whole table."""
    cols = list(columns) if columns is not None else None
    for path in paths:
        if path.suffix == PART_SUFFIX:  # a part: one flush's rows, small
            for part in _readable([path], kind, cols, _selected(kind, cols)):
                yield from part.to_batches(max_chunksize=batch_size)
            continue
        # pre_buffer=False: pyarrow would otherwise load every requested column of the file up front.
        handle = pq.ParquetFile(path, read_dictionary=_dict_cols(kind, cols), pre_buffer=False)
        present = set(handle.schema_arrow.names)
        wanted = cols if cols is not None else TABLES[kind].names
        if all(c in present for c in wanted):
            yield from handle.iter_batches(batch_size=batch_size, columns=cols)
            continue
        for batch in handle.iter_batches(batch_size=batch_size, columns=[c for c in wanted if c in present]):
            yield from _with_nulls(pa.Table.from_batches([batch]), kind, wanted).to_batches()  # an older run's file


def check_file_version(path: Path) -> None:
    """Refuse a parquet file that gradscope did not write, or that a newer schema wrote."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise RunFormatError(f"{path} is not a readable parquet file: {exc}") from None
    if metadata.get(b"gradscope.format") != FORMAT_NAME.encode():
        raise RunFormatError(f"{path} is not a gradscope file (no gradscope schema metadata)")
    raw = metadata.get(b"gradscope.schema_version", b"")
    check_version(path, int(raw) if raw.isdigit() else None, "a newer version")
