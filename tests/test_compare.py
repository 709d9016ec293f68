"""`gradscope compare`: injected clipping is clipping, arms run for real, bad input gets one line.

Every run here is a real subprocess of the CLI (or of plain `python` for the references), every run
directory is real parquet, and the plots are real PNGs opened again. Torch start-up dominates the
cost (~3-5 s per subprocess on a busy 2-core box), so each test runs as few arms as it can.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import GRADSCOPE, SCRIPTS, assert_exit_ok, clean_env

import gradscope
from gradscope import compare, plots, store
from gradscope.cli import main
from gradscope.compare.metrics import (
    BASELINE,
    ArmResult,
    SeedResult,
    SeedRun,
    arm_title,
    compare_arms,
    final_loss,
    norm_spike_mask,
    spike_mask,
    verdict,
    volatility,
)

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def _profile(runs: Path, *args: str, cwd: Path = SCRIPTS) -> gradscope.Run:
    assert_exit_ok(_run([*GRADSCOPE, "profile", "-q", "--runs-dir", str(runs), *args], cwd))
    return gradscope.load_run(runs_dir=runs)


def _compare(runs: Path, *args: str, cwd: Path = SCRIPTS, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return _run([*GRADSCOPE, "compare", "--runs-dir", str(runs), *args], cwd, timeout)


def _json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(proc.stdout)  # the whole of stdout: nothing else may be printed there with --json


def _arm(doc: dict[str, Any], arm: str) -> dict[str, Any]:
    return next(a for a in doc["arms"] if a["arm"] == arm)


def _seed(doc: dict[str, Any], arm: str, seed: int) -> dict[str, Any]:
    return next(s for s in _arm(doc, arm)["seeds"] if s["seed"] == seed)


# --------------------------------------------------------------------------------------------------
# Injected clipping == clipping written into the script (final parameters, bit for bit)
# --------------------------------------------------------------------------------------------------

EQUIV = SCRIPTS / "cmp_equiv.py"
CLIP = "0.05"  # far below these models' gradient norms (1-20): every step is clipped


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``trained(mode, script_clip=None, profile=None) -> (state_dict, run or None)``, memoised per module.

    Runs cmp_equiv.py under plain python (``profile=None``) or under ``gradscope profile PROFILE...``.
    """
    import torch

    cache: dict[tuple[Any, ...], tuple[dict[str, Any], Any]] = {}

    def train(mode: str, script_clip: str | None = None, profile: tuple[str, ...] | None = None) -> Any:
        key = (mode, script_clip, profile)
        if key not in cache:
            work = tmp_path_factory.mktemp(f"equiv-{mode}")
            out = work / "final.pt"
            script = [str(EQUIV), "--mode", mode, "--out", str(out), *(["--clip", script_clip] if script_clip else [])]
            argv = [sys.executable, *script] if profile is None else \
                [*GRADSCOPE, "profile", "-q", "--runs-dir", str(work / "runs"), *profile, *script]
            assert_exit_ok(_run(argv, work))
            run = gradscope.load_run(runs_dir=work / "runs") if profile is not None else None
            cache[key] = (torch.load(out), run)
        return cache[key]

    return train


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("mode", ["plain", "accum", "scaler", "fused", "lbfgs"])
def test_injected_clipping_equals_clipping_in_the_script(trained: Any, mode: str) -> None:
    """plain loop, 4-micro-batch accumulation, GradScaler (plain and fused AdamW), LBFGS with closure."""
    import torch

    in_script, _ = trained(mode, script_clip=CLIP)
    injected, run = trained(mode, profile=("--max-norm", CLIP))
    for key in in_script:
        assert torch.equal(in_script[key], injected[key]), f"{mode}: {key} differs by {_max_diff(in_script, injected):.3g}"
    # Every step's pre-clip norm is far above the threshold, so the script's clip acted at every
    # step: identical parameters cannot come from both sides doing nothing.
    steps = run.steps
    assert len(steps) >= 12 and (steps["grad_norm"] > 10 * float(CLIP)).all()
    assert (steps["clip_source"] == "injected").all() and np.allclose(steps["applied_norm"], float(CLIP), rtol=1e-4)


@pytest.mark.parametrize("mode", ["plain", "fused"])
def test_arm_threshold_replaces_the_scripts_own(trained: Any, mode: str) -> None:
    in_script, _ = trained(mode, script_clip=CLIP)
    replaced, run = trained(mode, script_clip="3", profile=("--max-norm", CLIP))  # the script clips at 3
    assert _max_diff(in_script, replaced) == 0.0
    assert run.meta.clipping.script_max_norm == 3.0 and run.meta.clipping.script_clip_disabled


def test_baseline_arm_disables_the_scripts_clipping(trained: Any) -> None:
    unclipped, _ = trained("plain")
    disabled, run = trained("plain", script_clip=CLIP, profile=("--no-clip",))
    clipped, _ = trained("plain", script_clip=CLIP)
    assert _max_diff(unclipped, disabled) == 0.0  # "no clipping" means no clipping
    assert _max_diff(unclipped, clipped) > 1e-3
    assert (run.steps["clip_source"] == "script-disabled").all()


# --------------------------------------------------------------------------------------------------
# The definitions and the verdict (pure functions, real pandas)
# --------------------------------------------------------------------------------------------------


def test_spike_definitions() -> None:
    loss = pd.Series([1.0] * 10 + [3.5, 1.0, 2.9, float("inf"), 1.0])
    assert spike_mask(loss).tolist() == [False] * 10 + [True, False, False, False, False]  # 3.5 > 3x1; 2.9 is not
    norms = pd.Series([2.0] * 12 + [10.5, 9.5])  # recommend's rule: > 5x the median of the previous 50
    assert norm_spike_mask(norms).tolist() == [False] * 12 + [True, False]
    assert final_loss(pd.Series(range(100), dtype=float)) == pytest.approx(np.mean(range(90, 100)))
    assert math.isnan(final_loss(pd.Series([1.0, 2.0, float("nan")])))  # a run that ends in NaN has no final loss
    assert volatility(pd.Series([1.0, 2.0, 1.0, 2.0])) == pytest.approx(np.std([1, -1, 1], ddof=1))


def _arm_result(arm: str, max_norm: float | None, finals: list[float], vols: list[float]) -> ArmResult:
    seeds = [SeedResult(k, f"r{k}", "ok", None, 100, {"final_loss": f, "volatility": v}, None, False, pd.DataFrame())
             for k, (f, v) in enumerate(zip(finals, vols, strict=True))]
    return ArmResult(arm, max_norm, seeds)


def test_verdict_separates_effect_from_seed_noise() -> None:
    base = _arm_result(BASELINE, None, [2.0, 2.1, 1.9], [0.5, 0.6, 0.55])
    clear = verdict([base, _arm_result("max_norm=1", 1.0, [1.0, 1.1, 0.9], [0.2, 0.2, 0.2])])
    assert clear.best == "max_norm=1" and clear.exceeds_spread is True and "real effect" in clear.text
    noisy = verdict([base, _arm_result("max_norm=1", 1.0, [1.95, 2.05, 1.85], [0.2, 0.3, 0.25])])
    assert noisy.best == "max_norm=1"  # ties on final loss within noise: the smoother arm wins
    assert "tie within seed noise" in noisy.text and "volatility" in noisy.text
    one_seed = verdict([_arm_result(BASELINE, None, [2.0], [0.5]), _arm_result("max_norm=1", 1.0, [1.0], [0.2])])
    assert one_seed.exceeds_spread is None and "seed spread unknown" in one_seed.text
    worse = verdict([base, _arm_result("max_norm=0.1", 0.1, [3.0, 3.1, 2.9], [0.1, 0.1, 0.1])])
    assert worse.best == BASELINE and worse.exceeds_spread is True


# --------------------------------------------------------------------------------------------------
# Whole comparisons on a toy script: crashes, divergence, the JSON, the plots
# --------------------------------------------------------------------------------------------------

TOY = "cmp_toy.py"


@pytest.fixture(scope="module")
def toy_compare(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, gradscope.Run, subprocess.CompletedProcess[str]]:
    """Unclipped lr=0.6 diverges to NaN; seed 1 crashes at step 3. One recorded run, then 3 arms.

    Seed 0's baseline is the recorded run itself (seeded, unclipped), so the arms are: clip seed 0,
    baseline seed 1 (crashes), clip seed 1 (crashes).
    """
    runs = tmp_path_factory.mktemp("toy") / "runs"
    original = _profile(runs, TOY, "--lr", "0.6", "--crash-seed", "1")
    proc = _compare(runs, "--max-norm", "1", "--seeds", "2", "--json")
    return runs, original, proc


def test_crashed_and_diverged_arms_are_reported_and_the_rest_finish(toy_compare: Any) -> None:
    runs, original, proc = toy_compare
    assert proc.returncode == 0, proc.stderr  # an arm that crashes or diverges is news, not a failure
    doc = _json(proc)
    assert doc["format"] == "gradscope-compare" and type(doc["schema_version"]) is int
    assert doc["baseline_reused"] and doc["thresholds"] == [1.0] and doc["seeds"] == [0, 1]
    base0, base1 = _seed(doc, BASELINE, 0), _seed(doc, BASELINE, 1)
    clip0, clip1 = _seed(doc, "max_norm=1", 0), _seed(doc, "max_norm=1", 1)
    assert base0["reused_recorded_run"] and base0["run_id"] == original.id
    assert base0["status"] == "diverged" and base0["first_nonfinite_step"] is not None and base0["final_loss"] is None
    assert base1["status"] == clip1["status"] == "crashed"
    assert "simulated crash at step 3" in base1["error"] and base1["exit_code"] == 1
    assert clip0["status"] == "ok" and clip0["nonfinite"] == 0 and clip0["n_steps"] == 40
    assert clip0["clipped_fraction"] > 0.9 and math.isfinite(clip0["final_loss"])
    assert doc["verdict"]["best"] == "max_norm=1" and "baseline diverged" in doc["verdict"]["text"]
    assert json.loads((Path(doc["out_dir"]) / "compare.json").read_text()) == doc
    assert "step 0 loss" in Path(clip0["log"]).read_text()  # the arm's own output went to its log
    assert gradscope.load_run(runs_dir=runs).id == original.id  # `latest` is the user's run again


def test_arms_rerun_the_recorded_command_with_their_seed_and_threshold(toy_compare: Any) -> None:
    runs, original, proc = toy_compare
    doc = _json(proc)
    arm = gradscope.load_run(runs / _seed(doc, "max_norm=1", 1)["run_id"])
    assert arm.meta.provenance.argv == original.meta.provenance.argv
    assert arm.meta.provenance.cwd == original.meta.provenance.cwd
    assert arm.meta.seed == 1 and arm.meta.clipping.injected_max_norm == 1.0
    assert arm.status == "failed" and "simulated crash" in arm.meta.error
    base = gradscope.load_run(runs / _seed(doc, BASELINE, 1)["run_id"])
    assert base.meta.clipping.injected_max_norm is None and base.meta.clipping.script_clip_disabled


def test_plots_have_one_axis_per_arm_and_a_line_per_seed_and_threshold(toy_compare: Any, tmp_path: Path) -> None:
    from matplotlib.image import imread

    runs, _, proc = toy_compare
    doc = _json(proc)
    seed_runs = []
    for arm in doc["arms"]:
        for seed in arm["seeds"]:
            run = gradscope.load_run(runs / seed["run_id"])
            seed_runs.append(SeedRun(arm["arm"], arm["max_norm"], seed["seed"], run, run.status))
    comparison = compare_arms(seed_runs)
    drawn = sum(1 for s in seed_runs if len(s.run.steps))
    loss_fig = plots.plot_compare_loss(comparison, tmp_path / "loss.png")
    assert len(loss_fig.axes) == 1 and len(loss_fig.axes[0].get_lines()) == 2 * drawn  # raw + smoothed per seed
    assert [t.get_text() for t in loss_fig.axes[0].get_legend().get_texts()] == ["no clipping", "max_norm=1"]
    assert [arm_title(a) for a in comparison.arms] == ["no clipping", "max_norm=1"] == [a["title"] for a in doc["arms"]]
    norm_fig = plots.plot_compare_grad_norm(comparison, tmp_path / "grad_norm.png")
    assert len(norm_fig.axes) == 2
    for ax in norm_fig.axes:
        assert len(ax.get_lines()) == 2 + 1  # one line per seed, plus max_norm=1 (dashed or dotted)
        assert ax.get_lines()[-1].get_ydata()[0] == 1.0
    for name, fig in (("loss", loss_fig), ("grad_norm", norm_fig)):
        written = imread(doc["plots"][name])  # the PNG the compare subprocess wrote
        width, height = fig.get_size_inches() * plots.DPI
        assert written.shape[:2] == (round(height), round(width))
        assert imread(tmp_path / f"{name}.png").shape == written.shape
        assert written[..., :3].std() > 0.05  # not a blank canvas


# --------------------------------------------------------------------------------------------------
# Bad input: one clear line and a documented exit code each
# --------------------------------------------------------------------------------------------------


def test_changed_script_warns_with_its_hash_and_gets_a_baseline_arm(tmp_path: Path) -> None:
    script = tmp_path / TOY
    shutil.copy(SCRIPTS / TOY, script)
    original = _profile(tmp_path / "runs", TOY, "--steps", "8", cwd=tmp_path)
    recorded = original.meta.provenance.script_sha256
    script.write_text(script.read_text() + "# edited after the run\n")
    proc = _compare(tmp_path / "runs", "--max-norm", "1", "--steps", "5", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"changed since run {original.id} was recorded (sha256 {recorded[:12]} then" in proc.stderr
    doc = _json(proc)
    assert not doc["baseline_reused"]  # the recorded run no longer describes this script
    assert [(a["arm"], a["seeds"][0]["status"], a["seeds"][0]["n_steps"]) for a in doc["arms"]] == \
        [(BASELINE, "ok", 5), ("max_norm=1", "ok", 5)]

    script.unlink()
    gone = _compare(tmp_path / "runs", "--max-norm", "1", cwd=tmp_path)
    assert gone.returncode == 1
    assert gone.stderr.strip().splitlines() == [
        f"gradscope: the script {script} of run {original.id} no longer exists (recorded sha256 {recorded[:12]}); "
        "restore it or profile the script again"]


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", "1,,2", "auto,0"])
def test_bad_max_norm_is_one_line_and_exit_2(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--runs-dir", str(tmp_path), "--max-norm", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradscope: --max-norm takes 'auto' or positive numbers")


def test_bad_max_norm_in_a_real_process_and_no_run(tmp_path: Path) -> None:
    bad = _compare(tmp_path, "--max-norm", "-0.5")
    assert bad.returncode == 2 and "'-0.5' is not a positive number" in bad.stderr and not bad.stdout
    none = _compare(tmp_path / "empty")
    assert none.returncode == 1 and none.stderr.startswith("gradscope: no runs yet in")
    assert len(none.stderr.strip().splitlines()) == 1


def test_plan_without_a_seed_or_with_script_clipping(tmp_path: Path) -> None:
    from gradscope import recommend

    unseeded = _profile(tmp_path / "a", TOY, "--steps", "30", "--no-seed")
    plan = compare.plan_compare(compare.CompareOptions(run=str(unseeded.path), seeds=3, max_norm="auto,2"))
    assert plan.seeds == [0, 1, 2] and not any(spec.reuse for spec in plan.arms)
    assert any(note.startswith("script not seeded: gradscope seeded torch") for note in plan.notes)
    assert plan.auto_max_norm == recommend.recommend(unseeded)[0].max_norm
    assert plan.thresholds == sorted([plan.auto_max_norm, 2.0]) and plan.step_cap == 30
    argv = compare.arm_argv(plan, plan.arms[-1])
    assert argv[argv.index("--seed") + 1] == "2" and argv[argv.index("--max-steps") + 1] == "30"
    assert argv[-4:] == [TOY, "--steps", "30", "--no-seed"]

    clipped = _profile(tmp_path / "b", TOY, "--steps", "30", "--clip", "1.5")
    plan = compare.plan_compare(compare.CompareOptions(run=str(clipped.path), max_norm="1"))
    assert not plan.arms[0].reuse and plan.arms[0].max_norm is None
    assert "the script clips (clip_grad_norm_, max_norm=1.5)" in plan.notes[-1]
    assert "--no-clip" in compare.arm_argv(plan, plan.arms[0])


def _wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_ctrl_c_stops_the_running_arm_and_keeps_what_finished(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    original = _profile(runs, TOY, "--steps", "60", "--slow-seed", "1")  # seed 0: fast
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err, open(tmp_path / "stdout.txt", "w") as out:
        proc = subprocess.Popen([*GRADSCOPE, "compare", "--runs-dir", str(runs), "--max-norm", "1", "--seeds", "2"],
                                cwd=SCRIPTS, env=clean_env(), stdout=out, stderr=err)
    try:
        # Arms: clip seed 0 (fast), baseline seed 1 (0.2 s a step), clip seed 1. Interrupt the slow one
        # once it has written a part file, i.e. once there is something of it to keep.
        _wait_for(lambda: "arm 1/3" in err_path.read_text(), 120, "the first arm to finish")
        _wait_for(lambda: any(store.count_steps(p) for p in runs.glob("cmp_toy-compare-base-s1-*")), 120, "a part file")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        proc.kill()
    doc = json.loads(next(runs.glob("compare-*/compare.json")).read_text())
    assert doc["interrupted"] and doc["exit_code"] == 130
    assert _seed(doc, "max_norm=1", 0)["status"] == "ok" and _seed(doc, BASELINE, 0)["run_id"] == original.id
    stopped = _seed(doc, BASELINE, 1)
    assert stopped["status"] == "interrupted" and _seed(doc, "max_norm=1", 1)["status"] == "not run"
    arm = gradscope.load_run(runs / stopped["run_id"])
    assert arm.status == "interrupted" and arm.compacted and 20 <= len(arm.steps) < 60  # saved by the arm itself
    with pytest.raises(ProcessLookupError):
        os.kill(arm.meta.pid, 0)  # no orphan left running
    table = (tmp_path / "stdout.txt").read_text()
    assert "s1 interrupted" in table and "verdict:" in table
    assert err_path.read_text().strip().splitlines()[-1].startswith("gradscope: interrupted")


class _SeenProgress:
    """An ArmObserver that keeps every step count it is told while the arm runs."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.finished: Any = None

    def arm_started(self, spec: Any, index: int, total: int, log_path: Path) -> None:
        self.counts.clear()

    def arm_progress(self, spec: Any, steps: int, elapsed: float) -> None:
        self.counts.append(steps)

    def arm_finished(self, spec: Any, outcome: Any) -> None:
        self.finished = outcome


def test_progress_moves_while_an_arm_runs(tmp_path: Path) -> None:
    """The running arm's step count comes from the part files it writes, not only from its end."""
    runs = tmp_path / "runs"
    recorded = _profile(runs, TOY, "--steps", "30", "--slow-seed", "1")  # seed 0 fast; seed 1 0.2 s a step
    plan = compare.plan_compare(compare.CompareOptions(run=str(recorded.path), max_norm="1", seeds=2))
    slow = next(spec for spec in plan.arms if spec.seed == 1 and spec.max_norm is None)
    seen = _SeenProgress()
    outcome = compare.run_arm(plan, slow, tmp_path / "arm.log", seen)
    assert outcome.status == "complete", outcome.error
    total = len(store.load_run(outcome.run_path).steps)
    assert total == 30
    # A part holds 20 steps; the last 10 take 2 s more: counts strictly between 0 and the total
    # can only have been read while the arm was still running.
    assert any(0 < n < total for n in seen.counts), seen.counts
    assert seen.counts == sorted(seen.counts)
