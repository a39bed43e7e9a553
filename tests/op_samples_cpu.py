"""opcheck samples for the CPU expert ops (`dali::cpu_experts`, `_submit`, `_wait`).

# T tokens, H hidden, I intermediate, K top-k, E experts

The async pair is stateful: a real handle names one job and may be waited on exactly once, while
opcheck calls each op several times with the same arguments and compares the results. So opcheck
exercises submit/wait on the empty job (no slot selected for the CPU: handle 0, which is
deterministic and may be waited on repeatedly; the real kernels' output metadata is the same).
Real jobs are tested in tests/test_cpu_experts.py, including their metadata against the fakes.
"""

from __future__ import annotations

import torch
from op_samples import Register, sample_builder

from dali_compile.ops import cpu_attention as _cpu_attention  # noqa: F401  (defines dali::cpu_attention)
from dali_compile.ops import cpu_experts as _cpu_experts  # noqa: F401  (defines the dali::cpu_experts* ops)
from dali_compile.ops import cpu_linear as _cpu_linear  # noqa: F401  (defines dali::cpu_linear)
from dali_compile.ops.quantized_linear import quantize_stacked, quantize_weight

E, H, I, K = 4, 24, 12, 2  # noqa: E741


def _layer(dtype, gated, interleaved, transposed, bias, gen):
    def draw(*shape):
        return (torch.randn(*shape, generator=gen) * 0.3).to(dtype)

    X = 2 * I if gated else I
    up, down = (draw(E, H, X), draw(E, I, H)) if transposed else (draw(E, X, H), draw(E, H, I))
    biases = (draw(E, X), draw(E, H)) if bias else (None, None)
    return (up, down, *biases)


def _routing(T, dtype, ids_dtype, gen):
    hidden = (torch.randn(T, H, generator=gen) * 0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(ids_dtype)
    weights = torch.softmax(torch.randn(T, K, generator=gen), dim=-1).to(dtype)
    return hidden, ids, weights


# (dtype, gated, interleaved, transposed, bias, activation, alpha, limit): Mixtral, GPT-OSS, Nemotron-H.
_LAYOUTS = (
    (torch.float32, True, False, False, False, "silu", 0.0, 0.0),
    (torch.bfloat16, True, True, True, True, "clamped_swiglu", 1.702, 7.0),
    (torch.float16, False, False, False, False, "relu2", 0.0, 0.0),
)


@sample_builder("dali::cpu_experts")
def _cpu_experts_samples(register: Register) -> list[tuple]:
    """Three layouts x T in {1, 5} x int64/int32 ids, with no mask and with a mask selecting half the experts."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for dtype, gated, interleaved, transposed, bias, act, alpha, limit in _LAYOUTS:
        weights = _layer(dtype, gated, interleaved, transposed, bias, gen)
        for T, ids_dtype in ((1, torch.int64), (5, torch.int32)):
            for mask in (None, torch.tensor([True, False, True, False])):
                routing = _routing(T, dtype, ids_dtype, gen)
                samples.append((*routing, *weights, mask, gated, interleaved, transposed, act, alpha, limit))
    samples += _quantized_samples(gen)
    return samples


def _quantized_samples(gen) -> list[tuple]:
    """Quantized experts (scales last): int8 per row with fp32 hidden, int4 in groups of 4 with bf16 hidden and
    biases (GPT-OSS's layout in row form), T in {1, 5}."""
    samples = []
    for bits, group, (dtype, gated, interleaved, _, bias, act, alpha, limit) in ((8, None, _LAYOUTS[0]),
                                                                                (4, 4, _LAYOUTS[1])):
        up, down, up_bias, down_bias = _layer(torch.float32, gated, interleaved, False, bias, gen)
        up, up_scales = quantize_stacked(up, bits, group)
        down, down_scales = quantize_stacked(down, bits, group)
        biases = (None, None) if up_bias is None else (up_bias.to(dtype), down_bias.to(dtype))
        for T in (1, 5):
            samples.append((*_routing(T, dtype, torch.int64, gen), up, down, *biases, None, gated, interleaved, False,
                            act, alpha, limit, up_scales, down_scales))
    return samples


def _empty_job_args(gen, T):
    dtype, gated, interleaved, transposed, bias, act, alpha, limit = _LAYOUTS[1]
    weights = _layer(dtype, gated, interleaved, transposed, bias, gen)
    mask = torch.zeros(E, dtype=torch.bool)  # every expert stays on the GPU: nothing for the CPU
    return (*_routing(T, dtype, torch.int64, gen), *weights, mask, gated, interleaved, transposed, act, alpha, limit)


@sample_builder("dali::cpu_experts_submit")
def _cpu_experts_submit_samples(register: Register) -> list[tuple]:
    """The empty job (see the module docstring), T in {1, 5}."""
    gen = torch.Generator().manual_seed(1)
    return [_empty_job_args(gen, T) for T in (1, 5)]


@sample_builder("dali::cpu_experts_wait")
def _cpu_experts_wait_samples(register: Register) -> list[tuple]:
    """Waits on the empty job, T in {1, 5}, given every tensor the submit was: zeros [T, K, H] fp32, like
    every real wait's result."""
    gen = torch.Generator().manual_seed(2)
    samples = []
    for T in (1, 5):
        args = _empty_job_args(gen, T)
        handle = torch.ops.dali.cpu_experts_submit(*args)
        samples.append((handle, *args[:8]))
    return samples


@sample_builder("dali::cpu_linear")
def _cpu_linear_samples(register: Register) -> list[tuple]:
    """Each dtype, decode (1 row) and a 3-D x, with and without bias, and a strided weight row."""
    gen = torch.Generator().manual_seed(3)
    samples = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = (torch.randn(12, 20, generator=gen) * 0.3).to(dtype)
        b = (torch.randn(12, generator=gen) * 0.3).to(dtype)
        samples.append(((torch.randn(1, 20, generator=gen)).to(dtype), w, None))
        samples.append(((torch.randn(2, 3, 20, generator=gen)).to(dtype), w, b))
    wide = torch.randn(12, 32, generator=gen)
    samples.append((torch.randn(4, 20, generator=gen), wide[:, 4:24], None))
    return samples


@sample_builder("dali::cpu_attention")
def _cpu_attention_samples(register: Register) -> list[tuple]:
    """Each dtype at decode (one query row), grouped-query heads, two query rows, and a cache read through a
    strided view (the first S positions of a longer buffer) with a transposed q."""
    gen = torch.Generator().manual_seed(4)
    samples = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        def draw(*shape, dtype=dtype):
            return torch.randn(*shape, generator=gen).to(dtype)

        samples.append((draw(1, 4, 1, 8), draw(1, 4, 5, 8), draw(1, 4, 5, 8), None, 8 ** -0.5))
        samples.append((draw(2, 6, 2, 8), draw(2, 2, 9, 8), draw(2, 2, 9, 8), None, 0.3))
    buffer = torch.randn(2, 4, 16, 8, generator=gen)
    q = torch.randn(2, 1, 4, 8, generator=gen).transpose(1, 2)
    samples.append((q, buffer[:, :, :7], buffer[:, :, 7:14], None, 0.5))
    mask = torch.rand(2, 1, 1, 7, generator=gen) > 0.4
    samples.append((q, buffer[:, :, :7], buffer[:, :, 7:14], mask, 0.5))
    samples.append((torch.randn(1, 4, 1, 8, generator=gen), buffer[:1, :, :7], buffer[:1, :, 7:14],
                    torch.zeros(1, 1, 1, 7, dtype=torch.bool), 0.5))  # a row that sees nothing
    return samples


@sample_builder("dali::quantized_linear")
def _quantized_linear_samples(register: Register) -> list[tuple]:
    """int8 and int4, whole-row and 8-column groups, each x dtype, decode (1 row) and a 3-D x with bias."""
    gen = torch.Generator().manual_seed(4)
    samples = []
    for bits, group in ((8, 24), (8, 8), (4, 24), (4, 8)):
        qweight, scales = quantize_weight(torch.randn(12, 24, generator=gen) * 0.3, bits, group)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            b = (torch.randn(12, generator=gen) * 0.3).to(dtype)
            samples.append((torch.randn(1, 24, generator=gen).to(dtype), qweight, scales, None, bits, group))
            samples.append((torch.randn(2, 3, 24, generator=gen).to(dtype), qweight, scales, b, bits, group))
    return samples
