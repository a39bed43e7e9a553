"""Triton kernels for the GPU side of a MoE layer: grouped experts whose weights sit in pool slots.

# T tokens, K top-k, E experts, S pool slots, H hidden, I intermediate, X = 2I (gated) or I
# M = T*K routed rows (row m = t*K + k), BM/BN/BK tile sizes, P padded rows, B = P/BM row blocks

The standard two-kernel fused-MoE design, reading weights through a slot table:

    _group_rows_kernel     grid (1,), or for large M its torch spec `group_rows_by_expert_torch`; no host sync
        rows whose expert has a slot, grouped by expert, each group padded to a multiple of BM
        -> sorted_rows [P] int32 (M marks padding), block_slot [B] int32 (-1: nothing to do)
    _gate_up_kernel        grid (B, cdiv(I, BN))
        inter[p, :] = act(hidden[row_p // K] @ up_pool[slot].T (+ up bias))     [P, I], hidden's dtype
    _down_kernel           grid (B, cdiv(H, BN))
        out[row_p, :] = topk_weights[row_p] * (inter[p] @ down_pool[slot].T (+ down bias))   [M, H] fp32

Every output element is written by exactly one program (no atomics), rows of experts without a slot
stay zero, and the math is the same as `ops/expert_math.py` up to summation order and the rounding of
the intermediate to hidden's dtype. Importing this module needs triton; `ops/gpu_experts.py` imports it
lazily so that CPU-only installs never do.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .quantized_linear import CODE_BITS, activation_group, round_activations
from .triton_routing import (  # noqa: F401  (the routing half, re-exported for the launcher's users and tests)
    ROUTING_KERNEL_MAX_EXPERTS,
    ROUTING_KERNEL_MAX_ROWS,
    _group_rows_kernel,
    group_rows_by_expert_torch,
    max_blocks,
    routing_tiles,
)

# Must be read before the `@triton.jit` decorations below, which is when triton picks interpreter or compiler.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# What `_activate` implements; a test keeps it equal to layer_spec.ACTIVATIONS.
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "quick_gelu", "clamped_swiglu", "clamped_silu")


@dataclass(frozen=True)
class TileConfig:
    """Tiles shared by both kernels; block_m is also the padding unit of the expert groups."""

    name: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# tl.dot needs every tile dim >= 16 on a real GPU. Shared memory per stage (gated, bf16): decode 18 KiB,
# medium 20 KiB, prefill 40 KiB, within sm_80's 163 KiB at these depths. fp32 (exact "ieee" dots, no tensor
# cores) holds its operands in registers: small tiles keep it from spilling. The compile test checks both limits.
_CONFIGS = {
    ("decode", 2): TileConfig("decode", 16, 64, 64, 4, 4),
    ("medium", 2): TileConfig("medium", 32, 64, 64, 4, 4),
    ("prefill", 2): TileConfig("prefill", 64, 128, 64, 8, 3),
    ("decode", 4): TileConfig("decode-fp32", 16, 64, 16, 4, 3),
    ("medium", 4): TileConfig("medium-fp32", 32, 64, 16, 4, 3),
    ("prefill", 4): TileConfig("prefill-fp32", 64, 32, 32, 8, 2),
}


def all_configs(dtype: torch.dtype) -> tuple[TileConfig, ...]:
    """Every tile config the launcher may choose for weights of `dtype`."""
    width = 4 if dtype == torch.float32 else 2
    return tuple(cfg for (_, w), cfg in _CONFIGS.items() if w == width)


def choose_config(num_rows: int, num_experts: int, dtype: torch.dtype) -> TileConfig:
    """Tiles by the mean rows per expert (from shapes only, so choosing never syncs with the device).

    Decode (up to 16 rows per expert) is bound by reading the weights: the smallest M tile wastes least.
    Prefill (hundreds of rows) is bound by the matmuls: big tiles reuse each weight tile across rows.
    """
    per_expert = num_rows / max(1, min(num_experts, num_rows))
    regime = "decode" if per_expert <= 16 else "medium" if per_expert <= 48 else "prefill"
    return _CONFIGS[(regime, 4 if dtype == torch.float32 else 2)]


@triton.jit
def _activate(gate, up, ACTIVATION: tl.constexpr, GATED: tl.constexpr, alpha, limit):
    """fp32 [BM, BN] tiles -> act(gate) * up (gated) or act(gate); same formulas as expert_math."""
    if ACTIVATION == "clamped_swiglu":  # GPT-OSS
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        y = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    elif ACTIVATION == "clamped_silu":  # DeepSeek-V4
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        y = gate * tl.sigmoid(gate) * up
    else:
        if ACTIVATION == "silu":
            y = gate * tl.sigmoid(gate)
        elif ACTIVATION == "gelu":
            y = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
        elif ACTIVATION == "gelu_tanh":
            inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            y = 0.5 * gate * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(z) = 2 sigmoid(2z) - 1
        elif ACTIVATION == "relu":
            y = tl.maximum(gate, 0.0)
        elif ACTIVATION == "relu2":
            y = tl.maximum(gate, 0.0)
            y = y * y
        else:
            tl.static_assert(ACTIVATION == "quick_gelu", "unknown activation")
            y = gate * tl.sigmoid(1.702 * gate)
        if GATED:
            y = y * up
    return y


@triton.jit
def _quantized_tile(codes_ptr, scales_ptr, rows, cols, mask, stride_row, stride_srow, QBITS: tl.constexpr,
                    GROUP: tl.constexpr):
    """fp32 weights w[rows, cols] of one slot's quantized matrix (ops/quantized_linear.py's formats), from codes
    [rows, cols * QBITS/8] (row stride `stride_row` bytes) and float16 scales [rows, cols / GROUP]; rows and
    cols broadcast to the tile's shape. int4: the G/2 bytes of a group hold its first half in the low nibbles
    and its second half in the high ones, each as q + 8."""
    if QBITS == 8:
        q = tl.load(codes_ptr + rows * stride_row + cols, mask=mask, other=0).to(tl.float32)
    else:
        half: tl.constexpr = GROUP // 2
        j = cols % GROUP
        byte = tl.load(codes_ptr + rows * stride_row + (cols // GROUP) * half + j % half, mask=mask, other=0)
        byte = byte.to(tl.int32)
        q = (tl.where(j >= half, byte >> 4, byte & 15) - 8).to(tl.float32)
    scale = tl.load(scales_ptr + rows * stride_srow + cols // GROUP, mask=mask, other=0.0).to(tl.float32)
    return q * scale


@triton.jit
def _gate_up_kernel(
    hidden_ptr, w_ptr, bias_ptr, inter_ptr, sorted_rows_ptr, block_slot_ptr, scales_ptr,
    num_rows, top_k, H, I,
    stride_ht, stride_ws, stride_wx, stride_wh, stride_bs, stride_ss, stride_sx,
    alpha, limit,
    GATED: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    QBITS: tl.constexpr = 0, QGROUP: tl.constexpr = 1,
):
    """inter[p, n] for one BM block of rows and BN columns of I (see the module docstring).

    w_ptr: the up pool, element (slot s, output column x, hidden h) at s*stride_ws + x*stride_wx + h*stride_wh,
    which covers [S, X, H] and, transposed, [S, H, X]. Concatenated gate = columns [0, I), up = [I, 2I);
    interleaved gate = even columns, up = odd ones, loaded as one contiguous [BK, 2BN] tile.
    QBITS 8 or 4: w_ptr holds codes [S, X, H * QBITS/8] and scales_ptr their scales [S, X, H / QGROUP] (row
    form only), dequantized tile by tile in fp32; hidden then comes fp32 (int4: already rounded per group).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    rows = tl.load(sorted_rows_ptr + offs_m)
    row_ok = rows < num_rows
    tokens = (rows // top_k).to(tl.int64)
    offs_k = tl.arange(0, BK)
    a_ptrs = hidden_ptr + tokens[:, None] * stride_ht + offs_k[None, :]
    w_base = w_ptr + slot.to(tl.int64) * stride_ws
    s_base = scales_ptr + slot.to(tl.int64) * stride_ss
    b_base = bias_ptr + slot.to(tl.int64) * stride_bs
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < I
    if INTERLEAVED:
        cols = pid_n * 2 * BN + tl.arange(0, 2 * BN)
        col_ok = cols < 2 * I
        w_ptrs = w_base + cols[None, :] * stride_wx + offs_k[:, None] * stride_wh
        acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
        for k0 in range(0, H, BK):
            k_ok = offs_k + k0 < H
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if QBITS:
                a = a.to(tl.float32)
                w = _quantized_tile(w_base, s_base, cols[None, :], (offs_k + k0)[:, None],
                                    k_ok[:, None] & col_ok[None, :], stride_wx, stride_sx, QBITS, QGROUP)
            else:
                w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BK
            w_ptrs += BK * stride_wh
        if HAS_BIAS:
            acc += tl.load(b_base + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        gate, up = tl.split(tl.reshape(acc, (BM, BN, 2)))
    else:
        g_ptrs = w_base + offs_n[None, :] * stride_wx + offs_k[:, None] * stride_wh
        gate = tl.zeros((BM, BN), dtype=tl.float32)
        up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, H, BK):
            k_ok = offs_k + k0 < H
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            tile_ok = k_ok[:, None] & n_ok[None, :]
            if QBITS:
                a = a.to(tl.float32)
                wg = _quantized_tile(w_base, s_base, offs_n[None, :], (offs_k + k0)[:, None], tile_ok, stride_wx,
                                     stride_sx, QBITS, QGROUP)
            else:
                wg = tl.load(g_ptrs, mask=tile_ok, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                wg = wg.to(tl.float32)
            gate = tl.dot(a, wg, gate, input_precision=PRECISION)
            if GATED:
                if QBITS:
                    wu = _quantized_tile(w_base, s_base, (offs_n + I)[None, :], (offs_k + k0)[:, None], tile_ok,
                                         stride_wx, stride_sx, QBITS, QGROUP)
                else:
                    wu = tl.load(g_ptrs + I * stride_wx, mask=tile_ok, other=0.0)
                if UPCAST:
                    wu = wu.to(tl.float32)
                up = tl.dot(a, wu, up, input_precision=PRECISION)
            a_ptrs += BK
            g_ptrs += BK * stride_wh
        if HAS_BIAS:
            gate += tl.load(b_base + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                up += tl.load(b_base + I + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = _activate(gate, up, ACTIVATION, GATED, alpha, limit)
    out_ptrs = inter_ptr + offs_m.to(tl.int64)[:, None] * I + offs_n[None, :]
    tl.store(out_ptrs, y.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    inter_ptr, w_ptr, bias_ptr, topk_weights_ptr, out_ptr, sorted_rows_ptr, block_slot_ptr, scales_ptr,
    num_rows, H, I,
    stride_ws, stride_wh, stride_wi, stride_bs, stride_ss, stride_sh,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    QBITS: tl.constexpr = 0, QGROUP: tl.constexpr = 1,
):
    """out[row, n] = topk_weight[row] * (inter[p] @ down[slot] (+ bias)) for one BM block, BN columns of H.

    w_ptr: the down pool, element (slot s, hidden h, intermediate i) at s*stride_ws + h*stride_wh + i*stride_wi,
    which covers [S, H, I] and, transposed, [S, I, H]. out is [M, H] fp32, rows never touched stay zero.
    QBITS 8 or 4: codes [S, H, I * QBITS/8] and scales [S, H, I / QGROUP], as in `_gate_up_kernel`.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    rows = tl.load(sorted_rows_ptr + offs_m)
    row_ok = rows < num_rows
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BK)
    a_ptrs = inter_ptr + offs_m.to(tl.int64)[:, None] * I + offs_k[None, :]
    w_ptrs = w_ptr + slot.to(tl.int64) * stride_ws + offs_n[None, :] * stride_wh + offs_k[:, None] * stride_wi
    w_base = w_ptr + slot.to(tl.int64) * stride_ws
    s_base = scales_ptr + slot.to(tl.int64) * stride_ss
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, I, BK):
        k_ok = offs_k + k0 < I
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if QBITS:
            a = a.to(tl.float32)
            w = _quantized_tile(w_base, s_base, offs_n[None, :], (offs_k + k0)[:, None], k_ok[:, None] & n_ok[None, :],
                                stride_wh, stride_sh, QBITS, QGROUP)
        else:
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BK
        w_ptrs += BK * stride_wi
    if HAS_BIAS:
        acc += tl.load(bias_ptr + slot.to(tl.int64) * stride_bs + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(topk_weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * H + offs_n[None, :]
    tl.store(out_ptrs, acc * scale[:, None], mask=row_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class Launch:
    """One kernel launch, spelled out so the compile test can build exactly what the launcher runs."""

    kernel: object
    grid: tuple[int, int]
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def _plan_routing(
    topk_ids: torch.Tensor, slot_of_expert: torch.Tensor, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, list[Launch]]:
    """(sorted_rows [P], block_slot [B], launches): the routing kernel for small M, else its torch spec now."""
    M, E = topk_ids.numel(), slot_of_expert.numel()
    if M > ROUTING_KERNEL_MAX_ROWS or E > ROUTING_KERNEL_MAX_EXPERTS:
        return (*group_rows_by_expert_torch(topk_ids, slot_of_expert, block_m), [])
    B = max_blocks(M, E, block_m)
    sorted_rows = torch.empty(B * block_m, dtype=torch.int32, device=topk_ids.device)
    block_slot = torch.empty(B, dtype=torch.int32, device=topk_ids.device)
    block_e, chunk = routing_tiles(E)
    routing = Launch(
        _group_rows_kernel,
        (1, 1),
        dict(topk_ids_ptr=topk_ids, slot_of_expert_ptr=slot_of_expert, sorted_rows_ptr=sorted_rows,
             block_slot_ptr=block_slot, num_rows=M, num_experts=E, num_blocks=B),
        dict(BM=block_m, BLOCK_E=block_e, CHUNK=chunk),
        num_warps=4,
        num_stages=1,
    )
    return sorted_rows, block_slot, [routing]


def plan_expert_launches(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    up_pool: torch.Tensor,
    down_pool: torch.Tensor,
    up_bias_pool: torch.Tensor | None,
    down_bias_pool: torch.Tensor | None,
    slot_of_expert: torch.Tensor,
    gated: bool,
    interleaved: bool,
    transposed: bool,
    activation: str,
    alpha: float,
    limit: float,
    up_scales_pool: torch.Tensor | None = None,
    down_scales_pool: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, list[Launch]]:
    """Allocates the output and routing metadata and describes the two launches (inputs already checked).

    Returns (out [T, K, H] fp32 zeros until the launches run, launches: the routing kernel for small M,
    then gate/up, then down). `config` overrides the choice by size (tests compile every config this way).
    Quantized pools (scales given; row form): the kernels dequantize the codes tile by tile and compute in
    fp32 (the fp32 tiles), after rounding hidden, and the intermediate between the launches, to int8 per token
    and activation group (`activation_group`, `round_activations`, part of the format), as the CPU kernels do.
    """
    hidden, topk_ids, topk_weights = hidden.contiguous(), topk_ids.contiguous(), topk_weights.contiguous()
    T, K = topk_ids.shape
    M, H, E = T * K, hidden.shape[1], slot_of_expert.numel()
    bits = CODE_BITS[up_pool.dtype] if up_scales_pool is not None else 0
    I = down_pool.shape[2] * 8 // bits if bits else down_pool.shape[1] if transposed else down_pool.shape[2]
    cfg = config or choose_config(M, E, torch.float32 if bits else hidden.dtype)
    out = torch.zeros(T, K, H, dtype=torch.float32, device=hidden.device)
    if M == 0 or E == 0:
        return out, []
    if activation not in ACTIVATIONS:
        raise ValueError(f"the expert kernels have no activation {activation!r}; they have {', '.join(ACTIVATIONS)}")
    sorted_rows, block_slot, launches = _plan_routing(topk_ids, slot_of_expert, cfg.block_m)
    B = block_slot.numel()
    upcast = INTERPRETING and hidden.dtype == torch.bfloat16  # the interpreter gets bf16 arithmetic wrong
    inter_dtype = torch.float32 if upcast or bits else hidden.dtype
    up_quant, down_quant = _quantization(bits, H, I, up_scales_pool, down_scales_pool)
    up_x_group, down_x_group = (activation_group(bits, columns, quant["QGROUP"]) if bits else None
                                for columns, quant in ((H, up_quant), (I, down_quant)))
    # Rounding the intermediate's rows in place: padding rows must hold numbers (zeros), not garbage
    inter = (torch.zeros if down_x_group else torch.empty)(sorted_rows.numel(), I, dtype=inter_dtype,
                                                            device=hidden.device)
    has_bias = up_bias_pool is not None
    # fp32 weights must not silently drop to tf32 on tensor cores: the contract is fp32 math.
    precision = "ieee" if hidden.dtype == torch.float32 or upcast or bits else "tf32"
    tiles = dict(BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, UPCAST=upcast, PRECISION=precision)
    if up_x_group:
        hidden = round_activations(hidden, up_x_group)
    up_scales = up_scales_pool if bits else up_pool  # (a pointer the kernel never reads when QBITS == 0)
    down_scales = down_scales_pool if bits else down_pool
    # [S, X, H]: (x, h) strides (H, 1); transposed [S, H, X]: (1, X).
    up_strides = (up_pool.stride(2), up_pool.stride(1)) if transposed else (up_pool.stride(1), up_pool.stride(2))
    # [S, H, I]: (h, i) strides (I, 1); transposed [S, I, H]: (1, H).
    down_strides = (
        (down_pool.stride(2), down_pool.stride(1)) if transposed else (down_pool.stride(1), down_pool.stride(2))
    )
    gate_up = Launch(
        _gate_up_kernel,
        (B, triton.cdiv(I, cfg.block_n)),
        dict(
            hidden_ptr=hidden, w_ptr=up_pool, bias_ptr=up_bias_pool if has_bias else up_pool,
            inter_ptr=inter, sorted_rows_ptr=sorted_rows, block_slot_ptr=block_slot, scales_ptr=up_scales,
            num_rows=M, top_k=K, H=H, I=I,
            stride_ht=hidden.stride(0), stride_ws=up_pool.stride(0), stride_wx=up_strides[0],
            stride_wh=up_strides[1], stride_bs=up_bias_pool.stride(0) if has_bias else 0,
            stride_ss=up_scales.stride(0) if bits else 0, stride_sx=up_scales.stride(1) if bits else 0,
            alpha=float(alpha), limit=float(limit),
        ),
        dict(GATED=gated, INTERLEAVED=interleaved, HAS_BIAS=has_bias, ACTIVATION=activation, **tiles, **up_quant),
        cfg.num_warps,
        cfg.num_stages,
    )
    down = Launch(
        _down_kernel,
        (B, triton.cdiv(H, cfg.block_n)),
        dict(
            inter_ptr=inter, w_ptr=down_pool, bias_ptr=down_bias_pool if has_bias else down_pool,
            topk_weights_ptr=topk_weights, out_ptr=out, sorted_rows_ptr=sorted_rows, block_slot_ptr=block_slot,
            scales_ptr=down_scales, num_rows=M, H=H, I=I,
            stride_ws=down_pool.stride(0), stride_wh=down_strides[0], stride_wi=down_strides[1],
            stride_bs=down_bias_pool.stride(0) if has_bias else 0,
            stride_ss=down_scales.stride(0) if bits else 0, stride_sh=down_scales.stride(1) if bits else 0,
        ),
        dict(HAS_BIAS=has_bias, **tiles, **down_quant),
        cfg.num_warps,
        cfg.num_stages,
    )
    between = [_RoundActivations(inter, down_x_group)] if down_x_group else []
    return out, [*launches, gate_up, *between, down]


def _quantization(bits: int, H: int, I: int, up_scales_pool, down_scales_pool) -> tuple[dict, dict]:
    """The QBITS / QGROUP constexprs of the gate/up and the down kernel (QBITS 0: not quantized)."""
    if not bits:
        return dict(QBITS=0, QGROUP=1), dict(QBITS=0, QGROUP=1)
    return (dict(QBITS=bits, QGROUP=H // up_scales_pool.shape[2]),
            dict(QBITS=bits, QGROUP=I // down_scales_pool.shape[2]))


@dataclass(frozen=True)
class _RoundActivations:
    """A step between the launches: the rounding of the intermediate to int8 per row and activation group."""

    tensor: torch.Tensor
    group: int

    def __call__(self) -> None:
        self.tensor.copy_(round_activations(self.tensor, self.group))


def run_gpu_experts(*args, config: TileConfig | None = None) -> torch.Tensor:
    """The launcher: `dali::gpu_experts`'s arguments (checked by the caller) -> [T, K, H] fp32."""
    hidden = args[0]
    with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
        out, launches = plan_expert_launches(*args, config=config)
        for launch in launches:
            launch()
    return out
