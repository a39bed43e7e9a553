"""Sample inputs for `torch.library.opcheck`, one builder per dali op.

A builder takes `register(spec) -> handle` (layers it registers are released after the
test) and returns a list of argument tuples. Ops defined in other areas add their
builders in `tests/op_samples_<area>.py` with `@sample_builder("dali::name")`; the
registry test imports every such module, and fails for an op that has no builder.
"""

from __future__ import annotations

from typing import Callable

import torch

from dali_compile import Activation, ExpertLayout, LayerSpec

Register = Callable[[LayerSpec], int]
SampleBuilder = Callable[[Register], list[tuple]]

SAMPLE_BUILDERS: dict[str, SampleBuilder] = {}


def sample_builder(op_name: str):
    def decorate(fn: SampleBuilder) -> SampleBuilder:
        if op_name in SAMPLE_BUILDERS:
            raise ValueError(f"two sample builders for {op_name}")
        SAMPLE_BUILDERS[op_name] = fn
        return fn

    return decorate


@sample_builder("dali::moe_hybrid")
def _moe_hybrid_samples(register: Register) -> list[tuple]:
    """fp32 and bf16 x T in {1, 5} x int64/int32 ids, on a Mixtral-like and a GPT-OSS-like layout."""
    E, H, I, K = 4, 16, 12, 2  # noqa: E741
    gen = torch.Generator().manual_seed(0)
    layouts = {
        torch.float32: ExpertLayout(Activation("silu")),
        torch.bfloat16: ExpertLayout(  # GPT-OSS
            Activation("clamped_swiglu", alpha=1.702, limit=0.5),
            interleaved=True, transposed=True, has_bias=True,
        ),
    }
    samples = []
    for dtype, layout in layouts.items():
        def draw(*shape, dtype=dtype):
            return (torch.randn(*shape, generator=gen) * 0.3).to(dtype)

        up, down = ((E, H, 2 * I), (E, I, H)) if layout.transposed else ((E, 2 * I, H), (E, H, I))
        biases = (draw(E, 2 * I), draw(E, H)) if layout.has_bias else (None, None)
        handle = register(LayerSpec(layout, draw(*up), draw(*down), *biases, name=f"opcheck-{dtype}"))
        for T in (1, 5):
            for ids_dtype in (torch.int64, torch.int32):
                ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(ids_dtype)
                weights = torch.softmax(torch.randn(T, K, generator=gen), dim=-1).to(dtype)
                samples.append((draw(T, H), ids, weights, handle))
    return samples


@sample_builder("dali::prefetch_next")
def _prefetch_next_samples(register: Register) -> list[tuple]:
    """A registered layer without a runtime (the hook does nothing) at [T, H] and [B, S, H] gate inputs; the
    offloaded case is opchecked in test_prefetch.py."""
    E, H, I = 4, 16, 12  # noqa: E741
    gen = torch.Generator().manual_seed(1)
    handle = register(LayerSpec(ExpertLayout(Activation("silu")), torch.randn(E, 2 * I, H, generator=gen),
                                torch.randn(E, H, I, generator=gen), name="opcheck-prefetch"))
    return [(torch.randn(5, H, generator=gen), handle), (torch.randn(2, 3, H, generator=gen), handle)]
