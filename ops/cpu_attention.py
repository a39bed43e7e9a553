"""`dali::cpu_attention`: attention over a KV cache without a mask, on the CPU runtime (a decode step's).

# B batch, Hq query heads, Hk key/value heads (Hq a multiple of Hk), L query rows, S positions, D head dim

    cpu_attention(q[B, Hq, L, D], k[B, Hk, S, D], v[B, Hk, S, D], mask?[B|1, 1, L|1, S], scale) -> [B, Hq, L, D]

    out[b, h, l] = softmax(scale * q[b, h, l] . k[b, g] over the positions mask[b, 0, l] sees) @ v[b, g]
    g = h // (Hq // Hk); fp32 throughout, rounded once to q's dtype; a row that sees no position gives zeros

What `scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)` gives with a boolean
mask shared by the heads (or none), no dropout and is_causal=False: a decode step's new token over its cache
(a static cache's mask hides the unfilled positions; chunks of positions no row sees are never read). q, k and
v share one dtype (float32, bfloat16 or float16) and live on the CPU; k and v are read in place (unit stride
within a position's row). ATen's
16-bit attention at decode goes through a 16-bit GEMV that a CPU without native 16-bit dot products runs at a
fraction of its bandwidth (`benchmarks/bench_decode.py`); the kernel reads each cached key and value once,
widened to fp32 in registers. The `replace_decode_attention` pass puts it in place of such attention calls.

The schema is declared here and only here; the CPU kernel is C++ (`csrc/binding/attention_ops.cpp`),
registered when `dali_compile.runtime.cpu_extension` loads the library. The CompositeExplicitAutograd kernel
below loads it on first use and otherwise runs the PyTorch reference, also the test oracle. An inference op:
no autograd formula (the pass leaves graphs that need gradients alone).
"""

from __future__ import annotations

import torch

from dali_compile.runtime import cpu_extension

from .library import define_op

NAME = "dali::cpu_attention"
define_op(NAME, "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """The checks that need no data: shared by the fake kernel and the reference (C++ has its own). The number
    of positions may be symbolic in a graph traced with dynamic shapes: it is checked without a guard."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{NAME}: q, k and v must be 4-D [B, H, rows, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"{NAME}: q must be float32, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{NAME}: q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    devices = {t.device.type for t in (q, k, v)}
    if devices != {"cpu"}:
        raise ValueError(f"{NAME}: q, k and v must be CPU tensors, got {sorted(devices)}")
    kv_shapes = f"{NAME}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    if (k.shape[0], k.shape[1], k.shape[3]) != (v.shape[0], v.shape[1], v.shape[3]):
        raise ValueError(kv_shapes)
    _require_same_positions(k.shape[2], v.shape[2], kv_shapes)
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{NAME}: q {tuple(q.shape)} does not match the batch and head dim of k {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{NAME}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if isinstance(k.shape[2], int) and k.shape[2] == 0:
        raise ValueError(f"{NAME}: no cached position (k and v have 0 rows)")
    if mask is not None:
        _check_mask(q, k, mask)


def _check_mask(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"{NAME}: mask must be bool (True: the position is seen), got {mask.dtype}")
    if mask.device.type != "cpu":
        raise ValueError(f"{NAME}: mask must be a CPU tensor, got {mask.device}")
    expected = f"[B or 1, 1, L or 1, S] = [{q.shape[0]}, 1, {q.shape[2]}, {k.shape[2]}]"
    if mask.dim() != 4 or mask.shape[0] not in (1, q.shape[0]) or mask.shape[1] != 1 or mask.shape[2] not in (
            1, q.shape[2]):
        raise ValueError(f"{NAME}: mask must be {expected}, got {tuple(mask.shape)}")
    _require_same_positions(mask.shape[3], k.shape[2], f"{NAME}: mask must be {expected}, got {tuple(mask.shape)}")


def _require_same_positions(a, b, message: str) -> None:
    """a == b for two numbers of positions: a ValueError for plain ints; in a graph traced with dynamic shapes
    (symbolic sizes) a deferred runtime check, so no guard is added."""
    if isinstance(a, int) and isinstance(b, int):
        if a != b:
            raise ValueError(message)
        return
    torch._check(a == b, lambda: message)


@torch.library.register_fake(NAME)
def _cpu_attention_fake(q, k, v, mask, scale):
    check_args(q, k, v, mask)
    return q.new_empty(q.shape)  # contiguous, as the kernel's


def cpu_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            scale: float) -> torch.Tensor:
    """The op in plain PyTorch, in fp32: oracle and fallback."""
    check_args(q, k, v, mask)
    group = q.shape[1] // k.shape[1]
    keys, values = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.float() * scale) @ keys.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probabilities = scores.softmax(dim=-1).nan_to_num(0.0)  # a row that sees nothing: zeros
    return (probabilities @ values).to(q.dtype).contiguous()


def _cpu_attention_composite(q, k, v, mask, scale):
    # Loading the library registers the C++ kernel for the CPU key, so re-dispatching reaches it, not this.
    if cpu_extension.cpu_extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(NAME, "CPU"):
        return torch.ops.dali.cpu_attention.default(q, k, v, mask, scale)
    return cpu_attention_reference(q, k, v, mask, scale)


# A kernel registered directly for CPU (the C++ one, once loaded) takes precedence over this.
torch.library.impl(NAME, "CompositeExplicitAutograd")(_cpu_attention_composite)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring; scale defaults to 1 / sqrt(D), as scaled_dot_product_attention's."""
    return torch.ops.dali.cpu_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else float(scale))
