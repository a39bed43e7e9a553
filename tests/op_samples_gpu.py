"""opcheck samples for `dali::gpu_experts` (on CPU tensors: the reference kernel, the "emulated GPU")."""

from __future__ import annotations

from op_samples import Register, sample_builder
from triton_cases import GPT_OSS, Case, build_args

import dali_compile.ops.gpu_experts  # noqa: F401  (defines dali::gpu_experts)


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
    return samples
