"""The shared statistics: percentiles, clip rates and the two spike rules, checked against plain numpy loops."""

from __future__ import annotations

import math

import numpy as np

from gradscope import stats


def loop_median_before(values: np.ndarray, window: int, min_history: int) -> np.ndarray:
    """The median of the finite values among the ``window`` before each one, by a plain loop."""
    out = np.full(len(values), np.nan)
    for i in range(len(values)):
        before = values[max(0, i - window): i]
        before = before[np.isfinite(before)]
        if len(before) >= min_history:
            out[i] = np.median(before)
    return out


def test_the_two_rules_differ_on_purpose() -> None:
    assert (stats.NORM_SPIKE.factor, stats.NORM_SPIKE.window, stats.NORM_SPIKE.min_history) == (5.0, 50, 10)
    assert (stats.LOSS_SPIKE.factor, stats.LOSS_SPIKE.window, stats.LOSS_SPIKE.min_history) == (3.0, 20, 5)


def test_rolling_median_before_matches_a_loop_and_skips_nan() -> None:
    values = np.random.default_rng(1).lognormal(size=300)
    values[[40, 41, 120]] = np.nan
    got = stats.rolling_median_before(values, 20, 5)
    assert np.allclose(got, loop_median_before(values, 20, 5), equal_nan=True)


def test_spike_ratios_and_spike_mask_agree_on_norms() -> None:
    rng = np.random.default_rng(2)
    norms = rng.lognormal(size=2000)
    norms[rng.choice(2000, 30, replace=False)] *= 40
    ratios, medians = stats.spike_ratios(norms)
    assert np.allclose(medians, loop_median_before(norms, 50, 10), equal_nan=True)
    hits = ratios > stats.NORM_SPIKE.factor
    assert hits.sum() >= 20
    assert np.array_equal(hits, stats.spike_mask(norms, stats.NORM_SPIKE))


def test_spike_mask_on_losses_never_flags_non_finite_values_and_handles_negative_medians() -> None:
    loss = np.full(40, -2.0)
    loss[30] = 10.0  # -2 + (3 - 1) x |-2| = 2 is the bar: 10 clears it
    loss[35] = math.inf
    mask = stats.spike_mask(loss, stats.LOSS_SPIKE)
    assert list(np.flatnonzero(mask)) == [30]
    assert not stats.spike_mask(np.full(4, 100.0), stats.LOSS_SPIKE).any()  # too little history


def test_clip_rate_counts_and_averages_the_scale_down() -> None:
    norms = np.array([0.5, 1.0, 2.0, 4.0])
    assert stats.clip_rate(norms, 1.0) == (2, 0.5, (0.5 + 0.25) / 2)
    assert stats.clip_rate(norms, 10.0) == (0, 0.0, None)
    assert stats.clip_rate(np.array([]), 1.0) == (0, 0.0, None)


def test_percentile_of_sorted_is_bit_identical_to_numpy() -> None:
    rng = np.random.default_rng(12)
    for trial in range(500):
        values = rng.lognormal(size=int(rng.integers(1, 500))).astype(np.float32 if trial % 2 else np.float64)
        if trial % 5 == 0:
            values = np.round(values, 1)  # ties
        q = [50.0, 95.0, float(rng.uniform(0, 100)), 100.0, 0.0]
        assert np.array_equal(stats.percentile_of_sorted(np.sort(values), q), np.percentile(values, q))
