"""Replace every CPU `linear` of the graph by `dali::cpu_linear`: the step's dense matmuls on our runtime.

Before (attention projections, routers, shared experts, dense MLPs, lm_head):

    q = torch._C._nn.linear(x, q_proj_weight, q_proj_bias)      # ATen: MKL/oneDNN on its OpenMP threads

After:

    q = torch.ops.dali.cpu_linear.default(x, q_proj_weight, q_proj_bias)

At decode these matmuls are weight-bound; our kernel reads each weight byte once on the runtime's
pool, the pool that also runs the experts, so one set of threads serves the whole step instead of
our pool and ATen's OpenMP threads taking turns on the cores. The op itself sends prefill-sized
calls (from `cpu_extension.get_linear_gemm_min_rows()` rows on) to ATen's fp32 GEMM, so the pass
needs no row count and holds for dynamic shapes too.

Fires only where the kernel reads the weight in place and gives what linear gives: x, weight and
bias on the CPU, one dtype among float32/bfloat16/float16, a 2-D weight with unit stride in its
last dimension. CUDA graphs, quantized or mixed-dtype linears are left as they are, and so is a
graph that runs under CPU autocast (autocast recasts linear's operands at dispatch, and a custom op
would escape that: dynamo guards on the autocast state, so a later call without it recompiles). The
op has an autograd formula, so a graph traced with gradients enabled stays differentiable.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

import dali_compile.ops  # noqa: F401  (defines dali::cpu_linear)
from dali_compile.ops.cpu_linear import DTYPES

from .context import PassContext
from .find_moe_regions import example_value
from .graph_edits import recompile_if_edited, substitute_call

log = logging.getLogger(__name__)

_LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)
_AUTOCAST_ENTRIES = (torch.amp.autocast_mode._enter_autocast,)


def replace_cpu_linears(gm: GraphModule, ctx: PassContext) -> GraphModule:
    if not ctx.config.cpu_linears or uses_autocast(gm):
        return gm
    for node in list(gm.graph.nodes):
        operands = _linear_operands(node)
        if operands is None or not _runs_in_place(*operands):
            continue
        substitute_call(node, torch.ops.dali.cpu_linear.default, operands)
        ctx.report.cpu_linears += 1
    recompile_if_edited(gm, ctx.report.cpu_linears)
    log.info("replace_cpu_linears: %d linear(s) -> dali::cpu_linear", ctx.report.cpu_linears)
    return gm


def uses_autocast(gm: GraphModule) -> bool:
    """CPU autocast around the call, or an autocast region traced inside the graph."""
    if torch.is_autocast_enabled("cpu"):
        return True
    return any(n.op == "call_function" and n.target in _AUTOCAST_ENTRIES for n in gm.graph.nodes)


def _linear_operands(node: Node) -> tuple | None:
    """(x, weight, bias) of a linear call, or None for any other node."""
    if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
        return None
    names = ("input", "weight", "bias")
    args = list(node.args) + [node.kwargs.get(name) for name in names[len(node.args):]]
    if len(args) != 3 or args[1] is None or set(node.kwargs) - set(names):
        return None
    return tuple(args)


def _runs_in_place(x, weight, bias) -> bool:
    values = [example_value(n) if isinstance(n, Node) else n for n in (x, weight, bias)]
    x_value, w_value, b_value = values
    tensors = [v for v in values if v is not None]
    if not all(isinstance(v, torch.Tensor) for v in tensors) or (bias is not None and b_value is None):
        return False
    if any(v.device.type != "cpu" or v.dtype != w_value.dtype for v in tensors) or w_value.dtype not in DTYPES:
        return False
    if w_value.dim() != 2 or x_value.dim() < 1 or (b_value is not None and b_value.dim() != 1):
        return False
    # The kernel reads rows in place: unit stride within a row (a transposed view would need a copy).
    return w_value.shape[1] <= 1 or w_value.stride(1) == 1
