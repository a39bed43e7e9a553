"""`dali::quantized_linear`'s C++ kernel against its PyTorch reference: int8 and int4, every group size,
x dtype and ISA path, both sides of the streaming/GEMM crossover, odd shapes, autograd, and clear errors.

# T rows, N output features, C input features, G group size
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dali_compile.ops.quantized_linear import (
    dequantize,
    pack_codes,
    quantize_weight,
    quantized_input,
    quantized_linear,
    quantized_linear_reference,
)
from dali_compile.runtime import cpu_extension

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Against the reference, which multiplies x by the dequantized weight in fp32: the kernel sums x times
# the codes within a group and scales the group's sum once, so products and sums round in another
# order (fp32: a few ulps of the largest partial sums, far below 1e-5 at these sizes). 16-bit outputs
# add one rounding of the result to x's dtype, as dali::cpu_linear (tests/test_cpu_linear.py).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}

pytestmark = pytest.mark.usefixtures("cpu_runtime")


def draw(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * 0.3).to(dtype)


def quantized(N, C, bits, group, seed):
    return quantize_weight(draw(N, C, seed=seed), bits, group)


def rel_err(got, want) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def check(T, N, C, bits, group, dtype, bias, seed=0):
    qweight, scales = quantized(N, C, bits, group, seed + 1)
    x = draw(T, C, dtype=dtype, seed=seed + 2)
    b = draw(N, dtype=dtype, seed=seed + 3) if bias else None
    got = quantized_linear(x, qweight, scales, b, bits, group)
    assert got.dtype == dtype and got.shape == (T, N)
    G = C if group is None else group
    assert rel_err(got, quantized_linear_reference(x, qweight, scales, b, bits, G)) <= RTOL[dtype]


# N = 70: not a multiple of the 4-row tile, blocks of unequal size. C = 256 holds every group size.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("group", [None, 32, 64, 128], ids=["row", "G32", "G64", "G128"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("T", [1, 2, 3, 5])  # 5: a full and a partial group of 3 tokens
def test_streaming_kernel_equals_reference(T, bits, group, bias, dtype, isa):
    check(T, 70, 256, bits, group, dtype, bias)


# 1030 rows of 256 columns: short rows, so a task's block (sized in bytes of weights, csrc/core/stream_blocks.h)
# holds more than 64 of them (132), and the last block is partial.
@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)], ids=["int8", "int4-G32"])
@pytest.mark.parametrize("T", [1, 2])
def test_blocks_of_many_short_rows(T, bits, group, isa):
    check(T, 1030, 256, bits, group, torch.bfloat16, bias=True)


# (N, C, G): columns past the last full vector of a group (C not a multiple of the vector width).
ODD_SHAPES = (
    (37, 96, 32),   # int4: 16 bytes a group, one 8-lane AVX2 vector each half, none on AVX-512
    (37, 40, 40),   # whole-row group of 40: 5 AVX2 vectors (int8), 2 vectors + 4 bytes (int4)
    (5, 36, 12),    # int4: 6 bytes a group, no full vector at all: every column in the scalar tail
    (1, 24, 24),    # a single output feature
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("N,C,G", ODD_SHAPES)
def test_odd_shapes(N, C, G, bits, dtype, isa):
    for T in (1, 3, 4):
        check(T, N, C, bits, G, dtype, bias=True, seed=T)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("T", [16, 40])
def test_gemm_path_equals_reference(T, bits, dtype, gemm_rows, isa):
    """At and above the crossover: weight chunks dequantized to fp32, then ATen's GEMM."""
    gemm_rows(16)
    check(T, 130, 96, bits, 32, dtype, bias=True, seed=4)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("group", [None, 32], ids=["row", "G32"])
@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_gemm_path_multiplies_the_bf16_rounded_weights(bits, group, bias, gemm_rows):
    """bf16 activations from quantized_bf16_gemm_min_rows rows on (int4: twice as many; default on AMX-BF16 CPUs;
    forced here on any CPU): blocks of dequantized rows (600 rows: one block; two in the next test) rounded
    to bf16 and multiplied by ATen's bf16 GEMM. What F.linear computes on the bf16-rounded dequantized weight
    (on its activations rounded to int8) but for a few elements where an fp32 sum's order flips a bf16 rounding;
    within bf16 rounding of the reference. Below the threshold the streaming kernel, as exact as ever."""
    gemm_rows(0)
    cpu_extension.set_quantized_bf16_gemm_min_rows(8 if bits == 8 else 4)  # 8 rows for both; the fixture restores it
    N, C, T = 600, 256, 40
    G = C if group is None else group
    qweight, scales = quantized(N, C, bits, group, seed=11)
    x = draw(T, C, dtype=torch.bfloat16, seed=12)
    b = draw(N, dtype=torch.bfloat16, seed=13) if bias else None
    got = quantized_linear(x, qweight, scales, b, bits, group)
    assert got.dtype == torch.bfloat16 and got.shape == (T, N)
    x_used = quantized_input(x, bits, G).bfloat16()  # the format's activations (rounded to int8)
    own = F.linear(x_used, dequantize(qweight, scales, bits, G).bfloat16()).float()
    own = (own if b is None else own + b.float()).bfloat16()
    differ = (got.float() - own.float()).abs() > 1e-6 * own.float().abs().max()
    assert float(differ.float().mean()) < 0.02, f"{int(differ.sum())} of {differ.numel()} elements differ"
    assert rel_err(got, own) < 1e-2
    assert rel_err(got, quantized_linear_reference(x, qweight, scales, b, bits, G)) <= RTOL[torch.bfloat16]
    below = quantized_linear(x[:7], qweight, scales, b, bits, group)
    assert rel_err(below, quantized_linear_reference(x[:7], qweight, scales, b, bits, G)) <= RTOL[torch.bfloat16]


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 128)], ids=["int8", "int4-G32", "int4-G128"])
def test_bf16_gemm_path_rounds_each_dequantized_weight_as_torch_does(bits, group, gemm_rows, isa):
    """One-hot activations read single weights back: each is the dequantized weight rounded to bf16 bit for bit
    as torch rounds it (KernelTable::dequantize_rows_bf16 on every ISA), ties to even included: scale 1 + 2^-8
    times an odd code lies halfway between two bf16 values. 2100 rows of 2048 columns are two weight blocks (the
    GEMM's blocks hold 2^22 weights), so rows on both sides of the boundary are read."""
    gemm_rows(0)
    cpu_extension.set_quantized_bf16_gemm_min_rows(8)  # the fixture restores the default; int4 from 16 rows
    N, C = 2100, 2048
    G = C if group is None else group
    gen = torch.Generator().manual_seed(21)
    codes = torch.randint(-127 if bits == 8 else -8, 128 if bits == 8 else 8, (N, C), generator=gen)
    codes[:8, 0] = 1  # with scale 1 + 2^-8: exactly between 1 and 1 + 2^-7 (bf16 keeps 7 mantissa bits)
    scales = (torch.rand(N, C // G, generator=gen) * 0.5 + 0.01).half()
    scales[:8, 0] = 1 + 2**-8
    scales[N // 2:] = -scales[N // 2:]  # negative scales flip every sign
    qweight = pack_codes(codes, bits, G)
    columns = torch.tensor([0, 1, 15, 16, 17, 31, 32, 1000, C - 1])  # both nibbles of a byte, group edges
    x = torch.zeros(16, C, dtype=torch.bfloat16)  # 16 rows: int4 takes the GEMM from twice the setting
    x[torch.arange(len(columns)), columns] = 1.0
    got = quantized_linear(x, qweight, scales, None, bits, group)
    want = dequantize(qweight, scales, bits, G).bfloat16().T[columns]
    assert torch.equal(got[:len(columns)], want)
    assert (got[0, :8] == 1.0).all()  # the ties went to even
    assert torch.count_nonzero(got[len(columns):]) == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_default_crossover_and_thread_counts(bits, isa):
    """Enough work to run on the pool (> 64 KiB of codes), on 1 to 3 threads, plus the default crossover."""
    threads = cpu_extension.get_num_threads()
    try:
        for n in (1, 2, 3):
            cpu_extension.set_num_threads(n)
            check(2, 515, 512, bits, 64, torch.bfloat16, bias=False, seed=n)
    finally:
        cpu_extension.set_num_threads(threads)
    check(cpu_extension.get_linear_gemm_min_rows(), 20, 64, bits, 32, torch.float32, bias=True, seed=9)


def test_leading_dimensions_and_strided_operands():
    """x [B, S, C] non-contiguous; codes whose rows lie further apart than a row (a slice of a wider matrix)."""
    qweight, scales = quantized(24, 64, 8, 32, seed=5)
    wide = torch.zeros(24, 80, dtype=torch.int8)
    wide[:, 8:72] = qweight
    x = draw(3, 64, 5, seed=6).transpose(1, 2)  # [3, 5, 64] with stride 1 along dim 1
    got = quantized_linear(x, wide[:, 8:72], scales, None, 8, 32)
    assert got.shape == (3, 5, 24)
    assert rel_err(got, F.linear(quantized_input(x, 8, 32), dequantize(qweight, scales, 8, 32))) <= RTOL[torch.float32]


def test_nibble_order_is_the_documented_one():
    """A hand-packed int4 row: byte i holds column i (low nibble) and column G/2 + i (high nibble)."""
    C = G = 32
    codes = torch.arange(C) // 2 - 8  # -8 .. -1 in the first half, 0 .. 7 in the second: swaps show
    stored = (codes + 8).to(torch.uint8)
    packed = (stored[: G // 2] | (stored[G // 2:] << 4)).reshape(1, -1)
    scales = torch.ones(1, 1, dtype=torch.float16)
    for c in (0, 5, 16, 21, 31):
        x = torch.zeros(1, C)
        x[0, c] = 1.0
        assert quantized_linear(x, packed, scales, None, 4, G).item() == codes[c].item(), c


def test_gradients_flow_to_x_and_bias():
    """The op differentiates through x and bias, as F.linear with the dequantized weight does (the rounding of x to int8
    passes the gradient straight through); its value is the reference's, rounding included."""
    qweight, scales = quantized(8, 64, 4, 32, seed=7)
    weight = dequantize(qweight, scales, 4, 32)
    x, b = draw(2, 3, 64, seed=8).requires_grad_(), draw(8, seed=9).requires_grad_()
    grad = draw(2, 3, 8, seed=10)
    out = quantized_linear(x, qweight, scales, b, 4, 32)
    assert rel_err(out, quantized_linear_reference(x.detach(), qweight, scales, b.detach(), 4, 32)) <= 1e-5
    out.backward(grad)
    ours = [x.grad.clone(), b.grad.clone()]
    x.grad = b.grad = None
    F.linear(x, weight, b).backward(grad)
    for mine, theirs in zip(ours, (x.grad, b.grad), strict=True):
        assert rel_err(mine, theirs) <= 1e-5


def test_no_gradient_for_scales():
    qweight, scales = quantized(8, 64, 8, 32, seed=11)
    with pytest.raises(ValueError, match="no gradient with respect to scales"):
        quantized_linear(draw(2, 64), qweight, scales.float().requires_grad_().half(), None, 8, 32)


def _args(bits=8, N=4, C=64, G=32, **change):
    """Valid arguments for a bits-bit layer, with some replaced."""
    qweight, scales = quantized(N, C, bits, G, seed=12)
    args = {"x": draw(2, C), "qweight": qweight, "scales": scales, "bias": None, "bits": bits, "group_size": G}
    args.update(change)
    return args


BAD_INPUTS = {
    "bits": (lambda: _args(bits=8) | {"bits": 3}, ValueError, "bits must be 8 or 4"),
    "int8-codes-for-4-bits": (lambda: _args(bits=8) | {"bits": 4}, TypeError, "4-bit qweight must be a 2-D"),
    "float-codes": (lambda: _args() | {"qweight": torch.zeros(4, 64)}, TypeError, "8-bit qweight must be a 2-D"),
    "3d-codes": (lambda: _args() | {"qweight": torch.zeros(1, 4, 64, dtype=torch.int8)}, TypeError, "2-D"),
    "group-not-dividing": (lambda: _args() | {"group_size": 48}, ValueError, "must divide the 64 input"),
    "odd-int4-group": (lambda: _args(bits=4, C=64, G=32) | {"group_size": 1}, ValueError, "even for 4 bits"),
    "scales-dtype": (lambda: _args() | {"scales": torch.ones(4, 2)}, ValueError, "scales must be float16"),
    "scales-shape": (lambda: _args() | {"scales": torch.ones(4, 4, dtype=torch.float16)}, ValueError,
                     r"\[N, C / group_size\] = \[4, 2\]"),
    "x-dtype": (lambda: _args() | {"x": torch.zeros(2, 64, dtype=torch.float64)}, TypeError, "x must be"),
    "x-features": (lambda: _args() | {"x": draw(2, 63)}, ValueError, "expects 64 input features"),
    "bias-dtype": (lambda: _args() | {"bias": draw(4, dtype=torch.bfloat16)}, ValueError, "bias must be"),
    "bias-shape": (lambda: _args() | {"bias": draw(5)}, ValueError, r"bias must be \[4\]"),
    "device": (lambda: _args() | {"x": torch.zeros(2, 64, device="meta")}, ValueError, "CPU tensors"),
    "transposed-codes": (lambda: _args(N=64, C=64, G=64) | {"qweight": torch.zeros(64, 64, dtype=torch.int8).T},
                         ValueError, "unit stride"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(name):
    make, error, match = BAD_INPUTS[name]
    with pytest.raises(error, match=match):
        torch.ops.dali.quantized_linear(**make())


def test_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qweight, scales = quantized(5, 64, 4, 32, seed=13)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(draw(2, 3, 64, dtype=torch.bfloat16))
        out = quantized_linear(x, mode.from_tensor(qweight), mode.from_tensor(scales), None, 4, 32)
    assert out.shape == (2, 3, 5) and out.dtype == torch.bfloat16
