"""`dali_compile.quantize(model, experts=..., dense=...)`: int8 / int4 weights, converted in place.

    dali_compile.quantize(model, dense="int8")                  # attention, shared experts, dense MLPs, lm_head
    dali_compile.quantize(model, dense="int4", group_size=64)

`dense` is every `nn.Linear` of the model but the routers (a `*gate`/`*router` linear beside an
`experts` module, e.g. Qwen2-MoE's `shared_expert_gate`; transformers' own router classes are not
linears): each becomes a `QuantizedLinear` running `dali::quantized_linear` (formats in
ops/quantized_linear.py and csrc/README.md). int8 has one scale per output row, int4 one per
`group_size` input features (32 by default). The conversion goes one linear at a time and drops each
full-precision weight as soon as its quantized copy exists, so the model never holds a second full
copy of its weights.

Not there yet: `experts=` (the routed experts' own int8/int4 kernels, CPU and Triton) raises
NotImplementedError; quantized linears run on the CPU only.

Everything is checked before the first weight is converted: a bad value, a compiled or already
quantized model, a weight dtype the kernels do not take or a group size that does not divide a
layer's input features is an error with the model untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from dali_compile.ops.quantized_linear import (
    ACTIVATION_DTYPES,
    QWEIGHT_DTYPES,
    SCALE_DTYPE,
    dequantize,
    quantize_weight,
)

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
    _checked_format("experts", experts)
    if experts is not None:
        raise NotImplementedError("dali_compile.quantize: experts='int8'/'int4' is not implemented yet; only dense= "
                                  "is (the routed experts keep their dtype)")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError("dali_compile.quantize: quantize the model before torch.compile, not the compiled wrapper")
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("dali_compile.quantize: this model is already quantized; quantize a full-precision model")
    if bits is None:
        return model
    targets = _dense_linears(model)
    for name, linear in targets:
        _check_layer(name, linear, bits, group_size)
    for name, linear in targets:
        _replace(model, name, linear, bits, group_size)
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
    if weight.device.type != "cpu":
        raise ValueError(f"dali_compile.quantize: {name} is on {weight.device}; quantized linears run on the CPU only")
    C = linear.in_features
    if bits == 4 and (group_size < 2 or group_size % 2 or C % group_size):
        raise ValueError(f"dali_compile.quantize: {name} has {C} input features, not a multiple of the int4 group "
                         f"size {group_size} (an even number); choose a group_size that divides it")


def _replace(model: nn.Module, name: str, linear: nn.Linear, bits: int, group_size: int) -> None:
    group = linear.in_features if bits == 8 else group_size
    qweight, scales = quantize_weight(linear.weight.detach(), bits, group)
    assert qweight.dtype == QWEIGHT_DTYPES[bits] and scales.dtype == SCALE_DTYPE
    bias = None if linear.bias is None else linear.bias.detach()
    quantized = QuantizedLinear(linear.in_features, linear.out_features, bits, group, qweight, scales, bias)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
    linear.weight = None  # the full-precision weight goes now, not when the last reference to the module does
