"""A layer step's active experts (runtime/step_routing.py): the C call equals the numpy reference, bad ids
raise the reference's errors, and inputs the C call does not take go the reference's way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dali_compile.runtime import cpu_extension
from dali_compile.runtime.step_routing import StepRouting, active_experts_reference

needs_extension = pytest.mark.skipif(cpu_extension.step_routing_function() is None,
                                     reason="the C++ extension is not built here")


def slot_table(num_experts: int, cached: list[int]) -> np.ndarray:
    slots = np.full(num_experts, -1, dtype=np.int32)
    slots[cached] = np.arange(len(cached), dtype=np.int32)
    return slots


def assert_same(got, want):
    for name in ("experts", "workloads", "cached"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype and g.tolist() == w.tolist(), name
    assert got.hits == want.hits


CASES = [
    ("one token", torch.tensor([[3, 0, 7, 5]]), 8, [0, 5]),
    ("odd tokens", torch.randint(0, 64, (7, 8), generator=torch.Generator().manual_seed(0)), 64, [1, 2, 40, 63]),
    ("all on one expert", torch.full((5, 1), 2), 4, [2]),
    ("no token", torch.zeros((0, 4), dtype=torch.int64), 16, [3]),
    ("nothing cached", torch.tensor([[1, 2], [2, 3]]), 4, []),
    ("everything cached", torch.tensor([[1, 2], [2, 3]]), 4, [0, 1, 2, 3]),
]


@needs_extension
@pytest.mark.parametrize("path", ["arrays", "addresses"])
@pytest.mark.parametrize("name, ids, num_experts, cached", CASES, ids=[case[0] for case in CASES])
def test_the_c_call_equals_the_numpy_reference(name, ids, num_experts, cached, path):
    """Both C paths: the CPython call reading the arrays (where the module exists) and the call by address."""
    slots = slot_table(num_experts, cached)
    routing = StepRouting(num_experts, "layer")
    if path == "addresses":
        routing._arrays = None
    elif routing._arrays is None:
        pytest.skip("the library was built without Python's headers: ctypes only")
    want = active_experts_reference(ids.numpy().reshape(-1), slots, "layer")
    got = routing.active_experts(ids, slots)
    assert_same(got, want)
    assert want.workloads.sum() == ids.numel() and (want.workloads >= 1).all()
    # fresh arrays: the next call does not change what the caller kept
    routing.active_experts(torch.zeros_like(ids), slots)
    assert_same(got, want)


@pytest.mark.parametrize("bad, message", [(-3, "negative expert id -3"), (8, "expert id 8 out of range"),
                                          (100, "expert id 100 out of range")])
def test_an_id_outside_the_experts_names_itself(bad, message):
    ids = torch.tensor([[1, bad], [2, 3]])
    with pytest.raises(IndexError, match=message):
        StepRouting(8, "layer").active_experts(ids, slot_table(8, [1]))


def test_inputs_the_c_call_does_not_take_go_the_reference_way():
    """int32 ids, a non-contiguous view, a slot table of another dtype or size: the same answer."""
    ids = torch.tensor([[3, 1], [1, 6], [0, 3]])
    slots = slot_table(8, [1, 6])
    want = active_experts_reference(ids.numpy().reshape(-1), slots, "layer")
    routing = StepRouting(8, "layer")
    assert_same(routing.active_experts(ids.to(torch.int32), slots), want)
    assert_same(routing.active_experts(ids.t().contiguous().t(), slots), want)
    assert_same(routing.active_experts(ids, slots.astype(np.int64)), want)
    assert_same(routing.active_experts(ids, slots), want)


@needs_extension
def test_a_replaced_slot_table_is_read_anew():
    """The slot table's address is kept while it is the same array; a new array is read from its own memory."""
    ids, routing = torch.tensor([[0, 1, 2]]), StepRouting(4, "layer")
    assert routing.active_experts(ids, slot_table(4, [0])).hits == 1
    assert routing.active_experts(ids, slot_table(4, [0, 1, 2])).hits == 3
