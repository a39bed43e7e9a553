"""The ordered list of graph passes the dali backend runs. Each is `(gm, ctx) -> gm`."""

from __future__ import annotations

from torch.fx import GraphModule

from .context import PassContext
from .insert_prefetch_hooks import insert_prefetch_hooks
from .replace_cpu_linears import replace_cpu_linears
from .replace_decode_attention import replace_decode_attention
from .replace_moe_dispatch import replace_moe_dispatch

# replace_moe_dispatch runs first: its layout probe executes the experts region as traced.
PASSES = (
    replace_moe_dispatch,
    insert_prefetch_hooks,
    replace_cpu_linears,
    replace_decode_attention,
)


def run_passes(gm: GraphModule, ctx: PassContext) -> GraphModule:
    for graph_pass in PASSES:
        gm = graph_pass(gm, ctx)
    return gm
