"""The math of one expert in plain PyTorch, fp32: the oracle every kernel is tested against.

# n tokens routed to the expert, H hidden, I intermediate, X = 2I (gated) or I
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dali_compile.runtime.layer_spec import CLAMPED_ACTIVATIONS, Activation, ExpertLayout, LayerSpec

from .quantized_linear import dequantize, quantized_input


def layout_from_flags(gated: bool, interleaved: bool, transposed: bool, has_bias: bool, activation: str,
                      alpha: float, limit: float) -> ExpertLayout:
    """An op's flag arguments as an ExpertLayout. The ops always pass alpha and limit; alpha means
    something for clamped_swiglu only, limit for the clamped activations only, elsewhere they are ignored."""
    act = Activation(activation, alpha if activation == "clamped_swiglu" else None,
                     limit if activation in CLAMPED_ACTIVATIONS else None)
    return ExpertLayout(act, gated=gated, interleaved=interleaved, transposed=transposed, has_bias=has_bias)


def apply_activation(act: Activation, x: torch.Tensor) -> torch.Tensor:
    """Elementwise activation of a non-clamped activation."""
    name = act.name
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return torch.square(F.relu(x))
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"activation {name!r} is not elementwise")


def gate_and_activate(layout: ExpertLayout, h: torch.Tensor) -> torch.Tensor:
    """[n, X] up-projection output -> [n, I] activation input of the down projection."""
    if not layout.gated:
        return apply_activation(layout.activation, h)
    if layout.interleaved:
        gate, up = h[:, 0::2], h[:, 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    act = layout.activation
    if act.limit is not None:
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
    if act.name == "clamped_swiglu":
        return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))
    if act.name == "clamped_silu":
        return F.silu(gate) * up
    return apply_activation(act, gate) * up


def dequantize_expert(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """One quantized expert matrix [rows, C] in fp32 (the group size follows from the scales' shape)."""
    columns = codes.shape[1] * 8 // bits
    return dequantize(codes, scales, bits, columns // scales.shape[1])


def expert_weights(spec: LayerSpec, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of one expert in fp32, as stored (transposed or not), quantized ones dequantized."""
    quantization = spec.layout.quantization
    if quantization is None:
        return spec.up_weight[expert].float(), spec.down_weight[expert].float()
    return (dequantize_expert(spec.up_weight[expert], spec.up_scales[expert], quantization.bits),
            dequantize_expert(spec.down_weight[expert], spec.down_scales[expert], quantization.bits))


def expert_inputs(codes: torch.Tensor, scales: torch.Tensor, bits: int, x: torch.Tensor) -> torch.Tensor:
    """What a quantized projection multiplies: x [n, C] rounded to int8 per token and activation group
    (quantized_linear.activation_group: int4, the weight's groups; int8, 32 columns)."""
    columns = codes.shape[-1] * (2 if bits == 4 else 1)
    return quantized_input(x, bits, columns // scales.shape[-1])


def expert_forward(spec: LayerSpec, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens, all in fp32: x [n, H] fp32 -> [n, H] fp32."""
    layout = spec.layout
    up, down = expert_weights(spec, expert)
    quantization = layout.quantization
    if quantization is not None:
        x = expert_inputs(spec.up_weight, spec.up_scales, quantization.bits, x)
    h = x @ up if layout.transposed else x @ up.T
    if layout.has_bias:
        h = h + spec.up_bias[expert].float()
    a = gate_and_activate(layout, h)
    if quantization is not None:
        a = expert_inputs(spec.down_weight, spec.down_scales, quantization.bits, a)
    y = a @ down if layout.transposed else a @ down.T
    if layout.has_bias:
        y = y + spec.down_bias[expert].float()
    return y


def moe_reference(
    spec: LayerSpec, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Routed experts of one layer, fp32 accumulation, fixed combine order.

    hidden [T, H], topk_ids [T, K] (int), topk_weights [T, K] -> [T, H] in hidden's dtype.
    Each (token, k) contribution is computed in fp32 and the K contributions of a
    token are summed in k order, so any split of the experts between devices that
    keeps this order reproduces the result up to the rounding of the expert math.
    """
    T, K = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    contributions = torch.zeros(T * K, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    flat_weights = topk_weights.reshape(-1).float()
    for expert in torch.unique(flat_ids).tolist():  # ascending expert order
        rows = (flat_ids == expert).nonzero().squeeze(1)
        x = hidden[rows // K].float()
        contributions[rows] = expert_forward(spec, expert, x) * flat_weights[rows, None]
    return contributions.view(T, K, hidden.shape[1]).sum(dim=1).to(hidden.dtype)
