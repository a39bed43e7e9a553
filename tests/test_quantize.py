"""`dali_compile.quantize`: the int8/int4 formats by hand, and quantized models against their own dequantizing
reference (a copy of the model whose linears carry the dequantized fp32 weights), eager and compiled.

# N output features, C input features, G group size
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from helpers import ROUNDING_RTOL, relative_max_error
from torch import nn

import dali_compile
from dali_compile import QuantizedLinear
from dali_compile.ops.quantized_linear import (
    activation_group,
    dequantize,
    quantize_weight,
    quantized_linear_reference,
    round_activations,
)
from dali_compile.tiny_models import tiny_model

FAMILIES = ("qwen2_moe", "olmoe", "mixtral")
# int4 groups must divide every linear's input features: the tiny models' are 32 and 40
TINY_INT4_GROUP = 8
FP32_RTOL = 1e-5  # the same fp32 products summed in another order


def dense_linears(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}


def dequantized_reference(original: nn.Module, quantized: nn.Module) -> nn.Module:
    """A copy of the full-precision model whose quantized linears carry their dequantized fp32 weight (fp32 models);
    they also round their input to int8 per activation group first, as the format says (activation_group,
    round_activations)."""
    reference = copy.deepcopy(original)
    for name, module in dense_linears(quantized).items():
        if isinstance(module, QuantizedLinear):
            linear = reference.get_submodule(name)
            linear.weight.data = module.dequantized_weight().to(original.dtype)
            group = activation_group(module.bits, linear.in_features, module.group_size)
            if group is not None:
                linear.register_forward_pre_hook(functools.partial(_round_input, group=group))
    return reference


def _round_input(module, args, group: int):
    return (round_activations(args[0], group).to(args[0].dtype),)


def quantized_pair(family: str, fmt: str, dtype=torch.float32):
    original = tiny_model(family).to(dtype).eval()
    quantized = dali_compile.quantize(copy.deepcopy(original), dense=fmt, group_size=TINY_INT4_GROUP)
    return original, quantized


# ----------------------------------------------------------------------------- the formats by hand


def test_int8_codes_and_scales_by_hand():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_weight(w, 8)
    assert s.dtype == torch.float16 and s.shape == (2, 1)
    assert float(s[0, 0]) == pytest.approx(1 / 127, rel=1e-3)
    assert q[0].tolist() == [127, -64, 32, 0] and q[1].tolist() == [0, 0, 0, 0]  # -63.5 rounds to even
    assert torch.equal(dequantize(q, s, 8, 4)[1], torch.zeros(4))


def test_int4_nibble_layout_by_hand():
    """Group of 4: byte i holds element i (low nibble) and element 2 + i (high), each as q + 8."""
    w = torch.tensor([[7.0, -7.0, 1.0, -2.0, 0.0, 0.0, 0.0, 3.5]])
    q, s = quantize_weight(w, 4, group_size=4)
    assert q.dtype == torch.uint8 and q.shape == (1, 4) and s.shape == (1, 2)
    assert s[0].tolist() == [1.0, 0.5]
    # group 0 codes [7, -7, 1, -2] -> nibbles [15, 1, 9, 6]; group 1 codes [0, 0, 0, 7] -> [8, 8, 8, 15]
    assert q[0].tolist() == [15 | 9 << 4, 1 | 6 << 4, 8 | 8 << 4, 8 | 15 << 4]
    assert torch.equal(dequantize(q, s, 4, 4), w)


@pytest.mark.parametrize("bits,group", [(8, None), (8, 16), (4, 16), (4, 32), (4, 64)])
def test_round_trip_error_is_half_a_step_and_requantizing_is_exact(bits, group):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits + (group or 0)))
    q, s = quantize_weight(w, bits, group)
    G = group or 64
    restored = dequantize(q, s, bits, G)
    step = s.float().repeat_interleave(G, dim=1)
    assert bool(((restored - w).abs() <= step / 2 + 1e-7).all())
    q2, s2 = quantize_weight(restored, bits, group)
    assert torch.equal(q2, q) and torch.equal(s2, s)


def test_quantized_bf16_weight_matches_its_fp32_quantization():
    w = torch.randn(8, 32).bfloat16()
    for bits in (8, 4):
        ours, fp32 = quantize_weight(w, bits, 16), quantize_weight(w.float(), bits, 16)
        assert all(torch.equal(a, b) for a, b in zip(ours, fp32, strict=True))


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_model_equals_its_dequantized_reference(family, fmt):
    original, quantized = quantized_pair(family, fmt)
    reference = dequantized_reference(original, quantized)
    ids = torch.randint(0, original.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, full = quantized(ids).logits, reference(ids).logits, original(ids).logits
    assert relative_max_error(got, want) < (FP32_RTOL if fmt == "int8" else ROUNDING_RTOL)
    # it did quantize, and not wildly (random 32-wide tiny layers; quality is measured on a trained model elsewhere)
    assert 0 < relative_max_error(got, full) < (0.1 if fmt == "int8" else 0.5)


def test_routers_and_experts_keep_full_precision():
    _, quantized = quantized_pair("qwen2_moe", "int8")
    layer = quantized.model.layers[0].mlp
    assert type(layer.shared_expert_gate) is nn.Linear and layer.shared_expert_gate.weight.dtype == torch.float32
    assert not isinstance(layer.gate, QuantizedLinear) and layer.gate.weight.dtype == torch.float32
    assert layer.experts.down_proj.dtype == torch.float32
    assert isinstance(quantized.lm_head, QuantizedLinear) and isinstance(layer.shared_expert.down_proj, QuantizedLinear)
    assert not hasattr(quantized.model.layers[0].self_attn.q_proj, "weight")  # no full-precision copy kept


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_compiled_quantized_model_equals_eager_and_generates_the_same_tokens(fmt):
    _, quantized = quantized_pair("olmoe", fmt)
    compiled = torch.compile(quantized, backend="dali", dynamic=False, options={"inductor": False})
    ids = torch.randint(0, quantized.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_max_error(compiled(ids).logits, quantized(ids).logits) < FP32_RTOL
        eager_tokens = quantized.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(quantized.generate(ids, max_new_tokens=5, do_sample=False), eager_tokens)
        dali_compile.clear_reports()
        quantized.forward = torch.compile(quantized.forward, backend="dali", dynamic=False)
        assert torch.equal(quantized.generate(ids, max_new_tokens=5, do_sample=False), eager_tokens)
        assert dali_compile.reports(), "generate() did not run the compiled forward"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_bf16_quantized_model_is_within_bf16_noise_of_its_reference(fmt):
    """Over a few prompts, the bf16 quantized model stays within twice the distance a plain bf16 run of the same
    dequantized weights has from their fp32 run (the two bf16 runs round in different places: activations vs
    weights). On the Qwen2-MoE tiny model: in the others, some prompts put two experts' router scores within bf16
    rounding of each other, and whichever side flips the choice (the plain bf16 run as often as the quantized one)
    lands 10-40% away."""
    original, quantized = quantized_pair("qwen2_moe", fmt, torch.bfloat16)
    truth_model = dequantized_reference(original.float(), quantized)
    bf16_model = copy.deepcopy(truth_model).to(torch.bfloat16)
    ours, plain = [], []
    for seed in range(3):
        ids = torch.randint(0, original.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            truth = truth_model(ids).logits
            ours.append(relative_max_error(quantized(ids).logits, truth))
            plain.append(relative_max_error(bf16_model(ids).logits, truth))
    assert max(ours) <= 2 * max(plain), (ours, plain)


# ----------------------------------------------------------------------------- bad input, model untouched


def snapshot(model) -> dict[str, object]:
    return {n: (type(m), m.weight) for n, m in dense_linears(model).items()}


def assert_untouched(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(after[n][0] is before[n][0] and after[n][1] is before[n][1] for n in before)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dense="int2"), ValueError, "choose 'int8', 'int4' or None"),
    (dict(dense="int8", experts="fp8"), ValueError, "experts='fp8'"),
    (dict(dense="int8", experts="int4", group_size=16), ValueError, "group size 16 must divide both"),
    (dict(dense="int4", group_size=32), ValueError, "40 input features, not a multiple of the int4 group size 32"),
    (dict(dense="int4", group_size=5), ValueError, "group size 5"),
])
def test_bad_requests_leave_the_model_untouched(kwargs, error, match):
    model = tiny_model("qwen2_moe").eval()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        dali_compile.quantize(model, **kwargs)
    assert_untouched(model, before)


def test_quantizing_twice_a_compiled_model_or_float64_is_refused():
    model = dali_compile.quantize(tiny_model("olmoe").eval(), dense="int8")
    with pytest.raises(ValueError, match="already quantized"):
        dali_compile.quantize(model, dense="int4")
    with pytest.raises(TypeError, match="before torch.compile"):
        dali_compile.quantize(torch.compile(tiny_model("olmoe"), backend="dali"), dense="int8")
    model64 = tiny_model("olmoe").double()
    before = snapshot(model64)
    with pytest.raises(TypeError, match="torch.float64 weights"):
        dali_compile.quantize(model64, dense="int8")
    assert_untouched(model64, before)


def test_op_reference_refuses_bad_group_and_device():
    q, s = quantize_weight(torch.randn(4, 32), 4, 16)
    with pytest.raises(ValueError, match="group_size 12 must divide"):
        quantized_linear_reference(torch.randn(1, 32), q, s, None, 4, 12)
    with pytest.raises(ValueError, match="scales must be float16"):
        quantized_linear_reference(torch.randn(1, 32), q, s.float(), None, 4, 16)
