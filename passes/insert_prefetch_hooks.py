"""Insert `dali::prefetch_next` where each offloaded MoE layer's gate input is computed.

For every `dali::moe_hybrid` call of a layer whose hybrid runtime prefetches (and that has a next
MoE layer), a `dali::prefetch_next(gate_input, layer)` call goes right after the node producing the
layer's hidden states, which is the router's input: the prediction of layer l+1's experts and their
copies then start before layer l's router and experts run, instead of at its experts call (the
runtime's fallback). The hook returns nothing and changes no tensor.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule

import dali_compile.ops  # noqa: F401  (defines dali::prefetch_next)

from .context import PassContext

log = logging.getLogger(__name__)

_MOE_TARGETS = (torch.ops.dali.moe_hybrid, torch.ops.dali.moe_hybrid.default)


def insert_prefetch_hooks(gm: GraphModule, ctx: PassContext) -> GraphModule:
    graph = gm.graph
    first_compute = next((n for n in graph.nodes if n.op != "placeholder"), None)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _MOE_TARGETS or len(node.args) < 4:
            continue
        gate_input, layer = node.args[0], node.args[3]
        hybrid = ctx.registry.attached(layer) if isinstance(layer, int) else None
        runtime = getattr(hybrid, "runtime", None)  # a HybridLayer; other attached layers (distributed) have none
        if runtime is None or not runtime.prefetching or hybrid.index + 1 >= len(runtime.layers):
            continue
        # Right after the gate input exists; graph inputs come first, so a hook on one goes before any compute.
        anchor = ("before", first_compute) if gate_input.op == "placeholder" else ("after", gate_input)
        with graph.inserting_before(anchor[1]) if anchor[0] == "before" else graph.inserting_after(anchor[1]):
            graph.call_function(torch.ops.dali.prefetch_next.default, (gate_input, layer))
        ctx.report.prefetch_hooks.append(layer)
    if ctx.report.prefetch_hooks:
        graph.lint()
        gm.recompile()
        log.info("dali: prefetch hooks after the gate inputs of layers %s", ctx.report.prefetch_hooks)
    return gm
