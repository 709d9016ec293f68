"""`gradscope recommend`: numbers checked against numpy, bad input, output formats, plot, no torch.

Runs are real run directories written through the store API (``RunWriter.write_part`` + ``write_meta``
+ ``compact``), with known distributions. Every expected number is computed here with numpy,
independently of ``gradscope.recommend``: percentiles with ``np.percentile``, clip rates by counting,
spikes with a plain loop over ``np.median`` windows. CLI tests run ``python -m gradscope`` for real.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import GRADSCOPE, clean_env

from gradscope import plots, recommend, store
from gradscope.errors import NoDataError, UsageError
from gradscope.recommend import view

REPO = Path(__file__).resolve().parents[1]
DEAD_PID = 2**22 + 12345  # beyond pid_max on Linux: never alive

# --------------------------------------------------------------------------------------------------
# Synthetic runs
# --------------------------------------------------------------------------------------------------


def optimizer_data(norms: np.ndarray, names: list[str], **columns: Any) -> dict[str, Any]:
    """One optimizer's data: per-layer norms (steps x layers) and optional step columns.

    The global norm defaults to the L2 norm over the layers (NaN layers, i.e. no gradient, left out;
    an inf layer makes it inf), as clip_grad_norm_ computes it.
    """
    norms = np.asarray(norms, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        default = np.sqrt(np.nansum(np.square(norms.astype(np.float64)), axis=1))
    return {"norms": norms, "names": names, "grad_norm": columns.pop("grad_norm", default), **columns}


def write_run(root: Path, optimizers: list[dict[str, Any]], *, parts: int = 3, compact: bool = True,
              status: str = "complete", meta: dict[str, Any] | None = None, shuffle_layers: bool = False,
              seed: int = 0) -> Path:
    """A run directory with these optimizers' steps, split into ``parts`` part files."""
    rng = np.random.default_rng(seed)
    run_dir = store.create_run_dir(root, "synthetic")
    described = tuple(store.OptimizerMeta(k, o.get("class_name", f"Opt{k}"), tuple(o["names"]),
                                           n_evaluations=o.get("n_evaluations", 0)) for k, o in enumerate(optimizers))
    store.write_meta(run_dir, store.RunMeta(status=status, pid=DEAD_PID, host="elsewhere", norm_type=2.0,
                                            optimizers=described, **(meta or {})))
    writer = store.RunWriter(run_dir)
    for part in range(parts):
        for k, opt in enumerate(optimizers):
            n = len(opt["norms"])
            rows = np.arange(n)[part * n // parts:(part + 1) * n // parts]
            if len(rows):
                writer.write_part("steps", _steps_part(opt, k, rows))
                writer.write_part("layers", _layers_part(opt, k, rows, rng if shuffle_layers else None))
    if compact:
        writer.compact()
    store.point_latest(root, run_dir)
    return run_dir


def _steps_part(opt: dict[str, Any], k: int, rows: np.ndarray) -> dict[str, Any]:
    n = len(rows)
    grad = np.asarray(opt["grad_norm"], dtype=np.float64)[rows]
    pick = lambda name, default: list(np.asarray(opt[name])[rows]) if name in opt else default  # noqa: E731
    return {
        "step": rows, "optimizer": [k] * n, "grad_norm": grad, "applied_norm": grad,
        "max_norm": [None if v is None or np.isnan(v) else float(v) for v in pick("max_norm", [None] * n)],
        "clip_source": pick("clip_source", ["none"] * n), "clip_coef": [1.0] * n, "loss": [1.0] * n,
        "n_backward": [1] * n, "lr": pick("lr", [0.1] * n), "loss_scale": [None] * n,
        "skipped": pick("skipped", [False] * n), "nonfinite": ~np.isfinite(grad), "time_s": rows * 0.01,
    }


def _layers_part(opt: dict[str, Any], k: int, rows: np.ndarray, rng: np.random.Generator | None) -> dict[str, Any]:
    n_layers = len(opt["names"])
    step = np.repeat(rows, n_layers)
    layer = np.tile(np.asarray(opt["names"], dtype=object), len(rows))
    norm = opt["norms"][rows].reshape(-1)
    if rng is not None:  # an irregular layout: rows of a part in any order
        order = rng.permutation(len(step))
        step, layer, norm = step[order], layer[order], norm[order]
    max_abs = opt["max_abs"][rows].reshape(-1) if "max_abs" in opt else [None] * len(step)
    if rng is not None:
        max_abs = np.asarray(max_abs)[order]
    return {"step": step, "optimizer": [k] * len(step), "layer": list(layer), "norm": norm, "max_abs": max_abs}


def lognormal(steps: int, layers: int, seed: int = 0, sigma: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.lognormal(0.0, sigma, (steps, layers)) * np.geomspace(0.1, 2.0, layers)


def names(n: int) -> list[str]:
    return [f"block.{i}.weight" for i in range(n)]


def recommend_dir(run_dir: Path, **kwargs: Any) -> list[recommend.Recommendation]:
    return recommend.recommend(store.load_run(run_dir), **kwargs)


# Independent references ---------------------------------------------------------------------------


def numpy_spikes(norms: np.ndarray, window: int = 50, min_history: int = 10, factor: float = 5.0) -> dict[int, float]:
    """{index: ratio} of every norm above ``factor`` x the median of the ``window`` norms before it."""
    found = {}
    for i in range(len(norms)):
        history = norms[max(0, i - window):i]
        if len(history) >= min_history and np.median(history) > 0 and norms[i] / np.median(history) > factor:
            found[i] = norms[i] / np.median(history)
    return found


def numpy_clip(norms: np.ndarray, threshold: float) -> tuple[int, float, float | None]:
    clipped = [threshold / v for v in norms if v > threshold]
    return len(clipped), len(clipped) / len(norms), (sum(clipped) / len(clipped) if clipped else None)


# --------------------------------------------------------------------------------------------------
# The numbers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2000 steps x 6 layers: lognormal norms, 3 AMP-skipped steps, 2 non-finite, a script threshold."""
    n = 2000
    norms = lognormal(n, 6, seed=1)
    skipped = np.zeros(n, bool)
    skipped[[100, 700, 1500]] = True
    grad = np.sqrt(np.square(norms).sum(axis=1))
    grad[[700, 1200]] = [np.inf, np.nan]  # an AMP overflow (skipped) and a real NaN step
    clip_source = np.array(["script"] * n, dtype=object)
    max_norm = np.full(n, 2.5)
    run_dir = write_run(tmp_path_factory.mktemp("mixed"), [optimizer_data(
        norms, names(6), grad_norm=grad, skipped=skipped, clip_source=clip_source, max_norm=max_norm)])
    used = grad[np.isfinite(grad) & ~skipped]
    return {"dir": run_dir, "grad": grad, "used": used, "norms": norms, "skipped": skipped,
            "rec": recommend_dir(run_dir)[0]}


def test_max_norm_is_numpy_p95_of_finite_unskipped_norms(mixed_run: dict[str, Any]) -> None:
    rec, used = mixed_run["rec"], mixed_run["used"]
    assert len(used) == 2000 - 4  # 3 skipped (one of them inf) + 1 NaN
    assert rec.max_norm == np.percentile(used, 95)
    d = rec.distribution
    assert (d.n_recorded, d.n_used, d.n_nonfinite, d.n_skipped, d.n_before_skip) == (2000, 1996, 2, 3, 0)
    expected = np.percentile(used, [50, 90, 95, 99])
    assert [d.median, d.p90, d.p95, d.p99] == list(expected)
    assert (d.min, d.max) == (used.min(), used.max()) and d.mean == pytest.approx(used.mean(), rel=1e-12)
    assert rec.percentile == 95.0 and rec.intent == "spike-guard"


def test_clip_rates_of_every_candidate_match_a_count(mixed_run: dict[str, Any]) -> None:
    rec, used = mixed_run["rec"], mixed_run["used"]
    by_label = {row.label: row for row in rec.clip_rates}
    assert set(by_label) == {"p50", "p90", "p95", "p99", "script", "common default (transformers)",
                             "common default (RNNs)"}
    expected_thresholds = dict(zip(["p50", "p90", "p95", "p99"], np.percentile(used, [50, 90, 95, 99]), strict=True))
    expected_thresholds.update({"script": 2.5, "common default (transformers)": 1.0, "common default (RNNs)": 5.0})
    for label, row in by_label.items():
        assert row.threshold == expected_thresholds[label]
        n, rate, scale = numpy_clip(used, row.threshold)
        assert (row.n_clipped, row.clip_rate) == (n, pytest.approx(rate, abs=1e-15))
        assert row.mean_scale == (None if scale is None else pytest.approx(scale, rel=1e-12))
    assert [r.threshold for r in rec.clip_rates] == sorted(r.threshold for r in rec.clip_rates)
    assert [r.label for r in rec.clip_rates if r.recommended] == ["p95"]
    assert rec.clip_rate == by_label["p95"].clip_rate == pytest.approx(0.05, abs=1 / len(used))


def test_per_layer_stats_match_numpy_over_the_used_steps(mixed_run: dict[str, Any]) -> None:
    rec, norms = mixed_run["rec"], mixed_run["norms"]
    grad = mixed_run["grad"]
    used_rows = np.isfinite(grad) & ~mixed_run["skipped"]
    squares = {}
    for j, name in enumerate(names(6)):
        values = norms[used_rows, j].astype(np.float32)
        layer = next(s for s in rec.layers if s.layer == name)
        assert layer.n == used_rows.sum()
        assert [layer.median, layer.p95, layer.threshold] == list(np.percentile(values, [50.0, 95.0, 95.0]))
        assert layer.max == values.max()
        squares[name] = float(np.square(values.astype(np.float64)).sum())
    total = sum(squares.values())
    for layer in rec.layers:
        assert layer.sq_share == pytest.approx(squares[layer.layer] / total, rel=1e-9)
    assert [s.layer for s in rec.layers] == sorted(squares, key=lambda k: -next(
        s.threshold for s in rec.layers if s.layer == k))  # largest threshold first


def test_the_first_nonfinite_step_is_reported_with_its_amp_flag(mixed_run: dict[str, Any]) -> None:
    nf = mixed_run["rec"].nonfinite
    assert (nf.count, nf.count_not_skipped, nf.first_step, nf.first_step_amp_skipped) == (2, 1, 700, True)
    slugs = [note.slug for note in mixed_run["rec"].notes]
    assert "amp-skipped" in slugs and "nonfinite-steps" in slugs  # step 1200 was NaN and not skipped


def test_without_layers_only_the_layer_evidence_is_missing(mixed_run: dict[str, Any]) -> None:
    full, light = mixed_run["rec"], recommend_dir(mixed_run["dir"], with_layers=False)[0]
    assert light.max_norm == full.max_norm and light.clip_rates == full.clip_rates
    assert light.distribution == full.distribution and light.spikes.count == full.spikes.count
    assert light.layers == () and full.layers
    assert light.nonfinite.first_step == full.nonfinite.first_step == 700 and light.nonfinite.first_layer is None


def test_spikes_match_a_plain_loop_and_name_the_layer_that_carried_them(tmp_path: Path) -> None:
    n, n_layers = 1500, 5
    norms = lognormal(n, n_layers, seed=2, sigma=0.15)
    injected = {300: 2, 301: 2, 800: 4, 1400: 0}  # step -> the layer that jumps 40x
    for step, layer in injected.items():
        norms[step, layer] *= 40
    rec = recommend_dir(write_run(tmp_path, [optimizer_data(norms, names(n_layers))]))[0]
    grad = np.sqrt(np.square(norms.astype(np.float32).astype(np.float64)).sum(axis=1))
    expected = numpy_spikes(grad)
    assert set(expected) <= set(injected) and 300 in expected  # the reference itself sees the injection
    assert rec.spikes.count == len(expected) and (rec.spikes.factor, rec.spikes.window) == (5.0, 50)
    assert {s.step for s in rec.spikes.shown} == set(expected)
    assert [s.step for s in rec.spikes.shown] == sorted(expected, key=lambda i: -expected[i])
    for spike in rec.spikes.shown:
        assert spike.ratio == pytest.approx(expected[spike.step], rel=1e-12)
        assert spike.rolling_median == pytest.approx(np.median(grad[spike.step - 50:spike.step]), rel=1e-12)
        row = norms[spike.step].astype(np.float32).astype(np.float64)
        top = int(np.argmax(row))
        assert top == injected[spike.step]
        assert spike.layers[0].layer == names(n_layers)[top]
        assert spike.layers[0].share == pytest.approx(row[top] ** 2 / np.square(row).sum(), rel=1e-6)
        assert len(spike.layers) == 3


def test_only_the_largest_spikes_are_detailed_but_all_are_counted(tmp_path: Path) -> None:
    norms = lognormal(3000, 2, seed=3, sigma=0.1)
    for i, step in enumerate(range(100, 3000, 120)):  # 25 spikes of growing size
        norms[step] *= 10 + i
    rec = recommend_dir(write_run(tmp_path, [optimizer_data(norms, names(2))]))[0]
    grad = np.sqrt(np.square(norms.astype(np.float32).astype(np.float64)).sum(axis=1))
    expected = numpy_spikes(grad)
    assert rec.spikes.count == len(expected) == 25
    assert [s.step for s in rec.spikes.shown] == sorted(expected, key=lambda i: -expected[i])[:recommend.SPIKES_SHOWN]


def test_skip_steps_leaves_warmup_out(tmp_path: Path) -> None:
    norms = lognormal(1000, 3, seed=4)
    norms[:50] *= 30  # a loud start
    run_dir = write_run(tmp_path, [optimizer_data(norms, names(3))])
    grad = np.sqrt(np.square(norms.astype(np.float32).astype(np.float64)).sum(axis=1))
    full, skipped = recommend_dir(run_dir)[0], recommend_dir(run_dir, skip_steps=50)[0]
    assert skipped.max_norm == np.percentile(grad[50:], 95) < full.max_norm == np.percentile(grad, 95)
    assert (skipped.distribution.n_used, skipped.distribution.n_before_skip) == (950, 50)
    layer = next(s for s in skipped.layers if s.layer == "block.0.weight")
    assert layer.p95 == np.percentile(norms[50:, 0].astype(np.float32), [95.0])[0]
    # without --skip-steps the first 10% hold every clipped step; the lr is constant, so they are the
    # early steps, not a warm-up, and the recommendation stands
    w = full.warmup
    assert (w.window, w.basis, w.kind, w.dominates) == (100, "first-10%", "early-steps", True)
    assert w.tail_share == 1.0 and w.max_norm_without == np.percentile(grad[100:], 95)
    assert (w.lr_first, w.lr_after) == (0.1, 0.1)
    assert w.clip_rate_without == np.mean(grad[100:] > full.max_norm)
    assert w.max_norm_without_clip_rate == np.mean(grad > w.max_norm_without)
    (note,) = [n for n in full.notes if n.slug == "early-steps-dominate"]
    assert "warm-up" not in [n.slug for n in full.notes] and "recommendation stands" in note.message
    assert "no lr warm-up: lr 0.1 at the first step and after them" in note.message
    assert skipped.warmup is not None and not skipped.warmup.dominates


def test_an_lr_ramp_sets_the_warmup_window(tmp_path: Path) -> None:
    norms = lognormal(400, 2, seed=5)
    lr = np.minimum(1.0, (np.arange(400) + 1) / 40) * 1e-3  # linear warm-up to step 39
    rec = recommend_dir(write_run(tmp_path, [optimizer_data(norms, names(2), lr=lr)]))[0]
    assert (rec.warmup.window, rec.warmup.basis, rec.warmup.skip_steps) == (39, "lr-ramp", 39)
    assert (rec.warmup.kind, rec.warmup.lr_first, rec.warmup.lr_after) == ("warm-up", lr[0], lr[39])


def test_a_loud_lr_warmup_is_called_a_warmup_with_its_lr(tmp_path: Path) -> None:
    norms = lognormal(400, 2, seed=5)
    norms[:30] *= 30
    lr = np.minimum(1.0, (np.arange(400) + 1) / 40) * 1e-3
    run_dir = write_run(tmp_path, [optimizer_data(norms, names(2), lr=lr)])
    (note,) = [n for n in recommend_dir(run_dir)[0].notes if n.slug == "warmup-dominates"]
    assert "lr rises from 2.5e-05 at the first step to its peak 0.001 after 39 steps" in note.message
    assert "try --skip-steps 39" in note.message
    out = gradscope("recommend", str(run_dir)).stdout
    assert "warm-up: the lr rises from 2.5e-05" in out and "early steps:" not in out


def test_a_closure_optimizer_with_two_steps_says_so_and_claims_no_rate(tmp_path: Path) -> None:
    norms = lognormal(2, 2, seed=8)
    run_dir = write_run(tmp_path, [optimizer_data(norms, names(2), class_name="LBFGS", n_evaluations=37)], parts=1)
    rec = recommend_dir(run_dir)[0]
    assert rec.closure == recommend.Closure(n_steps=2, n_evaluations=37, per_step=18.5)
    assert rec.intent == "too-few-steps" and "%" not in rec.intent_text
    slugs = [n.slug for n in rec.notes]
    assert "closure-optimizer" in slugs and "too-few-steps" in slugs
    assert "few-steps" not in slugs and "frequent-clipping" not in slugs  # 1 of 2 steps is no clip rate
    out = gradscope("recommend", str(run_dir)).stdout
    assert "closure optimizer: 2 steps recorded, 37 closure evaluations (~18.5 per step)" in out
    assert "p95 of only 2 used steps: too few to support a percentile (20 needed)" in out
    assert "of steps here" not in out and "use (indicative only): " in out


def test_an_older_lbfgs_run_without_evaluations_is_still_a_closure_optimizer(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, [optimizer_data(lognormal(30, 2), names(2), class_name="LBFGS")], parts=1)
    rec = recommend_dir(run_dir)[0]
    assert rec.closure == recommend.Closure(n_steps=30, n_evaluations=None, per_step=None)
    assert rec.intent == "spike-guard" and "closure-optimizer" in [n.slug for n in rec.notes]


def test_tied_norms_never_get_an_intent_that_contradicts_the_rate(tmp_path: Path) -> None:
    grad = np.ones(200)
    grad[:40] = 3.0  # p95 = 3.0 clips nothing; p50 = 1.0 clips 20%, not ~50%
    run_dir = write_run(tmp_path, [optimizer_data(lognormal(200, 2), names(2), grad_norm=grad)])
    rec = recommend_dir(run_dir)[0]
    assert rec.clip_rate == 0.0 and "(yet 0.0% of steps here: many steps share the same norm)" in rec.intent_text
    rec = recommend_dir(run_dir, percentile=50.0)[0]
    assert rec.clip_rate == 0.2 and "p50 clips ~50% of steps (yet 20.0% of steps here" in rec.intent_text
    rec = recommend_dir(write_run(tmp_path, [optimizer_data(lognormal(200, 2), names(2))]))[0]
    assert rec.intent_text.endswith("~5% (5.0% of steps here)")


def value_run(tmp_path: Path, clip_value: float | None = 0.5, injected: float | None = None) -> tuple[Path, np.ndarray]:
    """300 steps x 3 layers whose per-layer max |g| is recorded, and meta.json naming the value clipping."""
    rng = np.random.default_rng(9)
    max_abs = rng.lognormal(-1.0, 0.5, (300, 3)).astype(np.float32)
    clipping = store.Clipping(script_clip_value=clip_value, injected_clip_value=injected,
                              script_clip_function="clip_grad_value_" if clip_value else None)
    run_dir = write_run(tmp_path, [optimizer_data(lognormal(300, 3), names(3), max_abs=max_abs)],
                        meta={"clipping": clipping})
    return run_dir, max_abs.max(axis=1).astype(np.float64)


def test_a_value_clipping_run_gets_a_clip_value_and_the_scripts_count(tmp_path: Path) -> None:
    run_dir, largest = value_run(tmp_path)
    rec = recommend_dir(run_dir)[0]
    v = rec.value_clipping
    assert rec.clip_value == v.clip_value == np.percentile(largest, 95)
    assert (v.n_steps, v.median, v.p99, v.max) == (300, np.median(largest), np.percentile(largest, 99), largest.max())
    assert v.clip_rate == np.mean(largest > v.clip_value)
    assert (v.script_clip_value, v.script_n_clipped) == (0.5, int((largest > 0.5).sum()))
    assert v.script_clip_rate == np.mean(largest > 0.5) and v.injected_clip_value is None
    (note,) = [n for n in rec.notes if n.slug == "script-clips-by-value"]
    assert f"changed {v.script_n_clipped} of 300 steps" in note.message
    assert "script-clips-often" in [n.slug for n in rec.notes]  # 0.5 is near the median here
    assert recommend_dir(run_dir, with_layers=False)[0].clip_value == rec.clip_value  # compare's fast path
    assert recommend_dir(run_dir, skip_steps=100)[0].clip_value == np.percentile(largest[100:], 95)
    out = gradscope("recommend", str(run_dir)).stdout
    assert f"the script clips by value: clip_grad_value_ at 0.5 changed {v.script_n_clipped} of 300 steps" in out
    assert f"torch.nn.utils.clip_grad_value_(params, clip_value={rec.clip_value:.6g})" in out
    doc = json.loads(gradscope("recommend", str(run_dir), "--json").stdout)["recommendations"][0]
    assert doc["clip_value"] == rec.clip_value
    assert set(doc["value_clipping"]) == {"n_steps", "median", "p95", "p99", "max", "clip_value", "clip_rate",
                                          "script_clip_value", "script_n_clipped", "script_clip_rate",
                                          "injected_clip_value", "injected_n_clipped"}


def test_injected_value_clipping_is_counted_and_norm_clipping_runs_get_no_clip_value(tmp_path: Path) -> None:
    run_dir, largest = value_run(tmp_path / "a", clip_value=None, injected=0.8)
    v = recommend_dir(run_dir)[0].value_clipping
    assert (v.injected_clip_value, v.injected_n_clipped, v.script_clip_value) == (0.8, int((largest > 0.8).sum()), None)
    rng = np.random.default_rng(10)  # two optimizers (a GAN): each gets its own steps' largest |g|
    two = [rng.lognormal(k, 0.5, (80, 2)).astype(np.float32) for k in (0.0, 2.0)]
    run_dir = write_run(tmp_path / "gan", [optimizer_data(lognormal(80, 2), names(2), max_abs=m) for m in two],
                        meta={"clipping": store.Clipping(script_clip_value=1.0)})
    got = [rec.clip_value for rec in recommend_dir(run_dir)]
    assert got == [np.percentile(m.max(axis=1).astype(np.float64), 95) for m in two]
    plain = write_run(tmp_path / "b", [optimizer_data(lognormal(50, 2), names(2))])
    rec = recommend_dir(plain)[0]
    assert rec.clip_value is None and rec.value_clipping is None


@pytest.mark.parametrize(("percentile", "intent"), [(10.0, "normalization"), (50.0, "intermediate"),
                                                    (99.0, "spike-guard"), (100.0, "spike-guard")])
def test_percentile_sets_intent_and_frequent_clipping_warns(tmp_path: Path, percentile: float, intent: str) -> None:
    norms = lognormal(500, 2, seed=6)
    rec = recommend_dir(write_run(tmp_path, [optimizer_data(norms, names(2))]), percentile=percentile)[0]
    grad = np.sqrt(np.square(norms.astype(np.float32).astype(np.float64)).sum(axis=1))
    assert rec.max_norm == np.percentile(grad, percentile)
    assert rec.intent == intent and rec.clip_rate == numpy_clip(grad, rec.max_norm)[1]
    frequent = [n for n in rec.notes if n.slug == "frequent-clipping"]
    assert bool(frequent) == (percentile <= 50)
    if frequent:
        assert "symptom, not a cure" in frequent[0].message and "learning rate" in frequent[0].message
    if percentile == 100.0:
        assert rec.clip_rate == 0.0 and rec.max_norm == grad.max()


def test_a_script_that_clips_every_step_is_warned_about(tmp_path: Path) -> None:
    norms = lognormal(300, 2, seed=7) * 20  # norms ~10-40 against max_norm=0.1, as in DETR
    run_dir = write_run(tmp_path, [optimizer_data(norms, names(2), clip_source=["script"] * 300,
                                                  max_norm=[0.1] * 300)])
    rec = recommend_dir(run_dir)[0]
    script = next(r for r in rec.clip_rates if r.source == "script")
    assert (script.threshold, script.clip_rate) == (0.1, 1.0)
    assert any(n.slug == "script-clips-often" and "clips 100% of steps" in n.message for n in rec.notes)


def test_first_nonfinite_layer_in_parameter_order_ignoring_layers_without_gradients(tmp_path: Path) -> None:
    layer_names = ["embed.weight", "frozen.weight", "mid.weight", "head.weight"]
    norms = lognormal(200, 4, seed=8)
    norms[:, 1] = np.nan  # never had a gradient
    norms[150, 2] = np.nan  # NaN gradients
    norms[150, 3] = np.inf
    norms[170:, :] = np.inf
    rec = recommend_dir(write_run(tmp_path, [optimizer_data(norms, layer_names)]))[0]
    nf = rec.nonfinite
    assert (nf.count, nf.count_not_skipped, nf.first_step, nf.first_step_amp_skipped) == (31, 31, 150, False)
    assert (nf.first_layer, nf.layers, nf.n_layers) == ("mid.weight", ("mid.weight", "head.weight"), 2)
    assert "frozen.weight" not in {s.layer for s in rec.layers}  # no finite norm: no stats
    assert rec.distribution.n_used == 169


def test_several_optimizers_get_one_recommendation_each(tmp_path: Path) -> None:
    gen, disc = lognormal(300, 3, seed=9), lognormal(300, 2, seed=10) * 7
    run_dir = write_run(tmp_path, [optimizer_data(gen, ["g.0", "g.1", "g.2"]), optimizer_data(disc, ["d.0", "d.1"])])
    recs = recommend_dir(run_dir)
    assert [r.optimizer for r in recs] == [0, 1] and recs[1].optimizer_label == "1 (Opt1)"
    for rec, data in zip(recs, (gen, disc), strict=True):
        grad = np.sqrt(np.square(data.astype(np.float32).astype(np.float64)).sum(axis=1))
        assert rec.max_norm == np.percentile(grad, 95)
        for j, layer in enumerate(sorted(rec.layers, key=lambda s: s.layer)):
            assert layer.median == np.percentile(data[:, j].astype(np.float32), [50.0])[0]
    only = recommend_dir(run_dir, optimizer=1)
    assert [r.optimizer for r in only] == [1] and only[0].max_norm == recs[1].max_norm
    with pytest.raises(UsageError, match="has no optimizer 4; it has 0, 1"):
        recommend_dir(run_dir, optimizer=4)


@pytest.mark.parametrize("batch_rows", [7, 100, 1 << 20])
@pytest.mark.parametrize("shuffle", [False, True])
def test_layer_stats_do_not_depend_on_layout_or_batch_size(tmp_path: Path, batch_rows: int, shuffle: bool) -> None:
    """Batches that cut step blocks in two (7 rows, 3 layers), and rows in any order, give the same stats."""
    norms = lognormal(120, 3, seed=11)
    norms[60] *= 50  # a spike, whose layers must be found whatever the layout
    run_dir = write_run(tmp_path, [optimizer_data(norms, names(3))], parts=4, shuffle_layers=shuffle)
    rec = recommend_dir(run_dir, layer_batch_rows=batch_rows)[0]
    for j, name in enumerate(names(3)):
        layer = next(s for s in rec.layers if s.layer == name)
        values = norms[:, j].astype(np.float32)
        assert (layer.n, layer.median, layer.p95, layer.max) == (120, *np.percentile(values, [50.0, 95.0]), values.max())
    assert [s.step for s in rec.spikes.shown] == [60] and len(rec.spikes.shown[0].layers) == 3


def test_killed_run_is_analysed_from_its_parts_and_labelled(tmp_path: Path) -> None:
    norms = lognormal(90, 2, seed=13)
    run_dir = write_run(tmp_path, [optimizer_data(norms, names(2))], compact=False, status="running")
    rec = recommend_dir(run_dir)[0]
    assert not rec.complete and rec.run_status == "killed"
    assert rec.status_note == ("incomplete run (killed at step 89): using the steps recorded up to its last flush")
    grad = np.sqrt(np.square(norms.astype(np.float32).astype(np.float64)).sum(axis=1))
    assert rec.max_norm == np.percentile(grad, 95)
    assert "few-steps" in [n.slug for n in rec.notes]


def test_no_usable_steps_raise_no_data(tmp_path: Path) -> None:
    empty = store.create_run_dir(tmp_path, "empty")
    store.write_meta(empty, store.RunMeta(status="complete"))
    writer = store.RunWriter(empty)
    writer.compact()
    with pytest.raises(NoDataError, match="recorded no optimizer step"):
        recommend_dir(empty)
    bad = write_run(tmp_path, [optimizer_data(np.full((5, 2), np.inf), names(2))])
    with pytest.raises(NoDataError, match="every one of the 5 recorded norms of optimizer 0 \\(Opt0\\) is non-finite"):
        recommend_dir(bad)
    with pytest.raises(UsageError, match="lower --skip-steps"):
        recommend_dir(write_run(tmp_path, [optimizer_data(lognormal(5, 2), names(2))]), skip_steps=5)


# --------------------------------------------------------------------------------------------------
# Output: JSON, plain text, rich on a terminal
# --------------------------------------------------------------------------------------------------


def gradscope(*args: str, cwd: Path = REPO, tty: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m gradscope ARGS`` as a real subprocess (stdout on a pseudo-terminal with ``tty``)."""
    if not tty:
        return subprocess.run([*GRADSCOPE, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                              timeout=120)
    leader, follower = pty.openpty()
    env = clean_env({"COLUMNS": "120", "TERM": "xterm-256color"})
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([*GRADSCOPE, *args], cwd=cwd, env=env, stdout=follower, stderr=subprocess.PIPE, text=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    stderr = proc.stderr.read() if proc.stderr else ""
    proc.wait(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, b"".join(chunks).decode(), stderr)


JSON_KEYS = {"format", "schema_version", "gradscope_version", "run", "percentile", "percentile_method", "clip_rule",
             "skip_steps", "recommendations"}
RECOMMENDATION_KEYS = {"optimizer", "optimizer_label", "norm_type", "max_norm", "clip_rate", "intent", "intent_text",
                       "distribution", "clip_rates", "spikes", "nonfinite", "warmup", "layers", "notes", "clip_value",
                       "value_clipping", "closure"}


def test_json_is_strict_and_has_the_documented_keys(mixed_run: dict[str, Any]) -> None:
    proc = gradscope("recommend", str(mixed_run["dir"]), "--json")
    assert proc.returncode == 0, proc.stderr

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads(proc.stdout, parse_constant=no_constants)  # all of stdout is the document
    assert set(doc) == JSON_KEYS and doc["format"] == "gradscope-recommend" and doc["schema_version"] == 1
    assert "linear interpolation" in doc["percentile_method"]
    assert doc["run"] == {"id": mixed_run["dir"].name, "path": str(mixed_run["dir"].resolve()),
                          "status": "complete", "complete": True, "note": None}
    (rec,) = doc["recommendations"]
    assert set(rec) == RECOMMENDATION_KEYS
    assert rec["max_norm"] == np.percentile(mixed_run["used"], 95)
    assert set(rec["distribution"]) == {"n_recorded", "n_used", "n_nonfinite", "n_skipped", "n_before_skip", "min",
                                        "median", "p90", "p95", "p99", "max", "mean"}
    assert set(rec["clip_rates"][0]) == {"label", "source", "threshold", "recommended", "n_clipped", "clip_rate",
                                         "mean_scale"}
    assert set(rec["layers"][0]) == {"layer", "n", "median", "p95", "threshold", "max", "sq_share"}
    assert len(rec["layers"]) == 6
    assert {n["slug"] for n in rec["notes"]} == {"amp-skipped", "nonfinite-steps", "script-clips-often"}
    assert set(rec["nonfinite"]) == {"count", "count_not_skipped", "first_step", "first_step_amp_skipped", "first_layer", "layers",
                                     "n_layers"}
    assert set(rec["warmup"]) == {"window", "basis", "skip_steps", "tail_share", "dominates", "max_norm_without",
                                  "clip_rate_without", "kind", "lr_first", "lr_after", "max_norm_without_clip_rate"}
    assert rec["clip_value"] is None and rec["value_clipping"] is None and rec["closure"] is None
    assert set(rec["spikes"]) == {"factor", "window", "count", "shown"}


def test_to_json_turns_nan_into_null(mixed_run: dict[str, Any]) -> None:
    rec = mixed_run["rec"]
    odd = recommend.Spike(step=1, norm=float("inf"), rolling_median=float("nan"), ratio=2.0, layers=())
    doc = view.to_json([rec.__class__(**{**rec.__dict__, "spikes": recommend.Spikes(5.0, 50, 1, (odd,))})])
    spike = doc["recommendations"][0]["spikes"]["shown"][0]
    assert spike["norm"] is None and spike["rolling_median"] is None
    json.dumps(doc, allow_nan=False)


def test_piped_output_is_plain_text_with_the_evidence(mixed_run: dict[str, Any]) -> None:
    proc = gradscope("recommend", "--runs-dir", str(mixed_run["dir"].parent))  # latest run, no RUN given
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\x1b[" not in out and "─" not in out  # no ANSI colours, no box drawing when piped
    assert f"max_norm = {mixed_run['rec'].max_norm:.6g}" in out
    for heading in ("Pre-clip global gradient norm", "What each threshold would clip", "Layers", "intent: spike guard",
                    "non-finite steps: 2, the first at step 700 (an AMP-skipped step", "early steps: the first",
                    "warning [nonfinite-steps]", "clip_grad_norm_(params, max_norm="):
        assert heading in out
    assert re.search(r"p95  <- recommended\s+\S+\s+\d+\s+5\.\d%", out)


def test_terminal_output_uses_rich(mixed_run: dict[str, Any]) -> None:
    proc = gradscope("recommend", str(mixed_run["dir"]), tty=True)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" in proc.stdout and "─" in proc.stdout  # styled text and rich's table rules
    assert "What each threshold would clip" in proc.stdout and "max_norm = " in proc.stdout


def test_killed_run_through_the_cli_exits_0_with_the_label(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, [optimizer_data(lognormal(60, 2), names(2))], compact=False, status="running")
    proc = gradscope("recommend", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "incomplete run (killed at step 59): using the steps recorded up to its last flush" in proc.stdout
    doc = json.loads(gradscope("recommend", str(run_dir), "--json").stdout)
    assert doc["run"]["status"] == "killed" and doc["run"]["complete"] is False and "killed at step 59" in doc["run"]["note"]


# --------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, a documented exit code, never a traceback
# --------------------------------------------------------------------------------------------------


def _foreign(root: Path) -> Path:
    path = root / "foreign"
    path.mkdir()
    (path / "meta.json").write_text(json.dumps({"format": "something-else"}))
    return path


def _newer(root: Path) -> Path:
    run_dir = write_run(root / "newer", [optimizer_data(lognormal(20, 2), names(2))])
    meta = json.loads((run_dir / "meta.json").read_text())
    (run_dir / "meta.json").write_text(json.dumps({**meta, "schema_version": 99, "gradscope_version": "9.0"}))
    return run_dir


def _zero_steps(root: Path) -> Path:
    run_dir = store.create_run_dir(root, "zero")
    store.write_meta(run_dir, store.RunMeta(status="complete"))
    store.RunWriter(run_dir).compact()
    return run_dir


def _all_nonfinite(root: Path) -> Path:
    return write_run(root / "nan", [optimizer_data(np.full((8, 2), np.nan), names(2), grad_norm=np.full(8, np.nan))])


def _plain_dir(root: Path) -> Path:
    (root / "plain").mkdir()
    return root / "plain"


def _a_file(root: Path) -> Path:
    (root / "notes.txt").write_text("hello")
    return root / "notes.txt"


def _ok(root: Path) -> Path:
    return write_run(root / "ok", [optimizer_data(lognormal(30, 2), names(2))])


BAD_INPUT = [
    # (case, make the run, extra args, exit code, what the line says)
    ("no runs yet", None, [], 1, "no runs yet in"),
    ("unknown id", None, ["no-such-run"], 1, "no run named no-such-run"),
    ("not a run dir", _plain_dir, [], 1, "is not a gradscope run: it has no meta.json"),
    ("a file", _a_file, [], 1, "is not a gradscope run directory"),
    ("foreign", _foreign, [], 1, 'is not a gradscope run file (no "format": "gradscope-run")'),
    ("newer schema", _newer, [], 1, "was written by gradscope 9.0 (schema 99); this gradscope reads schema 1"),
    ("zero steps", _zero_steps, [], 3, "recorded no optimizer step"),
    ("all non-finite", _all_nonfinite, [], 3, "is non-finite or AMP-skipped: nothing to set a threshold from"),
    ("percentile 0", _ok, ["--percentile", "0"], 2, "--percentile must be in (0, 100], got 0"),
    ("percentile 101", _ok, ["--percentile", "101"], 2, "--percentile must be in (0, 100], got 101"),
    ("percentile nan", _ok, ["--percentile", "nan"], 2, "--percentile must be in (0, 100], got nan"),
    ("no such optimizer", _ok, ["--optimizer", "3"], 2, "has no optimizer 3; it has 0"),
    ("skip everything", _ok, ["--skip-steps", "30"], 2, "none at or after step 30: lower --skip-steps"),
    ("plot suffix", _ok, ["--plot", "out.txt"], 2, "use a file name ending in .png, .svg, .pdf"),
    ("plot in no directory", _ok, ["--plot", "no/such/dir/p.png"], 2, "--plot no/such/dir/p.png: the directory "),
]


@pytest.mark.parametrize(("case", "make", "extra", "code", "says"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_and_an_exit_code(tmp_path: Path, case: str, make: Any, extra: list[str], code: int,
                                                says: str) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    target = [str(make(runs))] if make else []
    proc = gradscope("recommend", "--runs-dir", str(runs), *target, *extra, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("gradscope: ") and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_typer_usage_errors_exit_2(tmp_path: Path) -> None:
    proc = gradscope("recommend", "--skip-steps", "-1", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_help_documents_every_option() -> None:
    proc = gradscope("recommend", "--help")
    assert proc.returncode == 0
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", proc.stdout).split())
    for fragment in ("--percentile", "A high one (95-99) guards against spikes", "--skip-steps", "(an lr warm-up) out",
                     "--optimizer", "each optimizer gets its own recommendation", "--json",
                     "format gradscope-recommend", "--plot", "Exit codes: 0 ok, 1 no such run"):
        assert fragment in text


# --------------------------------------------------------------------------------------------------
# The plot, torch, the bench harness
# --------------------------------------------------------------------------------------------------


def test_plot_shows_the_series_on_a_log_axis_with_max_norm_and_a_histogram(mixed_run: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    from matplotlib.image import imread

    run = store.load_run(mixed_run["dir"])
    recs = recommend.recommend(run)
    fig = plots.plot_recommend(run, recs, tmp_path / "rec.png")
    assert len(fig.axes) == 2
    series, histogram = fig.axes
    assert series.get_yscale() == "log" and histogram.get_xscale() == "log"
    flat = [line for line in series.get_lines() if list(line.get_ydata()) == [recs[0].max_norm] * 2]
    assert flat and list(flat[0].get_xdata()) == [0, 1]  # an axhline: spans the axis at y = max_norm
    assert any(list(line.get_xdata()) == [recs[0].max_norm] * 2 for line in histogram.get_lines())
    assert sum(patch.get_height() for patch in histogram.patches) == recs[0].distribution.n_used
    image = imread(tmp_path / "rec.png")
    width, height = fig.get_size_inches() * plots.DPI
    assert image.shape[:2] == (round(height), round(width)) == (450, 1200)
    assert image[..., :3].std() > 0.05  # drawn, not blank


def test_cli_plot_writes_the_file_and_says_so(mixed_run: dict[str, Any], tmp_path: Path) -> None:
    proc = gradscope("recommend", str(mixed_run["dir"]), "--json", "--plot", str(tmp_path / "p.png"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stderr.strip() == f"gradscope: wrote {tmp_path / 'p.png'}"
    json.loads(proc.stdout)  # stdout is still only the JSON document


def test_recommend_never_imports_torch(mixed_run: dict[str, Any], tmp_path: Path) -> None:
    code = (
        "import sys, io, contextlib\n"
        "from gradscope.cli import main\n"
        "from gradscope import recommend, plots\nfrom gradscope.recommend import view\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    rc = main(['recommend', {str(mixed_run['dir'])!r}, '--plot', {str(tmp_path / 'x.png')!r}])\n"
        "assert rc == 0 and 'max_norm' in out.getvalue(), rc\n"
        "print('torch' in sys.modules, 'typer' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]  # the command ran in-process, without torch


def test_bench_harness_runs_tiny(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_recommend.py"), "--steps", "3000",
                           "--layers", "4"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:5] == ["steps", "layers", "build", "s", "wall"]
    assert lines[2].split()[:2] == ["3,000", "4"] and lines[2].rstrip().endswith("ok")
