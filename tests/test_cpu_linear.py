"""`dali::cpu_linear` against its fp32 reference and F.linear: every dtype, ISA path and thread count, both
sides of the streaming/GEMM crossover, odd strides, autograd, and clear errors for bad input.

# T rows, N output features, C input features
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dali_compile.ops.cpu_linear import cpu_linear, cpu_linear_reference
from dali_compile.runtime import cpu_extension

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Against the fp32-accumulating reference: both keep fp32 inside, so only the final rounding and
# the summation order differ (fp32: order only).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


pytestmark = pytest.mark.usefixtures("cpu_runtime")


def draw(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * 0.3).to(dtype)


def rel_err(got, want) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


# (T, N, C): why each is here.
CASES = (
    (1, 64, 48),     # decode: one row
    (3, 37, 20),     # N not a multiple of the 4-row tile, C not a multiple of a vector
    (4, 256, 200),   # 3 + 1 rows: a second pass over each block
    (7, 1, 5),       # a single output feature (router of a 1-expert toy), tiny C
    (2, 513, 130),   # blocks of unequal size across threads
    (1, 1030, 64),   # short rows: blocks (sized in bytes, csrc/core/stream_blocks.h) of more than 64 rows
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T,N,C", CASES)
def test_streaming_kernel_equals_reference(T, N, C, dtype, bias, gemm_rows):
    gemm_rows(0)  # never the GEMM: the streaming kernel at every row count
    x, w = draw(T, C, dtype=dtype, seed=1), draw(N, C, dtype=dtype, seed=2)
    b = draw(N, dtype=dtype, seed=3) if bias else None
    got = cpu_linear(x, w, b)
    assert got.dtype == dtype and got.shape == (T, N)
    assert rel_err(got, cpu_linear_reference(x, w, b)) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [16, 40])
def test_gemm_path_equals_reference(T, dtype, gemm_rows):
    """From the crossover on, ATen's fp32 GEMM (16-bit weights widened chunk by chunk)."""
    gemm_rows(16)
    x, w, b = draw(T, 96, dtype=dtype, seed=4), draw(130, 96, dtype=dtype, seed=5), draw(130, dtype=dtype, seed=6)
    assert rel_err(cpu_linear(x, w, b), cpu_linear_reference(x, w, b)) <= RTOL[dtype]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [8, 40])
def test_bf16_gemm_on_stored_weights_equals_reference(T, bias, gemm_rows):
    """bf16 weights from linear_bf16_gemm_min_rows rows on (default on AMX-BF16 CPUs): ATen's bf16 linear on the
    weight as stored, what F.linear gives; below it the streaming kernel. Both within bf16 rounding of the fp32
    reference, on any CPU (forced here)."""
    gemm_rows(0)
    cpu_extension.set_linear_bf16_gemm_min_rows(8)  # the fixture restores the default
    x, w = draw(T, 96, dtype=torch.bfloat16, seed=4), draw(130, 96, dtype=torch.bfloat16, seed=5)
    b = draw(130, dtype=torch.bfloat16, seed=6) if bias else None
    got = cpu_linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (T, 130)
    assert rel_err(got, cpu_linear_reference(x, w, b)) <= RTOL[torch.bfloat16]
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=0, atol=0)
    below = cpu_linear(x[:7], w, b)  # under the threshold: the streaming kernel
    assert rel_err(below, cpu_linear_reference(x[:7], w, b)) <= RTOL[torch.bfloat16]


def test_every_isa_path_and_thread_count(gemm_rows):
    gemm_rows(0)
    x, w = draw(2, 300, dtype=torch.bfloat16, seed=7), draw(130, 300, dtype=torch.bfloat16, seed=8)
    want = cpu_linear_reference(x, w, None)
    threads = cpu_extension.get_num_threads()
    try:
        for name in cpu_extension.supported_isas():
            cpu_extension.set_isa(name)
            for n in (1, 2, 3):
                cpu_extension.set_num_threads(n)
                assert rel_err(cpu_linear(x, w, None), want) <= RTOL[torch.bfloat16], (name, n)
    finally:
        cpu_extension.set_isa("auto")
        cpu_extension.set_num_threads(threads)


def test_leading_dimensions_and_strided_operands():
    """x [B, S, C] non-contiguous; a weight whose rows lie further apart than C (a slice of a wider matrix)."""
    wide = draw(24, 80, seed=9)
    w = wide[:, 8:72]  # rows 80 apart, unit stride within a row: read in place
    x = draw(3, 64, 5, seed=10).transpose(1, 2)  # [3, 5, 64] with stride 1 along dim 1
    got = cpu_linear(x, w)
    assert got.shape == (3, 5, 24)
    assert rel_err(got, F.linear(x, w)) <= 1e-5


def test_matches_torch_linear_within_dtype_tolerance():
    """What a model sees: the op in place of F.linear, bf16 rounding once at the end."""
    x, w, b = draw(1, 512, dtype=torch.bfloat16, seed=11), draw(256, 512, dtype=torch.bfloat16, seed=12), None
    truth = F.linear(x.float(), w.float())
    ours, theirs = rel_err(cpu_linear(x, w, b), truth), rel_err(F.linear(x, w, b), truth)
    assert ours <= max(theirs, 2**-8)


def test_gradients_equal_torch_linear():
    x = draw(2, 3, 16, seed=13).requires_grad_()
    w = draw(8, 16, seed=14).requires_grad_()
    b = draw(8, seed=15).requires_grad_()
    grad = draw(2, 3, 8, seed=16)
    cpu_linear(x, w, b).backward(grad)
    ours = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.linear(x, w, b).backward(grad)
    for mine, theirs in zip(ours, (x.grad, w.grad, b.grad), strict=True):
        assert rel_err(mine, theirs) <= 1e-5


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (draw(2, 8), draw(4, 8, dtype=torch.bfloat16), None), TypeError, "same dtype"),
        (lambda: (draw(2, 8), draw(4, 8).to(torch.float64), None), TypeError, "float32, bfloat16 or float16"),
        (lambda: (draw(2, 8), draw(4, 9), None), ValueError, "features"),
        (lambda: (draw(2, 8), draw(4, 2, 8), None), ValueError, "2-D"),
        (lambda: (draw(2, 8), draw(4, 8), draw(5)), ValueError, r"bias must be \[N\]"),
        (lambda: (draw(2, 8), draw(8, 4).T, None), ValueError, "unit stride"),
        (lambda: (draw(2, 8), torch.zeros(4, 8, device="meta"), None), ValueError, "CPU"),
    ],
    ids=["dtype-mismatch", "float64", "feature-mismatch", "3d-weight", "bias-shape", "transposed-weight", "device"],
)
def test_bad_inputs_raise_clear_errors(make, error, match):
    x, w, b = make()
    with pytest.raises(error, match=match):
        cpu_linear(x, w, b)


def test_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(draw(2, 3, 8, dtype=torch.bfloat16))
        w = mode.from_tensor(draw(5, 8, dtype=torch.bfloat16))
        out = cpu_linear(x, w)
    assert out.shape == (2, 3, 5) and out.dtype == torch.bfloat16


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_synchronous_calls_run_on_atens_threads(gemm_rows):
    """One thread budget: a step's synchronous calls use ATen's OpenMP team (capped by cpu_threads), so
    torch.set_num_threads bounds them too; the runtime's own pool stays selectable and gives the same result."""
    gemm_rows(0)
    x, w = draw(1, 2048, dtype=torch.bfloat16, seed=17), draw(4096, 2048, dtype=torch.bfloat16, seed=18)
    want = cpu_linear_reference(x, w, None)
    torch_threads, pool_threads = torch.get_num_threads(), cpu_extension.get_num_threads()
    assert cpu_extension.get_step_threads() == "aten"
    try:
        cpu_extension.set_num_threads(2)
        torch.set_num_threads(1)
        cpu_linear(x, w)
        assert cpu_extension.last_region_width() == 1  # ATen has one thread: so do we
        torch.set_num_threads(2)
        assert rel_err(cpu_linear(x, w), want) <= RTOL[torch.bfloat16]
        # Both members of ATen's OpenMP team joined the region (which of them claimed the tasks is up to the
        # OS scheduler: on a busy host one thread may run them all before the other wakes).
        assert cpu_extension.last_region_width() == 2
        cpu_extension.set_num_threads(1)  # cpu_threads caps the ATen team too
        assert rel_err(cpu_linear(x, w), want) <= RTOL[torch.bfloat16]
        assert cpu_extension.last_region_width() == 1
        cpu_extension.set_num_threads(2)
        cpu_extension.set_step_threads("pool")
        assert cpu_extension.get_step_threads() == "pool"
        assert rel_err(cpu_linear(x, w), want) <= RTOL[torch.bfloat16]
        assert cpu_extension.last_region_width() == 2  # the pool's size, whatever ATen's is
        with pytest.raises(ValueError, match="'aten' or 'pool'"):
            cpu_extension.set_step_threads("omp")
    finally:
        cpu_extension.set_step_threads("aten")
        torch.set_num_threads(torch_threads)
        cpu_extension.set_num_threads(pool_threads)
