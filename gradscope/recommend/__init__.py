"""``gradscope recommend``: read a run and recommend ``max_norm``, with the evidence.

Reads the store only; never imports torch. The data flows through the modules in this order:

* ``steps.py`` reads the steps table and picks each optimizer's used steps;
* ``layers.py`` streams the layers table once for per-layer statistics;
* ``analysis.py`` turns both into one :class:`Recommendation` per optimizer (:func:`recommend`);
* ``model.py`` holds the result's dataclasses, ``view.py`` renders them (text or JSON).
"""

from gradscope.recommend.analysis import (
    DEFAULT_PERCENTILE,
    PERCENTILE_METHOD,
    SPIKES_SHOWN,
    WARMUP_MAX_STEPS,
    recommend,
    status_note,
)
from gradscope.recommend.layers import LAYER_BATCH_ROWS
from gradscope.recommend.model import (
    ClipRate,
    Distribution,
    LayerShare,
    LayerStats,
    NonFinite,
    Note,
    Recommendation,
    Spike,
    Spikes,
    Warmup,
)

__all__ = ["DEFAULT_PERCENTILE", "LAYER_BATCH_ROWS", "PERCENTILE_METHOD", "SPIKES_SHOWN", "WARMUP_MAX_STEPS",
           "ClipRate", "Distribution", "LayerShare", "LayerStats", "NonFinite", "Note", "Recommendation", "Spike",
           "Spikes", "Warmup", "recommend", "status_note"]
