"""`dali_compile.quantize(model, experts=..., dense=...)`: int8 / int4 weights, converted in place.

    dali_compile.quantize(model, experts="int4", dense="int8")  # routed experts int4, the rest int8
    dali_compile.quantize(model, dense="int4", group_size=64)

`dense` is every `nn.Linear` of the model but the routers (a `*gate`/`*router` linear beside an
`experts` module, e.g. Qwen2-MoE's `shared_expert_gate`; transformers' own router classes are not
linears): each becomes a `QuantizedLinear` running `dali::quantized_linear` (formats in
ops/quantized_linear.py and csrc/README.md). int8 has one scale per output row, int4 one per
`group_size` input features (32 by default). The conversion goes one linear at a time and drops each
full-precision weight as soon as its quantized copy exists, so the model never holds a second full
copy of its weights.

`experts` is the routed experts of every transformers fused experts module: their weights become
codes and float16 scales in the same module (parameters `gate_up_proj` / `up_proj` and `down_proj`
hold the codes, `*_scales` the scales; transposed layouts are stored in row form), one expert at a
time, and the model is switched to the "dali" experts implementation, whose `dali::moe_hybrid`
runs them (the C++ CPU runtime reads the codes in place). Formats as for `dense`: int8 one scale per
row, int4 one per `group_size` columns.

Quantized linears run on the CPU only; quantized experts run on the CPU (eager, torch.compile, the C++
runtime) and under `offload(...)` (the slots hold codes and scales; the Triton kernels dequantize them).
`dali_compile.load(path, quantize=...)` quantizes while it reads a checkpoint (loading.py), through the
same functions, one tensor at a time.

Everything is checked before the first weight is converted: a bad value, a compiled or already
quantized model, a weight dtype the kernels do not take or a group size that does not divide a
layer's input features is an error with the model untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from dali_compile.experts_interface import (
    IMPLEMENTATION_NAME,
    QUANTIZATION_ATTRIBUTE,
    UnsupportedExpertsError,
    experts_modules,
    forget_layout,
    layout_of_module,
    quantization_of_module,
    register_experts_interface,
    up_weight_name,
)
from dali_compile.ops.quantized_linear import (
    ACTIVATION_DTYPES,
    QWEIGHT_DTYPES,
    SCALE_DTYPE,
    dequantize,
    quantize_stacked,
    quantize_weight,
)
from dali_compile.runtime.layer_spec import ExpertQuantization

FORMATS = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 32  # int4
ROUTER_NAMES = ("gate", "router")


class QuantizedLinear(nn.Module):
    """A linear layer with an int8 or int4 weight (buffers `qweight`, `scales`) and its original bias."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, qweight: torch.Tensor,
                 scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dali.quantized_linear(x, self.qweight, self.scales, self.bias, self.bits, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight [out, in] this layer computes with."""
        return dequantize(self.qweight, self.scales, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def quantize(model: nn.Module, experts: str | None = None, dense: str | None = None,
             group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Quantize `model`'s weights in place and return it; see the module docstring."""
    bits = _checked_format("dense", dense)
    expert_bits = _checked_format("experts", experts)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"dali_compile.quantize: group size {group_size!r} must be an even int >= 2")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError("dali_compile.quantize: quantize the model before torch.compile, not the compiled wrapper")
    if any(isinstance(m, QuantizedLinear) or quantization_of_module(m) is not None for m in model.modules()):
        raise ValueError("dali_compile.quantize: this model is already quantized; quantize a full-precision model")
    targets = _dense_linears(model) if bits is not None else []
    for name, linear in targets:
        _check_layer(name, linear, bits, group_size)
    expert_targets = _checked_experts(model, expert_bits, group_size) if expert_bits is not None else []
    for name, linear in targets:
        _replace(model, name, linear, bits, group_size)
    for _, module in expert_targets:
        _quantize_experts(module, expert_bits, group_size)
    if expert_targets:
        model.set_experts_implementation(IMPLEMENTATION_NAME)
    return model


def _checked_format(what: str, value: str | None) -> int | None:
    if value is None:
        return None
    if value not in FORMATS:
        raise ValueError(f"dali_compile.quantize: {what}={value!r}; choose 'int8', 'int4' or None")
    return FORMATS[value]


def _is_router(name: str, parent: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return hasattr(parent, "experts") and any(word in leaf for word in ROUTER_NAMES)


def _dense_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear but the routers."""
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is nn.Linear and not _is_router(name, parent):
                found.append((name, child))
    return found


def _check_layer(name: str, linear: nn.Linear, bits: int, group_size: int) -> None:
    weight = linear.weight
    if weight.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"dali_compile.quantize: {name} has {weight.dtype} weights; the quantized kernels take "
                        f"{', '.join(str(d) for d in ACTIVATION_DTYPES)} models")
    if weight.device.type not in ("cpu", "meta"):  # meta: checked before loading (loading.py)
        raise ValueError(f"dali_compile.quantize: {name} is on {weight.device}; quantized linears run on the CPU only")
    C = linear.in_features
    if bits == 4 and (group_size < 2 or group_size % 2 or C % group_size):
        raise ValueError(f"dali_compile.quantize: {name} has {C} input features, not a multiple of the int4 group "
                         f"size {group_size} (an even number); choose a group_size that divides it")


def _replace(model: nn.Module, name: str, linear: nn.Linear, bits: int, group_size: int) -> None:
    """Puts a QuantizedLinear of the linear's weight and bias in its place."""
    group = linear.in_features if bits == 8 else group_size
    qweight, scales = quantize_weight(linear.weight.detach(), bits, group)
    _install(model, name, linear, bits, group, qweight, scales)


def _install(model: nn.Module, name: str, linear: nn.Linear, bits: int, group: int, qweight: torch.Tensor,
             scales: torch.Tensor) -> None:
    """Puts a QuantizedLinear of these codes (`group`: columns per scale) and the linear's bias in its place."""
    assert qweight.dtype == QWEIGHT_DTYPES[bits] and scales.dtype == SCALE_DTYPE
    bias = None if linear.bias is None else linear.bias.detach()
    quantized = QuantizedLinear(linear.in_features, linear.out_features, bits, group, qweight, scales, bias)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
    linear.weight = None  # the full-precision weight goes now, not when the last reference to the module does


def _checked_experts(model: nn.Module, bits: int, group_size: int) -> list[tuple[str, nn.Module]]:
    """The fused experts modules to quantize, every one checked (nothing is changed here)."""
    modules = experts_modules(model)
    if not modules:
        raise ValueError(f"dali_compile.quantize: {type(model).__name__} has no transformers fused experts module "
                         "(@use_experts_implementation); experts= quantizes those")
    if not hasattr(model, "set_experts_implementation") or not register_experts_interface():
        raise RuntimeError("dali_compile.quantize: experts= needs a transformers version with the experts interface")
    for name, module in modules:
        try:
            layout = layout_of_module(module)
        except UnsupportedExpertsError as error:
            raise ValueError(f"dali_compile.quantize: {name} is an experts module dali cannot run: {error}") from None
        up, down = getattr(module, up_weight_name(module)), module.down_proj
        if up.dtype not in ACTIVATION_DTYPES or down.dtype != up.dtype:
            raise TypeError(f"dali_compile.quantize: {name} has {up.dtype} experts; the quantized kernels take "
                            f"{', '.join(str(d) for d in ACTIVATION_DTYPES)} models")
        if up.device.type not in ("cpu", "meta"):
            raise ValueError(f"dali_compile.quantize: {name} is on {up.device}; quantized experts run on the CPU only")
        H, I = (down.shape[2], down.shape[1]) if layout.transposed else (down.shape[1], down.shape[2])
        if bits == 4 and (H % group_size or I % group_size):
            raise ValueError(f"dali_compile.quantize: {name} has hidden size {H} and intermediate size {I}; the int4 "
                             f"group size {group_size} must divide both; choose a group_size that does")
    return modules


def _quantize_experts(module: nn.Module, bits: int, group_size: int) -> None:
    """Replaces the module's up and down weights by codes and scales, one projection at a time (quantized expert by
    expert): each full-precision tensor goes as soon as its codes exist."""
    dtype = module.down_proj.dtype
    for name in (up_weight_name(module), "down_proj"):
        _quantize_projection(module, name, getattr(module, name), bits, group_size)
    _mark_quantized(module, bits, dtype)


def _quantize_projection(module: nn.Module, name: str, weight: torch.Tensor, bits: int, group_size: int) -> None:
    """Codes and scales of the stacked projection `weight` become the module's parameters `name`, `name_scales`
    (row form; `weight` is in the module's current layout)."""
    transposed = bool(module.is_transposed)
    codes, scales = quantize_stacked(weight.detach(), bits, None if bits == 8 else group_size, transposed)
    setattr(module, name, nn.Parameter(codes, requires_grad=False))
    setattr(module, f"{name}_scales", nn.Parameter(scales, requires_grad=False))


def _mark_quantized(module: nn.Module, bits: int, dtype: torch.dtype) -> None:
    """After both projections are codes: the module's layout says so (`dtype`: the activations' dtype)."""
    module.is_transposed = False  # codes are in row form
    setattr(module, QUANTIZATION_ATTRIBUTE, ExpertQuantization(bits, dtype))
    forget_layout(module)  # the cached layout described the full-precision weights
