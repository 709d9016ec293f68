"""``gradscope export``: a run's recorded series as TensorBoard scalars, or its tables as CSV.

TensorBoard: one event file per optimizer, in ``DIR/<run id>/optimizer-<k>-<class>/``, so each
optimizer is a run of its own in TensorBoard's run selector and the same tag of two optimizers
shares a chart. Tags: ``gradscope/grad_norm``, ``gradscope/applied_norm``,
``gradscope/clip_coef``, ``gradscope/loss``, ``gradscope/lr`` and, one tag group for every layer,
``gradscope_layers/<layer name>``. Each step is one event whose step is the optimizer step and whose
wall time is the run's start plus the step's ``time_s``. Null values are left out; inf and NaN are
written as they are. The events are written with tensorboard's own writer (``tensorboard`` is an
optional extra: ``pip install 'gradscope[tensorboard]'``), never through torch: reporters do not
import torch.

CSV: ``DIR/steps.csv`` and ``DIR/layers.csv``, the two tables with every column, the layers table
streamed batch by batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from gradscope.errors import GradscopeError
from gradscope.store import Run

STEP_TAGS = ("grad_norm", "applied_norm", "clip_coef", "loss", "lr")
STEP_GROUP = "gradscope"
LAYER_GROUP = "gradscope_layers"
INSTALL_HINT = "pip install 'gradscope[tensorboard]'"


def _tensorboard() -> tuple[Any, Any, Any]:
    """tensorboard's writer, Event and Summary; a missing tensorboard is one line naming the extra."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise GradscopeError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}") from None
    return EventFileWriter, Event, Summary


def optimizer_dir(run: Run, k: int) -> str:
    """The folder name of optimizer ``k``'s events: ``optimizer-0-Adam``."""
    name = next((o.class_name for o in run.meta.optimizers if o.index == k), "")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"optimizer-{k}-{name}" if name else f"optimizer-{k}")


def _start_epoch(run: Run) -> float:
    try:
        return datetime.fromisoformat(str(run.meta.start_time).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def export_tensorboard(run: Run, logdir: Path) -> list[Path]:
    """Write the run's series as TensorBoard scalars under ``logdir/<run id>/``; returns the folders written.

    Raises:
        GradscopeError: tensorboard is not installed, or the folder cannot be written.
    """
    writer_cls, event_cls, summary_cls = _tensorboard()
    steps = run.read_table("steps", ["step", "optimizer", "time_s", *STEP_TAGS])
    optimizer = steps.column("optimizer").to_numpy()
    start, writers = _start_epoch(run), {}
    try:
        for k in (int(k) for k in np.unique(optimizer)):
            folder = logdir / run.id / optimizer_dir(run, k)
            folder.mkdir(parents=True, exist_ok=True)
            writers[k] = writer_cls(str(folder))
        times = _step_times(steps, start)
        for k, step, values in _step_rows(steps):
            event = event_cls(wall_time=times[(k, step)], step=step, summary=summary_cls(value=[
                summary_cls.Value(tag=f"{STEP_GROUP}/{tag}", simple_value=v) for tag, v in values]))
            writers[k].add_event(event)
        for k, step, values in _layer_rows(run):
            event = event_cls(wall_time=times.get((k, step), start), step=step, summary=summary_cls(value=[
                summary_cls.Value(tag=f"{LAYER_GROUP}/{name}", simple_value=v) for name, v in values]))
            writers[k].add_event(event)
    except OSError as exc:
        raise GradscopeError(f"cannot write TensorBoard events under {logdir}: {exc.strerror or exc}") from None
    finally:
        for writer in writers.values():
            writer.close()
    return [logdir / run.id / optimizer_dir(run, k) for k in writers]


def _step_times(steps: pa.Table, start: float) -> dict[tuple[int, int], float]:
    keys = zip(steps.column("optimizer").to_pylist(), steps.column("step").to_pylist(), strict=True)
    return {(k, s): start + (t or 0.0) for (k, s), t in zip(keys, steps.column("time_s").to_pylist(), strict=True)}


def _step_rows(steps: pa.Table) -> Iterator[tuple[int, int, list[tuple[str, float]]]]:
    columns = {name: steps.column(name).to_pylist() for name in ("optimizer", "step", *STEP_TAGS)}
    for i in range(steps.num_rows):
        values = [(tag, columns[tag][i]) for tag in STEP_TAGS if columns[tag][i] is not None]
        yield columns["optimizer"][i], columns["step"][i], values


def _layer_rows(run: Run) -> Iterator[tuple[int, int, list[tuple[str, float]]]]:
    """(optimizer, step, [(layer, norm)]) for each step of each batch of the layers table, streamed."""
    for batch in run.iter_batches("layers", ["step", "optimizer", "layer", "norm"]):
        step, optimizer = batch.column(0).to_numpy(), batch.column(1).to_numpy()
        layer, norm = batch.column(2).to_pylist(), batch.column(3).to_pylist()
        order = np.lexsort((step, optimizer))
        keys = np.stack([optimizer[order], step[order]], axis=1)
        cuts = np.flatnonzero((np.diff(keys, axis=0) != 0).any(axis=1)) + 1
        for group in np.split(order, cuts):
            values = [(layer[i], norm[i]) for i in group if norm[i] is not None]
            yield int(optimizer[group[0]]), int(step[group[0]]), values


def export_csv(run: Run, folder: Path) -> list[Path]:
    """Write ``steps.csv`` and ``layers.csv`` into ``folder``; returns their paths.

    Raises:
        GradscopeError: the folder cannot be written.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for kind in ("steps", "layers"):
            path = folder / f"{kind}.csv"
            _write_csv(path, lambda kind=kind: run.iter_batches(kind))
            written.append(path)
    except OSError as exc:
        raise GradscopeError(f"cannot write CSV files in {folder}: {exc.strerror or exc}") from None
    return written


def _write_csv(path: Path, batches: Callable[[], Iterator[pa.RecordBatch]]) -> None:
    writer = None
    try:
        for batch in batches():
            plain = pa.RecordBatch.from_arrays(  # the layer names as text: CSV has no dictionaries
                [c.cast(pa.string()) if pa.types.is_dictionary(c.type) else c for c in batch.columns],
                names=batch.schema.names)
            if writer is None:
                writer = pacsv.CSVWriter(str(path), plain.schema)
            writer.write_batch(plain)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        path.write_text("", encoding="utf-8")


def export_command(ref: str | None, runs_dir: Path | None, tensorboard: Path | None, csv: Path | None) -> None:
    """``gradscope export``: the formats asked for, each file or folder written named on stdout."""
    from gradscope import store
    from gradscope.errors import UsageError

    if tensorboard is None and csv is None:
        raise UsageError("export needs --tensorboard DIR, --csv DIR, or both")
    for option, path in (("--tensorboard", tensorboard), ("--csv", csv)):
        if path is not None and path.exists() and not path.is_dir():
            raise UsageError(f"{option} {path}: a file is there; give a directory")
    run = store.load_run(ref, runs_dir)
    written = export_tensorboard(run, tensorboard) if tensorboard is not None else []
    written += export_csv(run, csv) if csv is not None else []
    for path in written:
        print(f"wrote {path}")
