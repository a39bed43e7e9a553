"""What one MoE layer's experts are: their weights and how to apply them.

# E experts, H hidden, I intermediate, X = 2I (gated) or I (no gate)

A `LayerSpec` is what `dali::moe_hybrid`'s integer `layer` argument resolves to
at run time. It holds the model's own expert tensors (never a copy) plus an
`ExpertLayout` that says how transformers' fused-experts variants store them:

    gated, concatenated   up [E, 2I, H] rows = [gate; up]        (Mixtral, Qwen, DeepSeek)
    gated, interleaved    up rows = [g0, u0, g1, u1, ...]        (GPT-OSS)
    transposed            up [E, H, X], down [E, I, H]           (GPT-OSS, Aria)
    biases                up_bias [E, X], down_bias [E, H]       (GPT-OSS)
    no gate               up [E, I, H], out = down(act(up x))    (Nemotron-H)

Quantized experts (`dali_compile.quantize(model, experts=...)`) keep the row form only: up
codes [E, X, H * bits/8] and down codes [E, H, I * bits/8] (int8, or uint8 holding two int4 codes),
each row with float16 scales, up_scales [E, X, H / G_up] and down_scales [E, H, I / G_down], in the
formats of ops/quantized_linear.py; biases and activations keep the model's dtype
(`ExpertQuantization.dtype`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# Activations the in-tree MoE families use, by transformers' ACT2FN names where one exists.
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "quick_gelu", "clamped_swiglu", "clamped_silu")
# Gated activations that clamp gate (above) and up (both sides) at `limit` before combining them.
CLAMPED_ACTIVATIONS = ("clamped_swiglu", "clamped_silu")


@dataclass(frozen=True)
class Activation:
    """The expert nonlinearity.

    Two gated forms clamp first (gate above at `limit`, up to [-limit, limit]):
    `clamped_swiglu` (GPT-OSS): out = (up + 1) * gate * sigmoid(alpha * gate), needs alpha and limit;
    `clamped_silu` (DeepSeek-V4): out = silu(gate) * up, needs limit only.
    Every other activation takes neither alpha nor limit.
    """

    name: str
    alpha: float | None = None
    limit: float | None = None

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.name!r}; known: {', '.join(ACTIVATIONS)}")
        needs = (self.name == "clamped_swiglu", self.name in CLAMPED_ACTIVATIONS)
        if (self.alpha is not None, self.limit is not None) != needs:
            raise ValueError(
                f"activation {self.name!r}: alpha is required for clamped_swiglu and only for it; "
                f"limit for {' and '.join(CLAMPED_ACTIVATIONS)} and only for them"
            )

    def describe(self) -> str:
        if self.name == "clamped_swiglu":
            return f"clamped_swiglu(alpha={self.alpha:g}, limit={self.limit:g})"
        if self.name == "clamped_silu":
            return f"clamped_silu(limit={self.limit:g})"
        return self.name


@dataclass(frozen=True)
class ExpertQuantization:
    """Experts stored as `bits`-bit codes with float16 scales, computing on `dtype` activations."""

    bits: int
    dtype: torch.dtype

    def __post_init__(self):
        if self.bits not in (8, 4):
            raise ValueError(f"quantized experts have 8 or 4 bits, got {self.bits}")

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    def columns(self, code_columns: int) -> int:
        """The weight columns a code row of `code_columns` bytes holds."""
        return code_columns * 8 // self.bits


@dataclass(frozen=True)
class ExpertLayout:
    """How one layer's expert weights are stored and combined (see module docstring)."""

    activation: Activation
    gated: bool = True
    interleaved: bool = False
    transposed: bool = False
    has_bias: bool = False
    quantization: ExpertQuantization | None = None

    def __post_init__(self):
        if self.interleaved and not self.gated:
            raise ValueError("an interleaved gate/up layout needs a gate")
        if self.quantization is not None and self.transposed:
            raise ValueError("quantized experts are stored in row form, never transposed")
        if self.activation.name in CLAMPED_ACTIVATIONS and not self.gated:
            raise ValueError(f"{self.activation.name} is a gated activation")

    def describe(self) -> str:
        parts = ["gated" if self.gated else "no-gate"]
        if self.gated:
            parts.append("interleaved" if self.interleaved else "concatenated")
        if self.transposed:
            parts.append("transposed")
        if self.has_bias:
            parts.append("bias")
        if self.quantization is not None:
            parts.append(f"int{self.quantization.bits}")
        parts.append(self.activation.describe())
        return ", ".join(parts)


@dataclass(frozen=True)
class LayerSpec:
    """One MoE layer's experts: the model's own weight tensors plus their layout.

    up_weight:   [E, X, H] or, transposed, [E, H, X]
    down_weight: [E, H, I] or, transposed, [E, I, H]
    up_bias:     [E, X] or None;   down_bias: [E, H] or None
    Quantized (layout.quantization): up_weight and down_weight hold the codes, up_scales [E, X, H / G_up]
    and down_scales [E, H, I / G_down] their float16 scales (module docstring); otherwise both are None.
    """

    layout: ExpertLayout
    up_weight: torch.Tensor
    down_weight: torch.Tensor
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    up_scales: torch.Tensor | None = None
    down_scales: torch.Tensor | None = None
    name: str = ""

    def __post_init__(self):
        self._check()

    # Derived sizes: read from the tensors so they can never disagree with them.
    @property
    def num_experts(self) -> int:
        return self.up_weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.down_weight.shape[2 if self.layout.transposed else 1]

    @property
    def intermediate_size(self) -> int:
        columns = self.down_weight.shape[1 if self.layout.transposed else 2]
        quantization = self.layout.quantization
        return columns if quantization is None else quantization.columns(columns)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations (and biases) the layer takes."""
        quantization = self.layout.quantization
        return self.up_weight.dtype if quantization is None else quantization.dtype

    @property
    def device(self) -> torch.device:
        return self.up_weight.device

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """Every tensor of the layer, each [E, ...]: (up, down, up_bias, down_bias, up_scales, down_scales)."""
        return (self.up_weight, self.down_weight, self.up_bias, self.down_bias, self.up_scales, self.down_scales)

    def with_tensors(self, up_weight, down_weight, up_bias=None, down_bias=None, up_scales=None,
                     down_scales=None) -> LayerSpec:
        """The same layer bound to other tensors of the same shapes (e.g. a reloaded model)."""
        return dataclasses.replace(self, up_weight=up_weight, down_weight=down_weight, up_bias=up_bias,
                                   down_bias=down_bias, up_scales=up_scales, down_scales=down_scales)

    def _check(self):
        up, down = self.up_weight, self.down_weight
        quantization = self.layout.quantization
        where = f"layer {self.name!r}" if self.name else "layer"
        if up.dim() != 3 or down.dim() != 3:
            raise ValueError(f"{where}: expert weights must be 3-D, got {tuple(up.shape)} and {tuple(down.shape)}")
        if quantization is None and (not up.is_floating_point() or up.dtype != down.dtype):
            raise ValueError(f"{where}: expert weights must share one floating dtype, got {up.dtype}, {down.dtype}")
        if up.device != down.device:
            raise ValueError(f"{where}: expert weights on different devices ({up.device}, {down.device})")
        E, H, I = up.shape[0], self.hidden_size, self.intermediate_size
        X = 2 * I if self.layout.gated else I
        if quantization is None:
            expected_up = (E, H, X) if self.layout.transposed else (E, X, H)
        else:
            expected_up = (E, X, H * quantization.bits // 8)
        if tuple(up.shape) != expected_up or down.shape[0] != E:
            raise ValueError(
                f"{where}: up weight {tuple(up.shape)} does not fit down weight {tuple(down.shape)} "
                f"for layout ({self.layout.describe()}): expected up {expected_up}"
            )
        given = (self.up_bias is not None, self.down_bias is not None)
        if given != (self.layout.has_bias, self.layout.has_bias):
            raise ValueError(
                f"{where}: layout has_bias={self.layout.has_bias} needs "
                f"{'both biases' if self.layout.has_bias else 'no bias'}, got up_bias={given[0]}, down_bias={given[1]}"
            )
        for bias, width, label in ((self.up_bias, X, "up"), (self.down_bias, H, "down")):
            if bias is None:
                continue
            if tuple(bias.shape) != (E, width) or bias.device != up.device:
                raise ValueError(
                    f"{where}: {label} bias must be [{E}, {width}] on {up.device}, got {tuple(bias.shape)}"
                )
            if bias.dtype != self.dtype:
                raise ValueError(f"{where}: {label} bias is {bias.dtype} but the layer computes in {self.dtype}")
        self._check_quantized(where, E, H, I, X)

    def _check_quantized(self, where: str, E: int, H: int, I: int, X: int) -> None:
        quantization = self.layout.quantization
        scales = (self.up_scales, self.down_scales)
        if quantization is None:
            if scales != (None, None):
                raise ValueError(f"{where}: scales are given but the layout is not quantized")
            return
        for codes, scale, rows, columns, label in ((self.up_weight, self.up_scales, X, H, "up"),
                                                    (self.down_weight, self.down_scales, H, I, "down")):
            if codes.dtype != quantization.code_dtype:
                raise ValueError(f"{where}: int{quantization.bits} {label} codes must be {quantization.code_dtype}, "
                                 f"got {codes.dtype}")
            if scale is None or scale.dim() != 3 or scale.dtype != torch.float16 or scale.device != codes.device:
                raise ValueError(f"{where}: {label}_scales must be a 3-D float16 tensor on {codes.device}, got "
                                 f"{None if scale is None else (scale.dtype, tuple(scale.shape))}")
            groups = scale.shape[2]
            group = columns // groups if groups else 0
            if (tuple(scale.shape[:2]) != (E, rows) or not group or group * groups != columns
                    or (quantization.bits == 4 and group % 2)):
                even = " (even)" if quantization.bits == 4 else ""
                raise ValueError(f"{where}: {label}_scales {tuple(scale.shape)} must be [{E}, {rows}, {columns} / G] "
                                 f"for a group size G dividing {columns}{even}")
