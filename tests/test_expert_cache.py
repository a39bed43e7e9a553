"""The GPU expert cache on the emulated accelerator, and the stored cost model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_compile.runtime import profiling
from dali_compile.runtime.accelerator import ExpertMemoryError
from dali_compile.runtime.emulated import EmulatedAccelerator
from dali_compile.runtime.expert_cache import LayerCache, SlotPool, expert_bytes
from dali_compile.runtime.layer_spec import Activation, ExpertLayout, LayerSpec

# Each test runs on both modes of the emulated accelerator (synchronous, asynchronous with random delays).
pytestmark = pytest.mark.usefixtures("emulated_mode")

E, H, I = 6, 8, 4  # noqa: E741


def host_layer(seed: int, bias: bool = True) -> LayerSpec:
    g = torch.Generator().manual_seed(seed)
    layout = ExpertLayout(Activation("silu"), has_bias=bias)
    return LayerSpec(layout, torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g),
                     torch.randn(E, 2 * I, generator=g) if bias else None,
                     torch.randn(E, H, generator=g) if bias else None)


def test_pool_is_held_to_its_budget():
    layer = host_layer(0)
    accelerator = EmulatedAccelerator(budget_bytes=3 * expert_bytes(layer))
    SlotPool(accelerator, layer, 3)
    assert accelerator.pool.used_bytes == 3 * expert_bytes(layer)
    with pytest.raises(ExpertMemoryError, match="expert budget"):
        SlotPool(accelerator, layer, 1)


# A swap: (layer, expert, victim index into the resident list or -1 for a free slot).
swaps = st.lists(st.tuples(st.integers(0, 1), st.integers(0, E - 1), st.integers(-1, 3)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(swaps=swaps, capacity=st.integers(1, 4))
def test_cache_contents_match_the_weights_after_any_swaps(swaps, capacity):
    """Two layers share one pool; after any sequence of installs and evictions each resident expert's
    slot holds exactly that layer's weights, and no layer holds more than its slots."""
    layers = [host_layer(1), host_layer(2)]
    accelerator = EmulatedAccelerator(budget_bytes=2 * capacity * expert_bytes(layers[0]))
    pool = SlotPool(accelerator, layers[0], 2 * capacity)
    caches = [LayerCache(pool, list(range(i * capacity, (i + 1) * capacity)), E) for i in range(2)]
    for layer, expert, victim_index in swaps:
        cache = caches[layer]
        if cache.slot_of_expert[expert] >= 0:
            continue
        resident = cache.resident().tolist()
        full = len(resident) == cache.capacity
        if victim_index < 0 and full:
            with pytest.raises(ExpertMemoryError):
                cache.install(expert, -1, layers[layer], None)
            continue
        victim = resident[victim_index % len(resident)] if (victim_index >= 0 or full) and resident else -1
        cache.install(expert, victim, layers[layer], None)
        assert len(cache.resident()) <= cache.capacity
    accelerator.synchronize()
    assert accelerator.pool.used_bytes <= accelerator.pool.budget_bytes
    for cache, layer in zip(caches, layers, strict=True):
        slots = cache.slot_of_expert[cache.resident()]
        assert len(set(slots.tolist())) == len(slots)  # one expert per slot
        assert set(slots.tolist()) <= set(cache.slots)
        for expert in cache.resident().tolist():
            slot = int(cache.slot_of_expert[expert])
            for pooled, host in zip(pool.tensors, layer.tensors(), strict=True):
                assert (pooled is None) == (host is None)
                if host is not None:
                    assert torch.equal(pooled[slot], host[expert])


def test_cost_model_is_measured_once_and_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path))
    layer = host_layer(3, bias=False)
    accelerator = EmulatedAccelerator(budget_bytes=expert_bytes(layer))
    pool = SlotPool(accelerator, layer, 1)
    measured = []
    real_measure = profiling.measure_costs

    def counting(*args):
        measured.append(1)
        return real_measure(*args)

    monkeypatch.setattr(profiling, "measure_costs", counting)
    first = profiling.profiled_costs(accelerator, layer, pool, 0)
    second = profiling.profiled_costs(accelerator, layer, pool, 0)
    assert len(measured) == 1 and second == first
    assert np.all(np.diff(first.workloads) > 0) and first.transfer_seconds >= 0
    profiling.profiled_costs(accelerator, layer, pool, 0, refresh=True)
    assert len(measured) == 2
