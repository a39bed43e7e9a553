"""The simulator against the runtime (`benchmarks/validate_simulator.py`): a tiny model's real run through the
hybrid runtime on the emulated accelerator, replayed through the simulator with the same policy, budget, cost
model and prefetch predictions, gives exactly the runtime's counters; a wrong replay is caught. No timings are
asserted (they vary run to run); the simulator's per layer step times are checked on a hand timeline instead."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_compile.runtime import profiling
from dali_compile.runtime.planner import CostModel
from dali_compile.runtime.policies import POLICIES, Decision, LayerStep, Policy, SlotPlan, make_policy
from dali_compile.runtime.replay import counts_from_loads, replay_policy
from dali_compile.runtime.simulator import HardwareProfile, LayerTime, SimulatedModel, simulate

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BATCH, PROMPT, STEPS = 2, 6, 2  # B sequences, P prompt tokens, N decode steps: prefill steps of 12 tokens

# The runtime's cost model in these tests (a measurement of QUICK's experts on the emulated accelerator, 2-core
# AVX-512 host): fixed, so the policies decide the same on every machine. Measured, it carries the host's noise,
# and the runtime stores it for every later run: one stored model whose one-token GPU time read 2.1 ms instead of
# 0.45 ms (two test workers sharing 2 cores) turned every dali prefetch off from then on.
FIXED_COST = CostModel((1, 2, 4, 8, 16, 32, 64),
                       (2.98e-5, 3.05e-5, 3.12e-5, 3.32e-5, 3.64e-5, 4.28e-5, 5.61e-5),
                       (4.52e-4, 3.98e-4, 3.68e-4, 3.70e-4, 3.69e-4, 3.83e-4, 3.89e-4), 1.48e-4, 2.92e-5)


@pytest.fixture(scope="module", autouse=True)
def fixed_cost_model(tmp_path_factory):
    """FIXED_COST as what the runtime's profiling measures, in a cost-model store of this module's own."""
    store = tmp_path_factory.mktemp("cost-store") / "cost_models.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(profiling, "_store", lambda: store)
        patch.setattr(profiling, "measure_costs", lambda *args: FIXED_COST)
        yield FIXED_COST


@pytest.fixture(scope="module")
def validate():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import validate_simulator

        yield validate_simulator
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop("validate_simulator", None)


@pytest.fixture(scope="module")
def tiny(validate):
    """QUICK: 16 experts top-4 over 3 MoE layers (dali prefetches P = 2 for layers 1 and 2), fp32 on the CPU;
    with the cost model the runtime profiles for its experts (stored after the first measurement)."""
    shape = validate.QUICK
    model = validate.build_model(shape, torch.float32, "cpu")
    geometry = validate.expert_geometry(model)
    cost, _ = validate.profiled_costs(model, validate.budget_bytes(geometry, 0.5), "emulated")
    prompt = torch.randint(0, shape.vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(3))
    return model, geometry, cost, prompt, validate.simulated_model(model, shape)


def measure_and_replay(validate, tiny, policy: str, fraction: float, trials: int = 1):
    model, geometry, cost, prompt, sim_model = tiny
    measured = validate.run_policy(model, policy, validate.budget_bytes(geometry, fraction), prompt, STEPS,
                                   "emulated", trials=trials)
    return validate.validate(measured, sim_model, validate.hardware_profile("dev-2core+3090"), {"runtime": cost}, 1)


# Every policy, at a budget where caches are small (misses, evictions, staging) and one where half the experts
# fit (layerwise gets a GPU layer, the caches hit); both emulated modes (async: compute and copies on worker
# threads with random delays, which must not change a counter).
@pytest.mark.usefixtures("emulated_mode")
@pytest.mark.parametrize("fraction", [0.25, 0.5])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_the_simulator_counts_exactly_what_the_runtime_counted(validate, tiny, policy, fraction):
    result = measure_and_replay(validate, tiny, policy, fraction)
    assert result.mismatches == []
    counters = {name: got for name, got, _ in result.counters}
    assert counters["steps"] == 3 * (1 + STEPS)  # L MoE layers x (prefill + decode steps)
    assert counters["tokens_cpu"] + counters["tokens_gpu"] == 3 * 4 * BATCH * (PROMPT + STEPS)  # L * K * tokens
    if policy == "dali":  # the runtime prefetched, and the replay prefetched the same experts
        assert result.measured.prefetch == 2 and counters["prefetches"] > 0
    if policy in ("lru", "on_demand"):
        assert counters["copies"] > 0 and counters["experts_cpu"] == 0


def test_two_trials_with_warm_caches_and_every_layer_steps_times(validate, tiny):
    """Two trials (the first the timings' warm-up) replay as one run: the caches stay warm across them."""
    result = measure_and_replay(validate, tiny, "cache_cpu_miss", 0.25, trials=2)
    assert result.equal
    assert result.measured.trial_steps == 1 + STEPS and len(result.measured.layer_stats) == 2 * (1 + STEPS)
    assert len(result.simulated.layer_times) == 3 * 2 * (1 + STEPS)
    [(simulated, measured)] = validate.cpu_times(result)["all"]  # the second trial's only
    assert simulated > 0 and measured > 0  # values not asserted: timings


def test_a_wrong_replay_is_a_mismatch(validate, tiny):
    """The comparison can fail: one slot less in the replay changes lru's cache (hits, copies); dali replayed
    without its prefetch predictions misses the runtime's prefetch copies."""
    result = measure_and_replay(validate, tiny, "lru", 0.25)
    assert result.equal
    smaller = validate.replay(result.measured, tiny[4], validate.hardware_profile("dev-2core+3090"), tiny[2],
                              budget_slots=result.measured.budget_slots - 1)
    wrong = validate.compare(result.measured, smaller, tiny[2])
    assert not wrong.equal

    dali = measure_and_replay(validate, tiny, "dali", 0.5)
    assert dali.equal and dali.measured.prefetch == 2
    dali.measured.predictions, dali.measured.prefetch = None, 0
    unpredicted = validate.replay(dali.measured, tiny[4], validate.hardware_profile("dev-2core+3090"), tiny[2])
    wrong = validate.compare(dali.measured, unpredicted, tiny[2])
    assert any(line.startswith("prefetches") for line in wrong.mismatches)


def test_the_script_prints_the_table_writes_the_csv_and_exits_zero(validate, tmp_path, capsys):
    code = validate.main(["--quick", "--policies", "dali", "all_cpu", "--budgets", "0.5", "--steps", "1",
                          "--trials", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "EQUAL" in out and "MISMATCH" not in out and "GPU side" in out
    lines = (tmp_path / "validate_simulator.csv").read_text().splitlines()
    assert len(lines) == 3 and "counters_equal" in lines[0]


# ---------------------------------------------------------------------------------------------------
# The simulator and replay additions the validation relies on


PROFILE = HardwareProfile("test", "round numbers", ("none",), cpu_bytes_per_s=1e9, cpu_flop_per_s=1e18,
                          gpu_bytes_per_s=1e10, gpu_flop_per_s=1e18, pcie_bytes_per_s=5e8, gpu_kernel_s=0.0,
                          host_layer_s=1e-4, gpu_memory_bytes=1e9)
MODEL = SimulatedModel("toy", num_experts=4, top_k=2, expert_bytes=10**6, expert_flop_per_token=1000,
                       dense_bytes_per_layer=10**7, dense_flop_per_token_per_layer=1000)


class Split(Policy):
    """Expert 0 on the CPU, the others on the GPU through one staging slot."""

    name = "split"

    def slot_plan(self, budget_slots, num_layers, num_experts, top_k):
        return SlotPlan((0,) * num_layers, 1)

    def decide(self, step: LayerStep) -> Decision:
        return Decision(step.experts != 0)


def test_layer_times_follow_the_hand_timeline_and_a_given_cost_model_replaces_the_profiles():
    """One layer step: expert 0 (1 token) on the CPU, experts 1 and 2 (2 tokens each) on the GPU through one
    staging slot: copy, compute, copy after that compute, compute. The profile's roofline: 1 ms on the CPU,
    2 ms a copy, 0.1 ms on the GPU; a given cost model (3 ms on the CPU, 1 ms a copy, 0.5 ms on the GPU) is
    what the step is timed with instead."""
    counts = counts_from_loads([[{0: 1, 1: 2, 2: 2}]], 4)
    run = simulate(Split(), counts, PROFILE, MODEL, budget_slots=1, tokens_per_step=1)
    assert run.layer_times == [LayerTime(pytest.approx(1e-3), pytest.approx(2 * (2e-3 + 1e-4)))]
    own = CostModel((1, 2), (3e-3, 3e-3), (5e-4, 5e-4), 1e-3)
    timed = simulate(Split(), counts, PROFILE, MODEL, budget_slots=1, tokens_per_step=1, cost=own)
    assert timed.layer_times == [LayerTime(pytest.approx(3e-3), pytest.approx(2 * (1e-3 + 5e-4)))]
    assert timed.cpu_busy_s == pytest.approx(3e-3) and timed.replay.staged == 2


def test_the_replay_counts_tokens_on_each_side():
    counts = counts_from_loads([[{0: 1, 1: 2, 2: 3}], [{0: 4, 3: 1}]], 4)
    run = replay_policy(Split(), counts, budget_slots=1, top_k=2)
    assert (run.tokens_cpu, run.tokens_gpu, run.tokens) == (5, 6, 11)
    assert (run.experts_cpu, run.experts_gpu) == (2, 3)
    every_gpu = replay_policy(make_policy("on_demand"), counts, budget_slots=4, top_k=2)
    assert (every_gpu.tokens_cpu, every_gpu.tokens_gpu) == (0, 11)
    assert np.array_equal(every_gpu.copies_per_step, [3, 2])


def test_a_timing_cost_model_prices_the_same_decisions():
    """dali decides with `cost` whatever `timing_cost` is; only the times change (here: everything 10x slower)."""
    rng = np.random.default_rng(0)
    counts = np.zeros((12, 2, 4), dtype=np.int64)
    for s in range(12):
        for layer in range(2):
            counts[s, layer, rng.choice(4, 2, replace=False)] = rng.integers(1, 4, size=2)
    cost = PROFILE.cost_model(MODEL.expert_bytes, MODEL.expert_flop_per_token)
    slow = CostModel(cost.workloads, tuple(10 * t for t in cost.cpu_seconds), tuple(10 * t for t in cost.gpu_seconds),
                     10 * cost.transfer_seconds)
    plain = simulate(make_policy("dali"), counts, PROFILE, MODEL, budget_slots=4, tokens_per_step=1, cost=cost)
    timed = simulate(make_policy("dali"), counts, PROFILE, MODEL, budget_slots=4, tokens_per_step=1, cost=cost,
                     timing_cost=slow)
    for name in ("hits", "copies", "experts_cpu", "experts_gpu", "tokens_cpu", "background"):
        assert getattr(timed.replay, name) == getattr(plain.replay, name)
    assert plain.replay.experts_cpu > 0 and plain.replay.experts_gpu > 0
    assert timed.cpu_busy_s == pytest.approx(10 * plain.cpu_busy_s)
    assert [t.cpu_s for t in timed.layer_times] == pytest.approx([10 * t.cpu_s for t in plain.layer_times])
