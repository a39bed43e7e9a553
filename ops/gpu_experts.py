"""`dali::gpu_experts`: the experts a planner gives the GPU, with weights read from pool slots.

# T tokens, K top-k, E experts, S pool slots, H hidden, I intermediate, X = 2I (gated) or I

    gpu_experts(hidden[T, H], topk_ids[T, K], topk_weights[T, K],
                up_pool[S, X, H] (transposed [S, H, X]), down_pool[S, H, I] (transposed [S, I, H]),
                up_bias_pool[S, X]?, down_bias_pool[S, H]?, slot_of_expert[E] int32,
                gated, interleaved, transposed, activation, alpha, limit,
                up_scales_pool?, down_scales_pool?) -> [T, K, H] fp32

out[t, k] = topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]) computed with the weights of pool
slot slot_of_expert[topk_ids[t, k]], or exactly 0 where that slot is -1 (the expert runs elsewhere).
Returning per-slot contributions instead of their sum lets the caller add the CPU's and the GPU's
contributions in k order, so a split of the experts between devices changes nothing beyond rounding.

Quantized experts (scale pools given): the pools hold codes in row form, up [S, X, H * bits/8] and down
[S, H, I * bits/8] (int8, or uint8 with two int4 codes), and their float16 scales [S, X, H / G_up] and
[S, H, I / G_down], exactly as `dali::cpu_experts` takes them (their activations rounded to int8 per group);
biases stay in hidden's dtype. The Triton kernels dequantize the codes tile by tile and compute in fp32.

CUDA runs the Triton kernels of `ops/triton_experts.py` (imported on first use, so CPU-only installs
never import triton); every other device, and CUDA without triton, runs the fp32 reference of
`ops/expert_math.py` on the same slot table: the "emulated GPU" of CPU-only CI.
"""

from __future__ import annotations

import functools
import logging

import torch

from dali_compile.runtime.layer_spec import ExpertLayout, ExpertQuantization, LayerSpec

from .expert_math import expert_forward, layout_from_flags
from .library import define_op
from .quantized_linear import CODE_BITS

NAME = "dali::gpu_experts"
SCHEMA = (
    "(Tensor hidden, Tensor topk_ids, Tensor topk_weights, Tensor up_pool, Tensor down_pool, "
    "Tensor? up_bias_pool, Tensor? down_bias_pool, Tensor slot_of_expert, bool gated, bool interleaved, "
    "bool transposed, str activation, float alpha, float limit, Tensor? up_scales_pool=None, "
    "Tensor? down_scales_pool=None) -> Tensor"
)

define_op(NAME, SCHEMA)

_log = logging.getLogger(__name__)

# What the Triton kernels compute in (fp32 accumulation); other dtypes run the reference on CUDA too.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pool_layout(gated: bool, interleaved: bool, transposed: bool, has_bias: bool, activation: str,
                alpha: float, limit: float) -> ExpertLayout:
    """The op's flags as an ExpertLayout; alpha means something for clamped_swiglu only, limit for the
    clamped activations only (elsewhere the op ignores them)."""
    try:
        return layout_from_flags(gated, interleaved, transposed, has_bias, activation, alpha, limit)
    except ValueError as err:
        raise ValueError(f"{NAME}: {err}") from None


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_shapes(hidden, topk_ids, topk_weights, up_pool, down_pool, up_bias_pool, down_bias_pool,
                 slot_of_expert, gated, interleaved, transposed, activation, alpha, limit,
                 up_scales_pool=None, down_scales_pool=None) -> ExpertLayout:
    """Checks that need no tensor values; the fake kernel runs them too. Returns the layout (with its
    quantization when the scale pools are given)."""
    if (up_scales_pool is None) != (down_scales_pool is None):
        raise ValueError(f"{NAME}: give both scale pools or neither")
    if up_bias_pool is None and down_bias_pool is None:
        has_bias = False
    elif up_bias_pool is not None and down_bias_pool is not None:
        has_bias = True
    else:
        raise ValueError(f"{NAME}: give both bias pools or neither")
    layout = pool_layout(gated, interleaved, transposed, has_bias, activation, alpha, limit)
    if up_scales_pool is not None:
        return _check_quantized_pools(layout, hidden, topk_ids, topk_weights, up_pool, down_pool, up_bias_pool,
                                      down_bias_pool, slot_of_expert, up_scales_pool, down_scales_pool)
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"{NAME}: hidden must be a floating [T, H] tensor, got {hidden.dtype} {_shape(hidden)}")
    if topk_ids.dim() != 2 or _shape(topk_weights) != _shape(topk_ids) or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"{NAME}: topk_ids and topk_weights must both be [T, K] with T = {hidden.shape[0]} (hidden's rows), "
            f"got {_shape(topk_ids)} and {_shape(topk_weights)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64) or not topk_weights.is_floating_point():
        raise TypeError(f"{NAME}: topk_ids must be int32/int64 and topk_weights floating, got "
                        f"{topk_ids.dtype} and {topk_weights.dtype}")
    if slot_of_expert.dim() != 1 or slot_of_expert.dtype != torch.int32:
        raise TypeError(f"{NAME}: slot_of_expert must be a 1-D int32 [E] tensor, got "
                        f"{slot_of_expert.dtype} {_shape(slot_of_expert)}")
    pools = {"up_pool": up_pool, "down_pool": down_pool, "up_bias_pool": up_bias_pool, "down_bias_pool": down_bias_pool}
    for name, pool in pools.items():
        if pool is None:
            continue
        if pool.dtype != hidden.dtype:
            raise TypeError(f"{NAME}: {name} is {pool.dtype} but hidden is {hidden.dtype}; pools hold hidden's dtype")
        if not pool.is_contiguous():
            raise ValueError(f"{NAME}: {name} must be contiguous (the kernels address slots by fixed strides)")
    devices = {t.device for t in (hidden, topk_ids, topk_weights, slot_of_expert, *pools.values()) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{NAME}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if up_pool.dim() != 3 or down_pool.dim() != 3:
        raise ValueError(f"{NAME}: pools must be 3-D, got up {_shape(up_pool)} and down {_shape(down_pool)}")
    S, H = up_pool.shape[0], hidden.shape[1]
    I = down_pool.shape[1] if transposed else down_pool.shape[2]
    X = 2 * I if gated else I
    want_up, want_down = ((S, H, X), (S, I, H)) if transposed else ((S, X, H), (S, H, I))
    if _shape(up_pool) != want_up or _shape(down_pool) != want_down:
        raise ValueError(
            f"{NAME}: pools do not fit hidden size {H}, intermediate size {I} (read from down_pool) and layout "
            f"({layout.describe()}): expected up_pool {want_up} and down_pool {want_down}, "
            f"got {_shape(up_pool)} and {_shape(down_pool)}"
        )
    if has_bias and (_shape(up_bias_pool) != (S, X) or _shape(down_bias_pool) != (S, H)):
        raise ValueError(f"{NAME}: expected bias pools {(S, X)} and {(S, H)}, got "
                         f"{_shape(up_bias_pool)} and {_shape(down_bias_pool)}")
    return layout


def _check_quantized_pools(layout, hidden, topk_ids, topk_weights, up_pool, down_pool, up_bias_pool, down_bias_pool,
                           slot_of_expert, up_scales_pool, down_scales_pool) -> ExpertLayout:
    """The quantized pools through LayerSpec's own checks (the slots as its experts), then the routing's."""
    if up_pool.dtype not in CODE_BITS:
        raise TypeError(f"{NAME}: quantized pools hold int8 or uint8 (int4) codes, got {up_pool.dtype}")
    if layout.transposed:
        raise ValueError(f"{NAME}: quantized experts are stored in row form (transposed=False)")
    quantized = ExpertLayout(layout.activation, layout.gated, layout.interleaved, False, layout.has_bias,
                             ExpertQuantization(CODE_BITS[up_pool.dtype], hidden.dtype))
    try:
        LayerSpec(quantized, up_pool, down_pool, up_bias_pool, down_bias_pool, up_scales_pool, down_scales_pool,
                  name="gpu_experts pool")
    except ValueError as err:
        raise ValueError(f"{NAME}: {err}") from None
    pools = {"up_pool": up_pool, "down_pool": down_pool, "up_bias_pool": up_bias_pool,
             "down_bias_pool": down_bias_pool, "up_scales_pool": up_scales_pool, "down_scales_pool": down_scales_pool}
    for name, pool in pools.items():
        if pool is not None and not pool.is_contiguous():
            raise ValueError(f"{NAME}: {name} must be contiguous (the kernels address slots by fixed strides)")
    tensors = (hidden, topk_ids, topk_weights, slot_of_expert, *pools.values())
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{NAME}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if hidden.dim() != 2 or hidden.shape[1] != down_pool.shape[1] or topk_ids.dim() != 2 \
            or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"{NAME}: hidden [T, {down_pool.shape[1]}] and topk_ids, topk_weights [T, K] expected, got "
                         f"{_shape(hidden)}, {_shape(topk_ids)}, {_shape(topk_weights)}")
    if slot_of_expert.dim() != 1 or slot_of_expert.dtype != torch.int32:
        raise TypeError(f"{NAME}: slot_of_expert must be a 1-D int32 [E] tensor, got "
                        f"{slot_of_expert.dtype} {_shape(slot_of_expert)}")
    return quantized


def check_values(topk_ids: torch.Tensor, slot_of_expert: torch.Tensor, num_slots: int) -> None:
    """Ids in [0, E) and slots in [-1, S): one host sync for all four bounds."""
    E = slot_of_expert.numel()
    bounds = []
    for t in (topk_ids, slot_of_expert):
        bounds += [t.min(), t.max()] if t.numel() else [torch.zeros((), dtype=t.dtype, device=t.device)] * 2
    id_low, id_high, slot_low, slot_high = torch.stack([b.long() for b in bounds]).tolist()
    if topk_ids.numel() and (id_low < 0 or id_high >= E):
        bad = id_low if id_low < 0 else id_high
        raise IndexError(f"{NAME}: expert id {bad} out of range for slot_of_expert with {E} experts")
    if E and (slot_low < -1 or slot_high >= num_slots):
        bad = slot_low if slot_low < -1 else slot_high
        raise IndexError(f"{NAME}: slot {bad} in slot_of_expert is out of range for a pool of {num_slots} slots "
                         f"(valid: -1 for 'not here', or 0..{num_slots - 1})")


@torch.library.register_fake(NAME)
def _gpu_experts_fake(hidden, topk_ids, topk_weights, up_pool, down_pool, up_bias_pool, down_bias_pool,
                      slot_of_expert, gated, interleaved, transposed, activation, alpha, limit,
                      up_scales_pool=None, down_scales_pool=None):
    check_shapes(hidden, topk_ids, topk_weights, up_pool, down_pool, up_bias_pool, down_bias_pool,
                 slot_of_expert, gated, interleaved, transposed, activation, alpha, limit, up_scales_pool,
                 down_scales_pool)
    T, K = topk_ids.shape
    return hidden.new_empty(T, K, hidden.shape[1], dtype=torch.float32)


def gpu_experts_reference(hidden, topk_ids, topk_weights, up_pool, down_pool, up_bias_pool, down_bias_pool,
                          slot_of_expert, gated, interleaved, transposed, activation, alpha, limit,
                          up_scales_pool=None, down_scales_pool=None):
    """The fp32 reference on the slot table: the CPU kernel, and CUDA's fallback without triton."""
    layout = check_shapes(hidden, topk_ids, topk_weights, up_pool, down_pool, up_bias_pool, down_bias_pool,
                          slot_of_expert, gated, interleaved, transposed, activation, alpha, limit, up_scales_pool,
                          down_scales_pool)
    check_values(topk_ids, slot_of_expert, up_pool.shape[0])
    T, K = topk_ids.shape
    out = torch.zeros(T * K, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    if T * K == 0:
        return out.view(T, K, hidden.shape[1])
    # The pools as a LayerSpec whose "experts" are slots, so the oracle's own expert_forward does the math.
    pool_spec = LayerSpec(layout, up_pool, down_pool, up_bias_pool, down_bias_pool, up_scales_pool,
                          down_scales_pool, name="gpu_experts pool")
    flat_ids = topk_ids.reshape(-1).long()
    flat_weights = topk_weights.reshape(-1).float()
    slots = slot_of_expert.long()[flat_ids]
    for expert in torch.unique(flat_ids[slots >= 0]).tolist():  # ascending expert order
        rows = (flat_ids == expert).nonzero().squeeze(1)
        slot = int(slot_of_expert[expert])
        x = hidden[rows // K].float()
        out[rows] = expert_forward(pool_spec, slot, x) * flat_weights[rows, None]
    return out.view(T, K, hidden.shape[1])


@functools.cache
def _triton_launcher():
    """`run_gpu_experts`, or None where triton is missing (then CUDA runs the reference, with a warning)."""
    try:
        from .triton_experts import run_gpu_experts
    except ImportError as err:
        _log.warning("dali::gpu_experts: triton is unavailable (%s); CUDA experts run the slow fp32 reference", err)
        return None
    return run_gpu_experts


def gpu_experts_cuda(hidden, topk_ids, topk_weights, up_pool, down_pool, up_bias_pool, down_bias_pool,
                     slot_of_expert, gated, interleaved, transposed, activation, alpha, limit,
                     up_scales_pool=None, down_scales_pool=None):
    """The CUDA kernel: checks, then the Triton launcher (the reference where triton or the dtype is missing)."""
    args = (hidden, topk_ids, topk_weights, up_pool, down_pool, up_bias_pool, down_bias_pool,
            slot_of_expert, gated, interleaved, transposed, activation, alpha, limit, up_scales_pool, down_scales_pool)
    launcher = _triton_launcher() if hidden.dtype in KERNEL_DTYPES else None
    if launcher is None:
        return gpu_experts_reference(*args)
    check_shapes(*args)
    # The value checks read bounds back to the host, which a CUDA graph capture forbids: captured
    # replays rely on the checks of the eager warm-up runs.
    if not (hidden.is_cuda and torch.cuda.is_current_stream_capturing()):
        check_values(topk_ids, slot_of_expert, up_pool.shape[0])
    return launcher(*args)


torch.library.register_kernel(NAME, "cpu", gpu_experts_reference)
torch.library.register_kernel(NAME, "cuda", gpu_experts_cuda)


def gpu_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    up_pool: torch.Tensor,
    down_pool: torch.Tensor,
    up_bias_pool: torch.Tensor | None,
    down_bias_pool: torch.Tensor | None,
    slot_of_expert: torch.Tensor,
    layout: ExpertLayout,
    up_scales_pool: torch.Tensor | None = None,
    down_scales_pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """Typed wrapper: the flags come from an ExpertLayout.

    hidden [T, H]; topk_ids [T, K] int32/int64 in [0, E); topk_weights [T, K] floating; pools in hidden's
    dtype, contiguous: up [S, X, H] (transposed [S, H, X]), down [S, H, I] (transposed [S, I, H]),
    biases [S, X] and [S, H] or both None; slot_of_expert [E] int32 in [-1, S); quantized layouts: the pools
    hold codes and up_scales_pool / down_scales_pool their scales (module docstring). Returns [T, K, H] fp32.
    """
    act = layout.activation
    return torch.ops.dali.gpu_experts(
        hidden, topk_ids, topk_weights, up_pool, down_pool, up_bias_pool, down_bias_pool, slot_of_expert,
        layout.gated, layout.interleaved, layout.transposed, act.name,
        act.alpha if act.alpha is not None else 0.0, act.limit if act.limit is not None else 0.0,
        up_scales_pool, down_scales_pool,
    )
