"""The CPU/GPU expert assignment: stories with known answers, then properties over random problems."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dali_compile.runtime.planner import (
    TABULATED_WORKLOADS,
    CostModel,
    copy_never_pays_off,
    exact_plan,
    greedy_plan,
    plan_times,
)

# A Mixtral-like machine (arXiv 2512.16473's RTX 4090 numbers, in ms): one expert costs 7.3 ms on the
# CPU per token, 0.25 ms on the GPU, and 28 ms to copy over PCIe.
MIXTRAL_4090 = CostModel(
    workloads=(1, 2, 4, 8, 16, 64), cpu_seconds=(7.3, 8.0, 9.5, 12.5, 18.0, 55.0),
    gpu_seconds=(0.25, 0.26, 0.28, 0.3, 0.35, 0.8), transfer_seconds=28.0,
)


def test_decode_with_nothing_cached_stays_on_the_cpu():
    """Two experts with one token each and an empty cache: a 28 ms copy never beats 7.3 ms of CPU."""
    plan = greedy_plan(np.array([3, 5]), np.array([1, 1]), np.array([False, False]), MIXTRAL_4090, 4)
    assert plan.on_gpu.tolist() == [False, False]
    assert plan.makespan == pytest.approx(14.6)


def test_cached_experts_go_to_the_gpu():
    """A cached expert costs 0.25 ms on the GPU instead of 7.3 ms on the CPU: it must go there."""
    plan = greedy_plan(np.array([3, 5]), np.array([1, 1]), np.array([True, False]), MIXTRAL_4090, 4)
    assert plan.gpu_experts.tolist() == [3] and plan.cpu_experts.tolist() == [5]
    assert plan.makespan == pytest.approx(7.3)


def test_prefill_moves_heavy_uncached_experts_to_the_gpu():
    """At prefill an expert with 64 tokens costs 55 ms on the CPU but 28 ms (its copy) on the GPU. Greedy
    sends two of the three heavy experts over (56 ms of copies) and keeps one with the light expert on the
    CPU (55 + 7.3 ms): makespan 62.3 ms against 172.3 ms all on the CPU, and the exact optimum agrees."""
    args = (np.arange(4), np.array([64, 64, 64, 1]), np.zeros(4, bool), MIXTRAL_4090, 4)
    plan = greedy_plan(*args)
    assert plan.on_gpu[:3].sum() == 2 and not plan.on_gpu[3]
    assert plan.makespan == pytest.approx(62.3)
    assert exact_plan(*args).makespan == pytest.approx(62.3)


def test_memory_constraint_caps_copies_per_step():
    """Same prefill, but only one staging slot: at most one uncached expert may go to the GPU."""
    plan = greedy_plan(np.arange(4), np.array([64, 64, 64, 1]), np.zeros(4, bool), MIXTRAL_4090, 1)
    assert plan.on_gpu.sum() == 1
    exact = exact_plan(np.arange(4), np.array([64, 64, 64, 1]), np.zeros(4, bool), MIXTRAL_4090, 1)
    assert exact.on_gpu.sum() <= 1


def test_zero_staging_slots_still_uses_cached_experts():
    plan = greedy_plan(np.arange(3), np.array([64, 64, 64]), np.array([True, False, False]), MIXTRAL_4090, 0)
    assert plan.gpu_experts.tolist() == [0]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="increasing"):
        CostModel((4, 2), (1.0, 2.0), (1.0, 2.0), 1.0)
    with pytest.raises(ValueError, match="cpu_seconds"):
        CostModel((1, 2), (1.0, -2.0), (1.0, 2.0), 1.0)
    with pytest.raises(ValueError, match="at least one token"):
        greedy_plan(np.arange(2), np.array([0, 1]), np.zeros(2, bool), MIXTRAL_4090, 1)
    with pytest.raises(ValueError, match="max_uncached_on_gpu"):
        greedy_plan(np.arange(2), np.array([1, 1]), np.zeros(2, bool), MIXTRAL_4090, -1)


def test_cost_model_interpolates_and_extrapolates():
    assert MIXTRAL_4090.t_cpu(np.array([3]))[0] == pytest.approx(8.75)
    # past the last point (64 tokens) the last segment's slope continues: (55 - 18) / 48 per token
    assert MIXTRAL_4090.t_cpu(np.array([112]))[0] == pytest.approx(55.0 + 48 * 37 / 48)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 12))
    points = draw(st.lists(st.floats(0.01, 50.0), min_size=3, max_size=3))
    gpu_points = draw(st.lists(st.floats(0.001, 5.0), min_size=3, max_size=3))
    cost = CostModel((1, 8, 64), tuple(sorted(points)), tuple(sorted(gpu_points)), draw(st.floats(0.0, 60.0)))
    workloads = np.array(draw(st.lists(st.integers(1, 200), min_size=n, max_size=n)))
    cached = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    slots = draw(st.integers(0, n))
    experts = np.array(draw(st.permutations(range(64)))[:n])
    return experts, workloads, cached, cost, slots


@settings(max_examples=150, deadline=None)
@given(problems())
def test_plans_place_every_active_expert_once_within_memory(problem):
    experts, workloads, cached, cost, slots = problem
    for plan in (greedy_plan(*problem), exact_plan(*problem)):
        assert sorted(plan.gpu_experts.tolist() + plan.cpu_experts.tolist()) == sorted(experts.tolist())
        assert int((plan.on_gpu & ~cached).sum()) <= slots
        assert (plan.cpu_seconds, plan.gpu_seconds) == pytest.approx(plan_times(workloads, cached, plan.on_gpu, cost))


@settings(max_examples=150, deadline=None)
@given(problems())
def test_greedy_never_worse_than_all_cpu_or_feasible_all_gpu_and_exact_is_best(problem):
    experts, workloads, cached, cost, slots = problem
    greedy, exact = greedy_plan(*problem), exact_plan(*problem)
    all_cpu = max(plan_times(workloads, cached, np.zeros(len(experts), bool), cost))
    assert greedy.makespan <= all_cpu + 1e-9
    if int((~cached).sum()) <= slots:  # all-GPU is only a candidate when it fits in memory
        all_gpu = max(plan_times(workloads, cached, np.ones(len(experts), bool), cost))
        assert greedy.makespan <= all_gpu + 1e-9
    assert exact.makespan <= greedy.makespan + 1e-9


# The greedy is tuned for speed (tabulated costs, a loop over Python floats). Its oracle is the greedy as
# first written, numpy throughout; the two must agree to the bit: the same assignment and the same totals.


def reference_greedy(workloads, cached, cost: CostModel, slots: int) -> tuple[np.ndarray, float, float]:
    """(on_gpu, T_cpu, T_gpu): visit by |g - c| descending (stable argsort), GPU if it fits and keeps T_gpu <= T_cpu."""
    cached = np.asarray(cached, dtype=bool)
    cpu = cost.t_cpu(workloads)
    gpu = np.maximum(np.where(cached, 0.0, cost.transfer_seconds), cost.t_gpu(workloads))
    on_gpu = np.zeros(len(cpu), dtype=bool)
    cpu_total = gpu_total = 0.0
    copies_left = slots
    for i in np.argsort(-np.abs(gpu - cpu), kind="stable").tolist():
        if (cached[i] or copies_left > 0) and gpu_total + gpu[i] <= cpu_total + cpu[i]:
            on_gpu[i] = True
            gpu_total += gpu[i]
            copies_left -= int(not cached[i])
        else:
            cpu_total += cpu[i]
    return on_gpu, float(cpu[~on_gpu].sum()), float(gpu[on_gpu].sum())


@st.composite
def problems_with_ties(draw):
    """Like `problems`, plus what the fast path must get right: ties (few distinct cost values, repeated
    workloads), n past numpy's 8-way and 128-way summation blocks, workloads past the table (interpolated
    per call), workload dtypes the lookup indexes with or falls back on, and fractional workloads."""
    n = draw(st.integers(0, 140))
    values = st.sampled_from((0.5, 1.0, 2.0, 7.3)) if draw(st.booleans()) else st.floats(0.0, 50.0)
    cpu_points = sorted(draw(st.lists(values, min_size=3, max_size=3)))
    gpu_points = draw(st.lists(values, min_size=3, max_size=3))  # unsorted: falling GPU costs extrapolate below 0
    cost = CostModel((1, 8, 64), tuple(cpu_points), tuple(gpu_points), draw(st.sampled_from((0.0, 1.0, 28.0))))
    top = draw(st.sampled_from((4, 200, TABULATED_WORKLOADS + 3)))
    workloads = draw(st.lists(st.integers(1, top), min_size=n, max_size=n))
    dtype = draw(st.sampled_from((np.int64, np.int32, np.uint16, np.uint64, np.float64)))
    if dtype is np.uint16:
        workloads = [min(w, 60000) for w in workloads]
    workloads = np.array(workloads, dtype=dtype)
    if dtype is np.float64 and n and draw(st.booleans()):
        workloads[0] += 0.5  # a fractional workload (the interpolating path)
    cached = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    return np.arange(n) + 100, workloads, cached, cost, draw(st.integers(0, n + 1))


@pytest.fixture(params=["native", "python"])
def greedy_path(request, monkeypatch):
    """greedy_plan through the C implementation (csrc/core/planner.cpp) and through the Python loop."""
    from dali_compile.runtime import cpu_extension, planner

    if request.param == "native":
        if cpu_extension.greedy_plan_function() is None:
            pytest.skip("the C++ extension is not built here")
        monkeypatch.setattr(planner, "_native_function", cpu_extension.greedy_plan_function())
    else:
        monkeypatch.setattr(planner, "_native_function", False)
    return request.param


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems_with_ties())
def test_greedy_equals_the_reference_to_the_bit(greedy_path, problem):
    experts, workloads, cached, cost, slots = problem
    plan = greedy_plan(*problem)
    on_gpu, cpu_seconds, gpu_seconds = reference_greedy(workloads, cached, cost, slots)
    assert plan.on_gpu.dtype == np.bool_ and plan.on_gpu.tolist() == on_gpu.tolist()
    assert plan.experts.tolist() == experts.tolist()
    assert (plan.cpu_seconds.hex(), plan.gpu_seconds.hex()) == (cpu_seconds.hex(), gpu_seconds.hex())
    assert (plan.cpu_seconds, plan.gpu_seconds) == plan_times(workloads, cached, plan.on_gpu, cost)


def test_all_equal_costs_keep_the_order_given():
    """Eight identical cached experts tie on |g - c|: greedy visits them in the order given. Seven fit on the
    GPU (7 x 1 ms <= 7.3 ms); the last one visited goes to the CPU, and that must be the last one given."""
    cost = CostModel((1, 2), (7.3, 7.3), (1.0, 1.0), 28.0)
    plan = greedy_plan(np.arange(8), np.ones(8, np.int64), np.ones(8, bool), cost, 0)
    on_gpu, _, _ = reference_greedy(np.ones(8, np.int64), np.ones(8, bool), cost, 0)
    assert plan.on_gpu.tolist() == on_gpu.tolist() == [True] * 7 + [False]


def test_tabulated_costs_equal_interpolation_and_extrapolation():
    """The cost table that greedy reads holds, for every integer workload, np.interp inside the profile and
    the last segment's line past it: bit for bit, from the profile, not from t_cpu."""
    cost = MIXTRAL_4090
    w = np.arange(1, TABULATED_WORKLOADS + 1)
    x = np.asarray(cost.workloads, dtype=np.float64)
    for name, table in (("cpu_seconds", cost._table.cpu[1:]), ("gpu_seconds", cost._table.gpu[1:len(w) + 1])):
        y = np.asarray(getattr(cost, name))
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        expected = np.where(w > x[-1], y[-1] + slope * (w - x[-1]), np.interp(w.astype(np.float64), x, y))
        if name == "gpu_seconds":
            expected = np.maximum(cost.transfer_seconds, expected)  # the uncached row includes the copy
        assert np.array_equal(table, expected), name
    assert cost._table.cpu[112] == cost.t_cpu(np.array([112]))[0] == pytest.approx(55.0 + 48 * 37 / 48)


def test_workloads_past_the_table_are_interpolated():
    """A prefill chunk bigger than the table: greedy interpolates per call and agrees with the reference."""
    workloads = np.array([TABULATED_WORKLOADS + 1, 3 * TABULATED_WORKLOADS, 1])
    args = (np.arange(3), workloads, np.zeros(3, bool), MIXTRAL_4090, 2)
    on_gpu, cpu_seconds, gpu_seconds = reference_greedy(*args[1:])
    plan = greedy_plan(*args)
    assert plan.on_gpu.tolist() == on_gpu.tolist() == [True, True, False]
    assert (plan.cpu_seconds, plan.gpu_seconds) == (cpu_seconds, gpu_seconds)


def test_the_cost_table_is_invisible():
    """The table is derived state: equality, hashing, repr, asdict and pickling see only the profile."""
    twin = CostModel(**dataclasses.asdict(MIXTRAL_4090))
    assert twin == MIXTRAL_4090 and hash(twin) == hash(MIXTRAL_4090)
    assert set(dataclasses.asdict(twin)) == {"workloads", "cpu_seconds", "gpu_seconds", "transfer_seconds",
                                             "cpu_call_seconds"}
    assert "_table" not in repr(twin)
    clone = pickle.loads(pickle.dumps(twin))
    args = (np.arange(3), np.array([1, 64, 2]), np.array([False, False, True]))
    assert greedy_plan(*args, clone, 1).on_gpu.tolist() == greedy_plan(*args, MIXTRAL_4090, 1).on_gpu.tolist()


def test_the_c_greedy_serves_integer_workloads_and_agrees_with_python(monkeypatch):
    from dali_compile.runtime import cpu_extension, planner

    native = cpu_extension.greedy_plan_function()
    if native is None:
        pytest.skip("the C++ extension is not built here")
    monkeypatch.setattr(planner, "_native_function", native)
    rng = np.random.default_rng(0)
    kept = []  # earlier plans: the C greedy's reused buffers must not show through them
    for n in (1, 8, 128, 300, 5):  # 300: past the buffers' first size
        workloads, cached = rng.integers(1, 70, n), rng.random(n) < 0.4
        fast = planner._native_greedy(np.arange(n), workloads, cached, MIXTRAL_4090, 3)
        assert fast is not None
        kept.append((fast, fast.on_gpu.copy()))
        monkeypatch.setattr(planner, "_native_function", False)
        slow = greedy_plan(np.arange(n), workloads, cached, MIXTRAL_4090, 3)
        monkeypatch.setattr(planner, "_native_function", native)
        assert fast.on_gpu.tolist() == slow.on_gpu.tolist() and fast.makespan == slow.makespan
    assert all((plan.on_gpu == seen).all() for plan, seen in kept)
    assert planner._native_greedy(np.arange(2), np.array([1.5, 2.0]), np.zeros(2, bool), MIXTRAL_4090, 1) is None
    assert planner._native_greedy(np.arange(1), np.array([10**6]), np.zeros(1, bool), MIXTRAL_4090, 1) is None


def test_copy_never_pays_off_at_mixtral_decode_but_does_at_prefill():
    """arXiv 2512.16473's PC: at one token and top-2 the CPU side is at most 2 x 7.3 ms, under one 28 ms copy;
    at 4 tokens it can reach 8 x 9.5 ms, and a copy may pay off. A free copy always may."""
    assert copy_never_pays_off(MIXTRAL_4090, 1, 2, 8)
    assert not copy_never_pays_off(MIXTRAL_4090, 4, 2, 8)
    assert copy_never_pays_off(MIXTRAL_4090, 2, 1, 8)  # 2 experts of at most 2 tokens: 16 ms < 28
    free_copy = dataclasses.replace(MIXTRAL_4090, transfer_seconds=0.0)
    assert not copy_never_pays_off(free_copy, 1, 2, 8)
    assert not copy_never_pays_off(MIXTRAL_4090, TABULATED_WORKLOADS + 1, 2, 8)  # past the table: no bound


@st.composite
def routed_steps(draw):
    cost = draw(problems())[3]
    tokens, top_k = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    num_experts = draw(st.integers(top_k, 12))
    ids = [draw(st.permutations(range(num_experts)))[:top_k] for _ in range(tokens)]
    counts = np.bincount(np.array(ids).reshape(-1), minlength=num_experts)
    experts = np.flatnonzero(counts)
    cached = np.array(draw(st.lists(st.booleans(), min_size=len(experts), max_size=len(experts))))
    return cost, tokens, top_k, num_experts, experts, counts[experts], cached


@settings(max_examples=400, deadline=None)
@given(routed_steps())
def test_where_a_copy_never_pays_off_the_greedy_copies_nothing(step):
    """The bound is a guarantee: whenever it holds, greedy_plan puts no uncached expert on the GPU, for any
    routing of that many tokens and any cache."""
    cost, tokens, top_k, num_experts, experts, workloads, cached = step
    if copy_never_pays_off(cost, tokens, top_k, num_experts):
        plan = greedy_plan(experts, workloads, cached, cost, len(experts))
        assert not (plan.on_gpu & ~cached).any()
