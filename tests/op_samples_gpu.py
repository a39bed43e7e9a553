"""opcheck samples for `dali::gpu_experts` (on CPU tensors: the reference kernel, the "emulated GPU")."""

from __future__ import annotations

import torch
from op_samples import Register, sample_builder
from triton_cases import GPT_OSS, Case, build_args

import dali_compile.ops.gpu_experts  # noqa: F401  (defines dali::gpu_experts)
from dali_compile.ops.quantized_linear import quantize_stacked


@sample_builder("dali::gpu_experts")
def _gpu_experts_samples(register: Register) -> list[tuple]:
    """fp32 Mixtral-like and bf16 GPT-OSS-like pools x T in {1, 5} x int64/int32 ids.

    Slot tables are permutations with some experts at -1, so the samples hold zero rows too.
    """
    del register  # the op takes its weights as tensors, not a layer handle
    layouts = [dict(dtype="fp32"), dict(dtype="bf16", weights_dtype="bf16", **GPT_OSS)]
    samples = []
    for seed, layout in enumerate(layouts):
        for T in (1, 5):
            for ids_dtype in ("int64", "int32"):
                case = Case("opcheck", "", T=T, ids_dtype=ids_dtype, **layout)
                samples.append(build_args(case, seed=seed))
    samples += _quantized_samples()
    return samples


def _quantized_samples() -> list[tuple]:
    """Quantized pools (codes and scales, scale pools last): int8 per row with fp32 hidden, int4 in groups of 8 with
    bf16 hidden, a slot table with an expert elsewhere (-1)."""
    gen = torch.Generator().manual_seed(7)
    S, E, H, I, K, T = 3, 4, 16, 8, 2, 3  # noqa: E741
    slot_of_expert = torch.tensor([2, -1, 0, 1], dtype=torch.int32)
    samples = []
    for bits, group, dtype in ((8, None, torch.float32), (4, 8, torch.bfloat16)):
        up, up_scales = quantize_stacked(torch.randn(S, 2 * I, H, generator=gen) * 0.3, bits, group)
        down, down_scales = quantize_stacked(torch.randn(S, H, I, generator=gen) * 0.3, bits, group)
        hidden = torch.randn(T, H, generator=gen).to(dtype)
        ids = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :K]
        weights = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
        samples.append((hidden, ids, weights, up, down, None, None, slot_of_expert, True, False, False, "silu", 0.0,
                        0.0, up_scales, down_scales))
    return samples
