"""`dali::prefetch_next`: start copying the experts the next MoE layer will probably need.

    prefetch_next(gate_input[T, H], layer: int) -> ()

Inserted by the `insert_prefetch_hooks` pass right where layer `layer`'s gate input is computed, before
its router and experts run. For an offloaded layer whose runtime prefetches, it predicts layer
`layer` + 1's workload from `gate_input` (`runtime/prefetch.py`) and queues the copies on the copy
stream; for any other layer it does nothing. It returns nothing and changes no tensor: only time can
depend on it, never a result. It is registered as side-effecting so graph passes keep it.
"""

from __future__ import annotations

import torch

from dali_compile.runtime.registry import layer_registry

from .library import define_op

NAME = "dali::prefetch_next"
SCHEMA = "(Tensor gate_input, int layer) -> ()"

define_op(NAME, SCHEMA)


@torch.library.register_fake(NAME)
def _prefetch_next_fake(gate_input, layer):
    if gate_input.dim() < 2:
        raise ValueError(f"{NAME}: gate_input must be [..., H], got shape {tuple(gate_input.shape)}")


def prefetch_next_kernel(gate_input, layer):
    _prefetch_next_fake(gate_input, layer)
    hybrid = layer_registry().attached(layer)
    runtime = getattr(hybrid, "runtime", None)  # only an offloaded HybridLayer prefetches
    if runtime is not None:
        runtime.prefetch_from(hybrid.index, gate_input.reshape(-1, gate_input.shape[-1]))


torch.library.impl(NAME, "CompositeExplicitAutograd")(prefetch_next_kernel)

# FX's and inductor's dead-code elimination drop calls whose results are unused unless told otherwise.
if hasattr(torch.fx.node, "has_side_effect"):
    torch.fx.node.has_side_effect(torch.ops.dali.prefetch_next.default)
