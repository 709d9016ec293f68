"""``gradscope recommend``: read a run and recommend ``max_norm``, with the evidence.

Reads the store only; never imports torch. The data flows through the modules in this order:

* ``steps.py`` reads the steps table and picks each optimizer's used steps;
* ``layers.py`` streams the layers table once for per-layer statistics;
* ``values.py`` reads each step's largest |gradient| when the run clipped by value;
* ``analysis.py`` turns them into one :class:`Recommendation` per optimizer (:func:`recommend`),
  with ``schedule.py`` (a warm-up or the early steps) and ``notes.py`` (the warnings);
* ``model.py`` holds the result's dataclasses, ``view.py`` renders them (text or JSON).
"""

from gradscope.recommend.analysis import (
    DEFAULT_PERCENTILE,
    PERCENTILE_METHOD,
    SPIKES_SHOWN,
    recommend,
    status_note,
)
from gradscope.recommend.layers import LAYER_BATCH_ROWS
from gradscope.recommend.model import (
    ClipRate,
    Closure,
    Distribution,
    LayerShare,
    LayerStats,
    NonFinite,
    Note,
    Recommendation,
    Spike,
    Spikes,
    ValueClipping,
    Warmup,
)
from gradscope.recommend.notes import MIN_PERCENTILE_STEPS
from gradscope.recommend.schedule import WARMUP_MAX_STEPS

__all__ = ["DEFAULT_PERCENTILE", "LAYER_BATCH_ROWS", "MIN_PERCENTILE_STEPS", "PERCENTILE_METHOD", "SPIKES_SHOWN",
           "WARMUP_MAX_STEPS", "ClipRate", "Closure", "Distribution", "LayerShare", "LayerStats", "NonFinite", "Note",
           "Recommendation", "Spike", "Spikes", "ValueClipping", "Warmup", "recommend", "status_note"]
