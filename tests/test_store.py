"""The run directory: round trip, compaction, crash fallback, and refusal of foreign or newer files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradscope import store
from gradscope.errors import RunFormatError, RunNotFoundError


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
    store.write_meta(run_dir, {"status": "complete" if compact else "running", "pid": 2**22 + 12345, "host": "elsewhere"})
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
