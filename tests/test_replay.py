"""Trace replay: routing traces into counts, policies driven through them as the runtime drives them, and the
replay benchmark end to end on small synthetic traces."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dali_compile.runtime.cache_replacement import Lru, WorkloadAware
from dali_compile.runtime.planner import CostModel, plan_times
from dali_compile.runtime.policies import Decision, LayerStep, Policy, PolicyError, make_policy
from dali_compile.runtime.replay import (
    counts_from_loads,
    counts_from_trace,
    decision_makespan,
    replay_cache,
    replay_policy,
)

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

# test_policies' Mixtral-like machine (ms): 7.3 on the CPU, 0.25 on the GPU, 28 to copy, at one token.
MIXTRAL_4090 = CostModel(
    (1, 2, 4, 8, 16, 64), (7.3, 8.0, 9.5, 12.5, 18.0, 55.0), (0.25, 0.26, 0.28, 0.3, 0.35, 0.8), 28.0
)

# Two layers, top-2 of 8, four tokens; layer 1 of token 3 is missing (-1: a hole in the recorded trace).
IDS = np.array(
    [
        [[0, 1], [2, 3]],
        [[0, 4], [2, 5]],
        [[0, 1], [3, 5]],
        [[6, 7], [-1, -1]],
    ]
)


def test_a_trace_becomes_tokens_per_expert_per_layer_step():
    counts = counts_from_trace(IDS, 8)
    assert counts.shape == (4, 2, 8) and counts.sum() == 14
    assert np.flatnonzero(counts[1, 1]).tolist() == [2, 5] and not counts[3, 1].any()
    batched = counts_from_trace(IDS, 8, batch=2)  # two steps of two tokens
    assert batched.shape == (2, 2, 8)
    assert batched[0, 0].tolist() == [2, 1, 0, 0, 1, 0, 0, 0]
    assert counts_from_trace(IDS, 8, batch=3).shape == (1, 2, 8)  # the last, partial step is dropped


def test_an_expert_id_beyond_the_layers_experts_is_a_clear_error():
    bad = IDS.copy()
    bad[2, 1, 0] = 9
    with pytest.raises(ValueError, match=r"expert id 9 \(first bad entry at index \[2, 1, 0\]\) is out of range "
                                         r"for layers of 8 experts \(ids 0..7\)"):  # fmt: skip
        counts_from_trace(bad, 8)
    with pytest.raises(ValueError, match="expert id 8 .* out of range for layers of 8 experts"):
        counts_from_loads([[{8: 1}]], 8)
    with pytest.raises(ValueError, match=r"must be \[T, L, K\]"):
        counts_from_trace(IDS[0], 8)
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        counts_from_trace(IDS, 8, batch=0)


def test_a_missing_layer_step_is_skipped_without_advancing_the_layers_step_count():
    run = replay_policy(make_policy("dali"), counts_from_trace(IDS, 8), budget_slots=6, top_k=2, cost=MIXTRAL_4090,
                        keep_trace=True)  # fmt: skip
    assert run.steps == 4 and run.layer_steps == 7
    assert [(step.layer, step.step) for step, _ in run.trace] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2),
                                                                  (0, 3)]  # fmt: skip


def test_replay_counts_what_the_runtime_counts():
    """lru (every expert on the GPU, misses admitted) over one layer with cache {0, 1} and one staging slot:
    step 0 hits 0 and admits 2 in place of 1; step 1 hits 0 and 2; step 2 misses 5 and 6 and admits both, in
    place of the idle 0 and 2."""
    counts = counts_from_loads([[{0: 1, 2: 1}], [{0: 1, 2: 3}], [{5: 1, 6: 2}]], 8)
    run = replay_policy(make_policy("lru"), counts, budget_slots=3, top_k=1, cost=MIXTRAL_4090)
    assert (run.hits, run.misses, run.admitted, run.staged, run.background, run.evictions) == (3, 3, 3, 0, 0, 3)
    assert run.copies_per_step.tolist() == [1, 0, 2] and run.copies == 3 == run.cache_copies
    assert (run.experts_gpu, run.experts_cpu, run.tokens) == (6, 0, 9)
    assert run.caches == [{5, 6}] and run.hit_rate == 0.5


def test_the_makespan_is_the_planners_price_of_each_decision():
    counts = counts_from_trace(IDS, 8)
    seen = []
    run = replay_policy(make_policy("dali"), counts, budget_slots=6, top_k=2, cost=MIXTRAL_4090,
                        observe=lambda step, decision: seen.append((step, decision)))  # fmt: skip
    expected = sum(max(plan_times(s.workloads, s.cached, d.on_gpu, MIXTRAL_4090)) for s, d in seen)
    assert len(seen) == run.layer_steps and run.makespan_s == pytest.approx(expected)
    step, decision = seen[0]
    assert decision_makespan(step, decision.on_gpu, MIXTRAL_4090) == pytest.approx(
        max(plan_times(step.workloads, step.cached, decision.on_gpu, MIXTRAL_4090))
    )


def test_dalis_cache_is_exactly_its_replacements():
    """DALI with a cache replacement (without the copy budget, which depends on the plan) hits and copies exactly as
    the bare replacement does over caches of the same size: placement (greedy) never changes what is cached."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(8, size=(3, 2), replace=False) for _ in range(40)])  # [40 tokens, 3 layers, top-2]
    counts = counts_from_trace(ids, 8)
    for policy, replacement in (
        (make_policy("dali", w_size=2, u_size=1, swap_budget=False), WorkloadAware(2, 1)),
        (make_policy("dali", cache="lru", swap_budget=False), Lru()),
    ):
        dali = replay_policy(policy, counts, budget_slots=3 * 2 + 2, top_k=2, cost=MIXTRAL_4090)
        bare = replay_cache(replacement, counts, capacity=2)
        assert (dali.hits, dali.background, dali.caches) == (bare.hits, bare.background, bare.caches)
        assert dali.background > 0


class EvictsTheWrongExpert(Policy):
    """A broken policy: a background copy of an expert that is already cached."""

    name = "broken"

    def decide(self, step: LayerStep) -> Decision:
        return Decision(np.zeros(len(step.experts), dtype=bool), background=((int(step.resident[0]), -1),))


def test_a_policy_bug_is_an_error_not_a_wrong_count():
    with pytest.raises(PolicyError, match="broken .*already cached"):
        replay_policy(EvictsTheWrongExpert(), counts_from_trace(IDS, 8), budget_slots=6, top_k=2)


def test_replay_cache_rejects_a_bad_capacity():
    with pytest.raises(ValueError, match="capacity must be an int >= 0"):
        replay_cache(Lru(), counts_from_trace(IDS, 8), capacity=-1)


# --- the benchmark, end to end on small synthetic traces --------------------------------------------------


@pytest.fixture
def replay_traces(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import replay_traces

    return replay_traces


def write_traces(directory, rng) -> None:
    def routing(tokens, layers, experts, top_k):
        return np.stack([[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in range(tokens)])

    streams = ("humaneval_p0", "humaneval_p1", "gsm8k_p0", "gsm8k_p1")
    np.savez(directory / "mixtral_8x7b_instruct_fp8_vllm_routing.npz",
             **{f"{s}_decode_expert_ids": routing(12, 3, 8, 2).astype(np.int8) for s in streams})  # fmt: skip
    np.savez(directory / "flame_moe_290m_routing.npz", stream_expert_ids=routing(16, 2, 64, 6).astype(np.int8))


def test_the_benchmark_prints_every_policy_writes_a_csv_and_checks_the_targets(replay_traces, tmp_path, capsys):
    write_traces(tmp_path, np.random.default_rng(1))
    csv = tmp_path / "out.csv"
    replay_traces.main(["--traces-dir", str(tmp_path), "--csv", str(csv), "--plot", str(tmp_path / "out.png")])
    out = capsys.readouterr().out
    for policy in ("static", "workload(4,1)", "workload(4,8)", "lru=", "lfu=", "belady", "rt:lru", "rt:cache_cpu"):
        assert policy in out
    assert out.count("target mixtral-8x7b") == 2
    assert len(csv.read_text().splitlines()) == 1 + 2 * 2 * 9  # header, 2 traces x 2 cache sizes x 9 policies
    assert "wrote" in out and ("matplotlib is not installed" in out or (tmp_path / "out.png").exists())


def test_the_benchmark_says_where_the_traces_should_be(replay_traces, tmp_path):
    with pytest.raises(SystemExit, match="not found. The traces live in ../shared/traces"):
        replay_traces.main(["--traces-dir", str(tmp_path / "nowhere")])


def test_the_benchmark_rejects_a_trace_with_more_experts_than_the_model(replay_traces, tmp_path):
    rng = np.random.default_rng(2)
    write_traces(tmp_path, rng)
    path = tmp_path / "mixtral_8x7b_instruct_fp8_vllm_routing.npz"
    data = dict(np.load(path))
    data["gsm8k_p0_decode_expert_ids"][3, 1, 0] = 11
    np.savez(path, **data)
    with pytest.raises(ValueError, match="expert id 11 .* out of range for layers of 8 experts"):
        replay_traces.main(["--traces-dir", str(tmp_path), "--csv", str(tmp_path / "x.csv")])
