"""Quantized routed experts (`dali_compile.quantize(model, experts=...)`): the C++ kernels against their own
dequantizing reference, the reference against the plain kernel on the dequantized weights, whole models eager
and compiled against a copy that carries the dequantized fp32 experts, and the refusals.

# T tokens, K top-k, E experts, H hidden, I intermediate, X = 2I (gated) or I, G group size
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers import FP32_RTOL, ROUNDING_RTOL, relative_max_error

import dali_compile
from dali_compile.experts_interface import experts_modules, spec_of_module, up_weight_name
from dali_compile.offload import runtime_of
from dali_compile.ops import cpu_experts as ops
from dali_compile.ops.expert_math import dequantize_expert, expert_weights, moe_reference
from dali_compile.ops.quantized_linear import INT8_ACTIVATION_GROUP, quantize_stacked, round_activations
from dali_compile.runtime import cpu_extension
from dali_compile.runtime.expert_cache import expert_bytes
from dali_compile.runtime.planner import CostModel
from dali_compile.runtime.policies import POLICIES
from dali_compile.tiny_models import MINIMUM_FAMILIES, tiny_model

E, H, I, K = 6, 64, 48, 2  # noqa: E741
GROUP = 16  # int4: divides H and I

# (gated, interleaved, bias, activation, alpha, limit): Mixtral/Qwen, GPT-OSS, Nemotron-H.
LAYOUTS = {
    "concatenated": (True, False, False, "silu", 0.0, 0.0),
    "interleaved_bias": (True, True, True, "clamped_swiglu", 1.702, 7.0),
    "no_gate": (False, False, False, "relu2", 0.0, 0.0),
}
# The op's (gated, interleaved, transposed, activation, alpha, limit) for the concatenated layout without biases.
CONCATENATED_FLAGS = LAYOUTS["concatenated"][:2] + (False,) + LAYOUTS["concatenated"][3:]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantized_layer(bits: int, layout: str, dtype: torch.dtype, seed: int = 0):
    """(up codes, down codes, up_bias, down_bias, up_scales, down_scales, flags) of a random layer."""
    gated, interleaved, bias, act, alpha, limit = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    X = 2 * I if gated else I
    group = None if bits == 8 else GROUP
    up, up_scales = quantize_stacked(torch.randn(E, X, H, generator=gen) * 0.2, bits, group)
    down, down_scales = quantize_stacked(torch.randn(E, H, I, generator=gen) * 0.2, bits, group)
    biases = (None, None)
    if bias:
        biases = tuple((torch.randn(E, n, generator=gen) * 0.1).to(dtype) for n in (X, H))
    flags = (gated, interleaved, False, act, alpha, limit)
    return up, down, *biases, up_scales, down_scales, flags


def routing(T: int, dtype: torch.dtype, experts=None, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    if experts is None:
        ids = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :K]  # K distinct experts a token
    else:
        ids = torch.tensor(experts).expand(T, K).clone()
    return hidden, ids, torch.softmax(torch.randn(T, K, generator=gen), dim=-1)


def op_args(layer, route, mask=None) -> tuple:
    up, down, up_bias, down_bias, up_scales, down_scales, flags = layer
    return (*route, up, down, up_bias, down_bias, mask, *flags, up_scales, down_scales)


needs_extension = pytest.mark.skipif(not cpu_extension.cpu_extension_available(), reason="C++ extension not built")


# ----------------------------------------------------------------------------- the kernels


@needs_extension
@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,experts", [(1, None), (7, None), (5, (3, 3)), (0, None)],
                         ids=["decode", "odd", "all_on_one_expert", "no_tokens"])
def test_cpu_kernel_equals_dequantizing_reference(bits, layout, dtype, T, experts):
    """Each slot's contribution: the C++ kernel reads the codes in place, the reference dequantizes to fp32; both
    accumulate in fp32 from the same inputs. E = 6 experts, K = 2: most experts get no token at decode."""
    args = op_args(quantized_layer(bits, layout, dtype), routing(T, dtype, experts))
    got = torch.ops.dali.cpu_experts(*args)
    want = ops.cpu_experts_reference(*args)
    assert got.shape == (T, K, H) and got.dtype == torch.float32
    if T:
        assert relative_max_error(got, want) <= FP32_RTOL


@needs_extension
@pytest.mark.parametrize("bits", (8, 4))
def test_decode_blocks_of_many_short_rows(bits):
    """Quantized rows are short (a 512-column int4 row is 256 bytes of codes): a task's block, sized in bytes of
    weights (csrc/core/stream_blocks.h), holds more than 64 rows here (gate/up: 80 of 320, down: 128 of 512), the
    last block partial."""
    gen = torch.Generator().manual_seed(7)
    wide, inter, group = 512, 320, None if bits == 8 else 32
    up, up_scales = quantize_stacked(torch.randn(E, 2 * inter, wide, generator=gen) * 0.2, bits, group)
    down, down_scales = quantize_stacked(torch.randn(E, wide, inter, generator=gen) * 0.2, bits, group)
    hidden = torch.randn(1, wide, generator=gen).to(torch.bfloat16)
    args = (hidden, torch.tensor([[1, 4]]), torch.tensor([[0.7, 0.3]]), up, down, None, None, None,
            *CONCATENATED_FLAGS, up_scales, down_scales)
    got = torch.ops.dali.cpu_experts(*args)
    assert relative_max_error(got, ops.cpu_experts_reference(*args)) <= FP32_RTOL


def _each_call_equals_the_reference(weights, width: int, calls, gen) -> None:
    """dali::cpu_experts on a concatenated-layout quantized layer (up, down, up_scales, down_scales) equals the
    reference within ROUNDING_RTOL, for each (tokens, dense_gemm_min_tokens) of `calls`, bf16 hidden states."""
    up, down, up_scales, down_scales = weights
    previous = cpu_extension.get_dense_gemm_min_tokens()
    try:
        for T, min_tokens in calls:
            cpu_extension.set_dense_gemm_min_tokens(min_tokens)
            hidden = torch.randn(T, width, generator=gen).to(torch.bfloat16)
            ids = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :K]
            args = (hidden, ids, torch.rand(T, K, generator=gen), up, down, None, None, None, *CONCATENATED_FLAGS,
                    up_scales, down_scales)
            got = torch.ops.dali.cpu_experts(*args)
            assert relative_max_error(got, ops.cpu_experts_reference(*args)) <= ROUNDING_RTOL, (T, min_tokens)
    finally:
        cpu_extension.set_dense_gemm_min_tokens(previous)


@pytest.mark.parametrize("width", (64, 96, 256))
def test_int8_kernels_of_every_isa_equal_the_reference(width, isa):
    """int8 codes times activations rounded to int8 in groups of 32 on each ISA path: AVX-512 VNNI's integer kernel
    where the CPU has it (rows of a multiple of 64 columns: one run at 64, four at 256; one and two tokens per tile),
    otherwise, and at 96 columns, the fp32 kernel on the rounded activations x'; decode and multi-token, streaming
    and GEMM paths."""
    gen = torch.Generator().manual_seed(width)
    inter = 98 if width == 96 else width  # 98: no multiple of 32, so the intermediate multiplies as it is
    up, up_scales = quantize_stacked(torch.randn(E, 2 * inter, width, generator=gen) * 0.2, 8, None)
    down, down_scales = quantize_stacked(torch.randn(E, width, inter, generator=gen) * 0.2, 8, None)
    _each_call_equals_the_reference((up, down, up_scales, down_scales), width, ((1, 0), (2, 0), (7, 0), (40, 4)),
                                    gen)


@pytest.mark.parametrize("group", (8, 32, 64, 96, 128, 256))
def test_int4_kernels_of_every_isa_equal_the_reference(group, isa):
    """int4 on each ISA path: AVX-512 VNNI's kernel where the CPU has it (groups of 32k over 128-column rows: 4, 2
    or 1 groups per run of codes), AVX2's maddubs kernel (groups of 32k over 64-column rows) and the scalar one
    (group 8, and the portable table), decode and multi-token, streaming and GEMM paths."""
    gen = torch.Generator().manual_seed(group)
    # 256 columns: two 64-byte runs of codes per row for the VNNI kernel. Group 8 (the scalar kernel) keeps 128.
    # Within FP32_RTOL unless one activation lands on an int8 rounding boundary (ROUNDING_RTOL): at 256 columns and
    # group 8 that happened on an EPYC (7.5e-5 on every ISA), at group 64 on a Xeon with AMX (1.5e-3).
    # Group 96 (384 columns) straddles runs of codes and group 256 spans two: each ISA must send them where it can.
    width = {8: 128, 96: 384}.get(group, 256)
    up, up_scales = quantize_stacked(torch.randn(E, 2 * width, width, generator=gen) * 0.2, 4, group)
    down, down_scales = quantize_stacked(torch.randn(E, width, width, generator=gen) * 0.2, 4, group)
    _each_call_equals_the_reference((up, down, up_scales, down_scales), width, ((1, 0), (3, 0), (40, 0), (40, 4)),
                                    gen)


@pytest.mark.parametrize("width", (640, 1152))
def test_int4_decode_kernel_folds_whole_and_partial_blocks_of_groups(width, isa):
    """One token, groups of 32: AVX-512 VNNI's decode kernel folds each block of 16 groups (4 runs of codes) into
    one lane per group in 16-bit integers. 640 columns: a whole block and one run of the next; 1152: two whole
    blocks and one run; the down projection's rows (the same width) too. Then at the bound of the 16-bit sums:
    every up weight the largest code (nibble 15) and every activation code 127 (hidden states all equal), so each
    lane holds 8 * 15 * 127 and each pair of lanes 30480."""
    gen = torch.Generator().manual_seed(width)
    up, up_scales = quantize_stacked(torch.randn(E, 2 * width, width, generator=gen) * 0.2, 4, 32)
    down, down_scales = quantize_stacked(torch.randn(E, width, width, generator=gen) * 0.2, 4, 32)
    _each_call_equals_the_reference((up, down, up_scales, down_scales), width, ((1, 0), (1, 0), (2, 0)), gen)
    largest, largest_scales = quantize_stacked(torch.full((E, 2 * width, width), 0.25), 4, 32)
    assert bool((largest == 0xFF).all())
    ids = torch.arange(K).unsqueeze(0)
    args = (torch.ones(1, width, dtype=torch.bfloat16), ids, torch.rand(1, K, generator=gen), largest, down, None,
            None, None, *CONCATENATED_FLAGS, largest_scales, down_scales)
    assert relative_max_error(torch.ops.dali.cpu_experts(*args), ops.cpu_experts_reference(*args)) <= ROUNDING_RTOL


@needs_extension
@pytest.mark.parametrize("bits", (8, 4))
def test_many_tokens_take_the_dequantized_gemm_path(bits):
    """Experts with at least dense_gemm_min_tokens tokens are dequantized whole and run through ATen's GEMM; a mask
    keeps some experts for another device (their slots are zero)."""
    layer = quantized_layer(bits, "concatenated", torch.bfloat16)
    mask = torch.tensor([True, True, False, True, True, True])
    args = op_args(layer, routing(40, torch.bfloat16), mask)
    previous = cpu_extension.get_dense_gemm_min_tokens()
    previous16 = cpu_extension.get_quantized_bf16_gemm_min_rows()
    try:
        cpu_extension.set_quantized_bf16_gemm_min_rows(0)  # the bf16 GEMM (AMX hosts' default): a test of its own
        cpu_extension.set_dense_gemm_min_tokens(4)
        gemm = torch.ops.dali.cpu_experts(*args)
        cpu_extension.set_dense_gemm_min_tokens(0)  # disabled: the streaming kernels
        streamed = torch.ops.dali.cpu_experts(*args)
    finally:
        cpu_extension.set_dense_gemm_min_tokens(previous)
        cpu_extension.set_quantized_bf16_gemm_min_rows(previous16)
    want = ops.cpu_experts_reference(*args)
    assert relative_max_error(gemm, want) <= FP32_RTOL
    assert relative_max_error(streamed, want) <= FP32_RTOL
    assert torch.count_nonzero(want[args[1] == 2]) == 0


@needs_extension
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", (8, 4))
def test_bf16_hidden_with_many_tokens_take_the_bf16_gemm_on_dequantized_blocks(bits, layout):
    """With bf16 hidden states, experts with at least quantized_bf16_gemm_min_rows tokens (int4: twice as many;
    default on AMX-BF16 CPUs; forced here) multiply blocks of dequantized rows rounded to bf16 on ATen's bf16
    GEMM, the activations rounded to bf16 before each GEMM: within bf16 rounding of the dequantizing reference,
    and not the exact fp32 path's result (so the path ran); the other experts stream, in the same call, as exact
    as ever."""
    layer = quantized_layer(bits, layout, torch.bfloat16, seed=3)
    route = routing(40, torch.bfloat16, seed=4)
    args = op_args(layer, route)
    counts = torch.bincount(route[1].flatten(), minlength=E)
    setting = int(counts[counts > 0].median()) // (1 if bits == 8 else 2)
    threshold = setting if bits == 8 else 2 * setting  # int4 takes the GEMM from twice the setting
    previous, previous16 = cpu_extension.get_dense_gemm_min_tokens(), cpu_extension.get_quantized_bf16_gemm_min_rows()
    try:
        cpu_extension.set_dense_gemm_min_tokens(0)
        cpu_extension.set_quantized_bf16_gemm_min_rows(setting)  # some experts each way
        got = torch.ops.dali.cpu_experts(*args)
        cpu_extension.set_quantized_bf16_gemm_min_rows(0)
        exact = torch.ops.dali.cpu_experts(*args)
    finally:
        cpu_extension.set_dense_gemm_min_tokens(previous)
        cpu_extension.set_quantized_bf16_gemm_min_rows(previous16)
    by_gemm = (counts >= threshold)[route[1]]  # [T, K]: slots whose expert took the bf16 GEMM
    assert by_gemm.any() and not by_gemm.all()
    want = ops.cpu_experts_reference(*args)
    assert relative_max_error(got, want) < 2e-2  # bf16 rounding of the weights, h, act and y
    assert relative_max_error(got[by_gemm], exact[by_gemm]) > 1e-4
    assert relative_max_error(got[~by_gemm], want[~by_gemm]) <= (FP32_RTOL if bits == 8 else ROUNDING_RTOL)


@needs_extension
def test_async_pair_runs_quantized_jobs():
    args = op_args(quantized_layer(4, "interleaved_bias", torch.bfloat16), routing(3, torch.bfloat16))
    handle = torch.ops.dali.cpu_experts_submit(*args)
    tensors = (*args[:8], *args[14:16])
    got = torch.ops.dali.cpu_experts_wait(handle, *tensors)
    assert relative_max_error(got, ops.cpu_experts_reference(*args)) <= FP32_RTOL
    other = op_args(quantized_layer(4, "interleaved_bias", torch.bfloat16, seed=5), routing(3, torch.bfloat16))
    handle = torch.ops.dali.cpu_experts_submit(*args)
    with pytest.raises(ValueError, match="up_scales is not the tensor given"):
        torch.ops.dali.cpu_experts_wait(handle, *tensors[:8], other[14], tensors[9])


@pytest.mark.parametrize("bits", (8, 4))
def test_the_two_references_agree_and_int8s_equals_the_plain_one(bits):
    """The oracles themselves: the op's reference and expert_math's (moe_reference, behind dali::moe_hybrid) agree;
    for int8, dequantizing whole experts by hand and running the full-precision reference on the hidden states
    rounded to int8 in groups of 32 agrees too (I = 48 is no multiple of 32: the intermediate is not rounded; the
    rounding itself is checked by hand in test_round_activations_by_hand)."""
    up, down, ub, db, us, ds, flags = quantized_layer(bits, "interleaved_bias", torch.float32)
    hidden, ids, weights = routing(9, torch.float32)
    spec = dali_compile.LayerSpec(
        dali_compile.ExpertLayout(dali_compile.Activation("clamped_swiglu", alpha=1.702, limit=7.0), interleaved=True,
                                  has_bias=True, quantization=dali_compile.ExpertQuantization(bits, torch.float32)),
        up, down, ub, db, us, ds)
    quantized = ops.cpu_experts_reference(hidden, ids, weights, up, down, ub, db, None, *flags, us, ds)
    assert relative_max_error(quantized.sum(dim=1), moe_reference(spec, hidden, ids, weights)) <= FP32_RTOL
    if bits == 8:
        plain_up, plain_down = (torch.stack(t) for t in zip(*(expert_weights(spec, e) for e in range(E)), strict=True))
        rounded = round_activations(hidden, INT8_ACTIVATION_GROUP)
        plain = ops.cpu_experts_reference(rounded, ids, weights, plain_up, plain_down, ub, db, None, *flags)
        assert relative_max_error(quantized, plain) <= FP32_RTOL
        unrounded = ops.cpu_experts_reference(hidden, ids, weights, plain_up, plain_down, ub, db, None, *flags)
        assert relative_max_error(quantized, unrounded) > FP32_RTOL  # the rounding is not a no-op here


def test_round_activations_by_hand():
    """Groups of 4: scale max |x| / 127, codes rounded half to even, a group of zeros stays zero."""
    x = torch.tensor([[1.27, -0.5, 0.005, 0.0, 0.0, 0.0, 0.0, 0.0]])
    rounded = round_activations(x, 4)
    scale = torch.tensor(1.27) / 127
    codes = torch.tensor([127.0, -50.0, 0.0, 0.0])  # 0.005 / 0.01 = 0.5 rounds to even: 0
    assert torch.equal(rounded[0, :4], codes * scale)
    assert torch.equal(rounded[0, 4:], torch.zeros(4))


@pytest.mark.parametrize("group", (8, 32, 128))
def test_cpu_rounding_of_activations_equals_round_activations_bit_for_bit(group, isa, gemm_rows):
    """The C++ rounding of int4's activations (scalar, or 16 columns at a time on AVX-512 for groups of 32k) gives
    exactly round_activations' values, ties to even and the clamp included: an identity int4 weight (codes 9 on
    the diagonal, scale 1) on the GEMM path returns the rounded input itself, as every other product is 0."""
    width = 256
    gen = torch.Generator().manual_seed(group)
    x = torch.randn(5, width, generator=gen)
    x[0, :group] = torch.arange(group) - group / 2 + 0.5  # amax 127 ... ties at every value
    x[0, 0] = 127.0
    x[1, :group] = 0.0  # a group of zeros
    identity = torch.full((width, width // 2), 0x88, dtype=torch.uint8)
    for j in range(width):  # nibble layout: low nibbles hold a group's first half, high nibbles its second
        g, i = divmod(j, group)
        byte, shift = g * group // 2 + i % (group // 2), 4 * (i >= group // 2)
        identity[j, byte] = (identity[j, byte] & ~(0xF << shift)) | (9 << shift)
    scales = torch.ones(width, width // group, dtype=torch.float16)
    gemm_rows(1)
    got = torch.ops.dali.quantized_linear(x, identity, scales, None, 4, group)
    assert torch.equal(got, round_activations(x, group))


@needs_extension
@pytest.mark.parametrize(("bits", "group"), ((4, 32), (4, 128), (8, None)))
def test_activation_rounding_error_is_small(bits, group):
    """Quantized experts multiply int8-rounded activations: against the same dequantized weights with fp32
    activations, each slot moves by 1-2% of the layer's largest contribution (int4, measured here 1.1% at G = 32,
    1.7% at 128: wider groups round more coarsely; int8 in groups of 32, 1.0%); the model-level cost is in
    benchmarks/quantization_quality.py."""
    gen = torch.Generator().manual_seed(3)
    width = 256  # hidden and intermediate sizes: multiples of both group sizes
    up, up_scales = quantize_stacked(torch.randn(E, 2 * width, width, generator=gen) * 0.2, bits, group)
    down, down_scales = quantize_stacked(torch.randn(E, width, width, generator=gen) * 0.2, bits, group)
    route = (torch.randn(5, width, generator=gen), torch.randint(0, E, (5, K), generator=gen),
             torch.rand(5, K, generator=gen))
    got = torch.ops.dali.cpu_experts(*route, up, down, None, None, None, *CONCATENATED_FLAGS, up_scales, down_scales)
    plain = [torch.stack([dequantize_expert(c[e], s[e], bits) for e in range(E)])
             for c, s in ((up, up_scales), (down, down_scales))]
    unrounded = ops.cpu_experts_reference(*route, *plain, None, None, None, *CONCATENATED_FLAGS)
    assert 0 < relative_max_error(got, unrounded) <= 2e-2


@pytest.mark.parametrize("bits", (8, 4))
def test_gpu_experts_reads_quantized_slots_as_the_cpu_reference_reads_the_layer(bits):
    """dali::gpu_experts on quantized pools (the emulated device's kernel): slots hold a permutation of some experts,
    the others are elsewhere (-1) and contribute zero."""
    up, down, ub, db, us, ds, flags = quantized_layer(bits, "interleaved_bias", torch.float32)
    hidden, ids, weights = routing(7, torch.float32)
    resident = torch.tensor([3, 0, 5, 1])  # slot s holds expert resident[s]
    slot_of_expert = torch.full((E,), -1, dtype=torch.int32)
    slot_of_expert[resident] = torch.arange(len(resident), dtype=torch.int32)
    up_pool, down_pool, ub_pool, db_pool, us_pool, ds_pool = (t[resident] for t in (up, down, ub, db, us, ds))
    got = torch.ops.dali.gpu_experts(hidden, ids, weights, up_pool, down_pool, ub_pool, db_pool, slot_of_expert,
                                     *flags, us_pool, ds_pool)
    want = ops.cpu_experts_reference(hidden, ids, weights, up, down, ub, db, slot_of_expert >= 0, *flags, us, ds)
    assert relative_max_error(got, want) <= FP32_RTOL
    with pytest.raises(ValueError, match="both scale pools or neither"):
        torch.ops.dali.gpu_experts(hidden, ids, weights, up_pool, down_pool, ub_pool, db_pool, slot_of_expert,
                                   *flags, us_pool, None)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a[:14] + (None, a[15]), ValueError, "both up_scales and down_scales"),
    (lambda a: a[:14] + (a[14].float(), a[15]), ValueError, "up_scales must be float16"),
    (lambda a: a[:14] + (a[14][:, :5], a[15]), ValueError, "up_scales must be float16"),
    (lambda a: a[:3] + (a[3].view(torch.uint8),) + a[4:], TypeError, "must both be int8 or both uint8"),
    (lambda a: a[:10] + (True,) + a[11:], ValueError, "row form"),
    (lambda a: (a[0].double(),) + a[1:], TypeError, "hidden must be"),
])
@pytest.mark.parametrize("kernel", ("reference", "cpp"))
def test_bad_quantized_arguments_are_clear_errors(change, error, match, kernel):
    if kernel == "cpp" and not cpu_extension.cpu_extension_available():
        pytest.skip("C++ extension not built")
    args = change(op_args(quantized_layer(8, "concatenated", torch.float32), routing(2, torch.float32)))
    run = ops.cpu_experts_reference if kernel == "reference" else torch.ops.dali.cpu_experts
    with pytest.raises(error, match=match):
        run(*args)


# ----------------------------------------------------------------------------- whole models


def reference_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """An experts implementation that runs the op's PyTorch reference (moe_reference: dequantized weights, int4's
    activations rounded as the format says) on the module's own tensors."""
    return moe_reference(spec_of_module(self), hidden_states, top_k_index, top_k_weights)


@contextlib.contextmanager
def reference_experts(model):
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("dali_test_reference", reference_experts_forward)
    model.set_experts_implementation("dali_test_reference")
    try:
        yield
    finally:
        model.set_experts_implementation("dali")


@pytest.mark.parametrize("fmt", ("int8", "int4"))
@pytest.mark.parametrize("family", MINIMUM_FAMILIES)
def test_quantized_model_equals_its_dequantized_reference_eager_and_compiled(family, fmt):
    """The op's PyTorch reference as the model's experts implementation (the activations' rounding is part of the
    format: its size is checked per layer in test_activation_rounding_error_is_small)."""
    original = tiny_model(family).eval()
    quantized = dali_compile.quantize(copy.deepcopy(original), experts=fmt, group_size=8)
    ids = torch.randint(0, original.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with reference_experts(quantized):
            want = quantized(ids).logits
        eager = quantized(ids).logits
        # The experts' compiled path alone: the dense linears stay ATen's, as in the reference
        compiled = torch.compile(quantized, backend="dali", options={"cpu_linears": False})(ids).logits
        torch._dynamo.reset()
        with_cpu_linears = torch.compile(quantized, backend="dali")(ids).logits
    assert relative_max_error(eager, want) <= FP32_RTOL
    assert relative_max_error(compiled, want) <= FP32_RTOL
    # Our CPU linears sum in another order than ATen's (last bits; the AVX-512 path differs more often), and the
    # experts round their activations to int8, which can turn such a difference into one rounding step: 1.2e-3
    # (int4) on mixtral here, within the per-layer bound of test_activation_rounding_error_is_small.
    assert relative_max_error(with_cpu_linears, want) <= 2e-2
    for _, module in experts_modules(quantized):
        codes = [getattr(module, up_weight_name(module)), module.down_proj]
        assert all(c.dtype == (torch.int8 if fmt == "int8" else torch.uint8) for c in codes)


@pytest.mark.parametrize("family", ("qwen3_moe", "gpt_oss"))
def test_quantized_bf16_generate_is_deterministic_and_compiled_tokens_equal_eager(family):
    model = dali_compile.quantize(tiny_model(family, dtype=torch.bfloat16).eval(), experts="int4", dense="int8",
                                  group_size=8)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        first = model.generate(prompt, **settings)
        second = model.generate(prompt, **settings)
        dali_compile.clear_reports()
        model.forward = torch.compile(model.forward, backend="dali")
        third = model.generate(prompt, **settings)
    assert dali_compile.reports(), "generate() did not run the compiled forward"
    assert torch.equal(first, second)
    assert torch.equal(first, third)


@needs_extension
def test_resident_fast_path_serves_quantized_layers():
    """The C++ kernel of dali::moe_hybrid serves a quantized layer after its first call, with the same result."""
    model = dali_compile.quantize(tiny_model("olmoe").eval(), experts="int8")
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    cpu_extension.forget_resident_layers()
    with torch.no_grad():
        first = model(ids).logits
        assert cpu_extension.resident_layer_count() >= 1
        second = model(ids).logits
    assert torch.equal(first, second)


def expert_tensors(model) -> list:
    return [(p, p.data_ptr()) for _, m in experts_modules(model) for p in m.parameters(recurse=False)]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(experts="int3"), ValueError, "experts='int3'"),
    (dict(experts="int4", group_size=16), ValueError, "group size 16 must divide both"),
    (dict(experts="int4", group_size=7), ValueError, "group size 7"),
])
def test_bad_expert_requests_leave_the_model_untouched(kwargs, error, match):
    model = tiny_model("qwen2_moe").eval()
    before = expert_tensors(model)
    with pytest.raises(error, match=match):
        dali_compile.quantize(model, **kwargs)
    after = expert_tensors(model)
    assert all(a[0] is b[0] and a[1] == b[1] for a, b in zip(after, before, strict=True))


def test_quantizing_experts_twice_float64_or_a_model_without_fused_experts_is_refused():
    from handwritten_models import HandWrittenMoE

    with pytest.raises(ValueError, match="no transformers fused experts module"):
        dali_compile.quantize(HandWrittenMoE(), experts="int8")
    model = dali_compile.quantize(tiny_model("olmoe").eval(), experts="int8")
    with pytest.raises(ValueError, match="already quantized"):
        dali_compile.quantize(model, experts="int4")
    with pytest.raises(TypeError, match="float64 experts"):
        dali_compile.quantize(tiny_model("olmoe").double(), experts="int8")


# ----------------------------------------------------------------------------- offload in quantized bytes

# A GPU 10x faster than the CPU per expert and a copy at half a CPU expert: every policy splits and copies.
COST = CostModel(workloads=(1, 8), cpu_seconds=(1.0, 4.0), gpu_seconds=(0.1, 0.2), transfer_seconds=0.5)


@pytest.mark.usefixtures("emulated_mode")
@pytest.mark.parametrize("fmt", ("int8", "int4"))
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_offloaded_quantized_model_matches_its_eager_run_under_every_policy(policy, fmt):
    """Slots hold codes and scales: a slot is the quantized expert's bytes, so the same budget holds 2x (int8) to
    about 4x (int4) more experts than bf16 would; results equal the quantized model's own CPU run."""
    model = tiny_model("qwen3_moe").eval()
    fp32_slot = expert_bytes(spec_of_module(experts_modules(model)[0][1]))
    dali_compile.quantize(model, experts=fmt, group_size=8)
    spec = spec_of_module(experts_modules(model)[0][1])
    layers, top_k = len(experts_modules(model)), model.config.num_experts_per_tok
    slot = expert_bytes(spec)
    # a slot is the expert's codes and scales: int8 1 byte a weight (+ 2 a row), int4 at groups of 8 0.75
    assert fp32_slot / slot >= (3.5 if fmt == "int8" else 5.0)
    prompt = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(prompt).logits
        want_tokens = model.generate(prompt, max_new_tokens=3, do_sample=False)
    dali_compile.offload(model, device="emulated", expert_memory=slot * (top_k + layers * spec.num_experts // 2),
                         policy=policy, cost_model=COST)
    try:
        with torch.no_grad():
            got = model(prompt).logits
            tokens = model.generate(prompt, max_new_tokens=3, do_sample=False)
        stats = dali_compile.offload_stats(model)
    finally:
        dali_compile.release(model)
    assert relative_max_error(got, want) <= FP32_RTOL
    assert torch.equal(tokens, want_tokens)
    assert stats["slot_bytes"] == slot
    if policy not in ("all_cpu", "layerwise"):
        assert stats["total"]["experts_gpu"] > 0


@pytest.mark.parametrize("fmt", ("int8", "int4"))
def test_the_cost_model_of_quantized_experts_is_profiled_on_their_slots(fmt, tmp_path, monkeypatch):
    """No cost model given: offload profiles one on the quantized slots (the GPU side reads codes and scales)."""
    monkeypatch.setenv("DALI_COMPILE_CACHE", str(tmp_path))
    model = dali_compile.quantize(tiny_model("qwen3_moe").eval(), experts=fmt, group_size=8)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=3, do_sample=False)
    dali_compile.offload(model, device="emulated", expert_memory="1MiB", policy="dali")
    try:
        cost = runtime_of(model).cost
        assert all(t > 0 for t in cost.gpu_seconds) and cost.transfer_seconds > 0
        with torch.no_grad():
            assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False), want)
    finally:
        dali_compile.release(model)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ("int8", "int4"))
def test_quantized_model_offloaded_to_cuda_matches_its_cpu_run(fmt):
    """The Triton kernels read the codes and scales in the CUDA slots (tested in the interpreter and compiled
    without a GPU; this runs them)."""
    model = dali_compile.quantize(tiny_model("qwen3_moe").eval(), experts=fmt, group_size=8)
    spec = spec_of_module(experts_modules(model)[0][1])
    prompt = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(prompt).logits
        want_tokens = model.generate(prompt, max_new_tokens=3, do_sample=False)
    dali_compile.offload(model, device="cuda", expert_memory=expert_bytes(spec) * 3 * spec.num_experts // 2,
                         policy="dali", cost_model=COST)
    try:
        with torch.no_grad():
            got = model(prompt.cuda()).logits.cpu()
            tokens = model.generate(prompt.cuda(), max_new_tokens=3, do_sample=False).cpu()
        stats = dali_compile.offload_stats(model)
    finally:
        dali_compile.release(model)
    assert relative_max_error(got, want) <= 1e-4
    assert torch.equal(tokens, want_tokens) and stats["total"]["experts_gpu"] > 0
