"""Ranks the script starts itself are recorded: torch.multiprocessing.spawn, Lightning's ddp and ddp_spawn,
torchrun run under ``gradscope profile``; DataLoader workers and non-torch Python children are not, and
see what they would see under python.

Each job is read through the job reader (one run, a ``rank`` column).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import SCRIPTS, Profiled, assert_exit_ok, clean_env, parse_refs, run_profile

import gradscope


def per_rank(run_dir: Path) -> dict[int, Any]:
    """Each rank's steps of the job in ``run_dir`` (read through the job reader), by rank."""
    run = gradscope.load_run(run_dir)
    steps = run.steps
    return {int(rank): rows.sort_values("step") for rank, rows in steps.groupby("rank")} if run.ranks else {}


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run_dir(runs_dir: Path) -> Path:
    dirs = [p for p in runs_dir.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="module")
def spawn_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Profiled, Path]:
    runs = tmp_path_factory.mktemp("spawn")
    profiled = run_profile("ddp_spawn.py", "4", _free_port(), runs_dir=runs)
    return profiled, _run_dir(runs)


def test_mp_spawn_ranks_record_the_norms_clip_grad_norm_returned(spawn_job: tuple[Profiled, Path]) -> None:
    profiled, run_dir = spawn_job
    ranks = per_rank(run_dir)
    assert sorted(ranks) == [0, 1]
    for rank, steps in ranks.items():
        refs = [r["norm"] for r in profiled.ref("ddp") if r["rank"] == rank]
        norms = steps["grad_norm"].tolist()
        assert len(refs) == len(norms) == 4
        assert norms == pytest.approx(refs, rel=1e-4)
    assert gradscope.load_run(run_dir).status == "complete"


def test_workers_and_non_torch_children_are_left_as_under_python(tmp_path: Path) -> None:
    other = tmp_path / "other_site"  # a sitecustomize further on the path (Debian ships one): it still runs
    other.mkdir()
    (other / "sitecustomize.py").write_text("import sys\nsys.path.append('/other-sitecustomize-ran')\n")
    env = {"PYTHONPATH": f"{Path(gradscope.__file__).parents[1]}:{other}"}
    plain = subprocess.run([sys.executable, "dl_spawn_child.py", "3"], cwd=SCRIPTS, env=clean_env(env),
                           capture_output=True, text=True, timeout=300)
    profiled = run_profile("dl_spawn_child.py", "3", runs_dir=tmp_path / "runs", env=env, check=False)
    assert plain.returncode == profiled.proc.returncode == 3, profiled.proc.stderr[-3000:]
    assert profiled.proc.stdout == plain.stdout
    assert "/other-sitecustomize-ran'] " in plain.stdout  # the child ran it, and printed python's sys.path
    run_dir = _run_dir(tmp_path / "runs")
    run = gradscope.load_run(run_dir)
    assert run.ranks == () and len(run.steps) == 3  # the script's own steps
    assert not (run_dir / "ranks").exists()  # the spawn workers wrote nothing


def test_torchrun_under_profile_records_both_ranks(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "gradscope", "profile", "--runs-dir", str(tmp_path), "-m", "torch.distributed.run",
            "--standalone", "--nproc-per-node", "2", "ddp_torchrun.py", "1", "3", "--ref"]
    proc = subprocess.run(argv, cwd=SCRIPTS, env=clean_env({"SNAPSHOT_DIR": str(tmp_path)}), capture_output=True,
                          text=True, timeout=300)
    assert_exit_ok(proc)
    ranks = per_rank(_run_dir(tmp_path))
    assert sorted(ranks) == [0, 1]
    for rank, steps in ranks.items():
        refs = [r["norm"] for r in parse_refs(proc.stdout) if r["rank"] == rank]
        assert steps["grad_norm"].tolist() == pytest.approx(refs, rel=1e-4)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_lightning_ranks_are_recorded(strategy: str, tmp_path: Path) -> None:
    run_profile("lightning_ddp.py", strategy, "4", runs_dir=tmp_path, timeout=600)
    ranks = per_rank(_run_dir(tmp_path))
    assert sorted(ranks) == [0, 1]  # rank 0 is the profiled process itself under strategy="ddp"
    assert all(len(steps) == 4 for steps in ranks.values())
