"""Placement policies: stories with known answers, replayed step by step, then properties over random routing."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_compile.runtime.planner import CostModel, exact_plan, plan_times
from dali_compile.runtime.policies import (
    FREE_SLOT,
    POLICIES,
    Decision,
    LayerStep,
    Policy,
    PolicyError,
    SlotPlan,
    break_even_tokens,
    check_decision,
    make_policy,
)
from dali_compile.runtime.replay import counts_from_loads, replay_policy

# The Mixtral-like machine of test_planner (RTX 4090, in ms): 7.3 ms per expert on the CPU for one token,
# 0.25 ms on the GPU, 28 ms to copy. Copying pays off from 29 tokens: t_cpu(29) = 28.02 ms >= 28 ms.
MIXTRAL_4090 = CostModel(
    workloads=(1, 2, 4, 8, 16, 64),
    cpu_seconds=(7.3, 8.0, 9.5, 12.5, 18.0, 55.0),
    gpu_seconds=(0.25, 0.26, 0.28, 0.3, 0.35, 0.8),
    transfer_seconds=28.0,
)


def replay(policy: Policy, steps, *, budget: int, num_experts: int = 8, top_k: int = 2, cost=MIXTRAL_4090):
    """Run `steps` (each a list over layers of {expert: tokens}) through `policy` the way the runtime does
    (`runtime.replay.replay_policy`: every decision checked, admissions and background copies applied)."""
    counts = counts_from_loads(steps, num_experts)
    return replay_policy(policy, counts, budget_slots=budget, top_k=top_k, cost=cost, keep_trace=True)


def one_layer(*loads: dict[int, int]) -> list[list[dict[int, int]]]:
    return [[step] for step in loads]


def layer_step(experts, workloads, cached, *, resident=None, cache_slots=4, staging_slots=2, cost=MIXTRAL_4090):
    """A single LayerStep of layer 0 with 8 experts, for stories about one decision."""
    experts = np.array(experts, dtype=np.int64)
    cached = np.array(cached, dtype=bool)
    resident = experts[cached] if resident is None else np.array(sorted(resident), dtype=np.int64)
    return LayerStep(
        0, 0, experts, np.array(workloads, dtype=np.int64), cached, resident, cache_slots, staging_slots, 8, cost
    )


# --- dali ------------------------------------------------------------------------------------------------


def test_dali_runs_cached_experts_on_the_gpu_and_light_misses_on_the_cpu():
    """Decode: a 28 ms copy never beats 7.3 ms on the CPU, but a cached expert costs 0.25 ms on the GPU."""
    step = layer_step([3, 5], [1, 1], [True, False])
    decision = make_policy("dali").decide(step)
    check_decision(step, decision)
    assert decision.on_gpu.tolist() == [True, False]
    assert decision.admit == () and decision.background == ()


def test_dali_copies_heavy_misses_only_into_the_staging_slots_it_has():
    """Prefill with three 64-token misses: copies pay off (28 ms < 55 ms), but one staging slot allows one."""
    step = layer_step([0, 1, 2, 3], [64, 64, 64, 1], [False] * 4, staging_slots=1)
    for policy in (make_policy("dali"), make_policy("dali", exact=True)):
        decision = policy.decide(step)
        check_decision(step, decision)
        assert int(decision.on_gpu.sum()) == 1


def test_dali_exact_matches_the_exact_planner():
    step = layer_step([0, 1, 2, 3], [64, 64, 64, 1], [False] * 4, staging_slots=4)
    decision = make_policy("dali", exact=True).decide(step)
    optimum = exact_plan(step.experts, step.workloads, step.cached, MIXTRAL_4090, 4)
    assert max(plan_times(step.workloads, step.cached, decision.on_gpu, MIXTRAL_4090)) == pytest.approx(
        optimum.makespan
    )


def test_dali_without_a_cost_model_is_a_clear_error():
    assert make_policy("dali").needs_cost
    with pytest.raises(ValueError, match="cost model"):
        make_policy("dali").decide(layer_step([1], [1], [False], cost=None))


def test_dali_with_a_static_cache_keeps_its_initial_cache():
    """cache="static": whatever the routing, DALI copies nothing into the cache."""
    steps = one_layer({6: 64, 7: 64}, {6: 64, 7: 64}, {0: 1}, {6: 9}, {7: 9})
    run = replay(make_policy("dali", cache="static"), steps, budget=4)
    assert run.plan == SlotPlan((2,), 2)
    assert run.caches == [{0, 1}] and run.admitted == run.background == 0
    # Each of the first two steps copies one heavy miss (28 ms) while the other runs on the CPU (55 ms):
    # copying both would take 56 ms.
    assert run.staged == 2 and run.experts_cpu == 2 + 2


def test_dali_swaps_the_windows_busiest_uncached_expert_in_after_the_window():
    """Mixtral-like layer (E = 8: w_size 4, u_size 1), cache {0, 1}. Window 1 (steps 0-3) routes most tokens
    to expert 6, some to 0, none to 1: after step 3, 6 replaces 1 (the lowest score) in the background; the
    next window's steps find it cached. Nothing moves before the window ends."""
    steps = one_layer({6: 5, 0: 1}, {6: 3}, {6: 2, 7: 1}, {6: 4, 0: 2}, {6: 1}, {6: 1, 0: 1})
    run = replay(make_policy("dali"), steps, budget=4)
    backgrounds = [decision.background for _, decision in run.trace]
    assert backgrounds == [(), (), (), ((6, 1),), (), ()]
    hits = [step.cached.tolist() for step, _ in run.trace]
    assert hits[3] == [True, False] and hits[4] == [True] and hits[5] == [True, True]
    assert run.caches == [{0, 6}] and run.background == run.evictions == 1


def test_dali_may_evict_an_expert_that_ran_on_the_gpu_in_the_same_step():
    """w_size 1, u_size 1, cache {0} (one slot): step 0 runs cached 0 on the GPU (1 token) and uncached 5 on
    the CPU (2 tokens: a copy would not pay off); 5 outscores 0, so the swap after the step evicts 0 (the
    background copy waits for the step's GPU work)."""
    step_loads = one_layer({0: 1, 5: 2})
    run = replay(make_policy("dali", w_size=1, u_size=1, swap_budget=False), step_loads, budget=2, top_k=1)
    ((step, decision),) = run.trace
    assert step.cached.tolist() == [True, False] and decision.on_gpu.tolist() == [True, False]
    assert decision.background == ((5, 0),) and run.caches == [{5}]


def test_dali_swaps_wait_for_idle_copy_time():
    """The same layer step four times, with the copy budget (the default): its makespan is t_cpu(2) = 8 ms and
    it copies nothing itself, so the copy stream idles 8 ms per step; the 28 ms swap of 5 for 0, proposed at
    every step (w_size 1), waits until four steps' idle time (32 ms) pays for it."""
    run = replay(make_policy("dali", w_size=1, u_size=1), one_layer(*[{0: 1, 5: 2}] * 4), budget=2, top_k=1)
    assert [decision.background for _, decision in run.trace] == [(), (), (), ((5, 0),)]
    assert run.caches == [{5}]
    # Copies twice as fast (14 ms, still slower than computing 5 on the CPU): two steps' idle time pays.
    fast_copy = CostModel(MIXTRAL_4090.workloads, MIXTRAL_4090.cpu_seconds, MIXTRAL_4090.gpu_seconds, 14.0)
    run = replay(make_policy("dali", w_size=1, u_size=1), one_layer(*[{0: 1, 5: 2}] * 2), budget=2, top_k=1,
                 cost=fast_copy)
    assert [decision.background for _, decision in run.trace] == [(), ((5, 0),)]


def test_dali_swap_budget_must_be_a_bool():
    with pytest.raises(ValueError, match="swap_budget must be a bool"):
        make_policy("dali", swap_budget="yes")


def test_dali_window_defaults_follow_the_expert_count():
    for num_experts, window in ((8, (4, 1)), (16, (4, 2)), (64, (4, 8)), (128, (4, 8))):
        policy = make_policy("dali")
        policy.slot_plan(10, 2, num_experts, 2)
        assert (policy.replacement.w_size, policy.replacement.u_size) == window
    policy = make_policy("dali", w_size=2)  # the other one still defaults
    policy.slot_plan(10, 2, 64, 6)
    assert (policy.replacement.w_size, policy.replacement.u_size) == (2, 8)


def test_dali_lru_cache_copies_every_miss_after_its_step():
    """cache="lru", cache {0, 1} (never used: the oldest, lower id first). Miss 5 replaces 0 after step 0,
    miss 6 replaces 1 after step 1, and 5 hits at step 2."""
    run = replay(make_policy("dali", cache="lru", swap_budget=False), one_layer({5: 1}, {6: 1}, {5: 1}), budget=3,
                 top_k=1)
    assert [decision.background for _, decision in run.trace] == [((5, 0),), ((6, 1),), ()]
    assert run.hits == 1 and run.caches == [{5, 6}]


# --- all_cpu ---------------------------------------------------------------------------------------------


def test_all_cpu_with_budget_zero_is_fine():
    policy = make_policy("all_cpu")
    assert not policy.uses_gpu
    run = replay(policy, [[{0: 3, 5: 1}, {2: 7}]] * 3, budget=0)
    assert run.plan == SlotPlan((0, 0), 0)
    assert run.experts_cpu == 9 and run.hits == run.staged == run.admitted == run.background == 0


def test_all_cpu_ignores_a_large_budget():
    assert make_policy("all_cpu").slot_plan(100, 3, 8, 2) == SlotPlan((0, 0, 0), 0)


# --- layerwise -------------------------------------------------------------------------------------------


def test_layerwise_with_budget_for_two_and_a_half_layers_caches_two_whole_layers():
    """4 layers of 8 experts and 20 slots: layers 0 and 1 hold all 8 experts, layers 2 and 3 run on the CPU;
    the half layer's 4 slots stay unused."""
    run = replay(make_policy("layerwise"), [[{0: 1, 7: 2}] * 4] * 2, budget=20)
    assert run.plan == SlotPlan((8, 8, 0, 0), 0)
    assert run.caches == [set(range(8)), set(range(8)), set(), set()]
    on_gpu = [decision.on_gpu.tolist() for _, decision in run.trace[:4]]
    assert on_gpu == [[True, True], [True, True], [False, False], [False, False]]
    assert run.hits == 8 and run.experts_cpu == 8 and run.staged == 0


def test_layerwise_caps_at_the_number_of_layers_and_gives_small_budgets_nothing():
    policy = make_policy("layerwise")
    assert policy.slot_plan(1000, 2, 8, 2) == SlotPlan((8, 8), 0)
    assert policy.slot_plan(7, 2, 8, 2) == SlotPlan((0, 0), 0)


# --- on_demand -------------------------------------------------------------------------------------------


def test_on_demand_sends_everything_to_the_gpu():
    run = replay(make_policy("on_demand"), one_layer({0: 1, 3: 50, 5: 2}, {3: 1}), budget=3)
    assert run.plan == SlotPlan((0,), 3)
    assert all(decision.on_gpu.all() for _, decision in run.trace)
    assert run.staged == 4 and run.experts_cpu == run.hits == run.admitted == 0


def test_on_demand_staging_is_capped_at_the_experts_and_needs_a_slot():
    assert make_policy("on_demand").slot_plan(50, 2, 8, 2) == SlotPlan((0, 0), 8)
    with pytest.raises(ValueError, match="at least one slot|>= 1 slot"):
        make_policy("on_demand").slot_plan(0, 2, 8, 2)


# --- lru -------------------------------------------------------------------------------------------------


def test_lru_evicts_the_expert_used_longest_ago():
    """Cache of 2 (budget 3, 1 staging slot) holding 0 and 1. Step 1 uses 0; step 2's miss 2 evicts 1 (never
    used); step 3's miss 1 evicts 0 (used at step 1, before 2 at step 2)."""
    policy = make_policy("lru")
    run = replay(policy, one_layer({0: 1}, {2: 1}, {1: 1}), budget=3, top_k=1)
    assert run.plan == SlotPlan((2,), 1)
    assert [decision.admit for _, decision in run.trace] == [(), ((2, 1),), ((1, 0),)]
    assert run.caches == [{1, 2}]
    assert run.hits == 1 and run.admitted == 2 and run.evictions == 2 and run.staged == 0


def test_lru_stages_misses_when_every_cached_expert_is_busy():
    """Cache {0, 1}; a step uses 0, 1, 2 and 3: nothing may be evicted (both cached experts run now), so 2 and
    3 go through staging. The next step's misses 2 (1 token) and 5 (3 tokens) are admitted, the busiest
    first into the LRU victim (0 and 1 tie, the lower id goes first)."""
    run = replay(make_policy("lru"), one_layer({0: 1, 1: 1, 2: 1, 3: 1}, {2: 1, 5: 3}), budget=4)
    assert run.plan == SlotPlan((2,), 2)
    first, second = (decision for _, decision in run.trace)
    assert first.on_gpu.all() and first.admit == ()
    assert second.admit == ((5, 0), (2, 1))
    assert run.staged == 2 and run.caches == [{2, 5}]


def test_lru_fills_a_free_slot_before_evicting():
    step = layer_step([4, 6], [1, 2], [False, False], resident=[0], cache_slots=2)
    decision = make_policy("lru").decide(step)
    check_decision(step, decision)
    assert decision.admit == ((6, FREE_SLOT), (4, 0))


def test_lru_needs_a_budget():
    with pytest.raises(ValueError, match="lru"):
        make_policy("lru").slot_plan(0, 2, 8, 2)


# --- cache_cpu_miss --------------------------------------------------------------------------------------


def test_cache_cpu_miss_copies_at_most_quota_per_step_the_busiest_miss_first():
    """Cache {0, 1} (all 2 slots). Step 1: 0 hits on the GPU; misses 4 (2 tokens) and 6 (5 tokens) run on the
    CPU, and 6 alone is copied after the step, evicting 1 (the LRU: 0 was just used). Step 2: 6 now hits; 4
    misses again and evicts 0."""
    run = replay(make_policy("cache_cpu_miss"), one_layer({0: 1, 4: 2, 6: 5}, {4: 1, 6: 1}), budget=2)
    assert run.plan == SlotPlan((2,), 0)
    (step1, first), (step2, second) = run.trace
    assert first.on_gpu.tolist() == [True, False, False] and first.background == ((6, 1),)
    assert second.on_gpu.tolist() == [False, True] and second.background == ((4, 0),)
    assert run.hits == 2 and run.experts_cpu == 3 and run.staged == run.admitted == 0
    assert run.caches == [{4, 6}]


def test_cache_cpu_miss_with_a_larger_quota_may_evict_this_steps_hits():
    """Background copies start after the step's GPU work, so even the expert that just hit may make room."""
    run = replay(make_policy("cache_cpu_miss", quota=2), one_layer({0: 1, 4: 2, 6: 5}), budget=2)
    assert run.trace[0][1].background == ((6, 1), (4, 0))


def test_cache_cpu_miss_uses_a_free_slot_first():
    step = layer_step([3, 5], [1, 1], [True, False], resident=[3], cache_slots=2, staging_slots=0)
    decision = make_policy("cache_cpu_miss").decide(step)
    check_decision(step, decision)
    assert decision.on_gpu.tolist() == [True, False] and decision.background == ((5, FREE_SLOT),)


# --- threshold -------------------------------------------------------------------------------------------


def test_threshold_with_k_4_sends_the_5_token_miss_to_the_gpu_and_the_1_token_one_to_the_cpu():
    step = layer_step([1, 2, 3], [5, 1, 1], [False, False, True])
    decision = make_policy("threshold", min_tokens=4).decide(step)
    check_decision(step, decision)
    assert decision.on_gpu.tolist() == [True, False, True]


def test_threshold_fills_staging_with_the_busiest_misses():
    step = layer_step([1, 2, 3], [5, 9, 7], [False, False, False], staging_slots=2)
    assert make_policy("threshold", min_tokens=4).decide(step).on_gpu.tolist() == [False, True, True]


def test_threshold_defaults_to_the_break_even_workload_of_the_cost_model():
    assert break_even_tokens(MIXTRAL_4090) == 29
    step = layer_step([1, 2], [28, 30], [False, False])
    assert make_policy("threshold").decide(step).on_gpu.tolist() == [False, True]


def test_threshold_never_copies_when_the_copy_never_pays_off():
    """A fast CPU (1 ms per expert, flat) never beats a 28 ms copy: only cached experts use the GPU."""
    fast_cpu = CostModel((1, 4096), (1.0, 1.0), (0.1, 0.1), 28.0)
    assert break_even_tokens(fast_cpu) is None
    step = layer_step([1, 2], [4000, 1], [False, True], cost=fast_cpu)
    assert make_policy("threshold").decide(step).on_gpu.tolist() == [False, True]


def test_threshold_without_k_or_cost_is_a_clear_error():
    assert make_policy("threshold").needs_cost and not make_policy("threshold", min_tokens=2).needs_cost
    with pytest.raises(ValueError, match="min_tokens"):
        make_policy("threshold").decide(layer_step([1], [5], [False], cost=None))
    step = layer_step([1], [5], [False], cost=None)
    assert make_policy("threshold", min_tokens=2).decide(step).on_gpu.tolist() == [True]


# --- the registry and the rules --------------------------------------------------------------------------


def test_every_policy_is_registered_under_its_name_and_documented():
    assert set(POLICIES) == {"dali", "all_cpu", "layerwise", "on_demand", "lru", "cache_cpu_miss", "threshold"}
    for name, cls in POLICIES.items():
        assert cls.name == name and make_policy(name).name == name
        assert cls.__doc__ and "Slot split" in cls.__doc__


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("belady", {}, "unknown policy 'belady'; known policies: dali, all_cpu"),
        ("lru", {"quota": 2}, "has no option quota; it takes no options"),
        ("cache_cpu_miss", {"quot": 2}, "has no option quot; its options are quota"),
        ("cache_cpu_miss", {"quota": -1}, "quota must be an int >= 0"),
        ("cache_cpu_miss", {"quota": True}, "quota must be an int"),  # a bool is not a count
        ("threshold", {"min_tokens": 0}, "min_tokens must be an int >= 1"),
        ("threshold", {"min_tokens": 2.5}, "min_tokens must be an int"),
        ("dali", {"exact": "yes"}, "exact must be a bool"),
        ("dali", {"cache": "belady"}, "cache must be one of workload, static, lru, lfu"),
        ("dali", {"cache": "static", "w_size": 2}, "w_size and u_size apply to cache='workload' only"),
        ("dali", {"w_size": 0}, "w_size must be an int >= 1"),
        ("dali", {"u_size": 1.5}, "u_size must be an int"),
    ],
)
def test_make_policy_rejects_unknown_names_and_bad_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, **options)


def test_a_gpu_expert_without_cache_or_staging_is_a_policy_bug():
    step = layer_step([1], [5], [False], staging_slots=0)
    with pytest.raises(PolicyError, match="staging"):
        check_decision(step, Decision(np.array([True])), "broken")


# --- properties over random routing ----------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    steps: list  # [step][layer] -> {expert: tokens}
    budget: int
    num_experts: int
    top_k: int
    cost: CostModel


@st.composite
def scenarios(draw, max_layers: int = 3):
    num_layers = draw(st.integers(1, max_layers))
    num_experts = draw(st.integers(1, 8))
    loads = st.dictionaries(st.integers(0, num_experts - 1), st.integers(1, 80), min_size=1, max_size=num_experts)
    steps = draw(st.lists(st.lists(loads, min_size=num_layers, max_size=num_layers), min_size=1, max_size=8))
    cpu = sorted(draw(st.lists(st.floats(0.01, 50.0), min_size=3, max_size=3)))
    gpu = sorted(draw(st.lists(st.floats(0.001, 5.0), min_size=3, max_size=3)))
    cost = CostModel((1, 8, 64), tuple(cpu), tuple(gpu), draw(st.floats(0.0, 60.0)))
    budget = draw(st.integers(0, num_layers * num_experts + 3))
    return Scenario(steps, budget, num_experts, draw(st.integers(1, num_experts)), cost)


CASES = [
    ("dali", {}),  # exact=True is replayed by the test below, which checks it against greedy
    ("dali", {"cache": "static"}),
    ("dali", {"cache": "lru"}),
    ("dali", {"cache": "lfu"}),
    ("dali", {"w_size": 1, "u_size": 3}),  # a swap after every step, several at once
    ("all_cpu", {}),
    ("layerwise", {}),
    ("on_demand", {}),
    ("lru", {}),
    ("cache_cpu_miss", {}),
    ("cache_cpu_miss", {"quota": 3}),
    ("threshold", {}),
    ("threshold", {"min_tokens": 4}),
]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}{o or ''}" for n, o in CASES])
@settings(max_examples=50, deadline=None)
@given(scenario=scenarios())
def test_every_policy_places_each_active_expert_once_within_memory(name, options, scenario):
    """Replayed against random routing: every decision passes check_decision and the caches stay within
    their slots (both in `replay`); GPU-only policies put every active expert on the GPU, the others never
    need more staging slots than they have; all_cpu never touches the GPU."""
    policy = make_policy(name, **options)
    if policy.gpu_only and scenario.budget == 0:
        with pytest.raises(ValueError, match="budget"):
            policy.slot_plan(0, len(scenario.steps[0]), scenario.num_experts, scenario.top_k)
        return
    run = replay(
        policy,
        scenario.steps,
        budget=scenario.budget,
        num_experts=scenario.num_experts,
        top_k=scenario.top_k,
        cost=scenario.cost,
    )
    for step, decision in run.trace:
        assert decision.on_gpu.shape == step.experts.shape
        staged = int((decision.on_gpu & ~step.cached).sum()) - len(decision.admit)
        if policy.gpu_only:
            assert decision.on_gpu.all()
        else:
            assert staged <= step.staging_slots
        if not policy.uses_gpu:
            assert not decision.on_gpu.any()


@settings(max_examples=30, deadline=None)
@given(scenario=scenarios())
def test_dali_is_never_worse_than_all_cpu_or_a_feasible_all_gpu(scenario):
    """In its own cost model, every DALI step is at least as fast as running all active experts on the CPU,
    and as running them all on the GPU whenever that fits the staging slots; exact=True is never slower.
    Without the swap budget (which depends on the plan) the cache replacement depends on the routing alone, so
    both variants see the same cached experts."""
    greedy, exact = (
        replay(make_policy("dali", exact=flag, swap_budget=False), scenario.steps, budget=scenario.budget,
               num_experts=scenario.num_experts, top_k=scenario.top_k, cost=scenario.cost)
        for flag in (False, True)
    )  # fmt: skip

    def makespan(step, on_gpu):
        return max(plan_times(step.workloads, step.cached, on_gpu, scenario.cost))

    for (step, decision), (_, optimum) in zip(greedy.trace, exact.trace, strict=True):
        everything = np.ones(len(step.experts), dtype=bool)
        assert makespan(step, decision.on_gpu) <= makespan(step, ~everything) + 1e-9
        if int((~step.cached).sum()) <= step.staging_slots:
            assert makespan(step, decision.on_gpu) <= makespan(step, everything) + 1e-9
        assert makespan(step, optimum.on_gpu) <= makespan(step, decision.on_gpu) + 1e-9


@pytest.mark.parametrize("name", ["lru", "cache_cpu_miss"])
@settings(max_examples=80, deadline=None)
@given(
    budget=st.integers(1, 9),
    sequence=st.lists(st.integers(0, 7), min_size=1, max_size=30),
)
def test_one_expert_per_step_behaves_like_a_textbook_lru_cache(name, budget, sequence):
    """With one active expert per step, both cache policies keep exactly what an LRU cache of the same
    capacity keeps (copy on miss, evict the least recently used; the initial cache is oldest, lowest id
    first): lru copies the miss for its own step, cache_cpu_miss right after it."""
    run = replay(make_policy(name), one_layer(*({e: 1} for e in sequence)), budget=budget, top_k=1)
    capacity = run.plan.cache_slots[0]
    textbook = OrderedDict.fromkeys(range(capacity))
    for expert, (step, _) in zip(sequence, run.trace, strict=True):
        assert bool(step.cached[0]) == (expert in textbook)
        assert set(step.resident.tolist()) == set(textbook)
        if expert in textbook:
            textbook.move_to_end(expert)
        elif capacity:
            textbook.popitem(last=False)
            textbook[expert] = None


@st.composite
def dali_step_sequences(draw):
    """Steps of two layers with random workloads (some past the cost table), caches and staging slots."""
    num_experts = draw(st.integers(2, 24))
    steps = []
    for _ in range(draw(st.integers(1, 25))):
        active = sorted(draw(st.sets(st.integers(0, num_experts - 1), min_size=1, max_size=num_experts)))
        workloads = [draw(st.sampled_from([1, 1, 2, 3, 30, 5000])) for _ in active]
        resident = sorted(draw(st.sets(st.integers(0, num_experts - 1), max_size=num_experts)))
        cached = [e in resident for e in active]
        steps.append((draw(st.integers(0, 1)), active, workloads, cached, resident, len(resident) + draw(
            st.integers(0, 2)), draw(st.integers(0, 3))))
    cost = CostModel((1, 8, 64), tuple(sorted(draw(st.lists(st.floats(0.01, 50.0), min_size=3, max_size=3)))),
                     tuple(sorted(draw(st.lists(st.floats(0.001, 5.0), min_size=3, max_size=3)))),
                     draw(st.floats(0.0, 60.0)))
    # int32 ids: the C call cannot read them in place and copies them into its buffers
    dtype = draw(st.sampled_from([np.int64, np.int32]))
    return num_experts, cost, draw(st.sampled_from([(1, 1), (2, 3), (4, 8)])), draw(st.booleans()), steps, dtype


@settings(max_examples=150, deadline=None)
@given(dali_step_sequences())
def test_dali_decides_in_one_c_call_as_in_python(run):
    """The greedy and the workload-aware window in one C call (csrc/core/planner.cpp) give the decisions of
    greedy_plan and the Python window, step after step, swap budget on or off (workloads past the cost table
    take the Python greedy, the window staying in C)."""
    num_experts, cost, (w_size, u_size), swap_budget, steps, dtype = run
    native = make_policy("dali", w_size=w_size, u_size=u_size, swap_budget=swap_budget)
    if native._replacement_for(num_experts).native() is None:
        pytest.skip("the C++ extension is not built here")
    python = make_policy("dali", w_size=w_size, u_size=u_size, swap_budget=swap_budget)
    python._replacement_for(num_experts)._native = False  # the reference window, and so the Python greedy
    counters = {}
    for layer, active, workloads, cached, resident, capacity, staging in steps:
        index = counters[layer] = counters.get(layer, -1) + 1
        step = LayerStep(layer, index, np.array(active, dtype=dtype), np.array(workloads, dtype=dtype),
                         np.array(cached, dtype=bool), np.array(resident, dtype=dtype), capacity, staging,
                         num_experts, cost)
        got, want = native.decide(step), python.decide(step)
        assert got.on_gpu.dtype == want.on_gpu.dtype and got.on_gpu.tolist() == want.on_gpu.tolist()
        assert got.background == want.background and got.admit == want.admit
