"""The CPU/GPU expert assignment: stories with known answers, then properties over random problems."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_compile.runtime.planner import CostModel, exact_plan, greedy_plan, plan_times

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
