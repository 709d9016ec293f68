"""A DDP job profiled rank by rank (``torchrun -m gradscope profile``) ends, every time.

Each rank tears its process group down right after its last step, with no barrier (as most scripts
do); gradscope's hooks must not turn torch's teardown race into a hang (hooks.py names the hazard).
The job is repeated: the hang it guards against struck about one run in three.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import PARALLEL, SCRIPTS, clean_env

import gradscope

REPEATS = 10
EPOCHS, STEPS_PER_EPOCH = 2, 10  # 20 steps per rank
TIMEOUT_S = 240  # per job; a hung job never ends, a slow machine takes ~30 s


def _job(root: Path) -> tuple[int | None, str, list[int]]:
    """One profiled 2-rank job: its exit code (None: it hung), its stderr tail and each rank's step count."""
    runs, snapshots = root / "runs", root / "snap"
    snapshots.mkdir(parents=True)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "gradscope", "profile", "-q", "ddp_torchrun.py", str(EPOCHS), str(STEPS_PER_EPOCH)]
    env = clean_env({"GRADSCOPE_DIR": str(runs), "SNAPSHOT_DIR": str(snapshots)})
    # Its own session: a hung job's ranks (torchrun's children) are killed with it, not left behind.
    proc = subprocess.Popen(argv, cwd=SCRIPTS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        return None, stderr[-2000:], []
    run = gradscope.load_run(runs_dir=runs)  # the job: one run, a row per rank per step
    steps = [int(n) for _, n in sorted(run.steps.groupby("rank").size().items())]
    return proc.returncode, stderr[-2000:], steps


@pytest.mark.timeout(REPEATS * TIMEOUT_S)
def test_profiled_ddp_ranks_end_without_a_barrier(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=max(1, PARALLEL)) as pool:
        results = list(pool.map(_job, [tmp_path / f"job{i}" for i in range(REPEATS)]))
    for i, (code, stderr, steps) in enumerate(results):
        assert code is not None, f"job {i} hung past {TIMEOUT_S}s\n{stderr}"
        assert code == 0, f"job {i} exited {code}\n{stderr}"
        assert steps == [EPOCHS * STEPS_PER_EPOCH] * 2, f"job {i}: steps per rank {steps}"
