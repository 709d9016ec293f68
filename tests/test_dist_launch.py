"""Distributed jobs on CPU (gloo, 2 ranks), launched by `profile --nproc-per-node` and by `torchrun -m gradscope`
(`profile -m torch.distributed.run`: tests/test_children.py): one run per job, a
row per rank per step, and each rank's grad_norm equal to what clip_grad_norm_ returned on that rank."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GRADSCOPE, SCRIPTS, assert_exit_ok, clean_env, parse_refs

import gradscope

STEPS = 6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _launch(how: str, runs: Path, *script_args: str) -> subprocess.CompletedProcess[str]:
    script = ["dist_ddp.py", *script_args]
    argv = {
        "nproc": [*GRADSCOPE, "profile", "--runs-dir", str(runs), "--nproc-per-node", "2", "--standalone", *script],
        "module": [*GRADSCOPE, "profile", "--runs-dir", str(runs), "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", "2", *script],
        "torchrun": [*TORCHRUN, "-m", "gradscope", "profile", "--runs-dir", str(runs), *script],
    }[how]
    return subprocess.run(argv, cwd=SCRIPTS, env=clean_env(), capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module", params=["nproc", "torchrun"])
def job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp(f"runs-{request.param}")
    proc = _launch(request.param, runs, str(STEPS))
    assert_exit_ok(proc)
    return request.param, runs, proc


def test_one_run_per_job_with_every_rank(job) -> None:
    how, runs, _ = job
    dirs = [p for p in runs.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
    assert len(dirs) == 1, f"{how}: one run directory per job, found {sorted(p.name for p in dirs)}"
    run = gradscope.load_run(runs_dir=runs)
    assert run.path == dirs[0].resolve() and run.world_size == 2 and run.status == "complete"
    assert [(r.rank, r.meta.rank, r.meta.local_rank, r.meta.world_size) for r in run.ranks] == \
        [(0, 0, 0, 2), (1, 1, 1, 2)]
    assert all(r.meta.host and r.meta.pid for r in run.ranks)
    steps = run.steps
    assert sorted(steps.groupby("rank").size().items()) == [(0, STEPS), (1, STEPS)]
    assert run.meta.launch is not None and run.meta.launch.via == ("torchrun" if how == "torchrun" else "gradscope")
    assert run.meta.launch.nproc_per_node == 2


def test_each_rank_grad_norm_is_what_clip_grad_norm_returned(job) -> None:
    _, runs, proc = job
    refs = {(r["rank"], r["step"]): r["norm"] for r in parse_refs(proc.stdout)}
    assert len(refs) == 2 * STEPS
    steps = gradscope.load_run(runs_dir=runs).steps
    for row in steps.itertuples():
        truth = refs[(row.rank, row.step)]
        assert row.grad_norm == pytest.approx(truth, rel=1e-4), (row.rank, row.step)
    # DDP all-reduced the gradients: both ranks saw the same norm
    by_step = steps.pivot(index="step", columns="rank", values="grad_norm")
    assert (abs(by_step[0] - by_step[1]) <= 1e-6 * by_step[0]).all()
    layers = gradscope.load_run(runs_dir=runs).layers
    assert sorted(layers["rank"].unique()) == [0, 1] and len(layers) == 2 * STEPS * 4


def test_a_crashing_rank_ends_the_job_as_torchrun_would_and_keeps_every_rank(tmp_path: Path) -> None:
    proc = _launch("nproc", tmp_path, "8", "1")
    plain = subprocess.run([*TORCHRUN, "dist_ddp.py", "8", "1"], cwd=SCRIPTS, env=clean_env(),
                           capture_output=True, text=True, timeout=240)
    assert proc.returncode == plain.returncode == 1
    assert "rank 1 fails on purpose" in proc.stderr and "Root Cause" in proc.stderr
    run = gradscope.load_run(runs_dir=tmp_path)
    assert run.status == "failed" and run.world_size == 2
    steps = run.steps
    assert sorted(steps.groupby("rank").size().items()) == [(0, 3), (1, 3)]  # steps 0-2, before the crash


def test_bad_torchrun_options_are_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([*GRADSCOPE, "profile", "--runs-dir", str(tmp_path), "--nproc-per-node", "2",
                           "--no-such-option", "dist_ddp.py"], cwd=SCRIPTS, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gradscope: "), proc.stderr
    missing = subprocess.run([*GRADSCOPE, "profile", "--runs-dir", str(tmp_path), "--nproc-per-node", "2",
                              "no_such_script.py"], cwd=SCRIPTS, env=clean_env(), capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1, missing.stderr
    assert not any(tmp_path.iterdir())  # nothing made for a job that cannot start
