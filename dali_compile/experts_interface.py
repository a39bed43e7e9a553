"""`"dali"` as a transformers experts implementation: the second way into dali::moe_hybrid.

    import dali_compile                      # registers "dali" in transformers' ExpertsInterface
    model.set_experts_implementation("dali") # every fused experts module now calls the op
    model(...)                               # eager, or under torch.compile with any backend

Here the layout is read from the experts module's own attributes (set by
transformers' `use_experts_implementation`), so no probing is needed. A module
whose math has no `ExpertLayout` (a post-expert norm, a gate no candidate
activation reproduces) keeps transformers' grouped_mm forward, with one warning.
"""

from __future__ import annotations

import logging
import warnings
import weakref

import torch
import torch.nn as nn

from dali_compile.ops.expert_math import gate_and_activate
from dali_compile.runtime.layer_spec import Activation, ExpertLayout, ExpertQuantization, LayerSpec
from dali_compile.runtime.registry import layer_registry

logger = logging.getLogger("dali_compile")

IMPLEMENTATION_NAME = "dali"

# Set by `dali_compile.quantize` on an experts module whose weights it replaced by codes and scales.
QUANTIZATION_ATTRIBUTE = "dali_quantization"


class UnsupportedExpertsError(NotImplementedError):
    pass


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """transformers' fused experts modules (they carry the attributes `use_experts_implementation` sets)."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "is_transposed") and isinstance(getattr(m, "down_proj", None), torch.Tensor)
            and m.down_proj.dim() == 3]


def quantization_of_module(experts: nn.Module) -> ExpertQuantization | None:
    return getattr(experts, QUANTIZATION_ATTRIBUTE, None)


def layout_of_module(experts: nn.Module) -> ExpertLayout:
    """The ExpertLayout of a transformers fused-experts module.

    Storage flags come from the attributes `use_experts_implementation` sets. The
    nonlinearity is not guessed from class names: the module's own `_apply_gate`
    (or `act_fn` without a gate) runs on a probe and the first candidate activation
    that reproduces it is taken; clamp limits and factors are drawn from the
    module's float attributes (GPT-OSS's alpha/limit, DeepSeek-V4's limit).
    """
    cached = _LAYOUTS.get(experts)
    if cached is not None:
        return cached
    if getattr(experts, "has_post_expert_norm", False):
        raise UnsupportedExpertsError("a post-expert norm has no dali layout yet")
    flags = dict(
        gated=bool(getattr(experts, "has_gate", True)),
        transposed=bool(getattr(experts, "is_transposed", False)),
        has_bias=bool(getattr(experts, "has_bias", False)),
    )
    flags["interleaved"] = flags["gated"] and not getattr(experts, "is_concatenated", True)
    quantization = quantization_of_module(experts)
    constants = sorted({float(v) for v in vars(experts).values() if isinstance(v, float)})
    intermediate = experts.down_proj.shape[1 if flags["transposed"] else 2]
    if quantization is not None:
        intermediate = quantization.columns(intermediate)
    width = intermediate * (2 if flags["gated"] else 1)
    probe = _gate_probe(width, constants)
    with torch.no_grad():
        expected = experts._apply_gate(probe) if flags["gated"] else experts.act_fn(probe)
        for activation in _candidate_activations(constants, flags["gated"]):
            layout = ExpertLayout(activation, **flags, quantization=quantization)
            if torch.allclose(gate_and_activate(layout, probe), expected.float(), rtol=1e-4, atol=1e-5):
                _LAYOUTS[experts] = layout
                return layout
    raise UnsupportedExpertsError(f"no known activation reproduces {type(experts).__name__}'s gate")


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget_layout(experts: nn.Module) -> None:
    """Drop the module's cached layout (its weights changed form, e.g. quantized)."""
    _LAYOUTS.pop(experts, None)


def _gate_probe(width: int, constants: list[float]) -> torch.Tensor:
    """Moderate and large values, so clamps at any of the module's constants are exercised."""
    generator = torch.Generator().manual_seed(0)
    big = max([abs(c) for c in constants] + [1.0]) * 3
    return torch.cat([torch.randn(16, width, generator=generator) * 2,
                      torch.randn(16, width, generator=generator) * big])


def _candidate_activations(constants: list[float], gated: bool) -> list[Activation]:
    candidates = [Activation(name) for name in ("silu", "gelu", "gelu_tanh", "relu", "relu2", "quick_gelu")]
    if gated:
        limits = [c for c in constants if c > 0]
        candidates += [Activation("clamped_swiglu", alpha=a, limit=lim) for lim in limits for a in constants]
        candidates += [Activation("clamped_silu", limit=lim) for lim in limits]
    return candidates


def spec_of_module(experts: nn.Module, name: str = "") -> LayerSpec:
    """The module's experts as a LayerSpec of its own Parameter objects (never views of them: the registry
    holds them weakly, and a view would die at once)."""
    layout = layout_of_module(experts)
    return LayerSpec(layout, *_module_tensors(experts, layout), name=name or type(experts).__name__)


def _module_tensors(experts: nn.Module, layout: ExpertLayout) -> tuple:
    """(up, down, up_bias, down_bias, up_scales, down_scales): LayerSpec's tensors, as the module holds them."""
    up_name = up_weight_name(experts)
    up_bias = down_bias = up_scales = down_scales = None
    if layout.has_bias:
        up_bias, down_bias = getattr(experts, f"{up_name}_bias"), experts.down_proj_bias
    if layout.quantization is not None:
        up_scales, down_scales = getattr(experts, f"{up_name}_scales"), experts.down_proj_scales
    return getattr(experts, up_name), experts.down_proj, up_bias, down_bias, up_scales, down_scales


def experts_implementations(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """(module, its experts implementation) of every module that has one: what `restore_experts_implementations`
    gives back after the model was switched to dali's."""
    return [(m, m.config._experts_implementation) for m in model.modules()
            if hasattr(m, "set_experts_implementation") and hasattr(m, "config")]


def restore_experts_implementations(saved: list[tuple[nn.Module, object]]) -> None:
    for module, implementation in reversed(saved):
        if module.config._experts_implementation != implementation:
            module.set_experts_implementation(implementation)


def top_k_of(model: nn.Module, default: int | None = None) -> int:
    """The model's top-k from its config (the names transformers' MoE configs use); `default` when none is
    there, or a ValueError without a default."""
    config = getattr(model, "config", None)
    for name in ("num_experts_per_tok", "moe_topk", "top_k"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if default is None:
        raise ValueError(f"cannot tell the top-k of {type(model).__name__} from its config")
    return default


def up_weight_name(experts: nn.Module) -> str:
    """The attribute of the up projection: gate_up_proj (gated) or up_proj."""
    return "gate_up_proj" if bool(getattr(experts, "has_gate", True)) else "up_proj"


_UNSUPPORTED = -1
_warned_fallback: set[str] = set()


@torch._dynamo.assume_constant_result
def _layer_handle(experts: nn.Module) -> int:
    """Registry handle of this module's experts, or -1 when dali cannot run them.

    Under dynamo this runs once at trace time and becomes a graph constant, so the
    layout probe and the registry never enter the graph. Eagerly it runs on every
    call: the module's last handle is kept and reused while the registry still binds
    it to the same tensor objects over the same storage (a registration costs about
    30 us, 60 us inside a real step: more than the rest of an offloaded layer's
    Python). New tensors (quantized, pinned, `.data` swapped) register again.
    """
    try:
        layout = layout_of_module(experts)
        tensors = _module_tensors(experts, layout)
        known = _HANDLES.get(experts)
        if known is not None and known.still_holds(layout, tensors):
            return known.handle
        handle = layer_registry().register(LayerSpec(layout, *tensors, name=type(experts).__name__), weak=True)
        _HANDLES[experts] = _KnownHandle(handle, layout, _storage_of(tensors))  # the module owns its experts
        return handle
    except UnsupportedExpertsError as error:
        key = type(experts).__name__
        if key not in _warned_fallback:
            _warned_fallback.add(key)
            message = f"dali: {key} keeps transformers' grouped_mm experts ({error})"
            warnings.warn(message, stacklevel=2)
            logger.warning(message)
        return _UNSUPPORTED


def _storage_of(tensors: tuple) -> tuple:
    """What the registry's identity key reads of each tensor, cheaply: where its data lives, its dtype, shape
    and strides (a `.data` swap keeps the object and changes these)."""
    return tuple(None if t is None else (t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors)


class _KnownHandle:
    """A module's last registry handle, with what it was registered for."""

    __slots__ = ("handle", "layout", "storage")

    def __init__(self, handle: int, layout: ExpertLayout, storage: tuple):
        self.handle, self.layout, self.storage = handle, layout, storage

    def still_holds(self, layout: ExpertLayout, tensors: tuple) -> bool:
        """The registry still binds the handle to exactly these tensor objects, over the same storage, for the
        same layout (released, freed or rebound handles fail the registry's check)."""
        return (layout is self.layout and layer_registry().holds(self.handle, tensors)
                and _storage_of(tensors) == self.storage)


_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dali_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """Drop-in experts forward: (hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]."""
    handle = _layer_handle(self)
    if handle == _UNSUPPORTED:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return torch.ops.dali.moe_hybrid(hidden_states, top_k_index, top_k_weights, handle)


def register_experts_interface() -> bool:
    """Register "dali" in transformers' ExpertsInterface; False when transformers has none."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(IMPLEMENTATION_NAME, dali_experts_forward)
    return True
