"""Replace the CPU attention of a decode step by `dali::cpu_attention`: the KV cache read once, in place.

Before (transformers' sdpa attention at decode: one new token per sequence; a static cache adds a boolean
mask [B, 1, 1, S] hiding its unfilled positions):

    out = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=s,
                                                    is_causal=False, enable_gqa=True)

After:

    out = torch.ops.dali.cpu_attention.default(q, k, v, mask, s)

ATen's 16-bit CPU attention runs a decode step's q.K and p.V through a 16-bit GEMV that a CPU without native
16-bit dot products runs slowly: measured on the 2-core development machine (bf16, head dim 128) 1.2-1.5 ms a
layer at 512 cached positions against 0.11-0.16 ms for the kernel, and 80-200 us against 28-35 us at 32
(`benchmarks/bench_decode.py` shows it in the whole step).

Fires only where the op gives exactly what the call gives: one query row (decode; prefill is causal and
compute-bound), no mask or a boolean one shared by the heads (4-D, [B or 1, 1, 1, S]), no dropout, is_causal
False, q/k/v on the CPU in one dtype among float32/bfloat16/float16, k and v of one shape, query heads a
multiple of key/value heads (grouped-query attention only with enable_gqa), no tensor that requires grad (the
op is inference-only; dynamo guards on grad mode, so a call with gradients recompiles and keeps ATen's
attention), and not under CPU autocast. CUDA graphs are left as they are.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

import dali_compile.ops  # noqa: F401  (defines dali::cpu_attention)
from dali_compile.ops.cpu_attention import DTYPES

from .context import PassContext
from .find_moe_regions import example_value
from .graph_edits import recompile_if_edited, substitute_call
from .replace_cpu_linears import uses_autocast

log = logging.getLogger(__name__)

_SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention,
                 torch.ops.aten.scaled_dot_product_attention.default)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def replace_decode_attention(gm: GraphModule, ctx: PassContext) -> GraphModule:
    if not ctx.config.cpu_attention or uses_autocast(gm):
        return gm
    for node in list(gm.graph.nodes):
        args = _sdpa_arguments(node)
        if args is None or not _runs_on_kernel(args):
            continue
        q, k, v = args["query"], args["key"], args["value"]
        scale = args["scale"] if args["scale"] is not None else example_value(q).shape[-1] ** -0.5
        substitute_call(node, torch.ops.dali.cpu_attention.default, (q, k, v, args["attn_mask"], float(scale)))
        ctx.report.cpu_attention += 1
    recompile_if_edited(gm, ctx.report.cpu_attention)
    log.info("replace_decode_attention: %d attention call(s) -> dali::cpu_attention", ctx.report.cpu_attention)
    return gm


def _sdpa_arguments(node: Node) -> dict | None:
    """The call's arguments by name (defaults filled in), or None for any other node."""
    if node.op != "call_function" or node.target not in _SDPA_TARGETS:
        return None
    if len(node.args) > len(_SDPA_ARGS) or set(node.kwargs) - set(_SDPA_ARGS):
        return None
    args = {**_SDPA_DEFAULTS, **dict(zip(_SDPA_ARGS, node.args, strict=False)), **node.kwargs}
    return args if all(name in args for name in _SDPA_ARGS[:3]) else None


def _mask_taken(mask, q: torch.Tensor) -> bool:
    """No mask, or a boolean one the op reads: [B or 1, 1, 1, S] (its S may be symbolic: not compared)."""
    if mask is None:
        return True
    value = example_value(mask) if isinstance(mask, Node) else None
    if not isinstance(value, torch.Tensor):
        return False
    if value.dtype != torch.bool or value.device.type != "cpu" or value.dim() != 4 or value.requires_grad:
        return False
    sizes = value.shape[:3]
    return all(isinstance(size, int) for size in sizes) and sizes[0] in (1, q.shape[0]) and sizes[1:] == (1, 1)


def _runs_on_kernel(args: dict) -> bool:
    if args["is_causal"] is not False or args["dropout_p"] not in (0, 0.0):
        return False
    if not (args["scale"] is None or isinstance(args["scale"], (int, float))) or isinstance(args["enable_gqa"], Node):
        return False
    values = [example_value(args[name]) if isinstance(args[name], Node) else None for name in ("query", "key", "value")]
    if not all(isinstance(t, torch.Tensor) for t in values):
        return False
    q, k, v = values
    if not _mask_taken(args["attn_mask"], q):
        return False
    if any(t.device.type != "cpu" or t.dtype != q.dtype or t.dim() != 4 or t.requires_grad for t in values):
        return False
    # Batch, heads and head dims are static in a decode graph; the number of cached positions may be
    # symbolic (a graph traced with dynamic shapes) and is never compared here: that would add a guard, and
    # scaled_dot_product_attention itself requires k and v to have as many positions as the op checks.
    static = [q.shape[0], q.shape[1], q.shape[2], q.shape[3], k.shape[0], k.shape[1], k.shape[3], *v.shape[:2],
              v.shape[3]]
    if not all(isinstance(size, int) for size in static) or q.dtype not in DTYPES or q.shape[2] != 1:
        return False
    if (k.shape[0], k.shape[1], k.shape[3]) != (v.shape[0], v.shape[1], v.shape[3]):
        return False
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return False
    return q.shape[1] == k.shape[1] or args["enable_gqa"] is True
