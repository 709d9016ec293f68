"""The benchmark harness runs and prints every row: ``bench/run.py --quick`` (tiny sizes, 2 rounds).

Nothing here asserts a time or a ratio: on a shared CI machine they are noise. The structure is what
is checked: every workload x variant row in the table and in the JSON, the memory section's two
arms, the targets block, and the sections that report a missing input instead of failing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

from overhead import VARIANTS  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADSCOPE_")}
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.timeout(600)
def test_table_has_every_workload_and_variant(quick: tuple[str, dict]) -> None:
    stdout, report = quick
    lines = stdout.splitlines()
    for name, make in WORKLOADS.items():
        title = make(True).title
        start = next(i for i, line in enumerate(lines) if line.startswith(title))
        block = lines[start:start + len(VARIANTS)]
        for variant, line in zip(VARIANTS, block, strict=True):
            assert variant.label in line, (name, variant.name, line)
            assert "(" in line and "…" in line  # median (min–max) of ratio and added µs
    assert [s["workload"] for s in report["overhead"]] == list(WORKLOADS)
    for summary in report["overhead"]:
        assert list(summary["variants"]) == [v.name for v in VARIANTS]
        for v in summary["variants"].values():
            assert {"ratio_median", "ratio_min", "ratio_max", "added_us_median", "added_us_min", "added_us_max"} <= set(v)
            assert v["ratio_min"] <= v["ratio_median"] <= v["ratio_max"]
        assert summary["variants"]["plain"]["ratio_median"] == 1.0
        for name, v in summary["variants"].items():  # CPU: every added variant timed inside and after backward
            if name != "plain":
                assert v["inside_us_min"] <= v["inside_us_median"] <= v["inside_us_max"]
                assert v["after_us_min"] <= v["after_us_median"] <= v["after_us_max"]
        assert summary["flush_us_per_step"] is not None and summary["part_rows"] >= 100
        assert {"start", "first_step_extra", "stop"} <= set(summary["recorder_fixed_ms"])
        assert summary["timer_us"]["hooks"] > 0 and summary["timer_us"]["call"] > 0  # subtracted from inside
        assert all(len(rounds) == summary["rounds"] for rounds in summary["per_round_s"].values())


@pytest.mark.timeout(600)
def test_other_sections_report(quick: tuple[str, dict]) -> None:
    stdout, report = quick
    mem = report["memory"]
    assert mem["gradscope"]["recorded_steps"] >= mem["gradscope"]["steps"]
    assert mem["gradscope"]["part_files"] >= 0 and mem["plain"]["recorded_steps"] is None
    assert len(mem["gradscope"]["samples"]) >= 20
    assert "Memory:" in stdout and "End to end on" in stdout and "Targets (printed, never asserted)" in stdout
    for row in report["e2e"]:
        if "skipped" in row:
            assert f"{row['script']}" in stdout and "skipped" in stdout
        else:
            assert row["exit_codes"] == {"python": [0], "profile": [0]}
    if not report["gpu"]["available"]:
        assert "no CUDA device" in stdout
    if (BENCH / "bench_recommend.py").is_file():
        assert report["recommend_exit_code"] == 0
    assert report["report_exit_code"] == 0


def test_ranks_section_times_both_tables(quick: tuple[str, dict]) -> None:
    stdout, report = quick
    assert "Ranks: join_ranks" in stdout
    assert [row[0] for row in report["ranks"]] == ["steps", "layers"]
    assert [row[5] for row in report["ranks"]] == [2 * 2000, 2 * 2000 * 5]  # every rank's rows, joined


def test_dist_section_times_a_profiled_ddp_job(quick: tuple[str, dict]) -> None:
    stdout, report = quick
    assert "Distributed: per-rank step time" in stdout
    [row] = report["dist"]
    assert row["nproc"] == 2 and row["plain_us"] > 0 and row["gradscope_us"] > 0


def test_edges_section_reports_startup_tiny_steps_and_compaction(quick: tuple[str, dict]) -> None:
    """bench/edges.py: both start-up scripts, the tiny-step run and the two compactions, printed and in the JSON."""
    stdout, report = quick
    edges = report["edges"]
    assert list(edges["startup"]) == ["imports torch", "one optimizer step"]
    for pair in [*edges["startup"].values(), edges["tiny"]]:
        assert pair["exit_codes"] == {"python": [0], "profile": [0]}  # --quick: one pair each
        assert {"added_s", "added_mb", "wall_ratio"} <= set(pair)
    assert edges["tiny"]["steps"] == 2000
    for run in (edges["tiny_compaction"], edges["compaction"]):
        assert run["parts"] >= 1 and run["seconds"] > 0 and "peak_added_mb" in run
    assert "start-up, script that only imports torch" in stdout and "compaction of 2,000 steps x 5 layers" in stdout
    assert "start-up added (one optimizer step)" in stdout  # its row in the targets block
