"""The offload runtime's counters (runtime/stats.py)."""

from __future__ import annotations

import dataclasses

from dali_compile.runtime.stats import LayerStats, total


def test_layer_stats_add_sums_every_field():
    """LayerStats.add is written out field by field: a field it forgot would not add up."""
    ones = LayerStats(**{f.name: 1 for f in dataclasses.fields(LayerStats)})
    summed = total([ones, ones])
    assert all(getattr(summed, f.name) == 2 for f in dataclasses.fields(LayerStats))
