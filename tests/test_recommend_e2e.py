"""End to end: profile the bundled RNN sample for real, then `gradscope recommend --json` on its run.

The recommendation is checked against the run's own ``steps.parquet``, read here with pyarrow and
numpy: ``max_norm`` is the 95th percentile of the finite, non-skipped pre-clip norms, and the clip
rate at it is about 5%.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import GRADSCOPE, assert_exit_ok, clean_env

REPO = Path(__file__).resolve().parents[1]
SAMPLE = "sample_runs/rnn_exploding.py"
STEPS = 200


@pytest.mark.slow
def test_recommend_on_the_profiled_sample_matches_its_steps_file(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    profile = subprocess.run([*GRADSCOPE, "profile", "--runs-dir", str(runs), SAMPLE, "--steps", str(STEPS)],
                             cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert_exit_ok(profile)
    proc = subprocess.run([*GRADSCOPE, "recommend", "--runs-dir", str(runs), "--json"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert_exit_ok(proc)
    doc = json.loads(proc.stdout)
    run_dir = Path(doc["run"]["path"])
    assert run_dir.parent == runs.resolve() and doc["run"]["status"] == "complete"

    steps = pq.read_table(run_dir / "steps.parquet", columns=["optimizer", "grad_norm", "skipped"]).to_pandas()
    steps = steps[steps["optimizer"] == 0]
    norms = steps["grad_norm"].to_numpy(dtype=float)
    used = norms[np.isfinite(norms) & ~steps["skipped"].to_numpy(dtype=bool)]
    assert len(steps) == STEPS and len(used) > 0.9 * STEPS

    rec = doc["recommendations"][0]
    assert rec["max_norm"] == np.percentile(used, 95)
    assert rec["distribution"]["n_used"] == len(used)
    assert rec["clip_rate"] == pytest.approx(0.05, abs=0.01)
    assert rec["clip_rate"] == np.mean(used > rec["max_norm"])
    recommended = [row for row in rec["clip_rates"] if row["recommended"]]
    assert len(recommended) == 1 and recommended[0]["threshold"] == rec["max_norm"]
    assert rec["layers"] and all(np.isfinite(layer["p95"]) for layer in rec["layers"])
