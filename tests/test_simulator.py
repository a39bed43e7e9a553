"""The simulated PC (`runtime.simulator`): its time model against hand-computed timelines, prefetch through the
replay, the shipped hardware profiles, bad inputs, and `benchmarks/simulate_pc.py` end to end on a real trace."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from dali_compile.runtime.policies import DaliPolicy, Decision, LayerStep, Policy, SlotPlan, make_policy
from dali_compile.runtime.replay import replay_policy
from dali_compile.runtime.simulator import (
    HardwareProfile,
    SimulatedModel,
    dense_seconds,
    expert_budget_slots,
    hardware_profile,
    hardware_profiles,
    simulate,
)

MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXTRAL_TRACE = os.path.join(REPO, "..", "shared", "traces", "mixtral_8x7b_instruct_fp8_vllm_routing.npz")

# Round numbers, so the expected timelines are easy to follow: an expert of 1 MB reads in 1 ms on the CPU,
# 0.1 ms on the GPU (plus 0 launch cost), copies in 2 ms; FLOPs never bind at these workloads.
PROFILE = HardwareProfile("test", "round numbers", ("none",), cpu_bytes_per_s=1e9, cpu_flop_per_s=1e18,
                          gpu_bytes_per_s=1e10, gpu_flop_per_s=1e18, pcie_bytes_per_s=5e8, gpu_kernel_s=0.0,
                          host_layer_s=1e-4, gpu_memory_bytes=1e9)
MODEL = SimulatedModel("toy", num_experts=4, top_k=2, expert_bytes=10**6, expert_flop_per_token=1000,
                       dense_bytes_per_layer=10**7, dense_flop_per_token_per_layer=1000)
DENSE = 1e-3 + 4 * PROFILE.gpu_kernel_s  # 10 MB at 10 GB/s
CPU, GPU, COPY, HOST = 1e-3, 1e-4, 2e-3, 1e-4


def routing(*steps):
    """counts [S, L, E] from steps of layers of {expert: tokens}."""
    counts = np.zeros((len(steps), len(steps[0]), MODEL.num_experts), dtype=np.int64)
    for s, layers in enumerate(steps):
        for layer, loads in enumerate(layers):
            for expert, tokens in loads.items():
                counts[s, layer, expert] = tokens
    return counts


class Fixed(Policy):
    """A scripted policy: `on_gpu(step)` and nothing cached, `staging` staging slots."""

    name = "fixed"

    def __init__(self, on_gpu, staging: int, cache=0, background=None):
        self.on_gpu, self.staging, self.cache, self.background = on_gpu, staging, cache, background

    def slot_plan(self, budget_slots, num_layers, num_experts, top_k):
        return SlotPlan((self.cache,) * num_layers, self.staging)

    def decide(self, step: LayerStep) -> Decision:
        background = self.background(step) if self.background else ()
        return Decision(np.array(self.on_gpu(step), dtype=bool), background=background)


def test_all_cpu_time_is_dense_host_and_cpu_experts_in_sequence():
    counts = routing([{0: 1, 1: 1}, {2: 1, 3: 1}], [{0: 1, 3: 1}, {1: 1, 2: 1}])
    run = simulate(make_policy("all_cpu"), counts, PROFILE, MODEL, budget_slots=0, tokens_per_step=1)
    assert run.seconds == pytest.approx(4 * (DENSE + HOST + 2 * CPU))
    assert run.cpu_busy_s == pytest.approx(8 * CPU) and run.pcie_busy_s == 0
    assert run.tokens == 2 and run.tokens_per_s == pytest.approx(2 / run.seconds)


def test_a_cpu_calls_fixed_part_counts_once_per_layer_step():
    """The same steps with a cost model whose CPU calls have a 0.4 ms fixed part: each layer step runs its two
    CPU experts in one call, so it takes 2 x 1 ms - 0.4 ms."""
    counts = routing([{0: 1, 1: 1}, {2: 1, 3: 1}], [{0: 1, 3: 1}, {1: 1, 2: 1}])
    base = PROFILE.cost_model(MODEL.expert_bytes, MODEL.expert_flop_per_token)
    with_call = dataclasses.replace(base, cpu_call_seconds=0.4e-3)
    run = simulate(make_policy("all_cpu"), counts, PROFILE, MODEL, budget_slots=0, tokens_per_step=1, cost=with_call)
    assert run.cpu_busy_s == pytest.approx(4 * (2 * CPU - 0.4e-3))
    assert run.seconds == pytest.approx(4 * (DENSE + HOST + 2 * CPU - 0.4e-3))
    with pytest.raises(ValueError, match="cpu_call_seconds"):
        dataclasses.replace(base, cpu_call_seconds=2 * CPU)  # more than a whole call of one expert


def test_staged_copies_reuse_one_slot_after_its_compute():
    # one staging slot: copy, compute, copy (after that compute), compute
    counts = routing([{0: 1, 1: 1}])
    one = simulate(Fixed(lambda s: [True, True], staging=1), counts, PROFILE, MODEL, budget_slots=1,
                   tokens_per_step=1)
    assert one.seconds == pytest.approx(DENSE + HOST + 2 * (COPY + GPU))
    # two slots: the copies run back to back, each expert computed once it has landed
    two = simulate(Fixed(lambda s: [True, True], staging=2), counts, PROFILE, MODEL, budget_slots=2,
                   tokens_per_step=1)
    assert two.seconds == pytest.approx(DENSE + HOST + 2 * COPY + GPU)
    assert two.pcie_busy_s == pytest.approx(2 * COPY) and two.replay.staged == 2


def test_cpu_and_gpu_overlap_and_the_layer_waits_for_the_slower():
    counts = routing([{0: 1, 1: 1}])
    run = simulate(Fixed(lambda s: [False, True], staging=1), counts, PROFILE, MODEL, budget_slots=1,
                   tokens_per_step=1)
    assert run.seconds == pytest.approx(DENSE + HOST + max(CPU, COPY + GPU))
    assert run.cpu_busy_s == pytest.approx(CPU)


def test_background_copies_delay_the_next_use_of_the_expert():
    # the cache holds expert 0; step 0 runs expert 1 on the CPU and copies expert 3 in (evicting 0) after its
    # GPU work; step 1 computes expert 3 on the GPU once it has landed
    def background(step):
        return ((3, 0),) if step.step == 0 else ()

    def on_gpu(step):
        return [bool(c) for c in step.cached]

    counts = routing([{1: 1}], [{3: 1}])
    run = simulate(Fixed(on_gpu, staging=0, cache=1, background=background), counts, PROFILE, MODEL,
                   budget_slots=1, tokens_per_step=1)
    step0_end = DENSE + HOST + CPU  # expert 0 on the CPU; the copy starts at the plan (no GPU work)
    landed = DENSE + HOST + COPY
    step1_start_gpu = step0_end + DENSE + HOST
    assert run.seconds == pytest.approx(max(step1_start_gpu, landed) + GPU)
    assert run.replay.background == 1 and run.replay.hits == 1


def test_prefetch_is_shown_as_cached_counted_apart_and_timed_on_the_copy_stream():
    counts = routing([{0: 1, 1: 1}, {2: 1, 3: 1}])
    asked = []

    def predictor(s, layer):
        asked.append((s, layer))
        return np.array([0, 0, 1, 2]), np.array([0.0, 0.0, 0.3, 0.6])  # layer 1's experts, 3 the busier

    fast_link = dataclasses.replace(PROFILE, pcie_bytes_per_s=5e9)  # 0.2 ms a copy: the planner wants both
    policy = Fixed(lambda s: [bool(c) for c in s.cached], staging=0)
    run = simulate(policy, counts, fast_link, MODEL, budget_slots=4, tokens_per_step=1, prefetch=predictor,
                   prefetch_count=2)
    assert asked == [(0, 1)]
    assert run.prefetches == 2 and run.prefetch_hits == 2 and run.replay.hits == 0
    assert run.pcie_busy_s == pytest.approx(2 * 0.2e-3)
    layer1_ready = (DENSE + HOST + 2 * CPU) + DENSE + HOST  # both copies landed by then (DENSE + 0.4 ms)
    assert run.seconds == pytest.approx(layer1_ready + 2 * GPU)
    # the same prediction on the slow link (2 ms a copy, 1 ms on the CPU): the planner balances one expert on
    # each side, so only one is copied ahead
    slow = simulate(Fixed(lambda s: [bool(c) for c in s.cached], staging=0), counts, PROFILE, MODEL,
                    budget_slots=4, tokens_per_step=1, prefetch=predictor, prefetch_count=2)
    assert slow.prefetches == 1
    with pytest.raises(ValueError, match="prefetch slots"):
        simulate(policy, counts, PROFILE, MODEL, budget_slots=3, tokens_per_step=1, prefetch=predictor,
                 prefetch_count=2)


def test_replay_rejects_a_prefetch_of_a_resident_or_out_of_range_expert():
    counts = routing([{0: 1}, {0: 1}])
    policy = DaliPolicy()
    cost = PROFILE.cost_model(MODEL.expert_bytes, MODEL.expert_flop_per_token)
    with pytest.raises(ValueError, match="already resident"):
        replay_policy(policy, counts, budget_slots=6, top_k=2, cost=cost, prefetch=lambda s, l, r: np.array([0]))
    with pytest.raises(ValueError, match="distinct ids"):
        replay_policy(DaliPolicy(), counts, budget_slots=6, top_k=2, cost=cost,
                      prefetch=lambda s, l, r: np.array([7]))


def test_every_policy_runs_and_dali_is_never_slower_than_all_cpu_on_a_fast_gpu():
    rng = np.random.default_rng(0)
    counts = np.zeros((20, 3, 4), dtype=np.int64)
    for s in range(20):
        for layer in range(3):
            counts[s, layer, rng.choice(4, 2, replace=False)] = 1
    for name in ("dali", "all_cpu", "layerwise", "threshold", "cache_cpu_miss", "lru", "on_demand"):
        run = simulate(make_policy(name), counts, PROFILE, MODEL, budget_slots=6, tokens_per_step=1)
        assert run.seconds > 0 and run.replay.layer_steps == 60
        assert run.cpu_busy_s <= run.seconds + 1e-12 and run.gpu_busy_s <= run.seconds + 1e-12
    dali = simulate(make_policy("dali"), counts, PROFILE, MODEL, budget_slots=6, tokens_per_step=1)
    cpu = simulate(make_policy("all_cpu"), counts, PROFILE, MODEL, budget_slots=6, tokens_per_step=1)
    assert dali.seconds <= cpu.seconds


def test_shipped_profiles_reproduce_their_sources():
    profiles = hardware_profiles()
    assert {"dali-paper-pc", "pc-4090-threadripper", "dev-2core+3090"} <= set(profiles)
    cost = profiles["pc-4090-threadripper"].cost_model(MIXTRAL_EXPERT_BYTES, 6 * 4096 * 14336)
    # arXiv 2512.16473's Mixtral expert: 7.3 ms on 24 CPU threads, 0.25 ms on the GPU, 28 ms over PCIe
    assert cost.cpu_seconds[0] == pytest.approx(7.3e-3, rel=1e-3)
    assert cost.gpu_seconds[0] - profiles["pc-4090-threadripper"].gpu_kernel_s == pytest.approx(0.25e-3, rel=1e-3)
    assert cost.transfer_seconds == pytest.approx(28e-3, rel=1e-3)
    for profile in profiles.values():
        assert profile.sources and profile.description
    assert hardware_profile("dali-paper-pc") == profiles["dali-paper-pc"]
    # A stated CPU call's fixed part: in every t_cpu, and the cost model's call part (counted once per step)
    calling = dataclasses.replace(profiles["pc-4090-threadripper"], cpu_call_s=50e-6)
    with_call = calling.cost_model(MIXTRAL_EXPERT_BYTES, 6 * 4096 * 14336)
    assert with_call.cpu_call_seconds == 50e-6
    assert np.allclose(np.subtract(with_call.cpu_seconds, cost.cpu_seconds), 50e-6)
    assert cost.cpu_call_seconds == 0.0  # the shipped files state none (optional field)


def test_budget_and_dense_time():
    assert expert_budget_slots(PROFILE, resident_bytes=0, expert_bytes=10**6, num_experts_total=10**6,
                               reserve_bytes=0) == 1000
    assert expert_budget_slots(PROFILE, resident_bytes=2 * 10**9, expert_bytes=10**6, num_experts_total=8) == 0
    assert expert_budget_slots(PROFILE, 0, 10**6, 8, reserve_bytes=0) == 8
    assert dense_seconds(PROFILE, MODEL, 1) == pytest.approx(DENSE)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="must be \\[S, L, 4\\]"):
        simulate(make_policy("all_cpu"), np.zeros((2, 2, 5), dtype=np.int64), PROFILE, MODEL, budget_slots=0,
                 tokens_per_step=1)
    with pytest.raises(ValueError, match="tokens_per_step"):
        simulate(make_policy("all_cpu"), np.zeros((2, 2, 4), dtype=np.int64), PROFILE, MODEL, budget_slots=0,
                 tokens_per_step=0)
    with pytest.raises(ValueError, match="pcie_bytes_per_s"):
        dataclasses.replace(PROFILE, pcie_bytes_per_s=0.0)
    with pytest.raises(ValueError, match="finite"):
        dataclasses.replace(PROFILE, host_layer_s=-1.0)
    with pytest.raises(ValueError, match="K <= E"):
        dataclasses.replace(MODEL, top_k=5)
    with pytest.raises(KeyError, match="no hardware profile"):
        hardware_profile("a-pc-nobody-has")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="missing fields"):
        hardware_profile(str(bad))


@pytest.mark.skipif(not os.path.exists(MIXTRAL_TRACE), reason="needs ../shared/traces")
def test_simulate_pc_end_to_end_on_the_mixtral_trace(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    sys.modules.pop("simulate_pc", None)
    import simulate_pc

    csv_path = tmp_path / "sim.csv"
    rows = simulate_pc.main(["--profiles", "dali-paper-pc", "--models", "mixtral-8x7b", "--batches", "1", "8",
                             "--max-steps", "16", "--csv", str(csv_path), "--no-plot"])
    assert csv_path.exists()
    assert {r.policy for r in rows} == set(simulate_pc.POLICIES) and {r.phase for r in rows} == {"decode", "prefill"}
    for r in rows:
        assert r.tokens_per_s > 0 and np.isfinite(r.dali_speedup)
        if r.policy == "dali":
            assert r.dali_speedup == pytest.approx(1.0)
    sys.modules.pop("simulate_pc", None)


def test_simulate_pc_step_predictions_sum_each_steps_predicted_routing(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    sys.modules.pop("simulate_pc", None)
    import simulate_pc
    from model_shapes import model_shape

    shape = dataclasses.replace(model_shape("olmoe"), experts=4, top_k=2, moe_layers=2)
    ids = np.zeros((4, 2, 2), dtype=np.int64)
    predicted = (np.array([[0, 1], [1, 2], [3, 2], [3, 0]]), np.array([[0.5, 0.5], [0.6, 0.4], [0.7, 0.3],
                                                                        [0.9, 0.1]], dtype=np.float32))
    routing = simulate_pc.Routing(shape, ids, budget_slots=4, gate_predicted=[None, predicted])
    predict = simulate_pc.step_predictions(routing, tokens_per_step=2, steps=2)
    counts, mass = predict(0, 1)  # tokens 0 and 1
    assert counts.tolist() == [1, 2, 1, 0] and mass == pytest.approx([0.5, 1.1, 0.4, 0.0])
    counts, mass = predict(1, 1)  # tokens 2 and 3
    assert counts.tolist() == [1, 0, 1, 2] and mass == pytest.approx([0.1, 0.0, 0.3, 1.6])
    sys.modules.pop("simulate_pc", None)
