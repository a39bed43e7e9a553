"""Offloaded models on the emulated accelerator: every policy and budget gives eager's answer.

The emulated accelerator is the CUDA test double (runtime/emulated.py): real slot pools within a
budget, copies on a worker thread, GPU experts through `dali::gpu_experts`' reference. So these tests
run the whole hybrid path of `dali::moe_hybrid` (plan, CPU submit/wait, staging, caches, combine).
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import FP32_RTOL, compile_dali, relative_max_error

import dali_compile
from dali_compile.experts_interface import spec_of_module
from dali_compile.hf_compat import cache_keyword
from dali_compile.offload import runtime_of
from dali_compile.runtime.accelerator import ExpertMemoryError, parse_bytes
from dali_compile.runtime.expert_cache import expert_bytes
from dali_compile.runtime.planner import CostModel
from dali_compile.runtime.policies import POLICIES
from dali_compile.runtime.prefetch import default_prefetch_count
from dali_compile.tiny_models import tiny_model

# Each test runs on both modes of the emulated accelerator (synchronous, asynchronous with random delays).
pytestmark = pytest.mark.usefixtures("emulated_mode")

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")
# A machine where the GPU is 10x faster than the CPU per expert and a copy costs half a CPU expert: every
# policy then splits experts between the devices and copies some, so the tests see real mixes.
COST = CostModel(workloads=(1, 8), cpu_seconds=(1.0, 4.0), gpu_seconds=(0.1, 0.2), transfer_seconds=0.5)
PROMPT = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))


@functools.cache
def eager_results(family: str):
    model = tiny_model(family)
    with torch.no_grad():
        logits = model(PROMPT).logits
        tokens = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
    return logits, tokens


def moe_geometry(model) -> tuple[int, int, int, int]:
    """(slot bytes, MoE layers, experts per layer, top-k) of a tiny model."""
    experts = [m for m in model.modules() if hasattr(m, "is_transposed")]
    spec = spec_of_module(experts[0])
    return expert_bytes(spec), len(experts), spec.num_experts, model.config.num_experts_per_tok


def budget_bytes(model, budget: str) -> int:
    """'none': only the staging slots (zero cached experts); 'some': half of every layer's experts cached;
    'all': every expert fits (and dali's prefetch slots, which come out of the budget)."""
    slot, layers, experts, top_k = moe_geometry(model)
    cached = {"none": 0, "some": layers * experts // 2, "all": layers * experts + 2 * default_prefetch_count(experts)}
    return slot * (top_k + cached[budget])


@pytest.fixture
def offloaded():
    models = []

    def make(family: str, **kwargs):
        model = tiny_model(family)
        kwargs.setdefault("expert_memory", budget_bytes(model, kwargs.pop("budget", "some")))
        kwargs.setdefault("cost_model", COST)
        models.append(dali_compile.offload(model, device="emulated", **kwargs))
        return model

    yield make
    for model in models:
        if getattr(model, "_dali_runtime", None) is not None:
            dali_compile.release(model)


@pytest.mark.parametrize("budget", ["none", "some", "all"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_policy_and_budget_matches_eager(offloaded, family, policy, budget):
    want_logits, want_tokens = eager_results(family)
    model = offloaded(family, policy=policy, budget=budget)
    with torch.no_grad():
        logits = model(PROMPT).logits  # prefill: 12 tokens
        tokens = model.generate(PROMPT, max_new_tokens=3, do_sample=False)  # decode steps of 2 tokens
    assert relative_max_error(logits, want_logits) <= FP32_RTOL
    assert torch.equal(tokens, want_tokens)
    runtime = runtime_of(model)
    stats = dali_compile.offload_stats(model)
    total = stats["total"]
    assert runtime.accelerator.pool.peak_bytes <= runtime.accelerator.pool.budget_bytes
    assert total["experts_cpu"] + total["experts_gpu"] == total["hits"] + total["misses"] > 0
    assert total["bytes_copied"] == total["copies"] * stats["slot_bytes"]
    if policy == "all_cpu" or (policy == "layerwise" and budget == "none"):
        assert total["experts_gpu"] == 0 and total["copies"] == 0
    if policy in ("on_demand", "lru"):
        assert total["experts_cpu"] == 0
    if budget == "all" and policy not in ("all_cpu", "on_demand"):
        assert total["misses"] == 0  # everything cached from the start


def test_some_budget_mixes_devices_and_copies(offloaded):
    """The equality above must not be vacuous: with half the experts cached, dali puts experts on both
    devices, on_demand copies every active expert, cache_cpu_miss copies misses in the background."""
    totals = {}
    for policy in ("dali", "on_demand", "cache_cpu_miss", "lru"):
        model = offloaded("qwen3_moe", policy=policy)
        with torch.no_grad():
            model.generate(PROMPT, max_new_tokens=4, do_sample=False)
        totals[policy] = dali_compile.offload_stats(model)["total"]
        dali_compile.release(model)
    assert totals["dali"]["experts_cpu"] > 0 and totals["dali"]["experts_gpu"] > 0
    assert totals["on_demand"]["copies"] == totals["on_demand"]["experts_gpu"]
    assert totals["cache_cpu_miss"]["copies"] > 0 and totals["cache_cpu_miss"]["experts_cpu"] > 0
    assert totals["lru"]["copies"] > 0 and totals["lru"]["misses"] > 0


@pytest.mark.parametrize("slots", [1, 3, 4])
def test_staging_chunks_when_more_misses_than_slots(offloaded, slots):
    """on_demand with fewer staging slots than active experts runs them through the slots in double-buffered
    chunks (one slot: one expert at a time); the answer is the same."""
    model = tiny_model("qwen3_moe")
    slot = moe_geometry(model)[0]
    model = offloaded("qwen3_moe", policy="on_demand", expert_memory=slots * slot)
    want_logits, _ = eager_results("qwen3_moe")
    with torch.no_grad():
        logits = model(PROMPT).logits
    assert relative_max_error(logits, want_logits) <= FP32_RTOL
    stats = dali_compile.offload_stats(model)
    assert stats["staging_slots"] == slots and stats["total"]["copies"] == stats["total"]["experts_gpu"]


@pytest.mark.parametrize("policy,inductor", [pytest.param("dali", True, marks=pytest.mark.one_emulated_mode),
                                             ("cache_cpu_miss", False)])
def test_compiled_offloaded_model_matches_eager(offloaded, policy, inductor):
    """torch.compile(backend="dali") on an offloaded model: one graph, the op calls the hybrid runtime
    (inductor keeps the opaque op and its order)."""
    want_logits, want_tokens = eager_results("mixtral")
    model = offloaded("mixtral", policy=policy)
    compiled = compile_dali(model, inductor=inductor)
    with torch.no_grad():
        logits = compiled(PROMPT).logits
    assert relative_max_error(logits, want_logits) <= FP32_RTOL
    assert dali_compile.offload_stats(model)["total"]["steps"] == 2  # the compiled graph ran both MoE layers


@pytest.mark.one_emulated_mode
def test_hand_written_decode_loop_under_compile(offloaded):
    from transformers import DynamicCache

    reference = tiny_model("gpt_oss")
    model = offloaded("gpt_oss", policy="lru")
    forward = compile_dali(model.forward, dynamic=True)
    outputs = []
    for net in (reference.forward, forward):
        cache, tokens, ids = DynamicCache(), [], PROMPT[:1]
        with torch.no_grad():
            for _ in range(4):
                logits = net(input_ids=ids, use_cache=True, **{cache_keyword(model): cache}).logits
                ids = logits[:, -1:].argmax(-1)
                tokens.append(int(ids))
        outputs.append(tokens)
    assert outputs[0] == outputs[1]


def test_the_cpu_profile_times_cold_experts_and_cuts_noise_to_a_non_decreasing_curve():
    from dali_compile.runtime import profiling

    experts = profiling._ColdExperts(5)
    taken = [experts.take(3) for _ in range(3)]
    assert taken == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]  # in turn, wrapping around (E >= 2k: no reuse in a row)
    assert profiling._non_decreasing([3.0, 2.0, 2.5, 4.0, 3.5]) == [2.0, 2.0, 2.5, 3.5, 3.5]


def test_dali_without_a_cost_model_profiles_once_and_refreshes_on_request(tmp_path, monkeypatch, offloaded):
    from dali_compile.runtime import profiling

    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path))
    calls = []
    real_measure = profiling.measure_costs
    monkeypatch.setattr(profiling, "measure_costs", lambda *args: calls.append(1) or real_measure(*args))
    first = offloaded("mixtral", policy="dali", cost_model=None)
    second = offloaded("mixtral", policy="threshold", cost_model=None)
    assert len(calls) == 1  # the second start read the stored model
    cost = runtime_of(first).cost
    assert cost == runtime_of(second).cost  # cpu_call_seconds stored and read back too
    assert 0 <= cost.cpu_call_seconds <= min(cost.cpu_seconds)
    assert list(cost.cpu_seconds) == sorted(cost.cpu_seconds)  # more tokens never cost less
    assert list(cost.gpu_seconds) == sorted(cost.gpu_seconds)  # on the accelerator neither
    dali_compile.refresh_costs(first)
    assert len(calls) == 2
    with torch.no_grad():  # the scratch slot's cached expert was loaded back
        assert relative_max_error(first(PROMPT).logits, eager_results("mixtral")[0]) <= FP32_RTOL


def test_budget_below_one_expert_is_a_clear_error():
    model = tiny_model("mixtral")
    slot = moe_geometry(model)[0]
    with pytest.raises(ExpertMemoryError, match="below one expert slot"):
        dali_compile.offload(model, device="emulated", expert_memory=slot - 1, policy="lru")
    assert getattr(model, "_dali_runtime", None) is None
    assert model.config._experts_implementation == "grouped_mm"  # refused before anything changed


def test_release_frees_the_handles_and_the_host_experts():
    import gc
    import weakref

    from dali_compile.runtime.registry import layer_registry

    model = dali_compile.offload(tiny_model("mixtral"), device="emulated", expert_memory="1MiB", cost_model=COST)
    handles = runtime_of(model).handles
    experts = weakref.ref(model.model.layers[0].mlp.experts.down_proj)
    dali_compile.release(model)
    assert not any(handle in layer_registry() for handle in handles)
    with pytest.raises(ValueError, match="not offloaded"):
        dali_compile.offload_stats(model)
    del model
    gc.collect()
    assert experts() is None  # nothing in dali_compile keeps the host experts alive


def test_all_cpu_needs_no_expert_memory(offloaded):
    model = offloaded("mixtral", policy="all_cpu", expert_memory=0)
    with torch.no_grad():
        logits = model(PROMPT).logits
    assert relative_max_error(logits, eager_results("mixtral")[0]) <= FP32_RTOL
    assert runtime_of(model).accelerator.pool.used_bytes == 0


def test_bad_offload_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        dali_compile.offload(tiny_model("mixtral"), device="emulated", expert_memory="1MiB", policy="fastest")
    with pytest.raises(ValueError, match="device must be"):
        dali_compile.offload(tiny_model("mixtral"), device="cpu", expert_memory="1MiB")
    with pytest.raises(ValueError, match="expected a size"):
        dali_compile.offload(tiny_model("mixtral"), device="emulated", expert_memory="lots")
    with pytest.raises(ValueError, match="no fused experts module"):
        dali_compile.offload(torch.nn.Linear(3, 3), device="emulated", expert_memory="1MiB")
    model = dali_compile.offload(tiny_model("mixtral"), device="emulated", expert_memory="1MiB", cost_model=COST)
    with pytest.raises(RuntimeError, match="already offloaded"):
        dali_compile.offload(model, device="emulated", expert_memory="1MiB")
    dali_compile.release(model)


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * 2**30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(4096) == 4096
    with pytest.raises(ValueError):
        parse_bytes(-1)


def test_hybrid_layer_rejects_wrong_device_and_dtype(offloaded):
    model = offloaded("mixtral", policy="dali")
    handle = runtime_of(model).handles[0]
    ids = torch.zeros(3, 2, dtype=torch.int64)
    weights = torch.ones(3, 2)
    with pytest.raises(TypeError, match="bfloat16"):
        torch.ops.dali.moe_hybrid(torch.randn(3, 32, dtype=torch.bfloat16), ids, weights, handle)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.dali.moe_hybrid(torch.randn(3, 32), ids + 8, weights, handle)


def test_moe_hybrid_on_an_offloaded_layer_passes_opcheck(offloaded):
    model = offloaded("mixtral", policy="dali")
    handle = runtime_of(model).handles[0]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 32, generator=generator)
    ids = torch.randint(0, 8, (5, 2), generator=generator)
    weights = torch.rand(5, 2, generator=generator)
    torch.library.opcheck(torch.ops.dali.moe_hybrid.default, (hidden, ids, weights, handle))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("budget", ["none", "some"])
@pytest.mark.parametrize("policy", ["dali", "lru", "cache_cpu_miss", "on_demand", "threshold"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_cuda_offload_matches_eager(family, policy, budget):
    """The same stories on a real GPU: pinned host experts, copy stream, Triton experts, eager and compiled."""
    want_logits, want_tokens = eager_results(family)
    model = tiny_model(family)
    dali_compile.offload(model, device="cuda", expert_memory=budget_bytes(model, budget), policy=policy,
                         cost_model=COST)
    try:
        prompt = PROMPT.cuda()
        with torch.no_grad():
            logits = model(prompt).logits
            tokens = model.generate(prompt, max_new_tokens=3, do_sample=False)
            compiled = compile_dali(model)(prompt).logits
        assert relative_max_error(logits.cpu(), want_logits) <= 1e-4  # TF32-free fp32, other summation order
        assert relative_max_error(compiled.cpu(), want_logits) <= 1e-4
        assert torch.equal(tokens.cpu(), want_tokens)
        assert all(p.is_pinned() for m in model.modules() if hasattr(m, "is_transposed") for p in m.parameters())
    finally:
        dali_compile.release(model)
