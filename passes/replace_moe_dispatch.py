"""Replace each MoE experts region by one `dali::moe_hybrid` call.

Before (transformers' grouped_mm experts, one layer):

    ids, w = router(x)                       # stays
    sort(ids) -> perm, histc -> offsets      # \\
    grouped_mm(x[perm // K], gate_up)        #  |  region under "...mlp.experts"
    act(gate) * up; grouped_mm(., down)      #  |
    (* w)[inv_perm].view(T, K, H).sum(1)     # /
    y = ... + shared_experts(x)              # stays

After:

    ids, w = router(x)
    out = torch.ops.dali.moe_hybrid(x, ids, w, layer)   # layer: registry handle
    y = ... + shared_experts(x)

Only the region's own nodes are erased, newest first and only once unused: no
graph-wide dead-code elimination, which would delete in-place ops outside the
region (DeepSeek's router `scatter_`). SymInt nodes are never part of a region,
so size arithmetic that dynamo shares across layers survives.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule

from dali_compile.report import RefusedLayer, RewrittenLayer
from dali_compile.runtime.layer_spec import LayerSpec

from .context import PassContext, WeightBinding
from .find_moe_regions import MoeRegion, find_moe_regions
from .infer_expert_layout import infer_expert_layout, region_signature

logger = logging.getLogger("dali_compile.passes")


def replace_moe_dispatch(gm: GraphModule, ctx: PassContext) -> GraphModule:
    regions, refused = find_moe_regions(gm, ctx.example_inputs)
    for r in refused:
        ctx.report.refused.append(RefusedLayer(r.scope, r.reason, r.graph_broken))
    for region in regions:
        result = _layout_of(gm, region, ctx)
        if isinstance(result, str):
            ctx.report.refused.append(RefusedLayer(region.scope, result))
            continue
        layout, up, down, up_bias, down_bias = result
        spec = LayerSpec(layout, up, down, up_bias, down_bias, name=region.scope)
        if not ctx.config.rewrite:
            continue
        handle = ctx.registry.register(spec, weak=True)  # the model owns its experts
        _rewrite(gm, region, handle)
        ctx.bindings.append(_binding(region, handle, spec))
        ctx.report.rewritten.append(
            RewrittenLayer(region.scope, handle, spec.num_experts, spec.hidden_size, spec.intermediate_size,
                           layout.describe())
        )
    gm.graph.lint()
    gm.recompile()
    logger.info("replace_moe_dispatch: %d region(s) rewritten, %d refused",
                len(ctx.report.rewritten), len(ctx.report.refused))
    return gm


def _layout_of(gm: GraphModule, region: MoeRegion, ctx: PassContext):
    """Probe once per distinct region code; layers built from the same code share the answer."""
    signature = region_signature(region)
    known = ctx.layout_cache.get(signature)
    if known is not None:
        layout, roles = known
        return (layout, *_tensors_by_role(region, roles))
    result = infer_expert_layout(gm, region)
    if not isinstance(result, str):
        ctx.layout_cache[signature] = (result[0], _roles(region, result[1:]))
    return result


def _roles(region: MoeRegion, tensors) -> tuple:
    """Which of the region's weight/bias inputs (by first-use position) plays up, down, up_bias, down_bias."""
    candidates = region.weights + region.biases
    return tuple(
        None if t is None else next(i for i, w in enumerate(candidates) if w.value is t) for t in tensors
    )


def _tensors_by_role(region: MoeRegion, roles) -> list:
    candidates = region.weights + region.biases
    return [None if i is None else candidates[i].value for i in roles]


def _binding(region: MoeRegion, handle: int, spec: LayerSpec) -> WeightBinding:
    by_tensor = {id(w.value): w.input_index for w in region.owned}
    indices = tuple(None if t is None else by_tensor[id(t)] for t in spec.tensors())
    return WeightBinding(handle, indices, spec.layout, spec.name)


def _rewrite(gm: GraphModule, region: MoeRegion, handle: int) -> None:
    graph = gm.graph
    with graph.inserting_after(region.output):
        call = graph.call_function(
            torch.ops.dali.moe_hybrid.default, (region.hidden, region.topk_ids, region.topk_weights, handle)
        )
    call.meta.update({k: v for k, v in region.output.meta.items() if k in ("example_value", "val", "nn_module_stack",
                                                                            "stack_trace", "source_fn_stack")})
    region.output.replace_all_uses_with(call)
    for node in reversed(region.nodes):
        if not node.users:
            graph.erase_node(node)
