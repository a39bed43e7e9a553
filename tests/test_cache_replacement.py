"""Cache replacement: the workload-aware window, LRU, LFU and Belady's MIN on hand-made routing with known
answers, replayed through `runtime.replay.replay_cache` (every swap checked by `check_decision`)."""

from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_compile.runtime.cache_replacement import (
    FREE_SLOT,
    Belady,
    Lfu,
    Lru,
    Static,
    WorkloadAware,
    default_window,
    make_cache_replacement,
)
from dali_compile.runtime.replay import counts_from_loads, replay_cache


def one_layer(*loads: dict[int, int], num_experts: int = 8) -> np.ndarray:
    """Routing counts [S, 1, E] of one layer, a {expert: tokens} per step."""
    return counts_from_loads([[step] for step in loads], num_experts)


def sequence(*experts: int, num_experts: int = 8) -> np.ndarray:
    """One layer, one expert (one token) per step: the textbook cache setting."""
    return one_layer(*({e: 1} for e in experts), num_experts=num_experts)


def swaps_of(run) -> list[tuple]:
    return [decision.background for _, decision in run.trace]


def hits_of(run) -> list[bool]:
    return [bool(step.cached.all()) for step, _ in run.trace]


def update(replacement, step, loads: dict[int, int], resident, capacity, layer=0):
    experts = np.array(sorted(loads), dtype=np.int64)
    workloads = np.array([loads[e] for e in experts.tolist()], dtype=np.int64)
    return replacement.update(layer, step, experts, workloads, np.array(sorted(resident), dtype=np.int64), capacity)


# --- workload-aware ---------------------------------------------------------------------------------------


@pytest.fixture(params=["c", "reference"])
def workload_path(request, monkeypatch):
    """WorkloadAware through the C window (csrc/core/planner.cpp) and through the Python reference."""
    if request.param == "c":
        if WorkloadAware(1, 1).native() is None:
            pytest.skip("the C++ extension is not built here")
    else:
        monkeypatch.setattr(WorkloadAware, "native", lambda self: None)
    return request.param


@pytest.mark.usefixtures("workload_path")
def test_workload_swaps_the_busiest_uncached_expert_for_the_idlest_cached_one_at_the_windows_end():
    """w 2, u 1, cache {0, 1}. Window 1 routes 3 + 1 tokens to expert 2, 1 to 0, 1 to 3, none to 1: after step 1
    (not before) 2 replaces 1. Expert 3 (1 token) would replace 0 (1 token) next, but that gains nothing."""
    run = replay_cache(WorkloadAware(2, 2), one_layer({2: 3, 0: 1}, {2: 1, 3: 1}), capacity=2, keep_trace=True)
    assert swaps_of(run) == [(), ((2, 1),)]
    assert run.caches == [{0, 2}] and run.background == run.evictions == 1


@pytest.mark.usefixtures("workload_path")
def test_workload_scores_reset_at_each_window():
    """w 2, u 1, one slot holding 0. Window 1 gives expert 1 six tokens: 1 comes in. Window 2 gives 0 four and
    1 none: 0 comes back, although 1's six tokens of the last window would have kept it."""
    steps = one_layer({1: 3}, {1: 3}, {0: 2}, {0: 2})
    run = replay_cache(WorkloadAware(2, 1), steps, capacity=1, keep_trace=True)
    assert swaps_of(run) == [(), ((1, 0),), (), ((0, 1),)]
    assert hits_of(run) == [False, False, False, False]


@pytest.mark.usefixtures("workload_path")
def test_workload_copies_at_most_u_size_per_window_busiest_first():
    """w 1, u 2, cache {0, 1, 2}: four uncached experts with 4, 3, 2, 1 tokens; the two busiest replace the two
    idlest cached experts (all idle: the lower ids first)."""
    run = replay_cache(WorkloadAware(1, 2), one_layer({4: 4, 5: 3, 6: 2, 7: 1}), capacity=3, keep_trace=True)
    assert swaps_of(run) == [((4, 0), (5, 1))]


@pytest.mark.usefixtures("workload_path")
def test_workload_fills_free_slots_first_and_never_brings_in_an_expert_without_tokens():
    swaps = update(WorkloadAware(1, 8), 0, {3: 2, 5: 1}, resident=[0], capacity=4)
    assert swaps == ((3, FREE_SLOT), (5, FREE_SLOT))
    assert update(WorkloadAware(1, 8), 0, {0: 2}, resident=[0], capacity=4) == ()


@pytest.mark.usefixtures("workload_path")
def test_workload_breaks_score_ties_by_recency():
    """w 3, u 1, cache {0, 1}, one token a step: 2, then 0, then 3. Uncached 2 and 3 tie at one token: 3, the
    more recent, comes in, in place of 1 (no token). When both sides tie, nothing moves: a copy for nothing."""
    run = replay_cache(WorkloadAware(3, 1), sequence(2, 0, 3), capacity=2, keep_trace=True)
    assert swaps_of(run) == [(), (), ((3, 1),)]
    run = replay_cache(WorkloadAware(2, 1), one_layer({0: 1, 2: 1}, {1: 1, 3: 1}), capacity=2, keep_trace=True)
    assert swaps_of(run) == [(), ()]


def test_default_window_follows_the_paper_and_grows_in_between():
    assert default_window(8) == (4, 1)  # Mixtral
    assert default_window(64) == default_window(128) == (4, 8)  # DeepSeek-V2-Lite, Qwen3-30B-A3B
    assert [default_window(e)[1] for e in (1, 4, 16, 32, 256)] == [1, 1, 2, 4, 8]


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 1), "w_size must be an int >= 1"),
        ((4, 0), "u_size must be an int >= 1"),
        ((True, 1), "w_size must be an int"),
    ],
)
def test_workload_rejects_bad_options(args, message):
    with pytest.raises(ValueError, match=message):
        WorkloadAware(*args)


# --- lru / lfu --------------------------------------------------------------------------------------------


def test_lru_copies_every_miss_after_its_step_evicting_the_least_recently_used():
    """Cache {0, 1}. 0 hits; miss 2 evicts 1 (never used); miss 1 evicts 0 (used before 2)."""
    run = replay_cache(Lru(), sequence(0, 2, 1), capacity=2, keep_trace=True)
    assert swaps_of(run) == [(), ((2, 1),), ((1, 0),)]
    assert hits_of(run) == [True, False, False]


def test_lru_with_a_quota_of_half_a_copy_per_step_copies_every_other_miss():
    """Four misses in a row with one slot: credit 0.5 after step 0, 1 after step 1 (a copy), and so on."""
    run = replay_cache(Lru(quota=0.5), sequence(1, 2, 3, 4), capacity=1, keep_trace=True)
    assert swaps_of(run) == [(), ((2, 0),), (), ((4, 2),)]
    assert replay_cache(Lru(quota=0), sequence(1, 2, 3), capacity=1).background == 0


def test_lru_quota_keeps_fractions_but_banks_no_burst():
    """Quota 0.4: copies after steps 2, 4 and 7 (credit 1.2, 1.0 after 0.2 left over, ...); a quiet stretch of
    hits never banks more than one copy."""
    run = replay_cache(Lru(quota=0.4), sequence(*range(1, 9), num_experts=9), capacity=1, keep_trace=True)
    assert [s for s, swaps in enumerate(swaps_of(run)) if swaps] == [2, 4, 7]
    run = replay_cache(Lru(quota=0.4), sequence(0, 0, 0, 0, 0, 0, 1, 2, 3), capacity=1, keep_trace=True)
    assert [s for s, swaps in enumerate(swaps_of(run)) if swaps] == [6, 8]


def test_copy_on_miss_never_evicts_an_expert_used_in_the_same_step():
    """One slot holding 0; a step uses 0 and 1: evicting 0 for 1 buys nothing, so nothing moves."""
    for replacement in (Lru(), Lfu()):
        assert update(replacement, 0, {0: 1, 1: 5}, resident=[0], capacity=1) == ()


def test_lfu_evicts_the_expert_with_the_fewest_tokens_even_if_used_recently():
    """Cache {0, 1}: 0 gets 5 tokens at step 0, 1 gets 1 at step 1; miss 2 evicts 1 (fewer tokens, although
    more recent), where LRU would evict 0."""
    steps = one_layer({0: 5}, {1: 1}, {2: 1})
    assert swaps_of(replay_cache(Lfu(), steps, capacity=2, keep_trace=True))[2] == ((2, 1),)
    assert swaps_of(replay_cache(Lru(), steps, capacity=2, keep_trace=True))[2] == ((2, 0),)


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(0, 5), experts=st.lists(st.integers(0, 7), min_size=1, max_size=30))
def test_lru_is_a_textbook_lru_cache_with_one_expert_per_step(capacity, experts):
    run = replay_cache(Lru(), sequence(*experts), capacity=capacity, keep_trace=True)
    textbook = OrderedDict.fromkeys(range(capacity))
    for expert, hit in zip(experts, hits_of(run), strict=True):
        assert hit == (expert in textbook)
        if hit:
            textbook.move_to_end(expert)
        elif capacity:
            textbook.popitem(last=False)
            textbook[expert] = None
    assert run.caches == [set(textbook)]


@pytest.mark.parametrize("quota", [-1, float("inf"), True, "1"])
def test_quota_must_be_a_finite_non_negative_number(quota):
    with pytest.raises(ValueError, match="quota must be None or a finite number >= 0"):
        Lru(quota=quota)


# --- belady ---------------------------------------------------------------------------------------------


def test_belady_keeps_the_experts_used_again_soonest():
    """Cache {0, 1}; requests 2 0 1 2 0 3 0 2. Miss 2 at step 0 is not kept: 0 and 1 come back sooner (steps 1
    and 2) than 2 (step 3). Miss 2 at step 3 replaces 1 (never again); miss 3 at step 5 is never used again."""
    run = replay_cache(Belady.from_counts(sequence(2, 0, 1, 2, 0, 3, 0, 2)), sequence(2, 0, 1, 2, 0, 3, 0, 2),
                       capacity=2, keep_trace=True)  # fmt: skip
    assert swaps_of(run) == [(), (), (), ((2, 1),), (), (), (), ()]
    assert hits_of(run) == [False, True, True, False, True, False, True, True]


def optimal_hits(requests: list[int], capacity: int) -> int:
    """The most hits any replacement on demand can get (after a miss: keep the cache, or put the missed expert
    in a free slot or in place of any cached one): exhaustive search."""

    @functools.lru_cache(maxsize=None)
    def best(t: int, cache: frozenset) -> int:
        if t == len(requests):
            return 0
        expert = requests[t]
        if expert in cache:
            return 1 + best(t + 1, cache)
        options = [cache] + ([cache | {expert}] if len(cache) < capacity else [])
        options += [cache - {victim} | {expert} for victim in cache]
        return max(best(t + 1, option) for option in options)

    return best(0, frozenset(range(capacity)))


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 3), requests=st.lists(st.integers(0, 5), min_size=1, max_size=12))
def test_belady_is_optimal_with_one_expert_per_step(capacity, requests):
    """Against every demand replacement (exhaustive search), and so above LRU, LFU and a static cache."""
    counts = sequence(*requests, num_experts=6)
    belady = replay_cache(Belady.from_counts(counts), counts, capacity=capacity).hits
    assert belady == optimal_hits(requests, capacity)
    for other in (Lru(), Lfu(), Static(), Lru(quota=0.5)):
        assert replay_cache(other, counts, capacity=capacity).hits <= belady


def test_belady_fails_loudly_when_the_replay_drifts_from_its_future():
    belady = Belady.from_counts(sequence(1, 2))
    with pytest.raises(ValueError, match="drifted from the trace"):
        update(belady, 0, {3: 1}, resident=[0], capacity=1)
    with pytest.raises(ValueError, match="no future known for layer 0, step 5"):
        update(belady, 5, {1: 1}, resident=[0], capacity=1)


# --- every replacement ----------------------------------------------------------------------------------


@st.composite
def routings(draw):
    num_experts = draw(st.integers(1, 8))
    loads = st.dictionaries(st.integers(0, num_experts - 1), st.integers(1, 9), min_size=1, max_size=num_experts)
    steps = draw(st.lists(st.lists(loads, min_size=2, max_size=2), min_size=1, max_size=12))
    return counts_from_loads(steps, num_experts), draw(st.integers(0, num_experts))


@pytest.mark.usefixtures("workload_path")
@settings(max_examples=40, deadline=None)
@given(routing=routings(), quota=st.sampled_from([None, 0.3, 2.0]), window=st.sampled_from([(1, 1), (2, 3), (4, 1)]))
def test_every_replacement_obeys_the_background_rules_and_belady_hits_most(routing, quota, window):
    """Random routing over two layers, several experts per step: every swap passes check_decision (replay_cache
    raises otherwise) and the caches stay within capacity. Belady's MIN out-hits the copy-on-miss policies."""
    counts, capacity = routing
    belady = replay_cache(Belady.from_counts(counts), counts, capacity=capacity)
    runs = [replay_cache(r, counts, capacity=capacity) for r in (Lru(quota), Lfu(quota), WorkloadAware(*window))]
    for run in [belady, *runs]:
        assert all(len(cache) <= capacity for cache in run.caches)
        assert run.copies_per_step.sum() == run.background
    assert runs[0].hits <= belady.hits and runs[1].hits <= belady.hits


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("fifo", {}, "unknown cache replacement 'fifo'; known: workload, static, lru, lfu"),
        ("lru", {"w_size": 2}, "cache 'lru' takes no w_size or u_size"),
        ("workload", {"quota": 1}, "cache 'workload' takes no quota"),
    ],
)
def test_make_cache_replacement_rejects_unknown_names_and_misplaced_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_cache_replacement(name, 8, **options)


@st.composite
def window_runs(draw):
    """Random steps of several layers: active experts with workloads, the cache's resident set and capacity."""
    num_experts, layers = draw(st.integers(1, 40)), draw(st.integers(1, 3))
    steps = []
    for _ in range(draw(st.integers(1, 30))):
        active = sorted(draw(st.sets(st.integers(0, num_experts - 1), min_size=0, max_size=num_experts)))
        resident = sorted(draw(st.sets(st.integers(0, num_experts - 1), max_size=num_experts)))
        capacity = len(resident) + draw(st.integers(0, 3))
        loads = [draw(st.integers(1, 9)) for _ in active]
        steps.append((draw(st.integers(0, layers - 1)), active, loads, resident, capacity))
    return draw(st.integers(1, 4)), draw(st.integers(1, 5)), steps


@settings(max_examples=200, deadline=None)
@given(window_runs())
def test_the_c_window_equals_the_reference(run):
    """Any sequence of steps (layers interleaved, ties everywhere, ids beyond those seen so far): the C window
    gives the reference's swaps at every step."""
    w_size, u_size, steps = run
    native = WorkloadAware(w_size, u_size)
    if native.native() is None:
        pytest.skip("the C++ extension is not built here")
    reference, counters = WorkloadAware(w_size, u_size), {}
    for layer, active, loads, resident, capacity in steps:
        step = counters[layer] = counters.get(layer, -1) + 1
        args = (layer, step, np.array(active, dtype=np.int64), np.array(loads, dtype=np.int64),
                np.array(resident, dtype=np.int64), capacity)
        assert native.update(*args) == reference.reference_update(*args)
