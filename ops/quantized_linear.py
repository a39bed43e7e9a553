"""`dali::quantized_linear`: a linear layer whose weight is stored in int8 or int4 (formats below).

# T rows (every leading dimension of x), N output features, C input features, G group size

    quantized_linear(x[..., C], qweight, scales[N, C/G], bias[N]?, bits, group_size) -> [..., N]   in x's dtype

    out = x' @ dequantize(qweight, scales).T + bias, accumulated in fp32 and rounded once to x's dtype
    x' = x rounded to int8 per row and group of `activation_group(bits, C, G)` columns (round_activations):
    for 4 bits the weight's groups, for 8 bits groups of 32 (x as it is when 32 does not divide C), so the
    kernels multiply the codes in integers (an int4 or int8 code widened to fp32 costs more than the
    multiply itself; AVX-512 VNNI sums four int8 products per lane in one instruction)

Formats (also in csrc/README.md, so a reader can dequantize them by hand). Symmetric, one float16
scale per group of G consecutive input features of an output row (G = C: one scale per row):
  - bits=8: qweight int8 [N, C]; w[n, c] = qweight[n, c] * scales[n, c // G].
  - bits=4: qweight uint8 [N, C/2], G even. The G/2 bytes of a group starting at column c0 hold its
    first half in their low nibbles and its second half in their high nibbles, each as q + 8 (0..15):
    byte c0/2 + i holds w[n, c0 + i] (low) and w[n, c0 + G/2 + i] (high);
    w = (nibble - 8) * scales[n, c // G].

x and bias are float32, bfloat16 or float16 (the same dtype) on the CPU. The schema is declared here
and only here; the CPU kernel is C++ (`csrc/binding/quantized_linear_ops.cpp`), registered when
`dali_compile.runtime.cpu_extension` loads the library. The CompositeExplicitAutograd kernel below
loads it on first use and otherwise runs the PyTorch reference, also the test oracle.
"""

from __future__ import annotations

import torch

from dali_compile.runtime import cpu_extension

from .library import define_op

NAME = "dali::quantized_linear"
define_op(NAME, "(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int bits, int group_size) -> Tensor")

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QWEIGHT_DTYPES = {8: torch.int8, 4: torch.uint8}
CODE_BITS = {dtype: bits for bits, dtype in QWEIGHT_DTYPES.items()}  # the codes' dtype -> bits
SCALE_DTYPE = torch.float16
INT8_ACTIVATION_GROUP = 32  # int8 weights: the activations' rounding groups (columns)


def in_features(qweight: torch.Tensor, bits: int) -> int:
    """C, the input features a qweight of `bits` holds per row."""
    return qweight.shape[1] * (2 if bits == 4 else 1)


def check_args(x, qweight, scales, bias, bits: int, group_size: int) -> None:
    """The checks that need no data: shared by the fake kernel and the reference (C++ has its own)."""
    if bits not in QWEIGHT_DTYPES:
        raise ValueError(f"{NAME}: bits must be 8 or 4, got {bits}")
    if qweight.dim() != 2 or qweight.dtype != QWEIGHT_DTYPES[bits]:
        raise TypeError(f"{NAME}: a {bits}-bit qweight must be a 2-D {QWEIGHT_DTYPES[bits]} tensor, got "
                        f"{qweight.dtype} of shape {tuple(qweight.shape)}")
    C = in_features(qweight, bits)
    if group_size < 1 or C % group_size or (bits == 4 and group_size % 2):
        raise ValueError(f"{NAME}: group_size {group_size} must divide the {C} input features"
                         + (" and be even for 4 bits" if bits == 4 else ""))
    N = qweight.shape[0]
    if scales.dtype != SCALE_DTYPE or tuple(scales.shape) != (N, C // group_size):
        raise ValueError(f"{NAME}: scales must be float16 [N, C / group_size] = [{N}, {C // group_size}], got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{NAME}: x must be one of {ACTIVATION_DTYPES}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != C:
        raise ValueError(f"{NAME}: x has shape {tuple(x.shape)} but the weight expects {C} input features")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (N,)):
        raise ValueError(f"{NAME}: bias must be [{N}] in x's dtype {x.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    devices = {t.device.type for t in (x, qweight, scales, bias) if t is not None}
    if devices != {"cpu"}:
        raise ValueError(f"{NAME}: x, qweight, scales and bias must be CPU tensors, got {sorted(devices)}")


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales) of a float weight [N, C] in the format above; group_size None = one group per row.
    Scales are rounded to float16 first and the weight is quantized against the rounded scale, so dequantizing
    gives exactly q * scale. Works in fp32 on one row block at a time (no full fp32 copy of a large weight)."""
    if bits not in QWEIGHT_DTYPES:
        raise ValueError(f"quantize: bits must be 8 or 4, got {bits}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"quantize: weight must be a 2-D float tensor, got {weight.dtype} {tuple(weight.shape)}")
    N, C = weight.shape
    G = C if group_size is None else group_size
    if G < 1 or C % G or (bits == 4 and G % 2):
        raise ValueError(f"quantize: group size {G} must divide the {C} input features"
                         + (" and be even for 4 bits" if bits == 4 else ""))
    q_max = 127 if bits == 8 else 7
    qweight = torch.empty((N, C if bits == 8 else C // 2), dtype=QWEIGHT_DTYPES[bits], device=weight.device)
    scales = torch.empty((N, C // G), dtype=SCALE_DTYPE, device=weight.device)
    rows = max(1, (1 << 22) // max(1, C))  # ~16 MiB of fp32 at a time
    tiny = torch.finfo(SCALE_DTYPE).tiny
    for n0 in range(0, N, rows):
        block = weight[n0:n0 + rows].to(torch.float32).view(-1, C // G, G)
        scale = (block.abs().amax(dim=-1) / q_max).clamp(min=tiny).to(SCALE_DTYPE)
        q = torch.round(block / scale.to(torch.float32).unsqueeze(-1)).clamp_(-q_max - (bits == 4), q_max)
        scales[n0:n0 + rows] = scale
        qweight[n0:n0 + rows] = pack_codes(q.reshape(-1, C), bits, G)
    return qweight, scales


def pack_codes(codes: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Integer codes [N, C] (int8: -127..127, int4: -8..7, any dtype holding them) in the format's layout: int8
    as they are; int4 as q + 8, a group's first G/2 columns in the low nibbles of its G/2 bytes and its last G/2
    in the high ones."""
    if bits == 8:
        return codes.to(torch.int8)
    nibbles = (codes + 8).to(torch.uint8).view(codes.shape[0], -1, group)
    return (nibbles[..., : group // 2] | (nibbles[..., group // 2:] << 4)).reshape(codes.shape[0], -1)


def quantize_stacked(weight: torch.Tensor, bits: int, group_size: int | None = None,
                     transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [E, rows, columns * bits / 8], scales [E, rows, groups]) of stacked expert weights [E, rows, columns]
    (transposed: [E, columns, rows], quantized in row form), one expert at a time; group_size as quantize_weight."""
    E = weight.shape[0]
    rows, columns = (weight.shape[2], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[2])
    group = columns if group_size is None else group_size
    codes = torch.empty((E, rows, columns * bits // 8), dtype=QWEIGHT_DTYPES[bits], device=weight.device)
    scales = torch.empty((E, rows, columns // group), dtype=SCALE_DTYPE, device=weight.device)
    for expert in range(E):
        matrix = weight[expert].T if transposed else weight[expert]
        codes[expert], scales[expert] = quantize_weight(matrix, bits, group)
    return codes, scales


def activation_group(bits: int, columns: int, group_size: int) -> int | None:
    """The groups of columns in which a quantized weight's activations are rounded to int8 (round_activations), or
    None where they multiply as they are: int4, the weight's own groups; int8, INT8_ACTIVATION_GROUP columns when
    that divides the row. The C++ kernels use the same rule (activation_group in csrc/core/kernels.h)."""
    if bits == 4:
        return group_size
    return INT8_ACTIVATION_GROUP if columns % INT8_ACTIVATION_GROUP == 0 else None


def quantized_input(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """x' in fp32: what a quantized weight of `bits` and `group_size` multiplies (the format's activations)."""
    group = activation_group(bits, x.shape[-1], group_size)
    return x.to(torch.float32) if group is None else round_activations(x, group)


def round_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., C] in fp32 as quantized weights see it: every token's groups of `group_size` consecutive values rounded
    to int8 against their own scale, max |x| / 127 (fp32; a group of zeros stays zero), then multiplied back:
        xq = clamp(round_half_even(x / s), -127, 127),   x' = xq * s
    (the kernels multiply the codes by xq in integers and scale by s * the weights' scale)."""
    x = x.to(torch.float32)
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / safe).clamp_(-127, 127)
    return (q * scale).reshape(x.shape)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The fp32 weight [N, C] a quantized one stands for (the formats above)."""
    N = qweight.shape[0]
    if bits == 8:
        q = qweight.to(torch.float32)
    else:
        packed = qweight.view(N, -1, group_size // 2)  # [N, groups, G/2] bytes
        low, high = (packed & 0xF).to(torch.float32) - 8, (packed >> 4).to(torch.float32) - 8
        q = torch.cat([low, high], dim=2).reshape(N, -1)
    groups = q.view(N, -1, group_size)
    return (groups * scales.to(torch.float32).unsqueeze(-1)).reshape(N, -1)


@torch.library.register_fake(NAME)
def _quantized_linear_fake(x, qweight, scales, bias, bits, group_size):
    check_args(x, qweight, scales, bias, bits, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def quantized_linear_reference(x, qweight, scales, bias, bits: int, group_size: int) -> torch.Tensor:
    """The op in plain PyTorch: dequantize, fp32 matmul, one rounding. Oracle and fallback."""
    check_args(x, qweight, scales, bias, bits, group_size)
    out = quantized_input(x, bits, group_size) @ dequantize(qweight, scales, bits, group_size).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _quantized_linear_composite(x, qweight, scales, bias, bits, group_size):
    # Loading the library registers the C++ kernel for the CPU key, so re-dispatching reaches it, not this.
    if cpu_extension.cpu_extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(NAME, "CPU"):
        return torch.ops.dali.quantized_linear.default(x, qweight, scales, bias, bits, group_size)
    return quantized_linear_reference(x, qweight, scales, bias, bits, group_size)


# A kernel registered directly for CPU (the C++ one, once loaded) takes precedence over this.
torch.library.impl(NAME, "CompositeExplicitAutograd")(_quantized_linear_composite)


def quantized_linear(x, qweight, scales, bias=None, bits: int = 8, group_size: int | None = None) -> torch.Tensor:
    """x [..., C] times a quantized weight (see the module docstring); group_size defaults to a whole row."""
    group = in_features(qweight, bits) if group_size is None else group_size
    return torch.ops.dali.quantized_linear(x, qweight, scales, bias, bits, group)
