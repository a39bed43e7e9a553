"""`dali::moe_hybrid`: one MoE layer's routed experts as one op.

# T tokens, H hidden, K top-k, E experts

    moe_hybrid(hidden[T, H], topk_ids[T, K], topk_weights[T, K], layer: int) -> [T, H]

`layer` is a handle into the process's `LayerRegistry` (weights, layout,
activation); the op never receives Python objects. The schema is declared here
and only here; device kernels register against it: CPU runs the C++ runtime
(`dali::cpu_experts`), CUDA the Triton kernels (`dali::gpu_experts`), any other
device the fp32 reference.
"""

from __future__ import annotations

import warnings

import torch

from dali_compile.runtime import cpu_extension
from dali_compile.runtime.layer_spec import LayerSpec
from dali_compile.runtime.registry import layer_registry

from .cpu_experts import cpu_experts
from .expert_math import moe_reference
from .gpu_experts import gpu_experts
from .library import define_op

NAME = "dali::moe_hybrid"
SCHEMA = "(Tensor hidden, Tensor topk_ids, Tensor topk_weights, int layer) -> Tensor"

define_op(NAME, SCHEMA)


def check_routing_shapes(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """Checks that need no layer state; shared by the fake and the real kernels."""
    if hidden.dim() != 2:
        raise ValueError(f"{NAME}: hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if topk_ids.dim() != 2 or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"{NAME}: topk_ids and topk_weights must both be [T, K], got "
            f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
        )
    if topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"{NAME}: hidden has {hidden.shape[0]} tokens but the routing has {topk_ids.shape[0]}"
        )
    if not hidden.is_floating_point():
        raise TypeError(f"{NAME}: hidden must be floating point, got {hidden.dtype}")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{NAME}: topk_ids must be int64 or int32, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"{NAME}: topk_weights must be floating point, got {topk_weights.dtype}")
    devices = {hidden.device, topk_ids.device, topk_weights.device}
    if len(devices) != 1:
        raise ValueError(f"{NAME}: hidden, topk_ids and topk_weights are on different devices: {devices}")


def check_against_layer(
    spec: LayerSpec, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, check_ids: bool = True
) -> None:
    """Checks against the layer's weights; these need the runtime, so only real kernels run them. The id
    range costs two reductions and a sync: a kernel that checks ids itself skips it (check_ids=False) and
    runs this again, ids included, to name the layer when the kernel refuses them."""
    if hidden.shape[1] != spec.hidden_size:
        raise ValueError(
            f"{NAME}: hidden size {hidden.shape[1]} does not match layer {layer} ({spec.name}) "
            f"hidden size {spec.hidden_size}"
        )
    if hidden.dtype != spec.dtype:
        raise TypeError(f"{NAME}: hidden is {hidden.dtype} but layer {layer} ({spec.name}) weights are {spec.dtype}")
    if hidden.device != spec.device:
        raise ValueError(
            f"{NAME}: hidden is on {hidden.device} but layer {layer} ({spec.name}) weights are on {spec.device}"
        )
    if check_ids and topk_ids.numel():
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < 0 or high >= spec.num_experts:
            bad = low if low < 0 else high
            raise IndexError(
                f"{NAME}: expert id {bad} out of range for layer {layer} ({spec.name}) "
                f"with {spec.num_experts} experts"
            )


@torch.library.register_fake(NAME)
def _moe_hybrid_fake(hidden, topk_ids, topk_weights, layer):
    check_routing_shapes(hidden, topk_ids, topk_weights)
    return torch.empty_like(hidden)


def moe_hybrid_reference_kernel(hidden, topk_ids, topk_weights, layer):
    """The fp32 reference behind the op: also the fallback where no compiled kernel exists."""
    check_routing_shapes(hidden, topk_ids, topk_weights)
    spec = layer_registry().get(layer)
    check_against_layer(spec, layer, hidden, topk_ids)
    return moe_reference(spec, hidden, topk_ids, topk_weights)


torch.library.impl(NAME, "CompositeExplicitAutograd")(moe_hybrid_reference_kernel)


# The op is an inference op: its kernels run below autograd and no formula is registered, so a gradient asked
# through it would be lost (on the CPU the C++ autograd kernel of resident layers hands such calls here).
GRADIENT_WARNING = (
    f"{NAME} has no autograd formula: no gradient flows through the routed experts. Run inference under "
    "torch.no_grad() or torch.inference_mode(); training through the dali backend is not supported."
)


def _device_kernel(resident_contributions, checks_ids: bool, publish=None):
    """A device kernel of the op: an offloaded layer goes to its hybrid runtime; otherwise every expert is
    resident on this device and `resident_contributions(spec, hidden, topk_ids, topk_weights)` gives the
    [T, K, H] fp32 slot contributions, summed over k in order, as moe_reference. `checks_ids`: it raises
    IndexError for an id out of range itself (the C++ runtime does), so the per-step id reductions are
    only run to word the error. `publish(handle, spec)`: after a resident call, hands the layer to a
    faster kernel that serves its later calls (see the CPU kernel below)."""

    def kernel(hidden, topk_ids, topk_weights, layer):
        check_routing_shapes(hidden, topk_ids, topk_weights)
        if torch.is_grad_enabled() and (hidden.requires_grad or topk_weights.requires_grad):
            warnings.warn(GRADIENT_WARNING, UserWarning, stacklevel=2)
        hybrid = layer_registry().attached(layer)
        if hybrid is not None:
            return hybrid.forward(hidden, topk_ids, topk_weights)
        spec = layer_registry().get(layer)
        check_against_layer(spec, layer, hidden, topk_ids, check_ids=not checks_ids)
        try:
            contributions = resident_contributions(spec, hidden, topk_ids, topk_weights)
        except IndexError:
            check_against_layer(spec, layer, hidden, topk_ids)  # raises, naming the layer
            raise
        if publish is not None:
            layer_registry().publish_if_resident(layer, publish)
        return contributions.sum(dim=1).to(hidden.dtype)

    return kernel


def _triton_over_identity_slots(spec, hidden, topk_ids, topk_weights):
    """All experts resident on the GPU: the Triton kernels over an identity slot table of the layer's weights."""
    identity = torch.arange(spec.num_experts, dtype=torch.int32, device=hidden.device)
    return gpu_experts(hidden, topk_ids, topk_weights, spec.up_weight, spec.down_weight,
                       spec.up_bias, spec.down_bias, identity, spec.layout)


# CUDA: the Triton kernels; CPU: the C++ runtime (`dali::cpu_experts`; its reference when not built). A layer
# offloaded to CUDA or to the emulated accelerator (CPU tensors) runs its hybrid runtime on either.
# On the CPU, a layer served resident is published to the C++ library's own kernel for the op
# (csrc/binding/resident_layers.cpp, registered for AutogradCPU, so it runs before this one): its later calls
# skip Python (about 120 us a layer per step) with the same arithmetic, and come back here for anything else.
moe_hybrid_cuda_kernel = _device_kernel(_triton_over_identity_slots, checks_ids=False)
moe_hybrid_cpu_kernel = _device_kernel(cpu_experts, checks_ids=True, publish=cpu_extension.publish_resident_layer)
torch.library.register_kernel(NAME, "cuda")(moe_hybrid_cuda_kernel)
torch.library.register_kernel(NAME, "cpu")(moe_hybrid_cpu_kernel)


def moe_hybrid(
    hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: int
) -> torch.Tensor:
    """Routed experts of MoE layer `layer` (a registry handle).

    hidden [T, H] in the layer's weight dtype; topk_ids [T, K] int64/int32 in
    [0, E); topk_weights [T, K] floating (fp32 or the model dtype). Returns
    [T, H] in hidden's dtype: sum over k of topk_weights[t, k] * expert(hidden[t]).
    """
    return torch.ops.dali.moe_hybrid(hidden, topk_ids, topk_weights, layer)
