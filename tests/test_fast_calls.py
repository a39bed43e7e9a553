"""The offload step's C calls through the library's CPython module (csrc/binding/fast_calls.cpp) equal the same
calls through ctypes, take None as a null pointer, and refuse a wrong argument count."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from dali_compile.runtime import cpu_extension
from dali_compile.runtime.planner import CostModel, greedy_plan

pytestmark = pytest.mark.skipif(not cpu_extension.cpu_extension_available(), reason="the C++ extension is not built")

NAMES = ("dali_greedy_plan", "dali_prefetch_choice", "dali_predict_prefetch", "dali_workload_update",
         "dali_decide_workload")


def both(name: str):
    """(the CPython module's function, the ctypes one)."""
    fast = getattr(cpu_extension._fast_calls, name, None)
    if fast is None:
        pytest.skip("the library was built without Python's headers: ctypes only")
    return fast, getattr(cpu_extension._loaded(), name)


def test_the_module_is_built_where_pythons_headers_are():
    has_headers = (Path(sysconfig.get_path("include", scheme="posix_prefix")) / "Python.h").exists()
    assert (cpu_extension._fast_calls is not None) == has_headers
    if has_headers:
        assert all(cpu_extension.fast_function(name) is getattr(cpu_extension._fast_calls, name) for name in NAMES)


def test_step_routing_gives_what_ctypes_gives():
    """The arrays call (the module's) and the call by address (ctypes) count the same experts."""
    arrays = cpu_extension.python_only_function("dali_step_routing_arrays")
    if arrays is None:
        pytest.skip("the library was built without Python's headers: ctypes only")
    by_address = cpu_extension.fast_function("dali_step_routing")
    ids = np.array([5, 1, 5, 9, 0, 1], dtype=np.int64)
    slots = np.full(12, -1, dtype=np.int32)
    slots[[1, 9]] = [0, 1]
    active, hits = np.zeros((3, 12), dtype=np.int64), np.zeros(1, dtype=np.int64)
    n = by_address(ids.size, ids.ctypes.data, 12, slots.ctypes.data, active.ctypes.data, hits.ctypes.data)
    experts, workloads, cached, hit_count = arrays(ids, slots)
    got = [np.frombuffer(experts, dtype=np.int64).tolist(), np.frombuffer(workloads, dtype=np.int64).tolist(),
           np.frombuffer(cached, dtype=np.bool_).astype(np.int64).tolist()]
    assert (n, active[:, :n].tolist(), int(hits[0])) == (len(got[0]), got, hit_count)
    assert got == [[0, 1, 5, 9], [1, 2, 2, 1], [0, 1, 0, 1]] and hit_count == 2
    bad = np.array([3, 12], dtype=np.int64)  # 12 is outside [0, 12)
    assert by_address(2, bad.ctypes.data, 12, slots.ctypes.data, active.ctypes.data, hits.ctypes.data) == -1
    assert arrays(bad, slots) == -1


def test_greedy_gives_what_ctypes_gives_and_none_is_a_null_pointer():
    cost = CostModel((1, 8, 64), (1.0, 2.0, 9.0), (0.1, 0.2, 0.5), transfer_seconds=3.0)
    table = cost._table
    workloads = np.array([1, 30, 7, 64, 2], dtype=np.int64)
    cached = np.array([1, 0, 0, 1, 0], dtype=np.uint8)
    plans = []
    for function in both("dali_greedy_plan"):
        on_gpu = np.zeros(5, dtype=np.uint8)
        status = function(5, workloads.ctypes.data, cached.ctypes.data, table.cpu_address, table.gpu_address,
                          table.key_address, table.top, 2, on_gpu.ctypes.data)
        plans.append((status, on_gpu.tolist()))
    assert plans[0] == plans[1] and plans[0][0] == 0 and any(plans[0][1])
    # prefetch_choice without weights: None (a null pointer) through both
    ids = np.array([2, 3, 2], dtype=np.int64)
    slots = np.full(4, -1, dtype=np.int32)
    chosen = []
    for function in both("dali_prefetch_choice"):
        counts, mass, out = np.zeros(4, dtype=np.int64), np.zeros(4), np.zeros(4, dtype=np.int64)
        taken = function(3, ids.ctypes.data, None, 4, slots.ctypes.data, 0, 0, 0, 0, 2, counts.ctypes.data,
                         mass.ctypes.data, out.ctypes.data)
        chosen.append((taken, out[:max(taken, 0)].tolist(), counts.tolist()))
    assert chosen[0] == chosen[1] == (2, [2, 3], [0, 0, 2, 1])


def test_a_wrong_call_is_a_python_error():
    fast, _ = both("dali_decide_workload")
    with pytest.raises(TypeError, match="takes 7 arguments"):
        fast(1, 2, 3)
    with pytest.raises(TypeError):
        fast(1, "not an address", 3, 4, 5, 6, 7)


def test_the_decision_reads_only_arrays_it_can_read_in_place():
    """dali_decide_workload_arrays reads the LayerStep's arrays through the buffer protocol: int64 and bool,
    1-D, contiguous. Anything else is None (the caller copies into its buffers), never a misread."""
    from dali_compile.runtime.cache_replacement import WorkloadAware

    function = cpu_extension.python_only_function("dali_decide_workload_arrays")
    if function is None:
        pytest.skip("the library was built without Python's headers: ctypes only")
    native = WorkloadAware(2, 1).native()
    cost = CostModel((1, 8, 64), (1.0, 2.0, 9.0), (0.1, 0.2, 0.5), transfer_seconds=3.0)
    context = native._context(0, cost._table, 8)
    experts, workloads = np.array([1, 4], dtype=np.int64), np.array([1, 40], dtype=np.int64)
    cached, resident = np.array([True, False]), np.array([1, 2], dtype=np.int64)
    on_gpu, taken = function(context, experts, workloads, cached, 0, 2, resident, 3)
    want = greedy_plan(experts, workloads, cached, cost, 2).on_gpu
    assert np.frombuffer(on_gpu, dtype=np.bool_).tolist() == want.tolist() == [False, True] and taken == 0
    for bad in ((experts.astype(np.int32), workloads, cached), (experts, workloads.astype(np.float64), cached),
                (experts, workloads, cached.astype(np.uint8)), (np.array([1, 0, 4])[::2], workloads, cached),
                (experts, workloads[:1], cached), ([1, 4], workloads, cached)):
        assert function(context, *bad, 1, 2, resident, 3) is None
    assert function(context, experts, np.array([1, 5000], dtype=np.int64), cached, 1, 2, resident, 3) == -1
    with pytest.raises(TypeError, match="takes 8 arguments"):
        function(context, experts)


def test_step_routing_reads_only_arrays_it_can_read_in_place():
    """dali_step_routing_arrays: int64 ids of any shape (contiguous) and an int32 slot table, fresh bytearrays
    out; -1 for an id outside [0, E); None for any other dtype or layout."""
    function = cpu_extension.python_only_function("dali_step_routing_arrays")
    if function is None:
        pytest.skip("the library was built without Python's headers: ctypes only")
    slots = np.full(6, -1, dtype=np.int32)
    slots[[2, 5]] = [0, 1]
    experts, workloads, cached, hits = function(np.array([[5, 2], [0, 5]], dtype=np.int64), slots)
    assert np.frombuffer(experts, dtype=np.int64).tolist() == [0, 2, 5]
    assert np.frombuffer(workloads, dtype=np.int64).tolist() == [1, 1, 2]
    assert np.frombuffer(cached, dtype=np.bool_).tolist() == [False, True, True] and hits == 2
    assert function(np.array([1, 6], dtype=np.int64), slots) == -1
    assert function(np.array([1, -1], dtype=np.int64), slots) == -1
    for ids, table in ((np.array([1, 2], dtype=np.int32), slots), (np.array([1, 0, 2])[::2], slots),
                       (np.array([1, 2]), slots.astype(np.int64)), ([1, 2], slots)):
        assert function(ids, table) is None
