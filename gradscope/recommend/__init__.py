"""``gradscope recommend``: read a run and recommend ``max_norm``, with the evidence.

Reads the store only; never imports torch.
"""

from gradscope.recommend.analysis import (
    DEFAULT_PERCENTILE,
    PERCENTILE_METHOD,
    SPIKE_FACTOR,
    SPIKE_MIN_HISTORY,
    SPIKE_WINDOW,
    SPIKES_SHOWN,
    WARMUP_MAX_STEPS,
    Recommendation,
    Spike,
    Spikes,
    analyse,
    clip_rate,
    percentile_of_sorted,
    rolling_median_before,
    status_note,
)

__all__ = ["DEFAULT_PERCENTILE", "PERCENTILE_METHOD", "SPIKES_SHOWN", "SPIKE_FACTOR", "SPIKE_MIN_HISTORY",
           "SPIKE_WINDOW", "WARMUP_MAX_STEPS", "Recommendation", "Spike", "Spikes", "analyse", "clip_rate",
           "percentile_of_sorted", "rolling_median_before", "status_note"]
