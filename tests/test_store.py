"""The run directory: round trip, compaction, crash fallback, and refusal of foreign or newer files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradscope import store
from gradscope.cli import main
from gradscope.errors import RunFormatError, RunNotFoundError
from gradscope.store.meta import MetaFieldError


def _steps(start: int, n: int) -> dict[str, list]:
    steps = list(range(start, start + n))
    return {
        "step": steps, "optimizer": [0] * n, "grad_norm": [float(s) + 0.5 for s in steps],
        "applied_norm": [float(s) + 0.5 for s in steps], "max_norm": [None] * n, "clip_source": ["none"] * n,
        "clip_coef": [1.0] * n, "loss": [None if s == 1 else 1.0 / (s + 1) for s in steps], "n_backward": [1] * n,
        "lr": [0.1] * n, "loss_scale": [None] * n, "skipped": [False] * n, "nonfinite": [False] * n,
        "time_s": [0.01 * s for s in steps],
    }


def _layers(start: int, n: int, names: list[str]) -> dict[str, list]:
    rows = [(s, name, float(s * 10 + i)) for s in range(start, start + n) for i, name in enumerate(names)]
    return {"step": [r[0] for r in rows], "optimizer": [0] * len(rows), "layer": [r[1] for r in rows],
            "norm": [r[2] for r in rows]}


def _write_run(root: Path, parts: int = 3, per_part: int = 4, compact: bool = True) -> Path:
    run_dir = store.create_run_dir(root, "synthetic")
    store.write_meta(run_dir, store.RunMeta(status="complete" if compact else "running", pid=2**22 + 12345, host="elsewhere"))
    writer = store.RunWriter(run_dir)
    for k in range(parts):
        writer.write_part("steps", _steps(k * per_part, per_part))
        writer.write_part("layers", _layers(k * per_part, per_part, ["a.weight", "b.bias"]))
    if compact:
        writer.compact()
    store.point_latest(root, run_dir)
    return run_dir


def test_round_trip_after_compaction(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path)
    assert not (run_dir / "parts").exists()
    run = store.load_run(runs_dir=tmp_path)  # via `latest`
    assert run.path == run_dir.resolve() and run.complete and run.status == "complete"
    assert list(run.steps["step"]) == list(range(12))
    assert math.isnan(run.steps["loss"][1]) and run.steps["loss"][2] == pytest.approx(1 / 3)
    layers = run.layers
    assert len(layers) == 24 and str(layers["layer"].dtype) == "category"
    expected = np.array([s * 10 + i for s in range(12) for i in range(2)], dtype=np.float32)
    np.testing.assert_array_equal(layers["norm"].to_numpy(), expected)
    schema = pq.read_schema(run_dir / "layers.parquet")
    assert schema.metadata[b"gradscope.schema_version"] == str(store.SCHEMA_VERSION).encode()


def test_killed_run_reads_its_parts(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path, compact=False)
    (run_dir / "parts" / ".steps-000009.arrow.tmp").write_bytes(b"ARROW1 half written")  # never listed
    run = store.load_run(run_dir)
    assert not run.complete and run.status == "killed"  # "running", but its pid is not alive
    assert list(run.steps["step"]) == list(range(12))
    assert run.read_table("layers", ["norm"]).num_rows == 24
    assert sum(b.num_rows for b in run.iter_batches("steps", ["grad_norm"])) == 12
    layers = run.layers  # the parts hold `layer` as a dictionary: the same frame as after compaction
    assert str(layers["layer"].dtype) == "category" and list(layers["layer"][:4]) == ["a.weight", "b.bias"] * 2
    assert sorted(p.suffix for p in (run_dir / "parts").iterdir() if not p.name.startswith(".")) == [".arrow"] * 6


def test_parquet_parts_of_gradscope_0_1_0_are_still_read(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path, compact=False)
    for part in sorted((run_dir / "parts").glob("*.arrow")):  # rewrite each part as 0.1.0 wrote it
        kind = part.name.split("-")[0]
        with pa.OSFile(str(part), "rb") as source:
            data = pa.ipc.open_file(source).read_all().cast(store.TABLES[kind])
        pq.write_table(data, part.with_suffix(".parquet"))
        part.unlink()
    run = store.load_run(run_dir)
    assert list(run.steps["step"]) == list(range(12)) and len(run.layers) == 24
    assert str(run.layers["layer"].dtype) == "category"
    store.RunWriter(run_dir).compact()  # and they compact like .arrow parts
    compacted = store.load_run(run_dir)
    assert compacted.compacted and list(compacted.layers["norm"]) == list(run.layers["norm"])


def test_run_references(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path)
    assert store.resolve_run(run_dir.name, tmp_path) == run_dir.resolve()
    assert store.resolve_run(run_dir / "steps.parquet", tmp_path) == run_dir.resolve()
    with pytest.raises(RunNotFoundError, match="no run named nope"):
        store.resolve_run("nope", tmp_path)
    with pytest.raises(RunNotFoundError, match="no runs yet"):
        store.resolve_run(None, tmp_path / "empty")
    not_a_run = tmp_path / "plain_dir"
    not_a_run.mkdir()
    with pytest.raises(RunFormatError, match="has no meta.json"):
        store.resolve_run(not_a_run, tmp_path)


def test_newer_schema_is_refused_naming_both_versions(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path)
    meta = json.loads((run_dir / "meta.json").read_text())
    meta.update(schema_version=store.SCHEMA_VERSION + 1, gradscope_version="9.0.0")
    (run_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RunFormatError) as err:
        store.load_run(run_dir)
    assert f"schema {store.SCHEMA_VERSION + 1}" in err.value.message
    assert f"reads schema {store.SCHEMA_VERSION} and older" in err.value.message
    assert "gradscope 9.0.0" in err.value.message


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"name": "wandb-run"}))
    with pytest.raises(RunFormatError, match="is not a gradscope run file"):
        store.load_run(foreign)
    (foreign / "meta.json").write_text("not json {")
    with pytest.raises(RunFormatError, match="is not a gradscope run file"):
        store.load_run(foreign)
    run_dir = _write_run(tmp_path / "runs")
    pq.write_table(pa.table({"x": [1]}), run_dir / "steps.parquet")  # a parquet file, but not ours
    with pytest.raises(RunFormatError, match="is not a gradscope file"):
        store.load_run(run_dir).read_table("steps")


def test_forked_child_never_writes(tmp_path: Path) -> None:
    run_dir = store.create_run_dir(tmp_path, "fork")
    writer = store.RunWriter(run_dir)
    pid = os.fork()
    if pid == 0:  # the child inherits the writer, as a DataLoader worker does
        writer.write_part("steps", _steps(0, 1))
        writer.compact()
        os._exit(0)
    os.waitpid(pid, 0)
    assert list((run_dir / "parts").iterdir()) == []
    assert not (run_dir / "steps.parquet").exists()


def test_load_run_does_not_import_torch(tmp_path: Path) -> None:
    _write_run(tmp_path)
    code = (
        "import sys, gradscope; run = gradscope.load_run(runs_dir=sys.argv[1]); run.steps; run.layers; "
        "print(len(run.steps), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["12", "False"]


# --------------------------------------------------------------------------------------------------
# meta.json: typed, checked on read
# --------------------------------------------------------------------------------------------------

#: meta.json exactly as gradscope 0.1.0 wrote it for `gradscope profile train.py --lr 0.1`.
META_0_1_0 = {
    "format": "gradscope-run", "schema_version": 1, "gradscope_version": "0.1.0", "torch_version": "2.5.1+cpu",
    "python_version": "3.12.3", "run_id": "train-20260101-120000", "label": "train",
    "target": "train.py", "as_module": False, "script_path": "/home/u/proj/train.py", "script_sha256": "ab" * 32,
    "argv": ["train.py", "--lr", "0.1"], "script_args": ["--lr", "0.1"], "cwd": "/home/u/proj",
    "command": ["gradscope", "profile", "train.py", "--lr", "0.1"],
    "seed": 0, "seeds_seen": [0], "norm_type": 2.0,
    "clipping": {"script_max_norm": 1.0, "script_clip_function": "clip_grad_norm_", "script_clip_calls": 40,
                 "injected_max_norm": None, "script_clip_disabled": False},
    "optimizers": [{"index": 0, "class": "AdamW", "n_tensors": 2, "names": ["fc.weight", "fc.bias"],
                    "shapes": [[1, 4], [1]], "aliases": {"fc.weight": ["head.weight"]}}],
    "flush_every": 200, "start_time": "2026-01-01T12:00:00+00:00", "end_time": "2026-01-01T12:01:00+00:00",
    "status": "complete", "exit_code": 0, "error": None, "n_steps": 40, "host": "box", "pid": 4242,
}


def _with_meta(root: Path, meta: dict) -> Path:
    run_dir = store.create_run_dir(root, "meta")
    (run_dir / "meta.json").write_text(json.dumps(meta))
    return run_dir


def test_meta_of_gradscope_0_1_0_reads_typed_and_writes_back_the_same(tmp_path: Path) -> None:
    run_dir = _with_meta(tmp_path, META_0_1_0)
    meta = store.load_run(run_dir).meta
    assert isinstance(meta, store.RunMeta) and meta.status == "complete" and meta.seed == 0
    assert meta.provenance is not None and meta.provenance.argv == ("train.py", "--lr", "0.1")
    assert meta.provenance.cwd == "/home/u/proj" and meta.clipping.script_max_norm == 1.0
    optimizer = meta.optimizers[0]
    assert (optimizer.index, optimizer.class_name, optimizer.n_tensors) == (0, "AdamW", 2)
    assert optimizer.shapes == ((1, 4), (1,)) and optimizer.aliases == {"fc.weight": ("head.weight",)}
    assert meta.to_json() == META_0_1_0  # same keys, same values, same order
    assert list(meta.to_json()) == list(META_0_1_0)
    assert meta.clipping.script_clip_calls == 40 and meta.error is None
    store.write_meta(run_dir, meta)  # a RunMeta is written as is
    assert json.loads((run_dir / "meta.json").read_text()) == META_0_1_0


def test_meta_without_provenance_or_with_unknown_keys(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path)  # written by the store API with three keys
    meta = store.read_meta(run_dir)
    assert meta.provenance is None and meta.optimizers == () and meta.clipping == store.Clipping()
    assert meta.pid == 2**22 + 12345 and meta.norm_type == 2.0
    store.write_meta(run_dir, replace(meta, extra={"note": {"by": "another tool"}}))
    again = store.read_meta(run_dir)
    assert again.extra == {"note": {"by": "another tool"}} and again.to_json()["note"] == {"by": "another tool"}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("seed", "3", 'meta.json field seed must be an integer or null, not "3"'),
    ("pid", True, "meta.json field pid must be an integer or null, not true"),
    ("norm_type", "2", 'meta.json field norm_type must be a number, not "2"'),
    ("status", "paused", 'meta.json field status must be one of running, complete, failed, interrupted, not "paused"'),
    ("status", None, "meta.json field status is missing"),
    ("argv", "train.py", 'meta.json field argv must be a list of strings, not "train.py"'),
    ("clipping", [], "meta.json field clipping must be an object, not []"),
    ("optimizers", [{"index": 0}], "meta.json field optimizers[0].class is missing"),
    ("optimizers", [{"index": 0, "class": "SGD", "shapes": [[2, 2.5]]}],
     "meta.json field optimizers[0].shapes must be a list of shapes (lists of integers), not [[2, 2.5]]"),
])
def test_bad_meta_field_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str,
                                              value: object, message: str) -> None:
    meta = {k: v for k, v in META_0_1_0.items() if not (k == field and value is None)}
    if value is not None:
        meta[field] = value
    run_dir = _with_meta(tmp_path, meta)
    with pytest.raises(RunFormatError) as err:
        store.load_run(run_dir)
    assert err.value.message == f"{run_dir} is not a gradscope run: {message}"
    assert main(["compare", str(run_dir), "--max-norm", "1"]) == 1  # through the CLI: one line, exit 1
    assert capsys.readouterr().err.splitlines() == [f"gradscope: {run_dir} is not a gradscope run: {message}"]


def test_write_meta_refuses_a_field_that_would_not_read_back(tmp_path: Path) -> None:
    run_dir = store.create_run_dir(tmp_path, "bad")
    with pytest.raises(MetaFieldError, match="meta.json field exit_code must be an integer or null"):
        store.write_meta(run_dir, store.RunMeta(status="complete", exit_code="0"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes a RunMeta"):
        store.write_meta(run_dir, {"status": "complete"})  # type: ignore[arg-type]
    assert not (run_dir / "meta.json").exists()


# --------------------------------------------------------------------------------------------------
# Counting the steps of a running run
# --------------------------------------------------------------------------------------------------


def test_count_steps_while_running_and_after_compaction(tmp_path: Path) -> None:
    run_dir = store.create_run_dir(tmp_path, "count")
    assert store.count_steps(run_dir) == 0
    writer = store.RunWriter(run_dir)
    counter = store.StepCounter(run_dir)
    writer.write_part("steps", _steps(0, 4))
    writer.write_part("layers", _layers(0, 4, ["a"]))  # other tables never count
    assert counter.count() == 4
    (run_dir / "parts" / ".steps-000009.arrow.tmp").write_bytes(b"ARROW1 half written")  # never read
    writer.write_part("steps", _steps(4, 3))
    assert counter.count() == 7 and store.count_steps(run_dir) == 7
    writer.compact()
    assert counter.count() == 7  # from the final file, once the parts are gone


def test_count_steps_reads_parquet_parts_of_gradscope_0_1_0(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path, compact=False)
    for part in sorted((run_dir / "parts").glob("steps-*.arrow")):
        with pa.OSFile(str(part), "rb") as source:
            pq.write_table(pa.ipc.open_file(source).read_all(), part.with_suffix(".parquet"))
        part.unlink()
    assert store.count_steps(run_dir) == 12


# --------------------------------------------------------------------------------------------------
# Added since the first release: the layers' max_abs column and optional meta.json keys
# --------------------------------------------------------------------------------------------------


def _drop_max_abs(path: Path) -> None:
    """Rewrite a layers file as a reader of the first release's schema left it: no max_abs column."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["max_abs"]).replace_schema_metadata(table.schema.metadata), path)
        return
    with pa.OSFile(str(path), "rb") as source:
        table = pa.ipc.open_file(source).read_all().drop_columns(["max_abs"])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize("compact", [True, False])
def test_layers_without_max_abs_read_it_as_null(tmp_path: Path, compact: bool) -> None:
    """A run recorded before the column existed (compacted, or killed with its parts) reads max_abs as null,
    whichever reader asks: the frame, read_table with or without columns, iter_batches, compaction."""
    run_dir = _write_run(tmp_path, compact=compact)
    for path in [run_dir / "layers.parquet"] if compact else sorted((run_dir / "parts").glob("layers-*.arrow")):
        _drop_max_abs(path)
    run = store.load_run(run_dir)
    assert run.layers["max_abs"].isna().all() and len(run.layers) == 24
    assert run.read_table("layers").column_names == [*store.LAYERS_SCHEMA.names, "rank"]
    table = run.read_table("layers", ["max_abs", "norm"])
    assert table.column_names == ["max_abs", "norm"] and table.column("max_abs").null_count == 24
    batches = list(run.iter_batches("layers", ["step", "max_abs"]))
    assert sum(b.num_rows for b in batches) == 24 and all(b.column(1).null_count == b.num_rows for b in batches)
    if not compact:
        store.RunWriter(run_dir).compact()
        assert store.load_run(run_dir).read_table("layers", ["max_abs"]).column(0).null_count == 24


def test_max_abs_round_trips_with_its_nulls(tmp_path: Path) -> None:
    run_dir = store.create_run_dir(tmp_path, "peaks")
    store.write_meta(run_dir, store.RunMeta(status="complete"))
    writer = store.RunWriter(run_dir)
    layers = _layers(0, 2, ["a.weight", "b.bias"])
    writer.write_part("layers", {**layers, "max_abs": pa.array([0.5, 0.25, None, None], pa.float32())})
    writer.write_part("steps", _steps(0, 2))
    writer.compact()
    frame = store.load_run(run_dir).layers
    assert list(frame["max_abs"][:2]) == [0.5, 0.25] and frame["max_abs"][2:].isna().all()


def test_meta_added_keys_round_trip_and_are_checked(tmp_path: Path) -> None:
    """executable/launcher, clipping's injection keys and n_evaluations: read as written; a 0.1.0 meta.json
    has their defaults; a wrong type is refused naming the field."""
    old = store.load_run(_with_meta(tmp_path, META_0_1_0)).meta
    assert old.provenance is not None and old.provenance.executable is None and old.provenance.launcher is None
    assert old.clipping.injection is None and old.clipping.injected_max_norms == () and old.optimizers[0].n_evaluations == 0
    added = {**META_0_1_0, "executable": "/venv/bin/python", "launcher": "python -m gradscope",
             "clipping": {**META_0_1_0["clipping"], "injected_max_norms": [1.0, None], "injected_clip_value": 0.5,
                          "script_clip_value": 0.1, "injection": "not injected: a reason"},
             "optimizers": [{**META_0_1_0["optimizers"][0], "n_evaluations": 12}]}
    meta = store.load_run(_with_meta(tmp_path, added)).meta
    assert meta.provenance.executable == "/venv/bin/python" and meta.provenance.launcher == "python -m gradscope"
    assert meta.clipping.injected_max_norms == (1.0, None) and meta.clipping.injection == "not injected: a reason"
    assert meta.clipping.script_clip_value == 0.1 and meta.optimizers[0].n_evaluations == 12
    assert meta.to_json() == added
    bad = {**META_0_1_0, "clipping": {**META_0_1_0["clipping"], "injected_max_norms": ["1"]}}
    with pytest.raises(RunFormatError, match='field clipping.injected_max_norms must be a list of numbers or nulls'):
        store.load_run(_with_meta(tmp_path, bad))
