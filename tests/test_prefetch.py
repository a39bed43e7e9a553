"""Residual-based prefetching: calibration, the predictor, and that prefetching never changes results."""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_RTOL, relative_max_error
from test_offload import COST, PROMPT, eager_results, moe_geometry

import dali_compile
from dali_compile.offload import runtime_of
from dali_compile.runtime.fused_router import NativePrefetchChoice
from dali_compile.runtime.planner import CostModel
from dali_compile.runtime.prefetch import find_router, prefetch_choice, routed_ids
from dali_compile.tiny_models import tiny_model

# Each test runs on both modes of the emulated accelerator (synchronous, asynchronous with random delays).
pytestmark = pytest.mark.usefixtures("emulated_mode")


def offload_with_prefetch(family: str, prefetch: int = 2, cached_fraction: float = 0.25, **config):
    model = tiny_model(family, **config)
    slot, layers, experts, top_k = moe_geometry(model)
    budget = slot * (top_k + int(cached_fraction * layers * experts) + 2 * prefetch)
    return dali_compile.offload(model, device="emulated", expert_memory=budget, cost_model=COST, prefetch=prefetch)


@pytest.fixture
def release_after():
    models = []
    yield models.append
    for model in models:
        dali_compile.release(model)


def gate_inputs(model, input_ids) -> list[torch.Tensor]:
    """Each MoE layer's router input, captured independently of dali (forward hooks on the routers)."""
    seen = []
    routers = [m for m in model.modules() if type(m).__name__.endswith(("TopKRouter", "TopkRouter"))]
    handles = [r.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
               for r in routers]
    with torch.no_grad():
        model(input_ids)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_calibration_reproduces_the_mean_gate_input_difference(family, release_after):
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    want = gate_inputs(tiny_model(family), ids)
    model = offload_with_prefetch(family)
    release_after(model)
    residuals = dali_compile.calibrate(model, ids)
    assert len(residuals) == len(want) - 1 >= 1
    for layer, res in enumerate(residuals):
        assert res.shape == (model.config.hidden_size,)
        expected = (want[layer + 1] - want[layer]).mean(dim=0)
        assert torch.allclose(res, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_prefetching_never_changes_results(family, release_after):
    want_logits, want_tokens = eager_results(family)
    model = offload_with_prefetch(family)
    release_after(model)
    dali_compile.calibrate(model)  # the built-in sample
    with torch.no_grad():
        logits = model(PROMPT).logits
        tokens = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
    assert relative_max_error(logits, want_logits) <= FP32_RTOL
    assert torch.equal(tokens, want_tokens)
    total = dali_compile.offload_stats(model)["total"]
    assert total["prefetches"] > 0 and total["prefetch_hits"] > 0
    runtime = runtime_of(model)
    assert runtime.accelerator.pool.peak_bytes <= runtime.accelerator.pool.budget_bytes


def test_a_wrong_prediction_only_costs_time(release_after):
    """Residual vectors that send every prediction astray: prefetched experts are wasted, results unchanged."""
    want_logits, _ = eager_results("qwen3_moe")
    model = offload_with_prefetch("qwen3_moe")
    release_after(model)
    predictor = runtime_of(model).predictor
    generator = torch.Generator().manual_seed(0)
    predictor.set_residuals([torch.randn(32, generator=generator) * 100 for _ in predictor.residuals])
    with torch.no_grad():
        logits = model(PROMPT).logits
    assert relative_max_error(logits, want_logits) <= FP32_RTOL
    assert dali_compile.offload_stats(model)["total"]["prefetches"] > 0


def test_the_predictor_applies_the_next_router_as_the_model_does(release_after):
    """Without calibration the prediction is the plain next gate: layer 1's own routing of layer 0's input."""
    model = offload_with_prefetch("deepseek_v3")  # sigmoid, correction bias, group-limited top-k
    release_after(model)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    block = model.model.layers[2].mlp
    router = find_router(block, 16, 32)
    with torch.no_grad():
        want = torch.bincount(routed_ids(router, x).reshape(-1), minlength=16).numpy()
        _, weights, ids = block.gate(x)
        counts, mass = runtime_of(model).predictor.predict(0, x)
    assert torch.equal(routed_ids(router, x), ids)
    assert (counts == want).all()
    want_mass = torch.zeros(16).index_add_(0, ids.reshape(-1), weights.reshape(-1).float())
    assert torch.allclose(torch.from_numpy(mass).float(), want_mass)


def test_the_predictor_runs_the_routers_hooks(release_after):
    """The predictor calls a router's forward directly only while no hook would run: a hook that changes the
    router's output (here: every token to expert 3 first) changes the prediction as it changes the model."""
    model = offload_with_prefetch("qwen3_moe")
    release_after(model)
    block = model.model.layers[1].mlp  # MoE layer 1: predicted from layer 0's gate input
    router = find_router(block, 16, 32)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    predictor = runtime_of(model).predictor
    with torch.no_grad():
        plain, _ = predictor.predict(0, x)

        def to_expert_3(module, args, out):
            logits, scores, ids = out
            return logits, scores, torch.full_like(ids, 3)

        handle = router.register_forward_hook(to_expert_3)
        try:
            hooked, _ = predictor.predict(0, x)
        finally:
            handle.remove()
        again, _ = predictor.predict(0, x)
    assert hooked[3] == 3 * router.top_k and hooked.sum() == hooked[3]
    assert (again == plain).all() and plain[3] < 3 * router.top_k


def test_the_c_prefetch_choice_equals_the_python_one():
    """The runtime's prefetch goes through NativePrefetchChoice: the same counts, mass and chosen experts (in
    order) as the predictor's counts and prefetch_choice, for random routings (ties of equal weights, bf16
    weights, none, caches partly full, with and without a cost model); None where it does not apply."""
    import numpy as np

    cost = CostModel((1, 2, 4, 8, 16, 32, 64), tuple(np.linspace(1e-4, 2e-3, 7)), tuple(np.linspace(5e-5, 3e-4, 7)),
                     4e-4, 2e-5)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    chooser = NativePrefetchChoice(4, 2)
    if chooser.function is None:
        pytest.skip("the C++ extension is not built here")
    for trial in range(400):
        E, P = int(rng.integers(2, 130)), int(rng.integers(0, 6))
        K, T = int(rng.integers(1, min(E, 9))), int(rng.integers(1, 40))
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        weights = torch.rand(T, K, generator=gen) if trial % 3 else torch.full((T, K), 0.25)
        weights = None if trial % 11 == 0 else weights.bfloat16() if trial % 5 == 0 else weights
        slots = np.where(rng.random(E) < 0.3, rng.integers(0, 50, E), -1).astype(np.int32)
        model = None if trial % 7 == 0 else cost
        chooser = NativePrefetchChoice(E, P)
        got = chooser.choose(ids, weights, slots, model)
        flat = ids.reshape(-1).numpy()
        counts = np.bincount(flat, minlength=E)
        mass = np.zeros(E) if weights is None else np.bincount(flat, weights=weights.float().reshape(-1).numpy(),
                                                                 minlength=E)
        assert got.tolist() == prefetch_choice(counts, mass, slots >= 0, model, P).tolist()
        assert (chooser.counts == counts).all() and (chooser.mass == mass).all()
    chooser = NativePrefetchChoice(8, 2)
    slots = np.full(8, -1, dtype=np.int32)
    assert chooser.choose(torch.tensor([[0, 8]]), None, slots, cost) is None  # an id out of range
    assert chooser.choose(torch.tensor([[0, 1]]), torch.tensor([[float("nan"), 1.0]]), slots, cost) is None
    assert chooser.choose(torch.tensor([[0, 1]]), None, slots.astype(np.int64), cost) is None  # not the slot table


def test_calibration_files_and_bad_input(tmp_path, release_after):
    model = offload_with_prefetch("qwen3_moe")
    release_after(model)
    with pytest.raises(ValueError, match="not been calibrated"):
        dali_compile.save_calibration(model, tmp_path / "c.pt")
    dali_compile.calibrate(model)
    dali_compile.save_calibration(model, tmp_path / "c.pt")
    dali_compile.load_calibration(model, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="shorter than one token"):
        dali_compile.calibrate(model, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        dali_compile.calibrate(model, "some text")
    other = offload_with_prefetch("qwen3_moe", num_hidden_layers=3)  # another layer count
    release_after(other)
    with pytest.raises(ValueError, match="another model"):
        dali_compile.load_calibration(other, tmp_path / "c.pt")
    torch.save([torch.zeros(7)], tmp_path / "wrong_hidden.pt")
    with pytest.raises(ValueError, match="another model"):
        dali_compile.load_calibration(model, tmp_path / "wrong_hidden.pt")


def test_prefetch_slots_come_out_of_the_budget(release_after):
    model = tiny_model("qwen3_moe")
    slot, layers, experts, top_k = moe_geometry(model)
    dali_compile.offload(model, device="emulated", expert_memory=slot * (top_k + 4), cost_model=COST, prefetch=2)
    release_after(model)
    stats = dali_compile.offload_stats(model)
    assert sum(stats["cache_slots"]) + stats["staging_slots"] + 4 == top_k + 4
    assert runtime_of(model).accelerator.pool.used_bytes == slot * (top_k + 4)


@pytest.mark.parametrize("policy", ["cache_cpu_miss", "layerwise", "lru", "threshold"])
def test_prefetch_works_with_every_policy(policy, release_after):
    """Prefetched experts are on the device for their step: policies without staging slots run them too."""
    want_logits, want_tokens = eager_results("qwen3_moe")
    model = tiny_model("qwen3_moe")
    slot, layers, experts, top_k = moe_geometry(model)
    dali_compile.offload(model, device="emulated", expert_memory=slot * (top_k + layers * experts // 2 + 4),
                         policy=policy, cost_model=COST, prefetch=2)
    release_after(model)
    with torch.no_grad():
        tokens = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
    assert torch.equal(tokens, want_tokens)
    assert dali_compile.offload_stats(model)["total"]["prefetches"] > 0


@pytest.mark.parametrize("inductor", [False, pytest.param(True, marks=pytest.mark.one_emulated_mode)])
def test_the_pass_inserts_one_prefetch_hook_per_moe_layer_but_the_last(release_after, inductor):
    """Compiled: a dali::prefetch_next after each gate input but the last layer's, kept by inductor; it
    prefetches before the layer's own step would (the runtime's fallback then does nothing), and results
    stay eager's."""
    from helpers import compile_dali

    model = offload_with_prefetch("qwen3_moe", num_hidden_layers=3)
    release_after(model)
    reference = tiny_model("qwen3_moe", num_hidden_layers=3)
    compiled = compile_dali(model, inductor=inductor)
    with torch.no_grad():
        want_logits = reference(PROMPT).logits
        compiled(PROMPT)  # compile
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            logits = compiled(PROMPT).logits
    assert sum(1 for e in prof.events() if e.name == "dali::prefetch_next") == 2
    report = dali_compile.last_report()
    runtime = runtime_of(model)
    assert sorted(report.prefetch_hooks) == sorted(runtime.handles[:-1])
    assert relative_max_error(logits, want_logits) <= FP32_RTOL
    stats = dali_compile.offload_stats(model)["layers"]
    names = [layer.name for layer in runtime.layers]
    assert stats[names[0]]["prefetches"] == 0 and all(stats[n]["prefetches"] > 0 for n in names[1:])


def test_prefetch_next_on_an_offloaded_layer_passes_opcheck(release_after):
    model = offload_with_prefetch("qwen3_moe")
    release_after(model)
    handle = runtime_of(model).handles[0]
    torch.library.opcheck(torch.ops.dali.prefetch_next.default, (torch.randn(4, 32), handle))


def test_no_prediction_runs_where_no_copy_can_pay_off(release_after):
    """Copies that cost more than any one-token step's CPU side (4 experts x 1 s against 30 s): a decode step's
    prediction would choose nothing, so it does not run; a 12-token prefill (16 experts of up to 12 tokens could
    keep the CPU busier than one copy) still predicts. Results equal eager either way."""
    eager = tiny_model("qwen3_moe")
    slot, layers, experts, top_k = moe_geometry(eager)
    cost = CostModel(workloads=(1, 8), cpu_seconds=(1.0, 4.0), gpu_seconds=(0.1, 0.2), transfer_seconds=30.0)
    model = dali_compile.offload(tiny_model("qwen3_moe"), device="emulated", expert_memory=slot * (top_k + 8 + 4),
                                 cost_model=cost, prefetch=2)
    release_after(model)
    runtime = runtime_of(model)
    predictor, predicted = runtime.predictor, []
    original = predictor.fused_choice

    def recording(layer, gate_input, *args):
        predicted.append(gate_input.shape[0])
        return original(layer, gate_input, *args)

    predictor.fused_choice = recording
    one_token = PROMPT[:1, :1]
    with torch.no_grad():
        want_prefill, want_decode = eager(PROMPT).logits, eager(one_token).logits
        prefill = model(PROMPT).logits
        assert predicted == [PROMPT.numel()]  # layer 0 predicts layer 1 (of 2)
        predicted.clear()
        decode = model(one_token).logits
    assert predicted == []
    assert all(layer.prefetched == {} for layer in runtime.layers)
    assert relative_max_error(prefill, want_prefill) <= FP32_RTOL
    assert relative_max_error(decode, want_decode) <= FP32_RTOL
