"""The second entry path: "dali" registered in transformers' ExpertsInterface, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_RTOL, compile_dali, count_moe_calls, num_moe_layers, relative_max_error

import dali_compile
from dali_compile.tiny_models import available_families, tiny_model


@pytest.mark.parametrize("family", available_families())
def test_dali_experts_implementation_equals_grouped_mm(family):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        model.set_experts_implementation("dali")
        got = model(ids).logits
        calls = count_moe_calls(model, ids)
        compiled = torch.compile(model, backend="eager", fullgraph=True)(ids).logits
    assert calls == num_moe_layers(model)
    assert relative_max_error(got, want) <= FP32_RTOL
    assert relative_max_error(compiled, want) <= FP32_RTOL


def test_dali_backend_over_dali_experts_does_not_rewrite_twice():
    """The graph already calls dali::moe_hybrid; the pass finds nothing left to do and results hold."""
    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        want = model(ids).logits
        model.set_experts_implementation("dali")
        compiled = compile_dali(model)
        got = compiled(ids).logits
        calls = count_moe_calls(compiled, ids)
    report = dali_compile.last_report()
    assert report.num_rewritten == 0 and not report.refused, str(report)
    assert calls == num_moe_layers(model)
    assert relative_max_error(got, want) <= FP32_RTOL


def test_unsupported_experts_fall_back_with_a_warning():
    """A post-expert norm has no dali layout: keep transformers' grouped_mm math and say so."""
    import dali_compile.experts_interface as interface

    model = tiny_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.has_post_expert_norm = True
    experts.post_expert_norm = torch.nn.LayerNorm(model.config.hidden_size)
    ids = torch.randint(0, 96, (1, 5))
    interface._warned_fallback.discard(type(experts).__name__)
    with torch.no_grad():
        want = model(ids).logits
        model.set_experts_implementation("dali")
        with pytest.warns(UserWarning, match="post-expert norm"):
            got = model(ids).logits
    assert relative_max_error(got, want) <= FP32_RTOL


def test_eager_calls_reuse_the_layer_handle():
    """Eagerly every call needs the module's handle: registered once, then reused."""
    from dali_compile.runtime.registry import layer_registry

    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    registry = layer_registry()
    registered = []
    original = registry.register

    def counting(spec, weak=False):
        registered.append(spec.name)
        return original(spec, weak)

    registry.register = counting
    try:
        with torch.no_grad():
            model.set_experts_implementation("dali")
            model(ids)
            first = len(registered)
            model(ids)
    finally:
        registry.register = original
    assert len(registered) == first == num_moe_layers(model)


def test_a_data_swap_under_offload_registers_the_new_weights():
    """An offloaded model's experts module whose `.data` now points at other storage (same Parameter object)
    is no longer the layer its runtime cached on the device: the module registers its new tensors and the
    result follows the new weights, not the runtime's cached copies of the old ones."""
    model = tiny_model("mixtral")
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # cache_cpu_miss computes every cached expert on the device, from the copies it cached there
        offloaded = dali_compile.offload(model, device="emulated", expert_memory="1MiB", policy="cache_cpu_miss")
        for _ in range(3):
            offloaded(ids)
        for layer in offloaded.model.layers:
            layer.mlp.experts.down_proj.data = layer.mlp.experts.down_proj.data * 2
        got = offloaded(ids).logits
        dali_compile.release(offloaded)
        offloaded.set_experts_implementation("grouped_mm")
        want = offloaded(ids).logits
    assert relative_max_error(got, want) <= FP32_RTOL


def test_a_released_handle_is_not_reused():
    """`dali_compile.release` of an offloaded model drops its handles; the module's next eager call registers
    its experts again and equals transformers' math."""
    model = tiny_model("mixtral")
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        offloaded = dali_compile.offload(model, device="emulated", expert_memory="1MiB", policy="dali")
        through_runtime = offloaded(ids).logits
        dali_compile.release(offloaded)
        model.set_experts_implementation("dali")
        again = model(ids).logits
    assert relative_max_error(through_runtime, want) <= FP32_RTOL
    assert relative_max_error(again, want) <= FP32_RTOL
