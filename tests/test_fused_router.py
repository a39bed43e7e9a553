"""The residual prefetch's C path (dali_compile/runtime/fused_router.py, csrc/core/prefetch.cpp): routers
recognised as its form, the routing against the form's plain torch reference, and the prefetch choice
against the Python one on that routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dali_compile.runtime.fused_router import FusedPrefetch, RouterForm, form_reference, recognise
from dali_compile.runtime.planner import CostModel
from dali_compile.runtime.prefetch import ResidualPredictor, find_router, prefetch_choice
from dali_compile.tiny_models import MINIMUM_FAMILIES, tiny_model

COST = CostModel((1, 2, 4, 8, 16, 32, 64), tuple(np.linspace(1e-4, 2e-3, 7)), tuple(np.linspace(5e-5, 3e-4, 7)),
                 4e-4, 2e-5)
E, H = 24, 40  # H not a multiple of the vector width: the dot kernels' tails too


@pytest.fixture(scope="module")
def fused():
    f = FusedPrefetch(E)
    if f.function is None:
        pytest.skip("the C++ extension is not built here")
    return f


def routing_close(ids, weights, want_ids, want_weights) -> None:
    """Same experts per token, in the same order (random inputs: no ties), weights within fp32 rounding."""
    assert torch.equal(torch.from_numpy(ids), want_ids)
    torch.testing.assert_close(torch.from_numpy(weights), want_weights.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize, bias", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_the_c_routing_equals_the_forms_reference(fused, dtype, normalize, bias, tokens):
    gen = torch.Generator().manual_seed(tokens)
    weight = torch.randn(E, H, generator=gen).to(dtype)
    form = RouterForm(normalize, 4, weight, torch.randn(E, generator=gen) if bias else None)
    x = torch.randn(tokens, 2 * H, generator=gen).to(dtype)[:, ::2][:, :H].contiguous()
    strided = torch.randn(tokens, H + 8, generator=gen).to(dtype)[:, :H]  # rows H + 8 apart
    residual = torch.randn(H, generator=gen)
    for gate_input, res in ((x, None), (x, residual), (strided, residual)):
        assert fused.run(form, gate_input, res, None, None, 0) == 0
        shifted = gate_input.float() + (0 if res is None else res)
        want_ids, want_weights = form_reference(form, shifted)
        pairs = tokens * form.top_k
        routing_close(fused.ids[:pairs].reshape(tokens, -1), fused.weights[:pairs].reshape(tokens, -1), want_ids,
                      want_weights)
        flat = want_ids.reshape(-1).numpy()
        assert (fused.counts == np.bincount(flat, minlength=E)).all()
        np.testing.assert_allclose(fused.mass, np.bincount(flat, weights=want_weights.reshape(-1).double().numpy(),
                                                           minlength=E), rtol=1e-5)


def test_the_c_choice_equals_the_python_one_on_its_routing(fused):
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    for trial in range(50):
        form = RouterForm(True, 4, torch.randn(E, H, generator=gen), None)
        x = torch.randn(int(rng.integers(1, 9)), H, generator=gen)
        slots = np.where(rng.random(E) < 0.3, rng.integers(0, 50, E), -1).astype(np.int32)
        cost, count = (None if trial % 5 == 0 else COST), int(rng.integers(0, 5))
        taken = fused.run(form, x, None, slots, cost, count)
        counts, mass = fused.counts.copy(), fused.mass.copy()
        assert fused.chosen[:taken].tolist() == prefetch_choice(counts, mass, slots >= 0, cost, count).tolist()
    assert fused.run(form, x, None, slots.astype(np.int64), COST, 2) == -1  # not a slot table: the Python path
    assert fused.run(form, x, None, slots, COST, E + 1) == -1


@pytest.mark.parametrize("family", MINIMUM_FAMILIES)
def test_each_familys_router_is_recognised_as_its_form(family):
    """Softmax-then-top-k routers (renormalised or not) and GPT-OSS's top-k-then-softmax (with its bias) take
    the C path, in fp32 and bf16; DeepSeek's sigmoid with group-limited top-k keeps the module."""
    want = {"mixtral": (True, False), "qwen3_moe": (True, False), "qwen2_moe": (False, False), "olmoe": (False, False),
            "gpt_oss": (True, True), "deepseek_v3": None}[family]
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(family).to(dtype)
        config = model.config
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or \
            config.n_routed_experts
        block = model.model.layers[-1].mlp
        form = recognise(find_router(block, experts, config.hidden_size), experts, config.hidden_size)
        assert (None if form is None else (form.normalize, form.bias is not None)) == want


def test_the_predictor_takes_the_c_path_for_a_recognised_router_and_rechecks_a_replaced_weight():
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe")
    config = model.config
    routers = [find_router(layer.mlp, config.num_experts, config.hidden_size) for layer in model.model.layers]
    predictor = ResidualPredictor(routers, config.num_experts, config.hidden_size)
    if FusedPrefetch(config.num_experts).function is None:
        pytest.skip("the C++ extension is not built here")
    x = torch.randn(3, config.hidden_size)
    with torch.no_grad():
        counts, mass = predictor.predict(0, x)
        assert predictor._forms[1] is not None  # recognised: the C path answered
        module_counts, module_mass = predictor.counts_of(*predictor.predicted_routing(0, x))
        assert (counts == module_counts).all()
        np.testing.assert_allclose(mass, module_mass, rtol=1e-5)
        routers[1].weight = torch.nn.Parameter(torch.randn_like(routers[1].weight))  # a new tensor
        counts, _ = predictor.predict(0, x)
        assert predictor._forms[1].weight is routers[1].weight
        assert (counts == predictor.counts_of(*predictor.predicted_routing(0, x))[0]).all()
