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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import GRADSCOPE, SCRIPTS, assert_exit_ok, clean_env, interruptible

import gradscope
from gradscope import compare, plots, store
from gradscope.cli import main
from gradscope.compare.metrics import (
    BASELINE,
    ArmResult,
    Clip,
    SeedResult,
    SeedRun,
    best_loss,
    compare_arms,
    final_loss,
    norm_spike_mask,
    seed_metrics,
    spike_mask,
    volatility,
)
from gradscope.compare.verdict import decide, paired_difference, t_quantile
from gradscope.record.config import Thresholds

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
    """One seed's run (status, run id, log) of one arm."""
    return next(s for s in _arm(doc, arm)["seeds"] if s["seed"] == seed)


def _metrics(doc: dict[str, Any], arm: str, seed: int, optimizer: int = 0) -> dict[str, Any]:
    """One seed's metrics of one arm on one optimizer."""
    entry = next(o for o in _arm(doc, arm)["optimizers"] if o["optimizer"] == optimizer)
    return next(s for s in entry["seeds"] if s["seed"] == seed)


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


def _arm_result(clip: Clip, finals: list[float], vols: list[float] | None = None,
                statuses: list[str] | None = None) -> ArmResult:
    """One arm on optimizer 0 with the given per-seed final losses (seed k is the k-th value)."""
    vols = vols or [0.1] * len(finals)
    statuses = statuses or ["ok"] * len(finals)
    seeds = [SeedResult(k, f"r{k}", st, "RuntimeError: boom" if st == "crashed" else None, 100,
                        {"final_loss": f, "volatility": v, "loss_spikes": 0.0, "nonfinite": 0.0}, None, False,
                        pd.DataFrame(), Path(f"/logs/arm-{k}.log"))
             for k, (f, v, st) in enumerate(zip(finals, vols, statuses, strict=True))]
    return ArmResult(clip, 0, seeds)


NAMES = {0: "optimizer 0 (SGD, net.*)"}
BASE, ONE = Clip(), Clip(max_norm=Thresholds.every(1.0))


def test_t_quantiles_and_the_paired_interval() -> None:
    assert t_quantile(1) == 12.706 and t_quantile(2) == 4.303 and t_quantile(30) == 2.042
    assert t_quantile(60) == pytest.approx(2.0003, abs=2e-4) and t_quantile(1000) == pytest.approx(1.9623, abs=2e-4)
    diff = paired_difference([1.0, 1.2, 0.9, 1.1], [2.0, 2.1, 2.0, 2.0])
    d = np.array([-1.0, -0.9, -1.1, -0.9])
    half = 3.182 * d.std(ddof=1) / 2
    assert diff.n == 4 and diff.mean == pytest.approx(d.mean())
    assert (diff.low, diff.high) == pytest.approx((d.mean() - half, d.mean() + half)) and diff.claimed
    assert paired_difference([1.0], [2.0]).low is None and not paired_difference([1.0], [2.0]).claimed


def test_verdict_claims_no_effect_when_arms_differ_only_by_seed_noise() -> None:
    """Both arms are one seed-driven value plus independent noise: no effect exists, none may be claimed."""
    rng = np.random.default_rng(7)
    seed_effect = rng.normal(2.0, 0.3, 5)
    base = _arm_result(BASE, list(seed_effect + rng.normal(0, 0.05, 5)), [0.5] * 5)
    arm = _arm_result(ONE, list(seed_effect + rng.normal(0, 0.05, 5)), [0.2] * 5)  # smoother, same loss
    verdict = decide([base, arm], NAMES)
    (effect,) = verdict.effects
    assert effect.claim == "no effect" and effect.diff is not None and effect.diff.n == 5
    assert effect.diff.low < 0 < effect.diff.high
    assert verdict.best is None and "best" not in verdict.text
    assert "no threshold changed the final loss beyond seed noise" in verdict.summary
    assert "volatility 0.2 vs 0.5" in effect.text  # stability is reported beside the loss, not instead


def test_verdict_claims_an_effect_with_its_interval_when_clipping_clearly_helps() -> None:
    base = _arm_result(BASE, [2.0, 2.4, 1.8])
    arm = _arm_result(ONE, [1.0, 1.3, 0.9])  # lower by 0.9-1.1 at every seed
    verdict = decide([base, arm], NAMES)
    (effect,) = verdict.effects
    assert effect.claim == "lower" and verdict.best == "max_norm=1"
    assert effect.diff.mean == pytest.approx(-1.0) and effect.diff.high < 0
    assert f"95% CI [{effect.diff.low:+.3g}, {effect.diff.high:+.3g}] over 3 paired seeds" in effect.text
    assert verdict.summary.startswith("best: max_norm=1")
    worse = decide([base, _arm_result(ONE, [3.0, 3.4, 2.8])], NAMES)
    assert worse.effects[0].claim == "higher" and worse.best is None and "raised it" in worse.summary


def test_verdict_with_two_seeds_is_indicative_only() -> None:
    verdict = decide([_arm_result(BASE, [2.0, 2.4]), _arm_result(ONE, [1.0, 1.3])], NAMES)
    (effect,) = verdict.effects
    assert effect.claim == "indicative only" and verdict.best is None
    assert "indicative only" in effect.text and "--seeds 3" in effect.text
    assert "best" not in verdict.text and "no threshold" not in verdict.text


def test_a_crashed_arm_is_could_not_compare_with_its_log_never_no_threshold_beat() -> None:
    base = _arm_result(BASE, [2.0, 2.1, 1.9])
    crashed = _arm_result(ONE, [math.nan] * 3, statuses=["crashed"] * 3)
    verdict = decide([base, crashed], NAMES)
    (effect,) = verdict.effects
    assert effect.claim == "could not compare" and "could not compare: seed 0 crashed: RuntimeError: boom" in effect.text
    assert "(log: /logs/arm-0.log)" in effect.text and verdict.best is None
    assert "no threshold" not in verdict.text and verdict.summary.startswith("could not compare")
    partial = decide([base, _arm_result(ONE, [1.0, 1.1, math.nan], statuses=["ok", "ok", "crashed"])], NAMES)
    assert partial.effects[0].claim == "indicative only" and "not counted: seed 2 crashed" in partial.effects[0].text
    uninjected = _arm_result(ONE, [2.0, 2.1, 1.9], statuses=["not injected: no update point"] * 3)
    text = decide([base, uninjected], NAMES).text
    assert "could not compare: seed 0 not injected: no update point (log: /logs/arm-0.log)" in text


def test_best_loss_uses_the_final_losss_smoothing_and_a_two_step_run_is_measured() -> None:
    rng = np.random.default_rng(3)
    for n in (2, 3, 9, 10, 11, 57, 200):
        loss = pd.Series(np.exp(-np.arange(n) / 30) + rng.normal(0, 0.2, n))
        assert best_loss(loss) <= final_loss(loss), n
    two = seed_metrics(pd.DataFrame({"step": [0, 1], "loss": [2.0, 1.0], "grad_norm": [3.0, 2.0],
                                     "clip_coef": [1.0, 0.5], "time_s": [0.1, 0.2]}))
    assert two["final_loss"] == 1.0 and two["best_loss"] == 1.0 and two["clipped_fraction"] == 0.5
    verdict = decide([_arm_result(BASE, [2.0, 2.2, 1.9]), _arm_result(ONE, [1.0, 1.1, 0.8])], NAMES)
    assert verdict.best == "max_norm=1"  # two-step seeds finish and count like any other


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
    assert doc["baseline_reused"] and doc["arms_planned"] == ["max_norm=1"] and doc["seeds"] == [0, 1]
    base0, base1 = _seed(doc, BASELINE, 0), _seed(doc, BASELINE, 1)
    clip0, clip1 = _seed(doc, "max_norm=1", 0), _seed(doc, "max_norm=1", 1)
    assert base0["reused_recorded_run"] and base0["run_id"] == original.id
    measured = _metrics(doc, BASELINE, 0)
    assert base0["status"] == "diverged" and measured["first_nonfinite_step"] is not None
    assert measured["final_loss"] is None and measured["final_loss_nonfinite"]
    assert base1["status"] == clip1["status"] == "crashed"
    assert "simulated crash at step 3" in base1["error"] and base1["exit_code"] == 1
    clipped = _metrics(doc, "max_norm=1", 0)
    assert clip0["status"] == "ok" and clipped["nonfinite"] == 0 and clipped["n_steps"] == 40
    assert clipped["clipped_fraction"] > 0.9 and math.isfinite(clipped["final_loss"])
    # No seed finished with a finite loss in both arms: nothing to pair, and the verdict says why.
    (effect,) = doc["verdict"]["effects"]
    assert effect["claim"] == "could not compare" and doc["verdict"]["best"] is None
    assert "no clipping diverged in seed 0" in effect["text"] and f"(log: {clip1['log']})" in effect["text"]
    assert "no threshold" not in doc["verdict"]["text"]
    assert json.loads((Path(doc["out_dir"]) / "compare.json").read_text()) == doc
    assert "step 0 loss" in Path(clip0["log"]).read_text()  # the arm's own output went to its log
    assert gradscope.load_run(runs_dir=runs).id == original.id  # `latest` is the user's run again


def test_arms_rerun_the_recorded_command_with_their_seed_and_threshold(toy_compare: Any) -> None:
    runs, original, proc = toy_compare
    doc = _json(proc)
    arm = gradscope.load_run(runs / _seed(doc, "max_norm=1", 1)["run_id"])
    assert arm.meta.provenance.argv == original.meta.provenance.argv
    assert arm.meta.provenance.cwd == original.meta.provenance.cwd
    assert arm.meta.seed == 1 and arm.meta.clipping.injected_max_norms == (1.0,)
    assert arm.meta.provenance.executable == sys.executable
    assert arm.status == "failed" and "simulated crash" in arm.meta.error
    base = gradscope.load_run(runs / _seed(doc, BASELINE, 1)["run_id"])
    assert all(v is None for v in base.meta.clipping.injected_max_norms) and base.meta.clipping.script_clip_disabled


def test_plots_have_one_axis_per_arm_and_a_line_per_seed_and_threshold(toy_compare: Any, tmp_path: Path) -> None:
    from matplotlib.image import imread

    runs, _, proc = toy_compare
    doc = _json(proc)
    seed_runs = []
    for arm in doc["arms"]:
        for seed in arm["seeds"]:
            run = gradscope.load_run(runs / seed["run_id"])
            clip = Clip(max_norm=Thresholds.every(arm["max_norm"][0])) if arm["max_norm"] else Clip()
            seed_runs.append(SeedRun(clip, seed["seed"], run, run.status))
    comparison = compare_arms(seed_runs)
    drawn = sum(1 for s in seed_runs if len(s.run.steps))
    loss_fig = plots.plot_compare_loss(comparison, tmp_path / "loss.png")
    assert len(loss_fig.axes) == 1 and len(loss_fig.axes[0].get_lines()) == 2 * drawn  # raw + smoothed per seed
    legend = [t.get_text() for t in loss_fig.axes[0].get_legend().get_texts()]  # an arm's seeds: one colour, named
    assert legend == [f"{a.title}, seed {s.seed}" for a in comparison.arms for s in a.seeds if s.n_steps]
    assert loss_fig.axes[0].get_title().startswith("optimizer 0 (SGD, ")
    assert [a.title for a in comparison.arms] == ["no clipping", "max_norm=1"] == [a["title"] for a in doc["arms"]]
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


def test_changed_script_is_refused_and_with_trust_run_warns_and_gets_a_baseline_arm(tmp_path: Path) -> None:
    script = tmp_path / TOY
    shutil.copy(SCRIPTS / TOY, script)
    original = _profile(tmp_path / "runs", TOY, "--steps", "8", cwd=tmp_path)
    recorded = original.meta.provenance.script_sha256
    script.write_text(script.read_text() + "# edited after the run\n")
    refused = _compare(tmp_path / "runs", "--max-norm", "1", "--steps", "5", "--seeds", "1", cwd=tmp_path)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "--trust-run" in refused.stderr and not list((tmp_path / "runs").glob("compare-*"))
    proc = _compare(tmp_path / "runs", "--max-norm", "1", "--steps", "5", "--seeds", "1", "--json", "--trust-run",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"changed since run {original.id} was recorded (sha256 {recorded[:12]} then" in proc.stderr
    doc = _json(proc)
    assert not doc["baseline_reused"]  # the recorded run no longer describes this script
    assert [(a["arm"], a["seeds"][0]["status"], a["optimizers"][0]["seeds"][0]["n_steps"]) for a in doc["arms"]] == \
        [(BASELINE, "ok", 5), ("max_norm=1", "ok", 5)]

    script.unlink()
    gone = _compare(tmp_path / "runs", "--max-norm", "1", cwd=tmp_path)
    assert gone.returncode == 1
    assert gone.stderr.strip().splitlines() == [
        f"gradscope: the script {script} of run {original.id} no longer exists (recorded sha256 {recorded[:12]}); "
        "restore it or profile the script again"]


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", "1,,2", "auto,0", "1/0", "1/x", "1//2"])
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
    auto = recommend.recommend(unseeded)[0].max_norm
    assert plan.auto_max_norm == Thresholds.every(auto)  # one optimizer: its own recommendation
    assert [c.title for c in plan.clips] == [f"max_norm={v:g}" for v in sorted([auto, 2.0])] and plan.step_cap == 30
    argv = compare.arm_argv(plan, plan.arms[-1])
    assert argv[argv.index("--seed") + 1] == "2" and argv[argv.index("--max-steps") + 1] == "30"
    assert argv[-4:] == [TOY, "--steps", "30", "--no-seed"]

    clipped = _profile(tmp_path / "b", TOY, "--steps", "30", "--clip", "1.5")
    plan = compare.plan_compare(compare.CompareOptions(run=str(clipped.path), max_norm="1"))
    assert not plan.arms[0].reuse and plan.arms[0].clip.is_baseline
    assert "the script clips (clip_grad_norm_, threshold 1.5)" in plan.notes[-1]
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
                                cwd=SCRIPTS, env=clean_env(), stdout=out, stderr=err, preexec_fn=interruptible)
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
    slow = next(spec for spec in plan.arms if spec.seed == 1 and spec.clip.is_baseline)
    seen = _SeenProgress()
    outcome = compare.run_arm(plan, slow, tmp_path / "arm.log", seen)
    assert outcome.status == "complete", outcome.error
    total = len(store.load_run(outcome.run_path).steps)
    assert total == 30
    # A part holds 20 steps; the last 10 take 2 s more: counts strictly between 0 and the total
    # can only have been read while the arm was still running.
    assert any(0 < n < total for n in seen.counts), seen.counts
    assert seen.counts == sorted(seen.counts)


# --------------------------------------------------------------------------------------------------
# Per-optimizer thresholds, the interpreter, --dry-run, hand-written loops
# --------------------------------------------------------------------------------------------------


def _clipped_within(run: gradscope.Run, thresholds: dict[int, float]) -> None:
    """Every step of each optimizer ran under its own threshold, and no update exceeded it."""
    steps = run.steps
    for optimizer, max_norm in thresholds.items():
        mine = steps[steps["optimizer"] == optimizer]
        assert len(mine) and np.allclose(mine["max_norm"], max_norm), (optimizer, mine["max_norm"].unique())
        assert (mine["applied_norm"] <= max_norm * (1 + 1e-5)).all(), optimizer


def test_gan_arms_inject_each_optimizers_own_recommendation(tmp_path: Path) -> None:
    from gradscope import recommend

    runs = tmp_path / "runs"
    original = _profile(runs, "cmp_gan.py", "--steps", "12")
    own = {rec.optimizer: rec.max_norm for rec in recommend.recommend(original)}
    assert own[0] != own[1]
    proc = _compare(runs, "--max-norm", "auto", "--seeds", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = _json(proc)
    assert [o["name"] for o in doc["optimizers"]] == ["optimizer 0 (Adam, D.*)", "optimizer 1 (Adam, G.*)"]
    assert doc["auto_max_norm"] == [own[0], own[1]]
    arm = next(a for a in doc["arms"] if a["arm"] != BASELINE)
    assert arm["max_norm"] == [own[0], own[1]] and [o["max_norm"] for o in arm["optimizers"]] == [own[0], own[1]]
    run = gradscope.load_run(runs / arm["seeds"][0]["run_id"])
    assert run.meta.clipping.injected_max_norms == (own[0], own[1])
    assert run.meta.clipping.injection == "applied"
    _clipped_within(run, own)
    assert [(e["optimizer"], e["claim"]) for e in doc["verdict"]["effects"]] == [(0, "indicative only"),
                                                                                 (1, "indicative only")]
    assert "optimizer 1 (Adam, G.*): max_norm=" in doc["verdict"]["text"]
    text = _compare(runs, "--max-norm", "0.5/2", "--seeds", "1", "--dry-run").stdout
    assert "--max-norm 0.5/2.0" in text or "--max-norm 0.5/2" in text


def _python_link(tmp_path: Path) -> Path:
    """Another path to this interpreter. In a venv the link must sit in the venv's bin (python finds its
    venv from pyvenv.cfg beside the path it was started by), so it goes there and is removed at the end."""
    in_venv = sys.prefix != sys.base_prefix
    link = (Path(sys.executable).parent if in_venv else tmp_path / "bin") / f"python-link-{os.getpid()}-{tmp_path.name}"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(sys.executable)
    _LINKS.append(link)
    return link


_LINKS: list[Path] = []


@pytest.fixture(autouse=True)
def _remove_python_links() -> Iterator[None]:
    yield
    while _LINKS:
        _LINKS.pop().unlink(missing_ok=True)


def test_arms_run_with_the_recorded_interpreter_and_dry_run_runs_nothing(tmp_path: Path) -> None:
    """Profiled through a symlink to python: the arms run with it; once it is gone, one line, exit 1."""
    link = _python_link(tmp_path)
    runs = tmp_path / "runs"
    assert_exit_ok(_run([str(link), "-m", "gradscope", "profile", "-q", "--runs-dir", str(runs), TOY, "--steps", "6"],
                        SCRIPTS))
    original = gradscope.load_run(runs_dir=runs)
    assert original.meta.provenance.executable == str(link)

    before = sorted(p.name for p in runs.iterdir())
    dry = _compare(runs, "--max-norm", "1", "--seeds", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert sorted(p.name for p in runs.iterdir()) == before  # no arm run, no compare directory
    assert f"every arm runs in {SCRIPTS} with {link}" in dry.stdout and "is written again" in dry.stdout
    commands = [line for line in dry.stdout.splitlines() if "$ " in line]
    assert len(commands) == 3 and all(f"$ {link} -m gradscope profile" in line for line in commands)  # base s0 reused
    chosen = _compare(runs, "--max-norm", "1", "--dry-run", "--python", sys.executable, "--json")
    assert _json(chosen)["python"] == sys.executable and not _json(chosen)["baseline_reused"]
    value = _json(_compare(runs, "--clip-value", "0.1", "--seeds", "1", "--dry-run", "--json"))
    argv = value["commands"][0]["argv"]
    assert value["arms_planned"] == ["clip_value=0.1"] and argv[argv.index("--clip-value") + 1] == "0.1"
    no_auto = _compare(runs, "--clip-value", "auto", "--dry-run")  # the toy never clipped by value
    assert no_auto.returncode == 2 and no_auto.stderr.startswith("gradscope: --clip-value auto: gradscope recommend")

    proc = _compare(runs, "--max-norm", "1", "--seeds", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    arm = gradscope.load_run(runs / _seed(_json(proc), "max_norm=1", 0)["run_id"])
    assert arm.status == "complete" and arm.meta.provenance.executable == str(link)

    link.unlink()
    gone = _compare(runs, "--max-norm", "1", "--seeds", "1")
    assert gone.returncode == 1 and gone.stderr.strip().splitlines() == [
        f"gradscope: the interpreter {link} that ran run {original.id} no longer exists; choose one with --python PATH"]
    bad = _compare(runs, "--python", str(tmp_path / "nope"), "--dry-run")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("clip", ["0", "0.25"], ids=["unclipped", "clips-itself"])
def test_hand_written_loop_compares_with_two_seeds(tmp_path: Path, clip: str) -> None:
    """word_language_model's loop (no torch.optim): every arm finishes, and each clipped arm either
    kept every update within max_norm or says it was not injected."""
    runs = tmp_path / "runs"
    _profile(runs, "cmp_handwritten.py", "--steps", "12", "--clip", clip)
    proc = _compare(runs, "--max-norm", "0.5", "--seeds", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = _json(proc)
    for arm in doc["arms"]:
        for seed in arm["seeds"]:
            assert seed["status"] == "ok" or seed["status"].startswith("not injected: "), seed
            run = gradscope.load_run(runs / seed["run_id"])
            assert run.status == "complete" and len(run.steps) == 12
            if arm["arm"] != BASELINE and seed["status"] == "ok":
                assert run.meta.clipping.injection == "applied"
                _clipped_within(run, {0: 0.5})
            elif arm["arm"] == BASELINE:
                assert (run.steps["clip_coef"].fillna(1.0) == 1.0).all()  # "no clipping" clipped nothing
    assert len(doc["verdict"]["effects"]) == 1 and doc["verdict"]["best"] is None  # 2 seeds: indicative at most


def test_an_arm_that_could_not_be_injected_says_so_in_the_table_json_and_verdict(tmp_path: Path) -> None:
    """Two backward passes per hand-written update and no clip call: no correct point to clip at."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    _profile(runs, "cmp_handwritten.py", "--steps", "8", "--accum", "2")
    proc = _compare(runs, "--max-norm", "0.5", "--seeds", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "compare.json").read_text())
    seed = _seed(doc, "max_norm=0.5", 0)
    assert seed["status"].startswith("not injected: ") and "backward calls per update" in seed["status"]
    assert gradscope.load_run(runs / seed["run_id"]).meta.clipping.injection == seed["status"]
    (effect,) = doc["verdict"]["effects"]
    assert effect["claim"] == "could not compare" and f"(log: {seed['log']})" in effect["text"]
    assert "s0 not injected: " in proc.stdout and "could not compare: seed 0 not injected" in proc.stdout
    assert "no threshold" not in proc.stdout and "best:" not in proc.stdout
