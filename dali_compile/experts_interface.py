"""`"dali"` as a transformers experts implementation: the second way into dali::moe_hybrid.

    import dali_compile                      # registers "dali" in transformers' ExpertsInterface
    model.set_experts_implementation("dali") # every fused experts module now calls the op
    model(...)                               # eager, or under torch.compile with any backend

Here the layout is read from the experts module's own attributes (set by
transformers' `use_experts_implementation`), so no probing is needed. A module
whose math has no `ExpertLayout` (a post-expert norm, an unknown custom gate)
keeps transformers' grouped_mm forward, with one warning.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

from dali_compile.runtime.layer_spec import Activation, ExpertLayout, LayerSpec
from dali_compile.runtime.registry import layer_registry

logger = logging.getLogger("dali_compile")

IMPLEMENTATION_NAME = "dali"

# transformers' activation classes (ACT2FN values) by class name -> our activation name.
# NewGELU and FastGELU write out the tanh approximation by hand: the same function up to rounding.
_ACTIVATION_BY_CLASS = {
    "SiLUActivation": "silu", "SiLU": "silu",
    "GELUActivation": "gelu", "GELU": "gelu",
    "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
    "ReLU": "relu", "ReLUSquaredActivation": "relu2", "QuickGELUActivation": "quick_gelu",
}


class UnsupportedExpertsError(NotImplementedError):
    pass


def layout_of_module(experts: nn.Module) -> ExpertLayout:
    """The ExpertLayout of a transformers fused-experts module, from its attributes."""
    if getattr(experts, "has_post_expert_norm", False):
        raise UnsupportedExpertsError("a post-expert norm has no dali layout yet")
    gated = bool(getattr(experts, "has_gate", True))
    apply_gate = getattr(type(experts), "_apply_gate", None)
    custom_gate = apply_gate is not None and apply_gate.__name__ != "_default_apply_gate"
    if custom_gate:
        alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
        if alpha is None or limit is None:
            raise UnsupportedExpertsError(f"custom gate {type(experts).__name__}._apply_gate is not known")
        activation = Activation("clamped_swiglu", alpha=float(alpha), limit=float(limit))
    else:
        act_class = type(getattr(experts, "act_fn", None)).__name__
        name = _ACTIVATION_BY_CLASS.get(act_class)
        if name is None:
            raise UnsupportedExpertsError(f"activation {act_class} is not known")
        activation = Activation(name)
    return ExpertLayout(
        activation,
        gated=gated,
        interleaved=gated and not getattr(experts, "is_concatenated", True),
        transposed=bool(getattr(experts, "is_transposed", False)),
        has_bias=bool(getattr(experts, "has_bias", False)),
    )


def spec_of_module(experts: nn.Module, name: str = "") -> LayerSpec:
    layout = layout_of_module(experts)
    up = experts.gate_up_proj if layout.gated else experts.up_proj
    up_bias = down_bias = None
    if layout.has_bias:
        up_bias = experts.gate_up_proj_bias if layout.gated else experts.up_proj_bias
        down_bias = experts.down_proj_bias
    return LayerSpec(layout, up, experts.down_proj, up_bias, down_bias, name=name or type(experts).__name__)


@torch._dynamo.assume_constant_result
def _layer_handle(experts: nn.Module) -> int:
    """Registry handle of this module's experts. Under dynamo it becomes a graph constant."""
    return layer_registry().register(spec_of_module(experts))


_warned_fallback: set[str] = set()


def dali_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """Drop-in experts forward: (hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]."""
    try:
        layout_of_module(self)
    except UnsupportedExpertsError as error:
        return _fallback(self, error, hidden_states, top_k_index, top_k_weights)
    return torch.ops.dali.moe_hybrid(hidden_states, top_k_index, top_k_weights, _layer_handle(self))


def _fallback(experts, error, hidden_states, top_k_index, top_k_weights):
    from transformers.integrations.moe import grouped_mm_experts_forward

    key = type(experts).__name__
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        message = f"dali: {key} keeps transformers' grouped_mm experts ({error})"
        warnings.warn(message, stacklevel=3)
        logger.warning(message)
    return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)


def register_experts_interface() -> bool:
    """Register "dali" in transformers' ExpertsInterface; False when transformers has none."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(IMPLEMENTATION_NAME, dali_experts_forward)
    return True
