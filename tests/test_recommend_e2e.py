"""End to end: profile real scripts, then `gradscope recommend` on their runs.

The bundled RNN sample's recommendation is checked against the run's own ``steps.parquet``, read
here with pyarrow and numpy: ``max_norm`` is the 95th percentile of the finite, non-skipped pre-clip
norms, and the clip rate at it is about 5%. Small scripts of tests/scripts/rcm_train.py check the
caveats: a closure optimizer, a script that clips by value, a constant lr and an lr warm-up.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import GRADSCOPE, Profiled, assert_exit_ok, clean_env

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


# --------------------------------------------------------------------------------------------------
# Caveats, on real runs of tests/scripts/rcm_train.py (a few seconds each, profiled in parallel)
# --------------------------------------------------------------------------------------------------


def recommend_cli(profiled: Profiled, *args: str) -> subprocess.CompletedProcess[str]:
    """``gradscope recommend RUN ARGS`` on the run a test profiled."""
    proc = subprocess.run([*GRADSCOPE, "recommend", str(profiled.run.path), *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert_exit_ok(proc)
    return proc


@pytest.mark.profiled("rcm_train.py", "lbfgs")
def test_a_closure_optimizer_states_steps_and_evaluations(profiled: Profiled) -> None:
    (ref,) = profiled.ref("lbfgs")
    rec = json.loads(recommend_cli(profiled, "--json").stdout)["recommendations"][0]
    assert rec["closure"] == {"n_steps": 2, "n_evaluations": ref["evaluations"], "per_step": ref["evaluations"] / 2}
    assert rec["intent"] == "too-few-steps"
    assert {"closure-optimizer", "too-few-steps"} <= {n["slug"] for n in rec["notes"]}
    assert "frequent-clipping" not in {n["slug"] for n in rec["notes"]}  # no rate is claimed from 2 steps
    out = recommend_cli(profiled).stdout
    assert f"closure optimizer: 2 steps recorded, {ref['evaluations']} closure evaluations" in out
    assert "too few to support a percentile (20 needed)" in out
    assert "% of steps here" not in out and "clips 50.0% of them" not in out and "~5%" not in out


@pytest.mark.profiled("rcm_train.py", "clip-value")
def test_a_value_clipping_script_gets_a_clip_value(profiled: Profiled) -> None:
    largest = np.array([r["max_abs"] for r in profiled.ref("clip-value")], dtype=np.float32)  # max_abs is float32
    rec = json.loads(recommend_cli(profiled, "--json").stdout)["recommendations"][0]
    values = rec["value_clipping"]
    assert values["script_clip_value"] == 0.5 and values["n_steps"] == len(largest) == 60
    assert values["script_n_clipped"] == int((largest > 0.5).sum()) > 0
    assert rec["clip_value"] == values["clip_value"] == pytest.approx(np.percentile(largest.astype(float), 95))
    assert "script-clips-by-value" in {n["slug"] for n in rec["notes"]}
    out = recommend_cli(profiled).stdout
    assert f"the script clips by value: clip_grad_value_ at 0.5 changed {values['script_n_clipped']} of 60" in out
    assert f"clip_grad_value_(params, clip_value={rec['clip_value']:.6g})" in out


@pytest.mark.profiled("rcm_train.py", "constant")
def test_a_constant_lr_run_has_early_steps_not_a_warmup(profiled: Profiled) -> None:
    out = recommend_cli(profiled).stdout
    assert "early steps: the first 6 (" in out and "no lr warm-up: lr 0.05 at the first step and after them" in out
    assert "\nwarm-up: " not in out and "warmup-dominates" not in out


@pytest.mark.profiled("rcm_train.py", "warmup")
def test_an_lr_warmup_is_named_with_its_lr(profiled: Profiled) -> None:
    out = recommend_cli(profiled).stdout
    assert "warm-up: the lr rises from 0.005 at the first step to its peak 0.05 after 9 steps" in out
    warmup = json.loads(recommend_cli(profiled, "--json").stdout)["recommendations"][0]["warmup"]
    assert (warmup["kind"], warmup["basis"], warmup["window"]) == ("warm-up", "lr-ramp", 9)
    assert (warmup["lr_first"], warmup["lr_after"]) == pytest.approx((0.005, 0.05))
